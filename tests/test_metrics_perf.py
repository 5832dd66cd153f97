"""pytest-benchmark cases for the pixel metrics (no timed assertions).

Default run (``--benchmark-disable`` in pyproject): every case runs once, the slow
baselines on a 10-map subset, so the file stays quick. To measure::

    pytest tests/test_metrics_perf.py --benchmark-enable
    pytest tests/test_metrics_perf.py --benchmark-enable --runslow -m slow   # 1725 x 518^2

Each category is compared with (a) one ``np.argsort`` of the same pixels and (b) the
200-threshold AUPRO approximation (AnomalyCLIP / cflow-ad recipe, here vectorised with the
connected components labelled once instead of at every threshold, so the baseline is much
*faster* than the shipped code). Figures are recorded in docs/performance.md ("Metrics").
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bench import metrics as M

SIZES = {"100x256": (100, 256, 256, 8), "1725x518": (1725, 518, 518, 14)}
_STRUCTURE = np.zeros((3, 3, 3), bool)
_STRUCTURE[1] = True


def make_category(n: int, h: int, w: int, cell: int, seed: int = 0):
    """Blobby masks (~5% anomalous pixels, ~30% all-normal images), float32 maps."""
    rng = np.random.default_rng(seed)
    low = ndimage.gaussian_filter(
        rng.normal(size=(n, h // cell + 1, w // cell + 1)).astype(np.float32), (0, 1, 1)
    )
    low[rng.random(n) < 0.3] = -np.inf
    masks = np.repeat(np.repeat(low > np.quantile(low[np.isfinite(low)], 0.93), cell, 1), cell, 2)
    masks = np.ascontiguousarray(masks[:, :h, :w])
    maps = rng.random((n, h, w), dtype=np.float32)
    maps += 0.6 * masks
    return masks, maps


def aupro_200_thresholds(masks: np.ndarray, maps: np.ndarray, expect_fpr: float = 0.3) -> float:
    """Baseline: the 200-threshold approximation, vectorised.

    Stronger than the shipped code: regions are labelled once (not at every threshold) and
    the normal / anomalous scores are split once, so each threshold costs two comparisons.
    """
    labels, n = ndimage.label(masks, structure=_STRUCTURE)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    pos, pos_labels, neg = maps[masks], labels[masks], maps[~masks]
    del labels
    lo, hi = maps.min(), maps.max()
    fprs, pros = [], []
    for th in np.arange(lo, hi, (hi - lo) / 200):
        fprs.append(np.count_nonzero(neg > th) / neg.size)
        tp = np.bincount(pos_labels[pos > th], minlength=n + 1)[1:]
        pros.append((tp / area).mean())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < expect_fpr
    fprs, pros = fprs[keep], pros[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return float(-np.trapezoid(pros, fprs))


@pytest.fixture(scope="module")
def cat_100x256():
    return make_category(*SIZES["100x256"])


@pytest.fixture(scope="module")
def cat_1725x518():
    return make_category(*SIZES["1725x518"])


def _subset(benchmark, masks, maps, n_disabled: int = 10):
    """Full category when benchmarking, a few maps when benchmarks are disabled."""
    if getattr(benchmark, "disabled", False):
        return masks[:n_disabled], maps[:n_disabled]
    return masks, maps


# --------------------------------------------------------------------------------------
# 100 maps of 256 x 256 (default)
# --------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="metrics-100x256")
def test_perf_argsort_baseline_100x256(benchmark, cat_100x256):
    _, maps = cat_100x256
    order = benchmark(np.argsort, maps.ravel())
    assert order.shape == (maps.size,)


@pytest.mark.benchmark(group="metrics-100x256")
def test_perf_pixel_auroc_100x256(benchmark, cat_100x256):
    masks, maps = cat_100x256
    assert 0.5 < benchmark(M.pixel_auroc, masks, maps) <= 1.0


@pytest.mark.benchmark(group="metrics-100x256")
def test_perf_aupro_100x256(benchmark, cat_100x256):
    masks, maps = cat_100x256
    assert 0.0 < benchmark(M.aupro, masks, maps) <= 1.0


@pytest.mark.benchmark(group="metrics-100x256")
def test_perf_category_metrics_100x256(benchmark, cat_100x256):
    masks, maps = cat_100x256
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    out = benchmark(M.category_metrics, labels, scores, masks, maps)
    assert len(out) == 7


@pytest.mark.benchmark(group="metrics-100x256")
def test_perf_aupro_compat_100x256(benchmark, cat_100x256):
    masks, maps = cat_100x256
    assert 0.0 < benchmark(M.aupro, masks, maps, compat=True) <= 1.0


@pytest.mark.benchmark(group="metrics-100x256")
def test_perf_aupro_200_threshold_baseline_100x256(benchmark, cat_100x256):
    masks, maps = _subset(benchmark, *cat_100x256)
    value = benchmark.pedantic(aupro_200_thresholds, (masks, maps), rounds=3, iterations=1)
    assert value == pytest.approx(M.aupro(masks, maps, compat=True), abs=1e-9)


# --------------------------------------------------------------------------------------
# 1725 maps of 518 x 518 (MVTec AD test set at AnomalyCLIP resolution), opt-in
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.benchmark(group="metrics-1725x518")
def test_perf_argsort_baseline_1725x518(benchmark, cat_1725x518):
    _, maps = cat_1725x518
    order = benchmark.pedantic(np.argsort, (maps.ravel(),), rounds=1, iterations=1)
    assert order.shape == (maps.size,)


@pytest.mark.slow
@pytest.mark.benchmark(group="metrics-1725x518")
def test_perf_pixel_auroc_1725x518(benchmark, cat_1725x518):
    masks, maps = cat_1725x518
    value = benchmark.pedantic(M.pixel_auroc, (masks, maps), rounds=2, iterations=1)
    assert 0.5 < value <= 1.0


@pytest.mark.slow
@pytest.mark.benchmark(group="metrics-1725x518")
def test_perf_aupro_1725x518(benchmark, cat_1725x518):
    masks, maps = cat_1725x518
    value = benchmark.pedantic(M.aupro, (masks, maps), rounds=2, iterations=1)
    assert 0.0 < value <= 1.0


@pytest.mark.slow
@pytest.mark.benchmark(group="metrics-1725x518")
def test_perf_category_metrics_1725x518(benchmark, cat_1725x518):
    masks, maps = cat_1725x518
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    out = benchmark.pedantic(
        M.category_metrics, (labels, scores, masks, maps), rounds=1, iterations=1
    )
    assert len(out) == 7


@pytest.mark.slow
@pytest.mark.benchmark(group="metrics-1725x518")
def test_perf_aupro_200_threshold_baseline_1725x518(benchmark, cat_1725x518):
    masks, maps = _subset(benchmark, *cat_1725x518, n_disabled=20)
    value = benchmark.pedantic(aupro_200_thresholds, (masks, maps), rounds=1, iterations=1)
    assert 0.0 < value <= 1.0
