"""Exact, fast image- and pixel-level metrics for zero-shot anomaly detection.

Every metric is computed **per category**; the runner averages categories and seeds with
:func:`aggregate`. Results are Python floats, fractions in ``[0, 1]`` (reports print
percent), and ``NaN`` -- never ``0`` -- where a metric is undefined: one class only (no
normal or no anomalous images / pixels) or no masks at all.

Semantics
---------
* ``image_auroc`` / ``pixel_auroc``: scikit-learn's ``roc_auc_score`` (trapezoidal ROC,
  tied scores form one threshold, i.e. a diagonal step). Computed as the tie-corrected
  Mann-Whitney statistic in exact integer arithmetic.
* ``image_ap`` / ``pixel_ap``: scikit-learn's ``average_precision_score`` -- the step-wise
  sum ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score values, *not* a trapezoid.
* ``f1_max`` / ``pixel_f1_max``: ``max 2PR / (P + R)`` over the thresholds of the
  precision-recall curve (scikit-learn's ``precision_recall_curve``). Only thresholds equal
  to an anomalous score can attain the maximum, so only those are evaluated.
* ``aupro``: the MVTec AD definition (Bergmann et al.). The connected components of every
  ground-truth mask (8-connectivity) are the *regions*; at a threshold ``t`` the PRO is the
  mean, over **all** regions of the category, of the fraction of the region's pixels with
  score ``>= t``; the FPR is the fraction of **all** normal pixels of the category with score
  ``>= t``. Tied scores form a single threshold, consecutive points are joined linearly,
  the curve is integrated from FPR 0 up to ``fpr_limit`` (linear interpolation at the
  limit) and divided by ``fpr_limit``.
* ``aupro(..., compat=True)``: **not the definition** -- the 200-threshold approximation
  shipped with AnomalyCLIP / APRIL-GAN / FAPrompt (from cflow-ad), kept only so that users
  can see how far published numbers are from the exact value. See :func:`aupro`.

Algorithm
---------
All pixel metrics are derived from one "ranking" of a category's pixels: the normal
pixels' scores sorted once (``np.sort``, in place, no index array), the anomalous pixels'
scores sorted, and a ``searchsorted`` pass giving, for every anomalous pixel, how many
normal pixels score strictly below / at most its score. From these counts

* AUROC = ``(sum(below) + sum(at_most)) / (2 * P * N)`` (exact, integer sums),
* AP and F1-max follow from the counts at the first pixel of every tie group,
* AUPRO is a weighted sum over anomalous pixels: with ``a`` / ``b`` the number of normal
  pixels scoring above / at least the pixel's score, the pixel's region-weight
  ``1 / (area * n_regions)`` is integrated over the stretch of the FPR axis on which the
  pixel counts as detected -- zero before ``a``, a linear ramp (its share of the tied,
  linearly joined segment) from ``a`` to ``b``, one afterwards -- clipped at ``fpr_limit``.
  This equals the trapezoidal integral of the piecewise-linear PRO curve exactly.

The cost is ``O(M log M)`` for ``M`` pixels. :func:`aupro` alone needs only the normal
scores above the FPR limit: it finds them with an ``O(M)`` partition and sorts just those
(30 % of them at the default limit), and drops the anomalous pixels that score below
all of them. float32 anomalous scores are sorted together with their region ids as packed
``uint64`` keys (no ``argsort``). Memory: one copy of the normal scores (``float32``;
``float64`` only when the maps are ``float64``), plus ``O(P)`` for the ``P`` anomalous
pixels; masks are converted and connected-component labelled in chunks of images, so no
full-size ``int32`` label volume or boolean temporary is ever built.

NumPy arrays and torch tensors are accepted. CPU tensors are viewed as NumPy arrays
(NumPy's vectorised sort is much faster than ``torch.sort`` on CPU); tensors on an
accelerator are ranked there with ``torch.sort`` / ``torch.searchsorted`` unless the device
lacks the memory, in which case the pixels are moved to the CPU. Connected components are
always labelled on the CPU (``scipy.ndimage.label``) from the (small, boolean) masks.

Example:
    >>> import numpy as np
    >>> from bench import metrics
    >>> metrics.image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> masks = np.zeros((1, 4, 4), bool); masks[0, :2, :2] = True
    >>> maps = masks.astype(np.float32)
    >>> metrics.aupro(masks, maps)
    1.0
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "image_auroc",
    "image_ap",
    "f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
    "category_metrics",
    "aggregate",
    "COMPAT_AUPRO_STEPS",
]

#: Number of thresholds of the legacy AnomalyCLIP / cflow-ad AUPRO approximation.
COMPAT_AUPRO_STEPS = 200

#: Pixels converted / labelled per chunk (bounds the temporaries: bool, int32 labels).
_CHUNK_PIXELS = 1 << 24

#: View CPU torch tensors as NumPy arrays (faster sort). Tests flip this to exercise the
#: torch code path on a machine without an accelerator.
_TORCH_CPU_VIA_NUMPY = True

#: 8-connectivity inside an image, no connectivity between the images of a stack.
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True

Array = Any  # np.ndarray or torch.Tensor


# --------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------


def _torch() -> Any:
    """Return the torch module if it has been imported, else ``None`` (no import cost)."""
    return sys.modules.get("torch")


def _is_tensor(x: object) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def _is_np(x: object) -> bool:
    return isinstance(x, np.ndarray)


def _to_numpy(x: Any) -> np.ndarray:
    """NumPy view/copy of an array-like (torch tensors are detached and moved to CPU)."""
    if _is_tensor(x):
        x = x.detach()
        if x.dtype.is_floating_point and x.element_size() < 4:  # float16/bfloat16
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def _score_dtype_np(dtype: np.dtype) -> np.dtype:
    """Scores are compared in float64 when given float64, in float32 otherwise."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _binary_np(x: np.ndarray) -> np.ndarray:
    """Boolean view of a mask chunk: bool as is, numbers ``> 0.5`` (0/1, 0/255, soft)."""
    return x if x.dtype == bool else x > 0.5


def _check_labels(labels: np.ndarray) -> np.ndarray:
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            found = np.unique(labels)[:10].tolist()
            raise ValueError(
                f"image labels must be 0 (normal) or 1 (anomalous); found values {found}. "
                "Convert them with `labels > 0` or map your label convention to 0/1."
            )
        labels = labels.astype(bool)
    return labels


def _image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level inputs and return (bool labels [N], float scores [N])."""
    y = np.ravel(_to_numpy(labels))
    s = np.ravel(_to_numpy(scores))
    if y.shape != s.shape:
        raise ValueError(
            f"labels and scores must have the same number of images, got {y.size} labels "
            f"and {s.size} scores."
        )
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}.")
    s = s.astype(_score_dtype_np(s.dtype), copy=False)
    if s.size and not np.isfinite(s).all():
        raise ValueError(
            "scores contain NaN or infinite values; a metric of such scores is meaningless. "
            "Check the method's output (e.g. a division by zero in the normalisation)."
        )
    return _check_labels(y), s


def _as_stack(x: Any, name: str) -> Any:
    """Reshape ``[..., H, W]`` to ``[N, H, W]`` (a single ``[H, W]`` map becomes N=1)."""
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape [N, H, W] (or [H, W]), got {tuple(x.shape)}.")
    return x.reshape(-1, x.shape[-2], x.shape[-1])


# --------------------------------------------------------------------------------------
# array helpers working on NumPy arrays and torch tensors alike
# --------------------------------------------------------------------------------------


def _searchsorted(sorted_a: Array, v: Array, side: str) -> Array:
    if _is_np(sorted_a):
        return np.searchsorted(sorted_a, v, side=side)
    return _torch().searchsorted(sorted_a, v, right=(side == "right"))


def _group_starts(sorted_x: Array) -> Array:
    """Index of the first element of every run of equal values in a sorted 1-D array."""
    if _is_np(sorted_x):
        return np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    torch = _torch()
    first = torch.ones(1, dtype=torch.bool, device=sorted_x.device)
    return torch.nonzero(torch.cat([first, sorted_x[1:] != sorted_x[:-1]])).flatten()


def _diff_to(starts: Array, end: int) -> Array:
    """Lengths of the runs that begin at ``starts`` in an array of length ``end``."""
    if _is_np(starts):
        return np.diff(starts, append=end)
    torch = _torch()
    return torch.diff(starts, append=torch.tensor([end], device=starts.device))


def _f64(x: Array) -> Array:
    return x.astype(np.float64) if _is_np(x) else x.double()


def _clamp(x: Array, lo: float | None, hi: float | None) -> Array:
    if not _is_np(x):
        return x.clamp(lo, hi)
    if lo is not None:  # np.minimum / np.maximum: much faster than np.clip
        x = np.maximum(x, lo)
    return x if hi is None else np.minimum(x, hi)


def _floor_to(value: float, like: Array) -> Array:
    """Largest number representable in ``like``'s dtype that is ``<= value``.

    For ``x`` of that dtype, ``x > value`` holds exactly when ``x > _floor_to(value)``, so
    thresholds computed in float64 can be applied to float32 scores without casting them.
    """
    if _is_np(like):
        f = np.asarray(value, dtype=like.dtype)
        if float(f) > value:
            f = np.nextafter(f, np.asarray(-np.inf, dtype=like.dtype))
        return f
    torch = _torch()
    f = torch.tensor(value, dtype=like.dtype, device=like.device)
    if float(f) > value:
        f = torch.nextafter(f, torch.tensor(-math.inf, dtype=like.dtype, device=like.device))
    return f.reshape(1)


# --------------------------------------------------------------------------------------
# the ranking shared by all metrics
# --------------------------------------------------------------------------------------


@dataclass
class _Ranking:
    """Everything the metrics need, computed with one sort of the normal scores.

    Attributes:
        n_pos: number of anomalous samples (pixels or images).
        n_neg: number of normal samples.
        pos: anomalous scores sorted ascending.
        below: for every entry of ``pos``, the number of normal scores ``< pos[i]``.
        at_most: for every entry of ``pos``, the number of normal scores ``<= pos[i]``.
        neg: normal scores sorted ascending (needed by the compat AUPRO only).
        weights: per entry of ``pos``, ``1 / (region area * n_regions)`` (AUPRO only).
        n_regions: number of connected ground-truth regions (AUPRO only).
        partial: only the anomalous pixels that matter to AUPRO up to a given FPR are
            ranked (``pos`` is a subset; ``neg`` is None).
    """

    n_pos: int
    n_neg: int
    pos: Array | None = None
    below: Array | None = None
    at_most: Array | None = None
    neg: Array | None = None
    weights: Array | None = None
    n_regions: int = 0
    partial: bool = False

    @property
    def defined(self) -> bool:
        return self.n_pos > 0 and self.n_neg > 0


def _finish_ranking(
    neg: Array,
    pos: Array,
    what: str,
    ids: Array | None = None,
    region_w: Array | None = None,
    top_fpr: float | None = None,
) -> _Ranking:
    """Sort, check finiteness, and count normal scores below each anomalous score.

    ``ids`` (region id of every anomalous pixel) and ``region_w`` (weight of every region,
    indexed by id) are given for AUPRO; the ranking then carries per-pixel weights.

    With ``top_fpr`` (NumPy only; exact AUPRO up to that FPR), only the highest normal
    scores are sorted -- the ``k = floor(top_fpr * n_neg) + 1`` largest, found with an
    O(n) partition -- and only anomalous pixels scoring at least the k-th largest normal
    score are kept. Every other anomalous pixel has more than ``top_fpr * n_neg`` normal
    pixels above it and so contributes nothing below the FPR limit. The result is then
    ``partial``: valid for :func:`_aupro_exact` only.
    """
    n_pos, n_neg = int(pos.shape[0]), int(neg.shape[0])
    n_regions = 0 if region_w is None else int(region_w.shape[0]) - 1
    if n_pos == 0 or n_neg == 0:
        return _Ranking(n_pos, n_neg, n_regions=n_regions)
    bad = ValueError(
        f"{what} contain NaN or infinite values; a metric of such scores is meaningless. "
        "Check the method's output (e.g. a division by zero in the normalisation)."
    )
    if _is_np(neg):
        k = n_neg if top_fpr is None else min(n_neg, math.floor(top_fpr * n_neg) + 1)
        if k < n_neg:
            if not np.isfinite(pos).all():
                raise bad
            cut = n_neg - k
            neg.partition(cut)  # in place: neg[:cut] <= neg[cut] <= neg[cut:]
            lower, top = neg[:cut], neg[cut:]
            v = top[0]
            if not (math.isfinite(float(lower.min())) and math.isfinite(float(top.max()))):
                raise bad
            top.sort()
            keep = pos >= v
            pos, weights = _sort_np(pos[keep], ids[keep], region_w)
            # counts in the whole normal set: all of ``lower`` is <= v < pos, except the
            # normal scores in ``lower`` that equal v, which are not < v.
            below, at_most = _count_below(top, pos)
            below += cut
            at_most += cut
            at_v = pos == v
            if at_v.any():
                below[at_v] -= np.count_nonzero(lower == v)
            return _Ranking(n_pos, n_neg, pos, below, at_most, None, weights, n_regions, True)
        neg.sort()  # in place, NumPy's vectorised sort; no index array
        pos, weights = _sort_np(pos, ids, region_w)
    else:
        torch = _torch()
        neg = torch.sort(neg).values
        pos, order = torch.sort(pos)
        weights = None if ids is None else region_w[ids[order].long()]
        del order
    ends = [float(neg[0]), float(neg[-1]), float(pos[0]), float(pos[-1])]
    if not all(math.isfinite(e) for e in ends):
        raise bad
    below, at_most = _count_below(neg, pos)
    return _Ranking(n_pos, n_neg, pos, below, at_most, neg, weights, n_regions)


def _sort_np(
    pos: np.ndarray, ids: np.ndarray | None, region_w: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sort anomalous scores ascending, carrying their regions' weights along.

    float32 scores: score and region id are packed into one order-preserving uint64 key
    and sorted with NumPy's vectorised sort -- about 3x faster than ``argsort`` plus two
    random gathers. float64 scores fall back to ``argsort``.
    """
    if ids is None:
        pos.sort()
        return pos, None
    if pos.dtype != np.float32:
        order = np.argsort(pos)
        return pos[order], region_w[ids[order]]
    sign = np.uint32(0x80000000)
    u = (pos + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into +0.0
    hi = np.where(u >= sign, ~u, u | sign)  # monotone map float32 -> uint32
    keys = hi.astype(np.uint64) << np.uint64(32)
    del u, hi
    keys |= ids
    keys.sort()
    hi = (keys >> np.uint64(32)).astype(np.uint32)
    pos = np.where(hi >= sign, hi & ~sign, ~hi).view(np.float32)
    keys &= np.uint64(0xFFFFFFFF)
    return pos, region_w[keys]


def _count_below(sorted_neg: Array, pos: Array) -> tuple[Array, Array]:
    """For each of ``pos``: the number of ``sorted_neg`` entries ``<`` it and ``<=`` it."""
    n = int(sorted_neg.shape[0])
    below = _searchsorted(sorted_neg, pos, "left")
    # ``at_most`` differs from ``below`` only where a normal score equals the anomalous one;
    # one gather finds those, and only they need a second binary search.
    tied = sorted_neg[_clamp(below, None, n - 1)] == pos
    tied &= below < n
    at_most = below.clone() if _is_tensor(below) else below.copy()
    at_most[tied] = _searchsorted(sorted_neg, pos[tied], "right")
    return below, at_most


def _rank_images(labels: Any, scores: Any) -> _Ranking:
    y, s = _image_inputs(labels, scores)
    return _finish_ranking(s[~y], s[y], "scores")


def _device_has_room(maps: Any, n_bytes: int) -> bool:
    """Whether an accelerator tensor's device has ``n_bytes`` free (True if unknown)."""
    torch = _torch()
    if maps.device.type != "cuda":
        return True
    try:
        free, _ = torch.cuda.mem_get_info(maps.device)
    except Exception:  # pragma: no cover - depends on the driver
        return True
    return n_bytes < 0.9 * free


def _rank_pixels(masks: Any, maps: Any, *, regions: bool, top_fpr: float | None = None) -> _Ranking:
    """Rank all pixels of a category; optionally label ground-truth regions (AUPRO).

    Args:
        masks: ``[N, H, W]`` (or ``[H, W]``) ground truth, bool or numbers (``> 0.5`` is
            anomalous); NumPy array or torch tensor.
        maps: anomaly maps of the same shape.
        regions: also compute the per-pixel region weights needed by AUPRO.
        top_fpr: rank only what exact AUPRO up to this FPR needs (see
            :func:`_finish_ranking`); requires ``regions``.
    """
    on_device = _is_tensor(maps) and not (maps.device.type == "cpu" and _TORCH_CPU_VIA_NUMPY)
    if not on_device:
        maps = _to_numpy(maps)
        if not np.issubdtype(maps.dtype, np.number) or np.issubdtype(
            maps.dtype, np.complexfloating
        ):
            raise ValueError(f"maps must be real numbers, got dtype {maps.dtype}.")
    if tuple(masks.shape) != tuple(maps.shape):
        raise ValueError(
            f"masks and maps must have the same shape [N, H, W], got {tuple(masks.shape)} "
            f"and {tuple(maps.shape)}. Resize the maps to the mask resolution first."
        )
    maps = _as_stack(maps, "maps")
    n_img, h, w = (int(d) for d in maps.shape)
    per_chunk = max(1, _CHUNK_PIXELS // max(1, h * w))
    chunks = [(i, min(i + per_chunk, n_img)) for i in range(0, n_img, per_chunk)]

    if on_device:
        torch = _torch()
        if _is_tensor(masks):
            masks = masks.to(maps.device)
        else:
            masks = torch.as_tensor(np.asarray(masks), device=maps.device)
        masks = _as_stack(masks, "masks")
        dtype = torch.float64 if maps.dtype == torch.float64 else torch.float32

        def chunk_mask(a: int, b: int) -> Any:
            m = masks[a:b]
            return m if m.dtype == torch.bool else m > 0.5

        n_pos = sum(int(chunk_mask(a, b).sum()) for a, b in chunks)
        n_all = n_img * h * w
        # neg + sorted copy + int64 sort indices, plus the anomalous side
        if not _device_has_room(maps, n_all * (2 * dtype.itemsize + 8) + n_pos * 32):
            return _rank_pixels(_to_numpy(masks), _to_numpy(maps), regions=regions, top_fpr=top_fpr)
        new = torch.empty
        neg = new(n_all - n_pos, dtype=dtype, device=maps.device)
        pos = new(n_pos, dtype=dtype, device=maps.device)
    else:
        masks = _as_stack(_to_numpy(masks), "masks")
        dtype = _score_dtype_np(maps.dtype)

        def chunk_mask(a: int, b: int) -> Any:
            return _binary_np(masks[a:b])

        n_pos = sum(int(np.count_nonzero(chunk_mask(a, b))) for a, b in chunks)
        n_all = n_img * h * w
        neg = np.empty(n_all - n_pos, dtype=dtype)
        pos = np.empty(n_pos, dtype=dtype)

    ids = np.empty(n_pos, dtype=np.uint32) if regions else None
    areas: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]  # id 0: no region
    n_regions = 0
    i_neg = i_pos = 0
    for a, b in chunks:
        m = chunk_mask(a, b)
        s = maps[a:b]
        s_pos, s_neg = s[m], s[~m]
        pos[i_pos : i_pos + s_pos.shape[0]] = s_pos
        neg[i_neg : i_neg + s_neg.shape[0]] = s_neg
        if regions and s_pos.shape[0]:
            m_np = m.cpu().numpy() if on_device else m
            anomalous = np.flatnonzero(m_np.any(axis=(1, 2)))  # label only these images
            m_np = m_np[anomalous] if anomalous.size < m_np.shape[0] else m_np
            lab, n = ndimage.label(m_np, structure=_STRUCTURE_8)
            lab_pos = lab[m_np]  # same (image, row, column) order as ``s[m]``
            del lab
            areas.append(np.bincount(lab_pos, minlength=n + 1)[1:])
            chunk_ids = ids[i_pos : i_pos + s_pos.shape[0]]
            np.add(lab_pos, n_regions, out=chunk_ids, casting="unsafe")
            n_regions += n
            del lab_pos
        i_pos += s_pos.shape[0]
        i_neg += s_neg.shape[0]
        del m, s_pos, s_neg
    region_w = None
    if regions:
        with np.errstate(divide="ignore"):
            region_w = 1.0 / (np.concatenate(areas) * float(max(n_regions, 1)))
        region_w[0] = 0.0
        if on_device:
            torch = _torch()
            ids = torch.from_numpy(ids.astype(np.int64)).to(maps.device)
            region_w = torch.from_numpy(region_w).to(maps.device)
    return _finish_ranking(neg, pos, "maps", ids, region_w, top_fpr)


# --------------------------------------------------------------------------------------
# metrics from a ranking
# --------------------------------------------------------------------------------------


def _auroc(r: _Ranking) -> float:
    assert not r.partial
    if not r.defined:
        return math.nan
    # Mann-Whitney with ties counted 1/2 == trapezoidal ROC area (sklearn).
    twice_u = int(r.below.sum()) + int(r.at_most.sum())
    return twice_u / (2 * r.n_pos * r.n_neg)


def _tie_groups(r: _Ranking) -> tuple[Array, Array, Array]:
    """Per distinct anomalous score: (#anomalous >= it, #normal >= it, #anomalous == it)."""
    assert not r.partial
    starts = _group_starts(r.pos)
    tp = _f64(r.n_pos - starts)
    fp = _f64(r.n_neg - r.below[starts])
    return tp, fp, _f64(_diff_to(starts, r.n_pos))


def _ap(r: _Ranking) -> float:
    if not r.defined:
        return math.nan
    tp, fp, n_eq = _tie_groups(r)
    return float((n_eq * (tp / (tp + fp))).sum()) / r.n_pos


def _f1(r: _Ranking) -> float:
    if not r.defined:
        return math.nan
    tp, fp, _ = _tie_groups(r)
    # F1 = 2PR/(P+R) = 2TP / (TP + FP + #anomalous)
    return float((2.0 * tp / (tp + fp + r.n_pos)).max())


def _aupro_exact(r: _Ranking, fpr_limit: float) -> float:
    if not r.defined or r.n_regions == 0:
        return math.nan
    lim = fpr_limit * r.n_neg  # the limit on the axis "number of normal pixels above t"
    above = _f64(r.n_neg - r.at_most)  # normal pixels scoring > s: the pixel's ramp starts
    at_least = _f64(r.n_neg - r.below)  # normal pixels scoring >= s: the ramp ends
    width = at_least - above
    # integral of the ramp (x - above) / width over [above, min(at_least, lim)] ...
    inside = _clamp(_clamp(at_least, None, lim) - above, 0.0, None)
    area = inside * inside / (2.0 * (width + (width == 0)))
    # ... plus 1 over the rest of the axis up to the limit
    area = area + _clamp(lim - at_least, 0.0, None)
    return float((r.weights * area).sum()) / lim


def _aupro_compat(r: _Ranking, fpr_limit: float, steps: int = COMPAT_AUPRO_STEPS) -> float:
    """Legacy cflow-ad / AnomalyCLIP approximation; see :func:`aupro`."""
    assert not r.partial
    if not r.defined or r.n_regions == 0:
        return math.nan
    # numpy scalars of the maps' dtype, as in the original (``amaps.min()``)
    lo = np.asarray(_to_numpy(min(r.neg[0], r.pos[0])))[()]
    hi = np.asarray(_to_numpy(max(r.neg[-1], r.pos[-1])))[()]
    delta = (hi - lo) / steps
    if not delta > 0:  # constant maps: the original divides by zero in np.arange
        return math.nan
    thresholds = np.arange(lo, hi, delta)
    # binary map = score > th (strict); counts via the sorted arrays
    if _is_np(r.neg):
        keys = np.array([_floor_to(float(t), r.neg) for t in thresholds], dtype=r.neg.dtype)
    else:
        keys = _torch().cat([_floor_to(float(t), r.neg) for t in thresholds])
    fp = r.n_neg - _searchsorted(r.neg, keys, "right")
    idx = _searchsorted(r.pos, keys, "right")
    w = _to_numpy(r.weights)
    suffix = np.r_[np.cumsum(w[::-1])[::-1], 0.0]  # suffix[i] = sum(w[i:])
    pro = suffix[_to_numpy(idx)]
    fpr = _to_numpy(fp) / r.n_neg
    keep = fpr < fpr_limit
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size < 2 or fpr.max() == fpr.min():
        return math.nan  # the original raises (sklearn.metrics.auc) or divides by zero
    fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    # fpr decreases with the threshold; integrate in increasing order
    x, y = fpr[::-1], pro[::-1]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------


def image_auroc(labels: Any, scores: Any) -> float:
    """Image-level AUROC, identical to ``sklearn.metrics.roc_auc_score``.

    Args:
        labels: ``[N]`` 0 = normal, 1 = anomalous (bool or 0/1; NumPy or torch).
        scores: ``[N]`` anomaly scores, higher = more anomalous.

    Returns:
        AUROC in ``[0, 1]``; NaN if only one class is present.
    """
    return _auroc(_rank_images(labels, scores))


def image_ap(labels: Any, scores: Any) -> float:
    """Image-level average precision, identical to ``sklearn.metrics.average_precision_score``.

    Step-wise: ``sum_k (R_k - R_{k-1}) P_k`` over the distinct scores (no interpolation).
    NaN if only one class is present (also when all images are anomalous, although the
    formula would give 1: such a dataset cannot support image metrics).
    """
    return _ap(_rank_images(labels, scores))


def f1_max(labels: Any, scores: Any) -> float:
    """Image-level F1-max: the best ``2PR / (P + R)`` over the precision-recall curve.

    Thresholds are the distinct scores, as in ``sklearn.metrics.precision_recall_curve``.
    NaN if only one class is present.
    """
    return _f1(_rank_images(labels, scores))


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Pixel-level AUROC over all pixels of a category (exact, ``roc_auc_score`` semantics).

    Args:
        masks: ``[N, H, W]`` ground truth, bool or 0/1 (numbers ``> 0.5`` are anomalous).
        maps: ``[N, H, W]`` anomaly maps.

    Returns:
        AUROC in ``[0, 1]``; NaN without anomalous pixels or without normal pixels.
    """
    return _auroc(_rank_pixels(masks, maps, regions=False))


def pixel_ap(masks: Any, maps: Any) -> float:
    """Pixel-level average precision (exact, ``average_precision_score`` semantics).

    NaN without anomalous pixels or without normal pixels.
    """
    return _ap(_rank_pixels(masks, maps, regions=False))


def pixel_f1_max(masks: Any, maps: Any) -> float:
    """Pixel-level F1-max over all thresholds of the pixel precision-recall curve (exact).

    NaN without anomalous pixels or without normal pixels.
    """
    return _f1(_rank_pixels(masks, maps, regions=False))


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3, *, compat: bool = False) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised by it.

    Exact MVTec AD definition (see the module docstring): regions are the 8-connected
    components of each mask, PRO averages the overlap over all regions of the category,
    FPR counts all normal pixels of the category, tied scores are one threshold, the
    piecewise-linear curve is integrated up to ``fpr_limit`` (interpolated there) and
    divided by ``fpr_limit``.

    Args:
        masks: ``[N, H, W]`` ground truth, bool or 0/1 (numbers ``> 0.5`` are anomalous).
        maps: ``[N, H, W]`` anomaly maps.
        fpr_limit: upper integration limit on the FPR axis, in ``(0, 1]``.
        compat: **legacy approximation, not the definition.** Reproduces the
            ``cal_pro_score`` shipped with AnomalyCLIP, APRIL-GAN and FAPrompt (from
            cflow-ad): 200 thresholds ``np.arange(min, max, (max - min) / 200)`` over the
            category's maps, a pixel is positive when ``score > threshold``; PRO = mean
            overlap over all regions, FPR over all normal pixels; only points with
            ``FPR < fpr_limit`` are kept, their FPRs min-max rescaled to ``[0, 1]``, and
            the area computed with the trapezoid rule. It ignores the curve between the
            last kept point and the limit and stretches the rest, so it can sit above or
            below the exact value; use it only to compare with published numbers. NaN
            where the original would fail (fewer than two points below the limit,
            constant maps).

    Returns:
        AUPRO in ``[0, 1]``; NaN without anomalous or without normal pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")
    if compat:
        return _aupro_compat(_rank_pixels(masks, maps, regions=True), fpr_limit)
    return _aupro_exact(_rank_pixels(masks, maps, regions=True, top_fpr=fpr_limit), fpr_limit)


def category_metrics(
    labels: Any,
    scores: Any,
    masks: Any = None,
    maps: Any = None,
    *,
    image_level: bool = True,
    pixel_level: bool = True,
) -> dict[tuple[str, str], float]:
    """All metrics of one category, sharing one ranking of the pixels between them.

    Args:
        labels: ``[N]`` image labels (0 normal, 1 anomalous).
        scores: ``[N]`` image scores.
        masks: ``[N, H, W]`` ground-truth masks, or None when the dataset has none.
        maps: ``[N, H, W]`` anomaly maps (required when ``masks`` is given and
            ``pixel_level`` is True).
        image_level: compute the image metrics.
        pixel_level: compute the pixel metrics (only when ``masks`` is not None).

    Returns:
        ``{("image", "auroc"|"ap"|"f1_max"): v, ("pixel", "auroc"|"ap"|"f1_max"|"aupro"):
        v}`` -- image keys when ``image_level``, pixel keys when ``pixel_level`` and masks
        are given; NaN where a metric is undefined.
    """
    out: dict[tuple[str, str], float] = {}
    if image_level:
        r = _rank_images(labels, scores)
        out[("image", "auroc")] = _auroc(r)
        out[("image", "ap")] = _ap(r)
        out[("image", "f1_max")] = _f1(r)
    if pixel_level and masks is not None:
        if maps is None:
            raise ValueError("category_metrics: masks were given but maps is None.")
        r = _rank_pixels(masks, maps, regions=True)
        out[("pixel", "auroc")] = _auroc(r)
        out[("pixel", "ap")] = _ap(r)
        out[("pixel", "f1_max")] = _f1(r)
        out[("pixel", "aupro")] = _aupro_exact(r, 0.3)
    return out


# --------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------

_KEYS_SEED = ["method", "aux", "shots", "seed", "dataset", "level", "metric"]
_KEYS_OUT = ["method", "aux", "shots", "dataset", "level", "metric"]
_AGG_COLUMNS = [*_KEYS_OUT, "mean", "std", "n_seeds", "n_categories", "n_excluded"]


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Average per-category records into dataset figures, mean +/- std over seeds.

    Step 1: for every (method, aux, shots, seed, dataset, level, metric) the mean over
    categories, ignoring NaN values (``n_categories`` counts those used, ``n_excluded``
    the NaN ones). Step 2: mean and sample standard deviation (``ddof=1``; NaN with a
    single seed) of those dataset means over seeds. Seeds whose dataset mean is NaN (every
    category undefined) are left out of step 2; if no seed is left the mean is NaN, never 0.

    Args:
        df: tidy records with columns ``method, aux, seed, dataset, category, level,
            metric, value`` and optionally ``shots`` (missing / null = 0). ``value`` may be
            None/NaN. Exact duplicate records are counted once; two different values for
            the same record key raise ``ValueError``.

    Returns:
        One row per (method, aux, shots, dataset, level, metric) with columns ``method,
        aux, shots, dataset, level, metric, mean, std, n_seeds, n_categories,
        n_excluded``. ``n_seeds`` counts the seeds with a defined dataset mean;
        ``n_categories`` / ``n_excluded`` are per seed (if seeds disagree: the smallest
        number used and the largest number excluded, over the seeds with a defined mean).
    """
    import pandas as pd

    required = ["method", "aux", "seed", "dataset", "category", "level", "metric", "value"]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"aggregate: records lack the column(s) {missing}; expected {required} "
            "(plus optional 'shots'). Load them with bench.results.load()."
        )
    d = df[[*required, *(["shots"] if "shots" in df.columns else [])]].copy()
    d["shots"] = (
        pd.to_numeric(d["shots"], errors="coerce").fillna(0).astype("int64")
        if "shots" in d.columns
        else 0
    )
    d["value"] = pd.to_numeric(d["value"], errors="coerce").astype("float64")
    if d.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in _AGG_COLUMNS})

    record_key = [*_KEYS_SEED, "category"]
    d = d.drop_duplicates()
    dup = d.duplicated(record_key, keep=False)
    if dup.any():
        example = d.loc[dup, record_key + ["value"]].head(4).to_dict("records")
        raise ValueError(
            f"aggregate: {int(dup.sum())} records share a key but differ in value, e.g. "
            f"{example}. Remove the stale run or keep one record per key."
        )

    g = d.groupby(_KEYS_SEED, dropna=False, sort=True)["value"]
    per_seed = g.agg(mean="mean", n_categories="count", n_all="size").reset_index()
    per_seed["n_excluded"] = per_seed["n_all"] - per_seed["n_categories"]
    # category counts are taken over the seeds that contribute a dataset mean
    used = per_seed["mean"].notna()
    per_seed["nc_used"] = per_seed["n_categories"].where(used)
    per_seed["nx_used"] = per_seed["n_excluded"].where(used)

    g2 = per_seed.groupby(_KEYS_OUT, dropna=False, sort=True)
    out = g2.agg(
        mean=("mean", "mean"),
        std=("mean", lambda v: v.std(ddof=1)),
        n_seeds=("mean", "count"),
        n_categories=("nc_used", "min"),
        n_excluded=("nx_used", "max"),
        n_excluded_all=("n_excluded", "max"),
    ).reset_index()
    out["std"] = out["std"].where(out["n_seeds"] >= 2)
    out["n_categories"] = out["n_categories"].fillna(0)
    out["n_excluded"] = out["n_excluded"].fillna(out["n_excluded_all"])
    for c in ("n_seeds", "n_categories", "n_excluded"):
        out[c] = out[c].astype("int64")
    return out[_AGG_COLUMNS]
