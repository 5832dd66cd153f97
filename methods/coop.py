"""CoOp as the ZSAD papers run it (Zhou et al., IJCV 2022; AnomalyCLIP/TokenCLIP appendix B).

CoOp (Zhou et al. 2022, §3.2) replaces a hand-written template by M learnable context
vectors ``[V]_1 … [V]_M`` shared by all classes ("unified context", class token at the end),
trained with the cross-entropy of CLIP's image–text logits while CLIP stays frozen. The ZSAD
papers (AnomalyCLIP §4 / appendix; TokenCLIP appendix B; "following Zhou et al. 2024a")
turn the two anomaly classes into class-aware prompts by inserting the state word before
the class name:

    ``[V]_1 … [V]_M [normal] [cls].``     ``[V]_1 … [V]_M [anomalous] [cls].``

and adapt only the text side — no visual adaptation, no DPAM, no pixel-level loss. The image
score is the softmax probability of the anomalous prompt for the projected class token; the
anomaly map the same probability for every last-layer patch token (``ln_post`` + ``proj``),
upsampled bilinearly. This is why CoOp's pixel AUROC in those papers is so poor (MVTec AD
33.3 %): nothing trains the patch alignment.

Choices where the ZSAD papers are silent (hyperparameters; ``docs/methods.md``):

* ``n_ctx`` = 16 (CoOp's default M), initialised N(0, 0.02²), one context shared by the
  normal and the anomalous prompt (CoOp's unified context);
* the optimiser and schedule of the host protocol (AnomalyCLIP's: Adam, lr 1e-3, betas
  (0.5, 0.999), batch 8, 15 epochs) instead of CoOp's few-shot SGD schedule (lr 2e-3,
  cosine, 50–200 epochs) — the ZSAD papers train every baseline on the same auxiliary data;
* logits use CLIP's own learned temperature (CoOp), maps are smoothed with AnomalyCLIP's
  test-time Gaussian (σ = 4 px) like every method evaluated in its harness.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Prediction, register
from methods.prompt_learning import (
    PromptMethodBase,
    PromptTemplate,
    encode_text,
    gaussian_blur,
    init_context,
    similarity_map,
)


class CoOpContext(nn.Module):
    """The learnable state: one unified context [M, W]."""

    def __init__(self, n_ctx: int, width: int) -> None:
        super().__init__()
        self.ctx = init_context(n_ctx, width)


@register("coop")
class CoOp(PromptMethodBase):
    """CoOp (learnable context + state word + class name), text-only, as ZSAD papers run it."""

    paper = "Zhou et al., Learning to Prompt for Vision-Language Models, IJCV 2022"
    bibtex = """@article{zhou2022coop,
  title={Learning to Prompt for Vision-Language Models},
  author={Zhou, Kaiyang and Yang, Jingkang and Loy, Chen Change and Liu, Ziwei},
  journal={International Journal of Computer Vision}, volume={130}, number={9},
  pages={2337--2348}, year={2022}}"""
    default_hparams: dict[str, Any] = {
        "epochs": 15,
        "lr": 1e-3,
        "betas": [0.5, 0.999],
        "batch_size": 8,
        "n_ctx": 16,
        "normal_state": "normal",
        "anomalous_state": "anomalous",
        "temperature": None,             # None: CLIP's learned logit scale
        "sigma": 4.0,
        "feature_layers": [24],          # last block (proportionally mapped)
        "dpam_start": 0,                 # no visual adaptation
    }

    def __init__(self, backbone: Any, **hparams: Any) -> None:
        super().__init__(backbone, **hparams)
        self.head = CoOpContext(self.hparams["n_ctx"], backbone.text_width).to(backbone.device)
        self._templates: dict[str, PromptTemplate] = {}

    def _scale(self) -> float:
        t = self.hparams["temperature"]
        return float(self.backbone.logit_scale) if t is None else 1.0 / float(t)

    def text_features(self, objects: list[str]) -> torch.Tensor:
        """[len(objects), 2, D] normalised (normal, anomalous) features per object name."""
        hp = self.hparams
        out = []
        for obj in objects:
            if obj not in self._templates:
                self._templates[obj] = PromptTemplate(
                    self.backbone, [f"{hp['normal_state']} {obj}.", f"{hp['anomalous_state']} {obj}."],
                    hp["n_ctx"])
            t = self._templates[obj]
            out.append(encode_text(self.backbone, t.embed(self.head.ctx), t.tokens))
        return F.normalize(torch.stack(out), dim=-1)

    def _batch_text(self, batch: dict[str, Any]) -> torch.Tensor:
        names = list(batch["prompt_name"])
        uniq = list(dict.fromkeys(names))
        feats = self.text_features(uniq)
        return feats[[uniq.index(n) for n in names]]                    # [B, 2, D]

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        images = batch["image"].to(self.device)
        text = self._batch_text(batch)
        glob, _ = self.image_features(images)
        logits = self._scale() * torch.einsum("bd,bkd->bk", F.normalize(glob, dim=-1), text)
        return F.cross_entropy(logits, batch["label"].to(self.device).long())

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> Prediction:
        images = batch["image"].to(self.device)
        text = self._batch_text(batch)
        glob, patches = self.image_features(images)
        s = self._scale()
        scores = (s * torch.einsum("bd,bkd->bk", F.normalize(glob, dim=-1), text)).softmax(-1)[:, 1]
        g = (self.backbone.grid_size, self.backbone.grid_size)
        maps = 0
        for p in patches.values():
            logits = s * torch.einsum("bnd,bkd->bnk", F.normalize(p, dim=-1), text)
            maps = maps + similarity_map(logits, g, tuple(images.shape[-2:]))[:, 1]
        return Prediction(scores, gaussian_blur(maps, float(self.hparams["sigma"])))
