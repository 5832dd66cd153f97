"""WinCLIP zero-shot (Jeong et al., CVPR 2023): compositional prompts and window re-encoding.

* **Text** (§4.1, compositional prompt ensemble): every template-level prompt × state-level
  prompt × class name, for the normal and the anomalous states; each class prototype is the
  mean of the L2-normalised prompt embeddings, normalised (CLIP's ensembling).
* **Image score** (§3, Eq. 1): ``softmax(<f, [g_n, g_a]> / τ)`` for the anomalous class on the
  projected class token of the whole image.
* **Map** (§4.2): the patch grid is covered by sliding windows of 2×2 and 3×3 patches,
  stride 1; each window keeps the class token and its own patch tokens (after the patch and
  position embeddings) and is re-encoded by the whole transformer into its own embedding
  (Fig. 3); every window gets the Eq. 1 score; each patch aggregates the scores of the windows
  that contain it by their harmonic mean (per scale); the image score (full-image scale) and
  the per-scale maps are fused by a per-patch harmonic mean, which is upsampled (bilinear) to
  the input size.

Where this follows the paper rather than anomalib's ``WinClipModel`` (each can be switched to
anomalib's behaviour; ``tests/test_winclip_anomalib.py`` does so and compares maps):

* prompt embeddings are L2-normalised before averaging (anomalib averages the raw embeddings)
  — ``normalize_prompts``;
* the template list has the paper's 22 distinct templates (anomalib has 21 entries that miss
  "a cropped photo of a {}." and "a jpeg corrupted photo of a {}." and list "a jpeg corrupted
  photo of the {}." twice) — ``templates``;
* class words come from the dataset adapter's prompt name (anomalib: the ``class_name``
  argument, ``"object"`` by default).

Unchanged from anomalib (and the paper): ViT-B-16-plus-240 at 240 px, τ = 0.07, scales (2, 3),
stride 1, harmonic aggregation, bilinear upsampling. On a grid smaller than a window (tiny
test backbones) the window is shrunk to the grid.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.backbone import (
    compose_prompts,
    encode_prompts,
    encode_windows,
    ensemble_mean,
    window_indices,
)
from methods.base import Method, Prediction, register
from methods.clip import upsample_map
from methods.prompts import WINCLIP_ANOMALOUS_STATES, WINCLIP_NORMAL_STATES, WINCLIP_TEMPLATES


def class_probability(features: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """WinCLIP Eq. (1): ``softmax(cos(f, [g_n, g_a]) / τ)[anomalous]``.

    ``features`` [B, ..., D] (any norm); ``text`` [B, 2, D] normalised prototypes.
    """
    f = torch.nn.functional.normalize(features, dim=-1)
    squeeze = f.dim() == 2
    f = f.unsqueeze(1) if squeeze else f
    logits = torch.einsum("bnd,bkd->bnk", f, text) / temperature
    p = logits.softmax(dim=-1)[..., 1]
    return p[:, 0] if squeeze else p


def harmonic_aggregation(window_scores: torch.Tensor, windows: torch.Tensor,
                         grid: tuple[int, int]) -> torch.Tensor:
    """Per-patch harmonic mean of the scores of the windows covering it (WinCLIP §4.2).

    ``window_scores`` [B, n_windows] (positive), ``windows`` [n_windows, k] patch indices on
    a ``grid`` = (rows, cols). Returns [B, rows, cols]; a patch no window covers gets 0.
    """
    B = window_scores.shape[0]
    n, k = windows.shape
    N = grid[0] * grid[1]
    idx = windows.reshape(-1).to(window_scores.device)
    inv = (1.0 / window_scores).repeat_interleave(k, dim=1)               # [B, n * k]
    inv_sum = window_scores.new_zeros(B, N).index_add_(1, idx, inv)
    count = window_scores.new_zeros(N).index_add_(0, idx, window_scores.new_ones(n * k))
    out = torch.where(count > 0, count / inv_sum, torch.zeros_like(inv_sum))
    return out.reshape(B, *grid)


@register("winclip")
class WinCLIP(Method):
    """WinCLIP zero-shot: compositional prompt ensemble, 2x2/3x3 windows re-encoded, harmonic fusion."""

    trains = False
    paper = "Jeong et al., WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation, CVPR 2023"
    bibtex = """@inproceedings{jeong2023winclip,
  title={WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation},
  author={Jeong, Jongheon and Zou, Yang and Kim, Taewan and Zhang, Dongqing and Ravichandran, Avinash and Dabeer, Onkar},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={19606--19616}, year={2023}}"""
    #: The paper's backbone (the protocol decides; bench/protocols/full.toml sets it).
    paper_backbone = {"arch": "ViT-B-16-plus-240", "pretrained": "laion400m_e31", "image_size": 240}
    default_hparams: dict[str, Any] = {
        "scales": [2, 3],                 # window sizes in patches (small, mid), §4.2
        "stride": 1,                      # window stride in patches
        "temperature": 0.07,              # τ of Eq. 1 (anomalib's value; CLIP's initial τ)
        "templates": list(WINCLIP_TEMPLATES),
        "normal_states": list(WINCLIP_NORMAL_STATES),
        "anomalous_states": list(WINCLIP_ANOMALOUS_STATES),
        "normalize_prompts": True,        # paper/CLIP ensembling; False = anomalib's raw mean
        "class_aware": True,              # class names in the prompts (False: "object")
        "window_chunk": 4096,             # sequences per transformer pass (memory only)
    }

    def __init__(self, backbone: Any, **hparams: Any) -> None:
        super().__init__(backbone, **hparams)
        self._text_cache: dict[str, torch.Tensor] = {}
        g = (backbone.grid_size, backbone.grid_size)
        sizes = sorted({min(int(s), *g) for s in self.hparams["scales"]})
        self.windows = [window_indices(g, s, int(self.hparams["stride"])) for s in sizes]

    def text_features(self, obj: str) -> torch.Tensor:
        """[2, D] normalised (normal, anomalous) prototypes of the compositional ensemble (§4.1)."""
        obj = obj if self.hparams["class_aware"] else "object"
        if obj not in self._text_cache:
            hp = self.hparams
            feats = []
            for states in (hp["normal_states"], hp["anomalous_states"]):
                raw = encode_prompts(self.backbone, compose_prompts(hp["templates"], states, obj),
                                     normalize=False)
                feats.append(ensemble_mean(raw, normalize_each=hp["normalize_prompts"]))
            self._text_cache[obj] = torch.stack(feats)
        return self._text_cache[obj]

    @torch.no_grad()
    def score_maps(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores [B] and the fused zero-shot patch-grid map [B, rows, cols]."""
        bb = self.backbone
        tau = float(self.hparams["temperature"])
        g = (bb.grid_size, bb.grid_size)
        image_scores = class_probability(bb.encode_image(images).global_embedding, text, tau)
        tokens = bb.embed_patches(images)
        maps = [image_scores[:, None, None].expand(-1, *g)]       # full-image scale
        for win in self.windows:
            emb = encode_windows(bb, tokens, win.to(bb.device), chunk=int(self.hparams["window_chunk"]))
            maps.append(harmonic_aggregation(class_probability(emb, text, tau), win, g))
        fused = len(maps) / torch.stack([1.0 / m for m in maps]).sum(dim=0)  # harmonic mean
        return image_scores, fused

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> Prediction:
        bb = self.backbone
        images = batch["image"].to(bb.device)
        text = torch.stack([self.text_features(o) for o in batch["prompt_name"]])  # [B, 2, D]
        image_scores, fused = self.score_maps(images, text)
        g = fused.shape[-2:]
        return Prediction(image_scores, upsample_map(fused.reshape(fused.shape[0], -1), tuple(g),
                                                     images.shape[-2:]))
