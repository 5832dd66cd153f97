"""Pieces shared by the method families: layer numbers across tower depths, map smoothing, the training loop.

* :func:`scale_layer` / :func:`scale_layers` — the papers give layer numbers of ViT-L/14
  (24 visual blocks, 12 text blocks); on another backbone block ``l`` becomes
  ``round_half_up(l · depth / reference)``, clamped to ``1..depth``.
* :func:`gaussian_blur` — ``scipy.ndimage.gaussian_filter`` on a batch of maps, the
  test-time smoothing of AnomalyCLIP, AF-CLIP and the methods evaluated in their harness.
* :func:`train_steps` — the optimisation loop every trained method runs (loss, zero_grad,
  backward, step per batch), with the module in train mode only while it runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: ViT-L/14: 24 visual blocks, 12 text blocks — the depths the papers' layer numbers refer to.
REFERENCE_VISUAL_DEPTH = 24
REFERENCE_TEXT_DEPTH = 12


def scale_layer(layer: int, depth: int, reference: int = REFERENCE_VISUAL_DEPTH) -> int:
    """Map a 1-based block number of a ``reference``-block tower onto a ``depth``-block one.

    ``round_half_up(layer · depth / reference)`` clamped to ``1..depth``: the identity on
    ViT-L/14; 12 blocks: 6 → 3, 24 → 12; the 4-block ``zsad-tiny``: 6 → 1, 12 → 2, 18 → 3,
    24 → 4. A 0 stays 0 (meaning "none").
    """
    if int(layer) <= 0:
        return 0
    return min(depth, max(1, math.floor(int(layer) * depth / reference + 0.5)))


def scale_layers(layers: Sequence[int], depth: int, reference: int = REFERENCE_VISUAL_DEPTH) -> list[int]:
    """:func:`scale_layer` on every entry, duplicates dropped (order kept).

    24 blocks: [6, 12, 18, 24] unchanged; 12 blocks → [3, 6, 9, 12]; 4 blocks → [1, 2, 3, 4].
    """
    out: list[int] = []
    for layer in layers:
        mapped = scale_layer(layer, depth, reference)
        if mapped not in out:
            out.append(mapped)
    return out


def _reflect_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of ``scipy.ndimage``'s 'reflect' (half-sample symmetric) padding."""
    idx = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(m, sigma)`` on every map [B, H, W] (mode 'reflect').

    Separable kernel of radius ``int(truncate · sigma + 0.5)``; AnomalyCLIP and AF-CLIP
    smooth their test maps with σ = 4. ``sigma`` <= 0: unchanged.
    """
    if sigma <= 0:
        return maps
    r = int(truncate * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(maps)
    B, H, W = maps.shape
    out = maps[:, _reflect_index(H, r, maps.device)]                 # [B, H + 2r, W]
    out = F.conv1d(out.transpose(1, 2).reshape(-1, 1, H + 2 * r), k.view(1, 1, -1))
    out = out.reshape(B, W, H).transpose(1, 2)
    out = out[:, :, _reflect_index(W, r, maps.device)]               # [B, H, W + 2r]
    out = F.conv1d(out.reshape(-1, 1, W + 2 * r), k.view(1, 1, -1))
    return out.reshape(B, H, W)


def train_steps(module: nn.Module, opt: torch.optim.Optimizer, epochs: int,
                batches: Callable[[], Iterable[dict[str, Any]]],
                loss: Callable[[dict[str, Any]], torch.Tensor], *,
                scheduler: Any = None, losses: list[float] | None = None) -> None:
    """``epochs`` passes over ``batches()``, one optimiser step per batch.

    Per batch, in this order: ``loss(batch)``, ``opt.zero_grad()``, ``backward()``,
    ``opt.step()``, then ``scheduler.step()`` (a per-step schedule) if given, and the loss
    value appended to ``losses`` if given. ``module`` (the learnable state) is in train mode
    while the loop runs and back in eval mode afterwards, also when it fails. ``batches`` is
    called once per epoch (a method's per-batch transforms — mosaics, re-batching — wrap the
    loader there or in ``loss``).
    """
    module.train()
    try:
        for _ in range(int(epochs)):
            for batch in batches():
                value = loss(batch)
                opt.zero_grad()
                value.backward()
                opt.step()
                if scheduler is not None:
                    scheduler.step()
                if losses is not None:
                    losses.append(float(value.detach()))
    finally:
        module.eval()
