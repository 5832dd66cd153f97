"""AnomalyCLIP: object-agnostic prompt learning (Zhou et al., ICLR 2024).

Paper §3 and the released code (zqhang/AnomalyCLIP, layer-24 fix of 2025-04), reimplemented:

* **Object-agnostic prompts** (§3.2): ``g_n = [V]_1…[V]_E [object]`` and
  ``g_a = [W]_1…[W]_E [damaged][object]`` with E = 12 learnable word embeddings each
  (N(0, 0.02²) init); the class name is never used.
* **Deep text prompts** (§3.2, "textual space refinement"): depth 9, length 4 — 8 sets of 4
  learnable tokens that replace token positions 1–4 at the input of text blocks 2–9.
* **DPAM** (§3.3): V-V self-attention on a second path in visual blocks 6–24 (FFN skipped on
  that path); patch tokens from that path, global token from the original path.
* **Patch features from layer 24 only** — the released code's fixed behaviour (the
  ``[6, 12, 18, 24]`` of the paper was, through an aliasing bug, layer 24 four times;
  author, issue #82). ``feature_layers=[6, 12, 18, 24]`` selects the multi-layer variant.
* **Loss** (§3.4, "glocal context optimisation"): cross-entropy on the global logits +
  ``local_weight`` (4, released ``lam``) × Σ_layers [Focal(P) + Dice(P_a, M) + Dice(P_n, 1 − M)]
  on the softmax maps upsampled (bilinear) to the image size; logits are cos / 0.07.
* **Optimiser**: Adam, lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs, 518 px images.
* **Inference**: image score = softmax(cos(f, g)/0.07)[anomalous]; map = Σ_layers P_a,
  Gaussian σ = 4 px.

Our choices and deviations (also in ``docs/methods.md``):

* Layer numbers refer to ViT-L/14 (24 visual, 12 text blocks); on another backbone they are
  mapped proportionally, ``round_half_up(l · depth / 24)`` (text: ``/ 12``) — on the 4-block
  ``zsad-tiny``, DPAM from block 1, features from block 4, deep prompts in text blocks 2–3.
* The global embedding goes through ``ln_post`` before ``proj`` (the released code skips
  ``ln_post`` there, AnomalyCLIP issue #14 — a bug we do not copy).
* The image size is the protocol's (518 in ``full.toml``, 64 in the demo); σ is in pixels of
  the evaluated map.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Prediction, register
from methods.losses import segmentation_loss
from methods.prompt_learning import (
    DeepTextPrompts,
    PromptMethodBase,
    PromptTemplate,
    encode_text,
    gaussian_blur,
    init_context,
    similarity_map,
    two_class_logits,
)

ANOMALYCLIP_BIBTEX = """@inproceedings{zhou2024anomalyclip,
  title={AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection},
  author={Zhou, Qihang and Pang, Guansong and Tian, Yu and He, Shibo and Chen, Jiming},
  booktitle={International Conference on Learning Representations (ICLR)}, year={2024}}"""


class ObjectAgnosticPrompts(nn.Module):
    """Learnable (normal, anomalous) prompt contexts plus deep text tokens: the learnable state."""

    def __init__(self, width: int, n_ctx: int, deep_depth: int, deep_length: int) -> None:
        super().__init__()
        self.ctx_normal = init_context(n_ctx, width)
        self.ctx_anomalous = init_context(n_ctx, width)
        self.deep = DeepTextPrompts(deep_depth, deep_length, width)

    def contexts(self) -> torch.Tensor:
        return torch.stack([self.ctx_normal, self.ctx_anomalous])        # [2, n_ctx, W]


@register("anomalyclip")
class AnomalyCLIP(PromptMethodBase):
    """AnomalyCLIP: object-agnostic learnable prompts, deep text tokens, DPAM (ICLR 2024)."""

    paper = ("Zhou et al., AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly "
             "Detection, ICLR 2024")
    bibtex = ANOMALYCLIP_BIBTEX
    default_hparams: dict[str, Any] = {
        "epochs": 15,
        "lr": 1e-3,
        "betas": [0.5, 0.999],
        "batch_size": 8,                 # read by the runner from the protocol's [hparams]
        "n_ctx": 12,                     # E learnable word embeddings per prompt
        "normal_suffix": "object.",
        "anomalous_suffix": "damaged object.",
        "deep_depth": 9,                 # text blocks 2..9 of 12 get deep tokens
        "deep_length": 4,
        "dpam_start": 6,                 # of 24 visual blocks
        "feature_layers": [24],          # released code; [6, 12, 18, 24] = paper's variant
        "temperature": 0.07,
        "local_weight": 4.0,             # lam of the released train.py
        "focal_gamma": 2.0,
        "sigma": 4.0,                    # Gaussian smoothing of test maps, pixels
    }
    #: The released VisionTransformer.forward resizes the position grid bilinearly (no
    #: antialias) from 336 to 518 px; object-agnostic prompts use no class words.
    released_inputs = {"pos_embed_resize": "bilinear"}

    def __init__(self, backbone: Any, **hparams: Any) -> None:
        super().__init__(backbone, **hparams)
        hp = self.hparams
        self.template = PromptTemplate(backbone, [hp["normal_suffix"], hp["anomalous_suffix"]],
                                       hp["n_ctx"])
        self.head = ObjectAgnosticPrompts(backbone.text_width, hp["n_ctx"], self._deep_depth(),
                                          hp["deep_length"]).to(backbone.device)

    def text_features(self) -> torch.Tensor:
        """[2, D] raw text features of the (normal, anomalous) prompts."""
        emb = self.template.embed(self.head.contexts())
        return encode_text(self.backbone, emb, self.template.tokens, self.head.deep(),
                           self.head.deep.start)

    def _maps(self, patches: dict[int, torch.Tensor], text: torch.Tensor,
              size: tuple[int, int]) -> list[torch.Tensor]:
        g = (self.backbone.grid_size, self.backbone.grid_size)
        T = float(self.hparams["temperature"])
        return [similarity_map(two_class_logits(p, text, T), g, size) for p in patches.values()]

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        hp = self.hparams
        images = batch["image"].to(self.device)
        mask = batch["mask"].to(self.device)
        label = batch["label"].to(self.device).long()
        text = self.text_features()
        glob, patches = self.image_features(images)
        loss = F.cross_entropy(two_class_logits(glob, text, float(hp["temperature"])), label)
        local = sum(segmentation_loss(p, mask, gamma=float(hp["focal_gamma"]))
                    for p in self._maps(patches, text, tuple(images.shape[-2:])))
        return loss + float(hp["local_weight"]) * local

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> Prediction:
        images = batch["image"].to(self.device)
        text = self.text_features()
        glob, patches = self.image_features(images)
        scores = two_class_logits(glob, text, float(self.hparams["temperature"])).softmax(-1)[:, 1]
        maps = sum(p[:, 1] for p in self._maps(patches, text, tuple(images.shape[-2:])))
        return Prediction(scores, gaussian_blur(maps, float(self.hparams["sigma"])))
