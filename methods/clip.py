"""Vanilla CLIP zero-shot anomaly detection — the weak baseline every ZSAD paper prints.

As AnoCLIP states the baseline (Deng et al. 2023, §3.1): two prompts, "a photo of a normal
[class]" and "a photo of an abnormal [class]"; the image score is the softmax probability of
the abnormal prompt for the projected class token (Eq. 1), the anomaly map the same
probability for every last-layer patch token read out through CLIP's own ``ln_post`` +
``proj`` (Eq. 2), reorganised on the patch grid and upsampled (bilinear) to the input size.
Logits use CLIP's learned temperature (Radford et al. 2021). No training, no seed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bench.backbone import encode_prompts, ensemble_mean
from methods.base import Method, Prediction, register
from methods.prompts import CLIP_ANOMALOUS_PROMPTS, CLIP_NORMAL_PROMPTS


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


def upsample_map(patch_scores: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Patch scores [B, N] on a ``grid`` -> [B, *size] by bilinear upsampling."""
    maps = patch_scores.reshape(-1, 1, *grid)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]


@register("clip")
class CLIP(Method):
    """Vanilla CLIP zero-shot: normal/abnormal prompts on the class token and last-layer patch tokens."""

    trains = False
    paper = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021"
    bibtex = """@inproceedings{radford2021clip,
  title={Learning Transferable Visual Models From Natural Language Supervision},
  author={Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel and Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela and Clark, Jack and Krueger, Gretchen and Sutskever, Ilya},
  booktitle={International Conference on Machine Learning (ICML)},
  pages={8748--8763}, year={2021}}"""
    default_hparams: dict[str, Any] = {
        # prompt templates with one {} slot for the class words; several are ensembled
        # (normalised, averaged); the defaults are the two prompts of AnoCLIP §3.1
        "normal_prompts": list(CLIP_NORMAL_PROMPTS),
        "anomalous_prompts": list(CLIP_ANOMALOUS_PROMPTS),
        "class_aware": True,          # False: the word "object" instead of the class name
    }

    def __init__(self, backbone: Any, **hparams: Any) -> None:
        super().__init__(backbone, **hparams)
        self._text_cache: dict[str, torch.Tensor] = {}

    def text_features(self, obj: str) -> torch.Tensor:
        """[2, D] normalised (normal, anomalous) features for object words ``obj``."""
        obj = obj if self.hparams["class_aware"] else "object"
        if obj not in self._text_cache:
            feats = []
            for prompts in (self.hparams["normal_prompts"], self.hparams["anomalous_prompts"]):
                raw = encode_prompts(self.backbone, [p.format(obj) for p in prompts], normalize=False)
                feats.append(ensemble_mean(raw))
            self._text_cache[obj] = torch.stack(feats)
        return self._text_cache[obj]

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> Prediction:
        bb = self.backbone
        images = batch["image"].to(bb.device)
        text = torch.stack([self.text_features(o) for o in batch["prompt_name"]])  # [B, 2, D]
        feats = bb.encode_image(images, layers=[bb.num_layers])
        scale = bb.logit_scale
        image_scores = two_way_scores(feats.global_embedding, text, scale)       # Eq. (1)
        patches = bb.project_tokens(feats.taps[bb.num_layers][:, 1:])           # [B, N, D]
        patch_scores = two_way_scores(patches, text, scale)                     # Eq. (2)
        return Prediction(image_scores, upsample_map(patch_scores, feats.grid, images.shape[-2:]))
