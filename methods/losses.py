"""Losses shared by the trained ZSAD methods.

* :func:`focal_loss` — multi-class focal loss on probabilities (Lin et al. 2017), in the
  form AnomalyCLIP (Zhou et al. 2024, §3.3) and APRIL-GAN/VAND use on the per-pixel
  {normal, anomalous} softmax map: ``-(1 - p_t)^gamma log p_t`` with the one-hot target
  clamped to ``[smooth, 1 - smooth]`` and ``p_t`` offset by ``smooth``.
* :func:`dice_loss` — soft binary Dice loss (Milletari et al. 2016) per sample,
  ``1 - (2 |X∩Y| + s) / (|X| + |Y| + s)``, averaged over the batch.
* :func:`segmentation_loss` — AnomalyCLIP's local loss on one map (focal + two Dice terms).
* :func:`hinge_loss` — the margin loss of MPA/MPAMA (§3.2, the L_hinge equation) and
  TokenCLIP (§3.3): mean over normal pixels of ``max(S - δ_n, 0)`` plus mean over anomalous
  pixels of ``max(δ_a - S, 0)``.
* :func:`orthogonality_loss` — TokenCLIP's regulariser (§3.1, Eq. 4) on K embeddings:
  ``|| Ĝ Ĝ^T - I ||_F^2`` with ``Ĝ`` the L2-normalised rows (zero iff they are orthonormal).

Both accept any trailing spatial shape; none of them reduces over anything but the batch
(and, for focal, the pixels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(probs: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
               alpha: torch.Tensor | None = None, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on class probabilities.

    ``probs`` [B, C, ...] (softmax over C already applied), ``target`` [B, ...] with integer
    (or 0/1 float) class indices. ``alpha`` [C] optional class weights (default: all 1).
    Returns the mean over all pixels of ``-alpha_t (1 - p_t)^gamma log(p_t)`` where
    ``p_t = <clamp(onehot, smooth/(C-1), 1-smooth), p> + smooth`` (the label-smoothed
    variant of AnomalyCLIP / APRIL-GAN, which keeps ``log`` finite).
    """
    C = probs.shape[1]
    p = probs.movedim(1, -1).reshape(-1, C)
    t = target.reshape(-1).long()
    onehot = F.one_hot(t, C).to(p.dtype)
    if smooth:
        onehot = onehot.clamp(smooth / max(C - 1, 1), 1.0 - smooth)
    pt = (onehot * p).sum(-1) + smooth
    loss = -((1.0 - pt).clamp_min(0) ** gamma) * pt.log()
    if alpha is not None:
        loss = alpha.to(p)[t] * loss
    return loss.mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """Soft binary Dice loss: ``1 - mean_b (2 Σ p·y + s) / (Σ p + Σ y + s)``.

    ``pred`` [B, ...] in [0, 1] (e.g. the anomalous channel of a softmax map), ``target``
    [B, ...] in {0, 1}. AnomalyCLIP applies it twice per map: to (p_anomalous, mask) and to
    (p_normal, 1 - mask).
    """
    B = pred.shape[0]
    p = pred.reshape(B, -1)
    y = target.reshape(B, -1).to(p.dtype)
    dice = (2 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)
    return 1.0 - dice.mean()


def segmentation_loss(probs: torch.Tensor, mask: torch.Tensor, *, gamma: float = 2.0) -> torch.Tensor:
    """AnomalyCLIP's local loss for one map: ``Focal(P, M) + Dice(P_a, M) + Dice(P_n, 1 - M)``.

    ``probs`` [B, 2, H, W] softmax over (normal, anomalous); ``mask`` [B, H, W] in {0, 1}.
    """
    m = (mask > 0.5).to(probs.dtype)
    return (focal_loss(probs, m, gamma=gamma) + dice_loss(probs[:, 1], m)
            + dice_loss(probs[:, 0], 1.0 - m))


def hinge_loss(scores: torch.Tensor, mask: torch.Tensor, *, delta_n: float = 0.5,
               delta_a: float = 0.5) -> torch.Tensor:
    """Margin loss pushing normal scores below ``delta_n`` and anomalous ones above ``delta_a``.

    ``scores`` [B, ...] anomaly scores in [0, 1] (e.g. the upsampled anomalous-class map),
    ``mask`` [B, ...] in {0, 1}. ``N_0``/``N_1`` are all normal/anomalous pixels of the batch;
    a term whose set is empty contributes 0 (MPA §3.2, with δ_a = δ_n = 0.5 in §4.1).
    """
    m = mask > 0.5
    s = scores.reshape(m.shape) if scores.shape != m.shape else scores
    zero = s.sum() * 0.0
    normal = (s[~m] - delta_n).clamp_min(0).mean() if (~m).any() else zero
    anomalous = (delta_a - s[m]).clamp_min(0).mean() if m.any() else zero
    return normal + anomalous


def orthogonality_loss(embeddings: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """Orthogonality regulariser ``|| Ĝ Ĝ^T - I ||_F^2`` over the last two dims.

    ``embeddings`` [..., K, D]; rows are L2-normalised first, so the diagonal of the Gram
    matrix is 1 and the loss is the sum of squared cosines between distinct rows (``"sum"``,
    TokenCLIP Eq. 4) or their mean over the K(K-1) ordered pairs (``"mean"``). Leading
    dimensions (e.g. the normal/anomalous class) are summed (``"sum"``) or averaged.
    """
    g = F.normalize(embeddings, dim=-1)
    K = g.shape[-2]
    gram = g @ g.transpose(-1, -2)
    eye = torch.eye(K, dtype=g.dtype, device=g.device)
    sq = (gram - eye).pow(2).sum(dim=(-1, -2))
    if reduction == "sum":
        return sq.sum()
    if reduction == "mean":
        return sq.mean() / max(K * (K - 1), 1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
