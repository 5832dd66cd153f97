"""Losses shared by the trained ZSAD methods.

* :func:`focal_loss` — focal loss (Lin et al. 2017) on the per-pixel class probabilities, in
  two explicit variants, each method using the one of its own released code (table below):

  - ``variant="smoothed"`` (:func:`focal_loss_smoothed`): the multi-class focal of
    AnomalyCLIP's and APRIL-GAN/VAND's ``loss.py`` (``FocalLoss``, copied from Hsuxu's
    Loss_ToolBox): ``-(1 - p_t)^gamma log p_t`` with the one-hot target clamped to
    ``[smooth, 1 - smooth]`` and ``p_t`` offset by ``smooth`` (1e-5). For a confidently
    wrong prediction ``p_t`` bottoms out at ~2e-5: the loss saturates at ``-log 2e-5 ≈ 10.8``
    and its gradient vanishes.
  - ``variant="bce"`` (:func:`focal_loss_bce`): the binary focal of AF-CLIP's ``main.py``
    (``focal_loss``): ``BCE(p, y) · (1 - p_t)^gamma`` with ``p_t = p y + (1 - p)(1 - y)``,
    no smoothing (torch's BCE clamps ``log`` at -100), soft targets allowed (AF-CLIP's 0.5
    grid cells).

  ======================================  =========  =====  ======================================
  method                                  variant    gamma  source
  ======================================  =========  =====  ======================================
  anomalyclip                             smoothed   2      AnomalyCLIP ``loss.py`` ``FocalLoss``
  vand                                    smoothed   2      VAND-APRIL-GAN ``loss.py`` (same class)
  tokenclip, tokenclip_van, mpa, mpama    smoothed   2      AnomalyCLIP's loss (their papers' Eq.;
                                                            released code not compared)
  afclip (afclip_plus shares its state)   bce        4      AF-CLIP ``main.py`` ``focal_loss``
  adaclip                                 smoothed   2      AdaCLIP ``loss.py`` ``FocalLoss``
  aaclip                                  smoothed   2      AA-CLIP (AnomalyCLIP's ``FocalLoss``)
  faprompt (maps)                         smoothed   2      FAPrompt ``loss.py`` ``FocalLoss``
  ======================================  =========  =====  ======================================

  :data:`FOCAL_VARIANTS` holds that table; ``focal_loss``'s default stays ``"smoothed"`` (the
  methods that call it without a variant get the numbers they always had).
* :func:`dice_loss` — soft binary Dice loss (Milletari et al. 2016) per sample,
  ``1 - (2 |X∩Y| + s) / (|X| + |Y| + s)``, averaged over the batch.
* :func:`segmentation_loss` — AnomalyCLIP's local loss on one map (focal + two Dice terms),
  the mask binarised as AnomalyCLIP's ``train.py`` does (``> 0.5`` → 1, else 0).
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

#: Which focal loss each method's released code uses (see the module docstring).
FOCAL_VARIANTS: dict[str, str] = {
    "anomalyclip": "smoothed", "vand": "smoothed", "tokenclip": "smoothed",
    "tokenclip_van": "smoothed", "mpa": "smoothed", "mpama": "smoothed",
    "afclip": "bce", "afclip_plus": "bce", "adaclip": "smoothed", "aaclip": "smoothed",
    "faprompt": "smoothed",
}


def focal_loss(probs: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
               alpha: torch.Tensor | None = None, smooth: float = 1e-5,
               variant: str = "smoothed") -> torch.Tensor:
    """Focal loss on class probabilities ``probs`` [B, C, ...]; ``target`` [B, ...].

    ``variant="smoothed"`` (default): :func:`focal_loss_smoothed` (AnomalyCLIP, VAND).
    ``variant="bce"``: :func:`focal_loss_bce` on the last class's probability
    ``probs[:, -1]`` (C must be 2; ``alpha`` a float weight of the positive class or None;
    ``smooth`` unused) — AF-CLIP.
    """
    if variant == "smoothed":
        return focal_loss_smoothed(probs, target, gamma=gamma, alpha=alpha, smooth=smooth)
    if variant == "bce":
        if probs.shape[1] != 2:
            raise ValueError(f"focal_loss(variant='bce') is binary; got {probs.shape[1]} classes")
        return focal_loss_bce(probs[:, 1], target, gamma=gamma, alpha=alpha)
    raise ValueError(f"focal_loss: variant must be 'smoothed' or 'bce', got {variant!r}")


def focal_loss_smoothed(probs: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
                        alpha: torch.Tensor | None = None, smooth: float = 1e-5) -> torch.Tensor:
    """Label-smoothed multi-class focal loss (AnomalyCLIP's and VAND's ``FocalLoss``).

    ``probs`` [B, C, ...] (softmax over C already applied), ``target`` [B, ...] with integer
    (or 0/1 float) class indices (cast with ``.long()``, as the released class does).
    ``alpha`` [C] optional class weights (default: all 1). Returns the mean over all pixels
    of ``-alpha_t (1 - p_t)^gamma log(p_t)`` where
    ``p_t = <clamp(onehot, smooth/(C-1), 1-smooth), p> + smooth``, which keeps ``log``
    finite and bounds the per-pixel loss by ``-log(~2 smooth)``.
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


def focal_loss_bce(prob: torch.Tensor, target: torch.Tensor, *, gamma: float = 4.0,
                   alpha: float | None = None) -> torch.Tensor:
    """Binary focal loss on the positive-class probability (AF-CLIP's ``main.py`` ``focal_loss``).

    ``prob`` [B, ...] in [0, 1], ``target`` [B, ...] in [0, 1] (soft values allowed). Mean of
    ``BCE(p, y) · (1 - p_t)^gamma`` with ``p_t = p y + (1 - p)(1 - y)``; with ``alpha`` a
    float, each element is weighted by ``alpha y + (1 - alpha)(1 - y)`` (the released
    ``alpha >= 0`` branch; its default -1 is ``None`` here). No smoothing: for a
    confidently wrong prediction the loss keeps growing like ``-log p`` (torch's BCE clamps
    the log at -100).

    The operations are the released ones in the same order, so autograd saves the same
    tensors (``target`` itself, when it already has the working dtype — float32, or float64
    in tests), which AF-CLIP's ``released_grad_bug`` switch relies on.
    """
    p = prob.to(torch.promote_types(prob.dtype, torch.float32))
    y = target.to(p.dtype)
    ce = F.binary_cross_entropy(p, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
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

    ``probs`` [B, 2, H, W] softmax over (normal, anomalous); ``mask`` [B, H, W], binarised
    ``> 0.5`` (AnomalyCLIP's ``gt[gt > 0.5] = 1; gt[gt <= 0.5] = 0``). Focal: the smoothed
    variant (AnomalyCLIP's ``FocalLoss``).
    """
    m = (mask > 0.5).to(probs.dtype)
    return (focal_loss(probs, m, gamma=gamma, variant="smoothed") + dice_loss(probs[:, 1], m)
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
