"""Vanilla CLIP zero-shot anomaly detection — the baseline every ZSAD paper prints.

Image score: softmax over {normal, anomalous} prompt-ensemble text features of the
projected class token. Anomaly map: the same two-way softmax on every last-layer patch
token read out through CLIP's own ``ln_post`` + ``proj``, upsampled (bilinear) to the
input size. No training, no seed dependence.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from methods.base import Method, Prediction, register

#: A compact version of CLIP's ImageNet template set, as WinCLIP/AnomalyCLIP use for states.
TEMPLATES = (
    "a photo of a {}.", "a cropped photo of the {}.", "a close-up photo of a {}.",
    "a bright photo of a {}.", "a dark photo of the {}.", "a blurry photo of the {}.",
    "a photo of the small {}.", "a photo of the large {}.", "this is a photo of a {}.",
    "there is a {} in the scene.",
)
NORMAL_STATES = ("", "flawless", "perfect", "unblemished", "normal", "good")
ANOMALOUS_STATES = ("damaged", "broken", "defective", "flawed", "abnormal", "with defect")


def two_way_scores(features: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Probability of the anomalous class: softmax(scale * cos(features, [normal, anomalous]))[1].

    ``features`` [..., D] (any norm), ``text`` [2, D] or [B, 2, D] normalised.
    """
    f = F.normalize(features, dim=-1)
    if text.dim() == 2:
        logits = scale * f @ text.T
    else:  # per-sample text features: f [B, N, D] or [B, D]
        logits = scale * (torch.einsum("bnd,bkd->bnk", f, text) if f.dim() == 3
                          else torch.einsum("bd,bkd->bk", f, text))
    return logits.softmax(dim=-1)[..., 1]


@register("clip")
class CLIP(Method):
    """Vanilla CLIP zero-shot: prompt ensembles on the class token and last-layer patch tokens."""

    trains = False
    paper = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021"
    bibtex = """@inproceedings{radford2021clip,
  title={Learning Transferable Visual Models From Natural Language Supervision},
  author={Radford, Alec and Kim, Jong Wook and Hallacy, Chris and others},
  booktitle={ICML}, year={2021}}"""
    default_hparams: dict[str, Any] = {"class_aware": True}

    def __init__(self, backbone: Any, **hparams: Any) -> None:
        super().__init__(backbone, **hparams)
        self._text_cache: dict[str, torch.Tensor] = {}

    def text_features(self, obj: str) -> torch.Tensor:
        """[2, D] normalised (normal, anomalous) ensemble features for object words ``obj``."""
        obj = obj if self.hparams["class_aware"] else "object"
        if obj not in self._text_cache:
            self._text_cache[obj] = torch.stack([
                self.backbone.encode_prompt_ensemble(TEMPLATES, NORMAL_STATES, obj),
                self.backbone.encode_prompt_ensemble(TEMPLATES, ANOMALOUS_STATES, obj),
            ])
        return self._text_cache[obj]

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> Prediction:
        bb = self.backbone
        images = batch["image"].to(bb.device)
        text = torch.stack([self.text_features(o) for o in batch["prompt_name"]])  # [B, 2, D]
        feats = bb.encode_image(images, layers=[bb.num_layers])
        scale = bb.logit_scale
        image_scores = two_way_scores(feats.global_embedding, text, scale)
        patches = bb.project_tokens(feats.taps[bb.num_layers][:, 1:])  # [B, N, D]
        patch_scores = two_way_scores(patches, text, scale)
        g = feats.grid
        maps = patch_scores.reshape(-1, 1, *g)
        maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return Prediction(image_scores, maps[:, 0])
