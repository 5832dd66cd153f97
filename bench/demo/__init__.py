"""The demo's own pieces, none of which the benchmark of real data needs.

* :mod:`bench.demo.toyclip` - the toy CLIP the demo runs on (corpus, training, checkpoint
  IO and :func:`~bench.demo.toyclip.checkpoint_path`, evaluation, ``python -m
  bench.demo.toyclip``);
* :mod:`bench.demo.synthetic` - the synthetic defect generators (the toy CLIP's corpus and
  the demo datasets of :mod:`dataset_adapters.demo`);
* ``model_configs/zsad-tiny.json`` - the toy CLIP's open_clip architecture (registered by
  :func:`bench.backbone.register_model_configs`);
* ``zsad-tiny-toy.pt`` - the shipped toy checkpoint.

Nothing is imported here: ``bench.demo.toyclip`` sets OpenMP's wait policy, which works only
when it is imported before torch.
"""
