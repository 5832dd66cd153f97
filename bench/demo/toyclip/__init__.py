"""A tiny pretrained CLIP for the demo: corpus, training, checkpoint, evaluation.

No CLIP weights can be downloaded on the machines this project runs on, and a randomly
initialised backbone carries almost no transferable signal. This package pre-trains the
``zsad-tiny`` open_clip architecture (``bench/demo/model_configs/zsad-tiny.json``,
open_clip's own tokenizer) on a generated, captioned image corpus so that it learns a little
vision-language alignment of *normal* and *damaged* states::

    python -m bench.demo.toyclip --out zsad-tiny-toy.pt     # ~14 min on 2 CPU cores
    python -m bench.demo.toyclip --out /tmp/x.pt --eval     # + zero-shot figures on demo_target

The checkpoint is an ordinary open_clip state dict (fp16) that
``bench.backbone.load_clip("zsad-tiny", pretrained=checkpoint_path())`` loads like real
weights. :func:`checkpoint_path` returns the copy shipped in ``bench/demo/`` (or builds
one into a cache folder on first use).

Corpus (:func:`build_corpus`, deterministic from its seed): procedural images (stripes,
grids, checkerboards, dots, noise, blobs, gradients, waves, rings, simple shapes, in
named colours) and crops of the photos and textures bundled with scikit-image, *except*
those the demo target dataset is made of (:data:`HELD_OUT_SOURCES`). Each base image
appears clean and with one or two synthetic defects (:mod:`bench.demo.synthetic`) with exact
masks; captions name the object or texture, the colour and the state.

Training (:func:`train`): CLIP's contrastive loss on (image, caption) pairs, where every
clean image and its defective twin are in the same batch, plus state alignment with the
two state prompts ("a photo of a flawless <object>." vs "a photo of a damaged <object>.")
at image level (the projected class token), and, at patch level, the local state
(supervised by the masks) of every last-layer patch token read out through ``ln_post`` +
``proj`` (exactly as :meth:`bench.backbone.ClipBackbone.project_tokens` does) against
two *free* state vectors, not against the prompts: as in OpenAI's CLIP, the patches carry
the state but are not aligned with text, which is what trained ZSAD methods learn
(recipe ``free-patches``, the default; ``aligned-patches`` is the earlier recipe that also
aligned the patches with the prompts, :data:`RECIPES`).
Object words are sometimes replaced by tokens the model has never seen, so that prompts
about unseen objects still carry the state. Bit-reproducible on the same machine and
software: fixed seeds, deterministic algorithms, a fixed thread count, and a checkpoint
file written byte-for-byte deterministically.

The token-embedding rows of words that never occur in the corpus or the prompts are
exactly zero (an "unknown word" embedding); the checkpoint is stored as a
deflate-compressed torch zip, which ``torch.load`` reads directly, so it stays small.

Modules: :mod:`~bench.demo.toyclip.words` (templates, states, vocabulary, tokens),
:mod:`~bench.demo.toyclip.corpus`, :mod:`~bench.demo.toyclip.training` (configuration,
recipes, the compact text tower, the loop), :mod:`~bench.demo.toyclip.checkpoint`,
:mod:`~bench.demo.toyclip.evaluation` and :mod:`~bench.demo.toyclip.cli`; this package
re-exports their names. ``bench.toyclip`` is a compatibility alias of this package.
"""

from __future__ import annotations

import os

# Under CPU contention (shared 2-core machines) OpenMP's spin-waiting makes torch several
# times slower; a passive wait policy does not change any result. Effective only when this
# package is imported before torch (as with `python -m bench.demo.toyclip`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.demo.toyclip.arch import ARCH, IMAGE_SIZE
from bench.demo.toyclip.checkpoint import (
    CHECKPOINT_NAME,
    CHECKPOINT_SHA256,
    SHIPPED_CHECKPOINT,
    cache_dir,
    checkpoint_path,
    file_sha256,
    save_checkpoint,
    state_dict_fp16,
)
from bench.demo.toyclip.cli import main
from bench.demo.toyclip.corpus import Corpus, build_corpus, corpus_digest
from bench.demo.toyclip.corpus import _load_skimage as _load_skimage
from bench.demo.toyclip.evaluation import ENSEMBLE_PROMPTS, PAIR_PROMPTS, evaluate, zero_shot
from bench.demo.toyclip.training import RECIPE_SHA256, RECIPES, TrainConfig, to_tensor, train
from bench.demo.toyclip.training import _CompactText as _CompactText
from bench.demo.toyclip.training import _new_model as _new_model
from bench.demo.toyclip.training import _pad as _pad
from bench.demo.toyclip.training import _prompt_pair as _prompt_pair
from bench.demo.toyclip.words import (
    ANOMALOUS_STATES,
    COLOURS,
    CORPUS_SOURCES,
    DEFECT_WORDS,
    HELD_OUT_SOURCES,
    NORMAL_STATES,
    PROCEDURAL,
    TEMPLATES,
    known_token_ids,
    tokenizer,
)
from bench.demo.toyclip.words import _Vocab as _Vocab

# the private names above (`x as x`, explicit re-exports) are those tests/test_toyclip.py uses
__all__ = [
    "ANOMALOUS_STATES", "ARCH", "CHECKPOINT_NAME", "CHECKPOINT_SHA256", "COLOURS",
    "CORPUS_SOURCES", "DEFECT_WORDS", "ENSEMBLE_PROMPTS", "HELD_OUT_SOURCES", "IMAGE_SIZE",
    "NORMAL_STATES", "PAIR_PROMPTS", "PROCEDURAL", "RECIPES", "RECIPE_SHA256",
    "SHIPPED_CHECKPOINT", "TEMPLATES", "Corpus", "TrainConfig", "build_corpus", "cache_dir",
    "checkpoint_path", "corpus_digest", "evaluate", "file_sha256", "known_token_ids", "main",
    "save_checkpoint", "state_dict_fp16", "to_tensor", "tokenizer", "train", "zero_shot",
]
