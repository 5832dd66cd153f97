"""Zero-shot evaluation of the toy CLIP through the backbone API (vanilla CLIP's two-way
softmax against normal/anomalous prompts): :func:`zero_shot`, and :func:`evaluate` on a
demo dataset."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.demo.toyclip.words import _article

# -- evaluation --------------------------------------------------------------------------

#: The issue's acceptance ensemble: "flawless/normal" vs "damaged/abnormal" states in CLIP
#: templates (``{}`` = the object words).
_EVAL_TEMPLATES = (
    "a photo of a {}.", "a cropped photo of the {}.", "a close-up photo of a {}.",
    "a bright photo of a {}.", "a dark photo of the {}.", "a blurry photo of the {}.",
    "a photo of the small {}.", "a photo of the large {}.", "this is a photo of a {}.",
    "there is a {} in the scene.",
)
ENSEMBLE_PROMPTS = (
    tuple(_article(t.format(s)) for t in _EVAL_TEMPLATES
          for s in ("{}", "flawless {}", "perfect {}", "unblemished {}", "normal {}", "good {}")),
    tuple(_article(t.format(s)) for t in _EVAL_TEMPLATES
          for s in ("damaged {}", "broken {}", "defective {}", "flawed {}", "abnormal {}",
                    "{} with defect")),
)
#: Vanilla CLIP's two prompts as AnoCLIP states the baseline (the ``clip`` method's default).
PAIR_PROMPTS = (("a photo of a normal {}.",), ("a photo of an abnormal {}.",))


@torch.no_grad()
def zero_shot(bb, images: torch.Tensor, obj: str,
              prompts: tuple[Sequence[str], Sequence[str]] = ENSEMBLE_PROMPTS
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Vanilla CLIP zero-shot AD through the backbone API: image scores [B], maps [B, S, S].

    ``prompts`` = (normal, anomalous) sentences with a ``{}`` slot for ``obj``; each side is
    ensembled (mean of normalised embeddings, normalised). Image score: two-way softmax of
    the projected class token against the two prototypes; map: the same on every last-layer
    patch token read out through ``ln_post`` + ``proj``, upsampled bilinearly.
    """
    text = torch.stack([F.normalize(bb.encode_text([p.format(obj) for p in side]).mean(0), dim=-1)
                        for side in prompts])
    encode = getattr(bb, "encode_image_uncached", bb.encode_image)
    feats = encode(images.to(bb.device), layers=[bb.num_layers])
    scale = bb.logit_scale

    def two_way(f: torch.Tensor) -> torch.Tensor:
        return (scale * F.normalize(f, dim=-1) @ text.T).softmax(-1)[..., 1]

    scores = two_way(feats.global_embedding)
    patch = two_way(bb.project_tokens(feats.taps[bb.num_layers][:, 1:]))
    g = feats.grid
    maps = F.interpolate(patch.reshape(-1, 1, *g), size=images.shape[-2:], mode="bilinear",
                         align_corners=False)[:, 0]
    return scores, maps


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).ravel()
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores).ravel()))


def evaluate(bb, dataset: str = "demo_target", root: str | os.PathLike | None = None,
             prompts: tuple[Sequence[str], Sequence[str]] = ENSEMBLE_PROMPTS) -> dict:
    """Zero-shot image and pixel AUROC per category of a demo dataset (generated if needed)."""
    from bench.data import load_image, load_mask
    from bench.registry import get_adapter

    adapter = get_adapter(dataset)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(root) if root is not None else Path(tmp)
        if not adapter.detect(base):
            adapter.generate(base)
        df = adapter.scan(base)
        df = df[df["split"] == "test"]
        out: dict[str, dict[str, float]] = {}
        for cat, g in df.groupby("category", sort=True):
            x = torch.stack([load_image(base / p, bb.image_size) for p in g["image"]])
            m = torch.stack([load_mask(base / p, bb.image_size) if isinstance(p, str)
                             else torch.zeros(bb.image_size, bb.image_size) for p in g["mask"]])
            scores, maps = zero_shot(bb, x, adapter.prompt_name(cat), prompts)
            out[cat] = {"image_auroc": _auroc(g["label"].to_numpy(), scores.numpy()),
                        "pixel_auroc": _auroc(m.numpy() > 0.5, maps.numpy())}
    out["mean"] = {k: float(np.mean([v[k] for c, v in out.items()])) for k in ("image_auroc", "pixel_auroc")}
    return out


def _fmt(res: dict) -> str:
    return ", ".join(f"{c}: img {v['image_auroc']:.3f} px {v['pixel_auroc']:.3f}" for c, v in res.items())
