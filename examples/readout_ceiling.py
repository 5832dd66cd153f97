"""How much local state can a linear read-out of a frozen backbone extract on one dataset?

A diagnostic, not a method: logistic-regression probes on patch tokens, trained with the
evaluated dataset's *own* masks (5 folds by image, each image scored by the probe that did not
see it), next to ``clip``'s zero-shot map on the same images. A zero-shot method that reads the
same tokens linearly (prompt learning, linear projections) has about the gap between the two
as room to beat ``clip``; on OpenAI's CLIP that gap is large (``clip`` ~20 pixel AUROC on MVTec
AD, trained linear projections ~90), on the toy demo backbone it is small
(docs/methods.md, "The trained methods on the demo").

    python examples/readout_ceiling.py --dataset demo_target
    python examples/readout_ceiling.py --dataset demo_aux_heldout --plugin examples/heldout_aux.py
    python examples/readout_ceiling.py --untrained coop,anomalyclip,tokenclip,mpa,vand,afclip

Probes: (1) the last block's patch tokens in the joint space (``ln_post`` + ``proj``, what
``clip`` and the prompt learners read), (2) the layer-normed tokens of every block,
concatenated (what VAND and AF-CLIP read). A patch is positive when its mask cover is >= 0.1.
Maps are upsampled bilinearly, as ``clip``'s; pixel AUROC is the mean over categories.
``--untrained`` adds trained methods as they are before ``fit`` (fresh prompts, projections or
adapters from ``--seed``, the protocol's hyperparameters): where training starts from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from bench import protocol
from bench.data import collate
from bench.registry import load_plugin
from bench.runner import load_backbone, open_dataset, seed_everything
from methods.base import METHODS


def cross_fitted_probe(x: np.ndarray, positive: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold probe logits [B, N] for tokens ``x`` [B, N, C] and labels [B, N]."""
    out = np.zeros(positive.shape)
    for k in np.unique(folds):
        tr, te = folds != k, folds == k
        clf = LogisticRegression(max_iter=2000, class_weight="balanced")
        clf.fit(x[tr].reshape(-1, x.shape[-1]), positive[tr].ravel())
        out[te] = clf.decision_function(x[te].reshape(-1, x.shape[-1])).reshape(out[te].shape)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", default="demo", help="protocol whose backbone is probed (default: demo)")
    p.add_argument("--dataset", default="demo_target", help="dataset whose test split is probed")
    p.add_argument("--data-root", default="data", help="folder holding <dataset>/ (demo data is generated)")
    p.add_argument("--plugin", action="append", default=[], help="plugin file registering the dataset")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--untrained", default="", metavar="M1,M2",
                   help="also score these trained methods before training (comma-separated)")
    p.add_argument("--seed", type=int, default=0, help="seed of the untrained methods' initialisation")
    args = p.parse_args(argv)
    for plugin in args.plugin:
        load_plugin(plugin)
    proto = protocol.load(args.protocol)
    handle = open_dataset(proto, args.dataset, Path(args.data_root))
    rows = handle.manifest[handle.manifest.split == "test"].reset_index(drop=True)
    bb = load_backbone(proto.backbone_for("clip"))
    ds = handle.torch_dataset(rows, bb.image_size)
    batch = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        clip_maps = METHODS.get("clip")(bb).predict(batch).anomaly_maps.numpy()
        feats = bb.encode_image(batch["image"], layers=list(range(1, bb.num_layers + 1)))
    g, size = bb.grid_size, bb.image_size
    joint = F.normalize(bb.project_tokens(feats.taps[bb.num_layers][:, 1:]), dim=-1).numpy()
    every = torch.cat([F.layer_norm(t[:, 1:], t.shape[-1:]) for t in feats.taps.values()], -1).numpy()
    positive = F.adaptive_avg_pool2d(batch["mask"][:, None].float(), g).flatten(1).numpy() >= 0.1
    folds = np.arange(len(rows)) % args.folds
    masks, cats = batch["mask"].numpy() > 0.5, np.asarray(batch["category"])

    def pixel_auroc(maps: np.ndarray) -> float:
        return float(np.mean([roc_auc_score(masks[cats == c].ravel(), maps[cats == c].ravel())
                              for c in np.unique(cats)]))

    def as_maps(logits: np.ndarray) -> np.ndarray:
        t = torch.tensor(logits, dtype=torch.float32).reshape(-1, 1, g, g)
        return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()

    print(f"{args.dataset}, {bb.describe()}, {len(rows)} test images, {g}x{g} tokens — pixel AUROC")
    print(f"  clip (zero-shot)                         {100 * pixel_auroc(clip_maps):.1f}")
    print(f"  probe, last block, joint space ({joint.shape[-1]}-d)   "
          f"{100 * pixel_auroc(as_maps(cross_fitted_probe(joint, positive, folds))):.1f}")
    print(f"  probe, every block ({every.shape[-1]}-d)             "
          f"{100 * pixel_auroc(as_maps(cross_fitted_probe(every, positive, folds))):.1f}")
    aux = proto.transfers[0].aux if proto.transfers else ""
    for name in filter(None, args.untrained.split(",")):
        seed_everything(args.seed)
        method = METHODS.get(name)(bb, **proto.hparams_for(name, aux))
        with torch.no_grad():
            maps = method.predict(batch).anomaly_maps.float().numpy()
        print(f"  {name}, untrained (seed {args.seed})".ljust(43) + f"{100 * pixel_auroc(maps):.1f}")


if __name__ == "__main__":
    main()
