"""Tests of bench.metrics against independent references.

* image and pixel AUROC / AP / F1-max: scikit-learn (``roc_auc_score``,
  ``average_precision_score``, ``precision_recall_curve``), with heavy ties and constant
  scores, NumPy and torch inputs;
* AUPRO: hand-computed small cases and a straightforward implementation of the MVTec AD
  definition written below (every distinct threshold enumerated, regions from
  ``scipy.ndimage.label``), on random data;
* compat AUPRO: a straightforward re-implementation of the 200-threshold recipe;
* aggregation: NaN exclusion with counts, sample std.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

from bench import metrics as M

# ------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------


def sk_f1_max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    return float(np.nanmax(f1))


def ref_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """MVTec AD AUPRO, straight from the definition (slow: one pass per distinct score)."""
    masks = masks.astype(bool)
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        det = maps >= t
        fprs.append((det & normal).sum() / normal.sum())
        pros.append(np.mean([det[i][reg].sum() / reg.sum() for i, reg in regions]))
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def ref_aupro_200(masks: np.ndarray, maps: np.ndarray, expect_fpr: float = 0.3) -> float:
    """The widely shipped 200-threshold AUPRO recipe, re-implemented plainly."""
    measure = pytest.importorskip("skimage.measure")
    masks = masks.astype(np.uint8)
    lo, hi = maps.min(), maps.max()
    delta = (hi - lo) / 200
    fprs, pros = [], []
    for th in np.arange(lo, hi, delta):
        binary = maps > th
        overlaps = []
        for b, m in zip(binary, masks):
            for region in measure.regionprops(measure.label(m, connectivity=2)):
                rr, cc = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(b[rr, cc].sum() / region.area)
        inverse = 1 - masks
        fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
        pros.append(np.mean(overlaps))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < expect_fpr
    fprs, pros = fprs[keep], pros[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return float(auc(fprs, pros))


def random_category(
    seed: int, n: int = 4, h: int = 16, w: int = 16, levels: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Blobby masks (several regions, some images all normal) and noisy maps."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(n, h, w)), sigma=(0, 1.5, 1.5))
    masks = noise > np.quantile(noise, 0.85)
    masks[rng.random(n) < 0.3] = False  # some all-normal images
    if not masks.any():
        masks[0, 2:5, 3:6] = True
    maps = 0.8 * masks + rng.normal(scale=0.6, size=(n, h, w))
    maps = ndimage.gaussian_filter(maps, sigma=(0, 0.7, 0.7))
    if levels is not None:  # heavy ties between normal and anomalous pixels
        maps = np.round((maps - maps.min()) / np.ptp(maps) * levels) / levels
    return masks, maps


# ------------------------------------------------------------------------------------
# image level
# ------------------------------------------------------------------------------------


def image_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    cases = []
    for i in range(40):
        n = int(rng.integers(2, 80))
        y = rng.integers(0, 2, n)
        y[0], y[-1] = 0, 1
        if i % 3 == 0:
            s = rng.random(n)
        elif i % 3 == 1:
            s = rng.integers(0, 4, n).astype(float)  # heavy ties
        else:
            s = np.round(rng.normal(size=n) + y, 1)
        cases.append((y, s))
    cases.append((np.array([0, 1, 0, 1, 1]), np.full(5, 0.3)))  # constant scores
    cases.append((np.array([0, 0, 0, 1]), np.array([0.9, 0.1, 0.2, 0.9])))
    return cases


@pytest.mark.parametrize("case", range(len(image_cases())))
def test_image_metrics_match_sklearn(case: int) -> None:
    y, s = image_cases()[case]
    assert M.image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.image_ap(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.f1_max(y, s) == pytest.approx(sk_f1_max(y, s), abs=1e-12)


def test_image_constant_scores_values() -> None:
    y, s = np.array([0, 1, 0, 1, 1]), np.zeros(5)
    assert M.image_auroc(y, s) == 0.5
    assert M.image_ap(y, s) == pytest.approx(3 / 5)
    assert M.f1_max(y, s) == pytest.approx(2 * 3 / (5 + 3))


def test_image_metrics_accept_torch_and_bool() -> None:
    y, s = image_cases()[2]
    ref = (roc_auc_score(y, s), average_precision_score(y, s), sk_f1_max(y, s))
    for yy, ss in [
        (torch.from_numpy(y), torch.from_numpy(s)),
        (torch.from_numpy(y.astype(bool)), torch.from_numpy(s).float()),
        (y.tolist(), s.tolist()),
    ]:
        got = (M.image_auroc(yy, ss), M.image_ap(yy, ss), M.f1_max(yy, ss))
        assert got == pytest.approx(ref, abs=1e-6)
    half = torch.from_numpy(s).half()
    assert M.image_auroc(torch.from_numpy(y), half) == pytest.approx(
        roc_auc_score(y, half.float().numpy()), abs=1e-12
    )


@pytest.mark.parametrize("fn", [M.image_auroc, M.image_ap, M.f1_max])
def test_image_one_class_is_nan(fn) -> None:
    assert math.isnan(fn([0, 0, 0], [0.1, 0.5, 0.2]))
    assert math.isnan(fn([1, 1], [0.1, 0.5]))
    assert math.isnan(fn([], []))


def test_image_input_errors() -> None:
    with pytest.raises(ValueError, match="same number"):
        M.image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 .normal. or 1"):
        M.image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        M.image_ap([0, 1], [0.1, float("nan")])


# ------------------------------------------------------------------------------------
# pixel AUROC / AP / F1
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 5, 40])
def test_pixel_metrics_match_sklearn(seed: int, levels: int | None) -> None:
    masks, maps = random_category(seed, levels=levels)
    y, s = masks.ravel(), maps.ravel()
    assert M.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.pixel_f1_max(masks, maps) == pytest.approx(sk_f1_max(y, s), abs=1e-12)


def test_pixel_metrics_float32_and_torch() -> None:
    masks, maps = random_category(7, levels=30)
    maps32 = maps.astype(np.float32)
    y, s = masks.ravel(), maps32.ravel()
    ref = (roc_auc_score(y, s), average_precision_score(y, s), sk_f1_max(y, s))
    inputs = [
        (masks, maps32),
        (masks.astype(np.uint8), maps32),
        (masks.astype(np.float32), maps32),
        (torch.from_numpy(masks), torch.from_numpy(maps32)),
        (masks, torch.from_numpy(maps32)),
    ]
    for mk, mp in inputs:
        got = (M.pixel_auroc(mk, mp), M.pixel_ap(mk, mp), M.pixel_f1_max(mk, mp))
        assert got == pytest.approx(ref, abs=1e-12)


def test_torch_code_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator path (torch.sort / searchsorted), exercised on CPU tensors."""
    monkeypatch.setattr(M, "_TORCH_CPU_VIA_NUMPY", False)
    monkeypatch.setattr(M, "_CHUNK_PIXELS", 300)
    for seed, levels in [(0, None), (1, 6)]:
        masks, maps = random_category(seed, levels=levels)
        y, s = masks.ravel(), maps.ravel()
        tm, tp = torch.from_numpy(masks), torch.from_numpy(maps)
        assert M.pixel_auroc(tm, tp) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert M.pixel_ap(tm, tp) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert M.pixel_f1_max(tm, tp) == pytest.approx(sk_f1_max(y, s), abs=1e-12)
        assert M.aupro(tm, tp) == pytest.approx(ref_aupro(masks, maps), abs=1e-9)
        assert M.aupro(tm.float(), tp.float(), compat=True) == pytest.approx(
            M.aupro(masks, maps.astype(np.float32), compat=True), abs=1e-12
        )
        assert math.isnan(M.aupro(torch.zeros_like(tm), tp))


def test_device_without_room_falls_back_to_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M, "_TORCH_CPU_VIA_NUMPY", False)
    monkeypatch.setattr(M, "_device_has_room", lambda maps, n_bytes: False)
    masks, maps = random_category(3, levels=9)
    got = M.category_metrics([0, 1], [0.2, 0.4], torch.from_numpy(masks), torch.from_numpy(maps))
    assert got[("pixel", "aupro")] == pytest.approx(ref_aupro(masks, maps), abs=1e-9)
    assert got[("pixel", "auroc")] == pytest.approx(
        roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12
    )


def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    masks, maps = random_category(11, n=6, levels=12)
    full = M.category_metrics([0, 1], [0, 1], masks, maps)
    monkeypatch.setattr(M, "_CHUNK_PIXELS", 1)  # one image per chunk
    assert M.category_metrics([0, 1], [0, 1], masks, maps) == pytest.approx(full, abs=1e-15)


@pytest.mark.parametrize("fn", [M.pixel_auroc, M.pixel_ap, M.pixel_f1_max, M.aupro])
def test_pixel_one_class_is_nan(fn) -> None:
    maps = np.random.default_rng(0).random((2, 5, 5))
    assert math.isnan(fn(np.zeros((2, 5, 5), bool), maps))  # no anomalous pixels
    assert math.isnan(fn(np.ones((2, 5, 5), bool), maps))  # no normal pixels


def test_pixel_input_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        M.pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    maps = np.zeros((1, 3, 3))
    maps[0, 1, 1] = np.nan
    masks = np.zeros((1, 3, 3), bool)
    masks[0, 0, 0] = True
    with pytest.raises(ValueError, match="NaN"):
        M.aupro(masks, maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(masks, np.zeros((1, 3, 3)), fpr_limit=0)


# ------------------------------------------------------------------------------------
# AUPRO
# ------------------------------------------------------------------------------------


def test_aupro_one_region_by_hand() -> None:
    masks = np.array([[[1, 1, 0, 0]]], bool)
    maps = np.array([[[0.9, 0.5, 0.7, 0.1]]])
    # curve (0,0) (0,.5) (.5,.5) (.5,1) (1,1)
    assert M.aupro(masks, maps) == pytest.approx(0.5)
    assert M.aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.75)
    assert M.aupro(masks, maps, fpr_limit=0.8) == pytest.approx((0.25 + 0.3) / 0.8)


def test_aupro_ties_form_one_threshold() -> None:
    masks = np.array([[[1, 0]]], bool)
    maps = np.array([[[0.5, 0.5]]])
    # a single diagonal segment (0,0)-(1,1): area 0.3^2 / 2 up to 0.3
    assert M.aupro(masks, maps) == pytest.approx(0.045 / 0.3)
    assert M.aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5)


def test_aupro_several_regions_and_normal_images_by_hand() -> None:
    # image 0: region A = {0} (area 1), region B = {2, 3} (area 2), 3 normal pixels;
    # image 1: all normal (6 pixels) -> 9 normal pixels in the category.
    masks = np.array([[[1, 0, 1, 1, 0, 0]], [[0, 0, 0, 0, 0, 0]]], bool)
    maps = np.array([[[0.9, 0.2, 0.8, 0.3, 0.1, 0.4]], [[0.5, 0.05, 0.05, 0.05, 0.05, 0.05]]])
    # PRO: .5 @ .9, .75 @ .8, FPR 1/9 @ .5, 2/9 @ .4, PRO 1 @ .3, FPR 3/9 @ .2
    expected = (0.75 * 2 / 9 + 1.0 * (0.3 - 2 / 9)) / 0.3
    assert expected == pytest.approx(22 / 27)
    assert M.aupro(masks, maps) == pytest.approx(expected)
    # regions are averaged, not pixels: a pixel-weighted overlap would give 2/3 at .8
    assert M.aupro(masks, maps) == pytest.approx(ref_aupro(masks, maps), abs=1e-12)


def test_aupro_diagonal_neighbours_are_one_region() -> None:
    masks = np.zeros((1, 3, 3), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True  # 8-connected: one region
    maps = np.full((1, 3, 3), 0.5)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 1, 2] = 0.9, 0.1, 0.1
    # one region of area 3: PRO 1/3 from FPR 0 to 1 -> AUPRO 1/3
    # (4-connectivity would give two regions and mean(1, 0) = 0.5)
    assert M.aupro(masks, maps) == pytest.approx(1 / 3)


def test_aupro_perfect_and_inverted() -> None:
    masks, _ = random_category(2)
    assert M.aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert M.aupro(masks, -masks.astype(np.float32)) == pytest.approx(0.0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 8, 50])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_definition_on_random_data(
    seed: int, levels: int | None, fpr_limit: float
) -> None:
    masks, maps = random_category(seed, levels=levels)
    assert M.aupro(masks, maps, fpr_limit) == pytest.approx(
        ref_aupro(masks, maps, fpr_limit), abs=1e-6
    )


def test_aupro_float32_maps_and_torch() -> None:
    masks, maps = random_category(5, levels=20)
    maps32 = maps.astype(np.float32)
    ref = ref_aupro(masks, maps32)
    assert M.aupro(masks, maps32) == pytest.approx(ref, abs=1e-6)
    assert M.aupro(torch.from_numpy(masks), torch.from_numpy(maps32)) == pytest.approx(
        ref, abs=1e-6
    )
    assert M.aupro(masks.astype(np.uint8) * 255, maps32) == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_aupro_float32_signed_zeros_and_negative_scores(seed: int) -> None:
    masks, maps = random_category(seed, levels=16)
    maps32 = (maps - 0.5).astype(np.float32)  # negative and positive scores, many ties
    maps32[maps32 == 0] = np.where(np.arange((maps32 == 0).sum()) % 2, -0.0, 0.0)
    assert np.signbit(maps32[maps32 == 0]).any()
    ref = ref_aupro(masks, maps32.astype(np.float64))
    for limit in (0.3, 1.0):
        assert M.aupro(masks, maps32, limit) == pytest.approx(
            ref_aupro(masks, maps32.astype(np.float64), limit), abs=1e-9
        )
    got = M.category_metrics([0, 1], [0, 1], masks, maps32)
    assert got[("pixel", "aupro")] == pytest.approx(ref, abs=1e-9)
    y, s = masks.ravel(), maps32.ravel()
    assert got[("pixel", "auroc")] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert got[("pixel", "ap")] == pytest.approx(average_precision_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_aupro_compat_matches_200_threshold_recipe(seed: int) -> None:
    masks, maps = random_category(seed, n=3, h=12, w=12)
    for m in (maps, maps.astype(np.float32)):
        compat = M.aupro(masks, m, compat=True)
        assert compat == pytest.approx(ref_aupro_200(masks, m), abs=1e-9)
        exact = M.aupro(masks, m)
        assert math.isfinite(compat) and compat != exact
        assert abs(compat - exact) < 0.1


def test_aupro_compat_undefined_cases_are_nan() -> None:
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = True
    assert math.isnan(M.aupro(masks, np.ones((1, 4, 4)), compat=True))  # constant maps
    assert math.isnan(M.aupro(np.zeros((1, 4, 4)), np.ones((1, 4, 4)), compat=True))


# ------------------------------------------------------------------------------------
# category_metrics
# ------------------------------------------------------------------------------------


def test_category_metrics_keys_and_values() -> None:
    masks, maps = random_category(4, levels=10)
    labels = masks.any(axis=(1, 2)).astype(int)
    labels[0] = 0
    labels[-1] = 1
    scores = maps.max(axis=(1, 2))
    got = M.category_metrics(labels, scores, masks, maps)
    assert set(got) == {
        ("image", "auroc"),
        ("image", "ap"),
        ("image", "f1_max"),
        ("pixel", "auroc"),
        ("pixel", "ap"),
        ("pixel", "f1_max"),
        ("pixel", "aupro"),
    }
    assert got[("image", "auroc")] == pytest.approx(roc_auc_score(labels, scores))
    assert got[("image", "ap")] == pytest.approx(average_precision_score(labels, scores))
    assert got[("pixel", "auroc")] == M.pixel_auroc(masks, maps)
    assert got[("pixel", "ap")] == M.pixel_ap(masks, maps)
    assert got[("pixel", "f1_max")] == M.pixel_f1_max(masks, maps)
    assert got[("pixel", "aupro")] == M.aupro(masks, maps)
    assert all(isinstance(v, float) for v in got.values())


def test_category_metrics_levels_and_nan() -> None:
    labels, scores = np.ones(3, int), np.array([0.1, 0.2, 0.3])  # no normal images
    masks = np.zeros((3, 4, 4), bool)
    masks[:, 1:3, 1:3] = True
    maps = np.random.default_rng(0).random((3, 4, 4))
    got = M.category_metrics(labels, scores, masks, maps)
    assert all(math.isnan(got[("image", m)]) for m in ("auroc", "ap", "f1_max"))
    assert all(math.isfinite(got[("pixel", m)]) for m in ("auroc", "ap", "f1_max", "aupro"))
    assert set(M.category_metrics([0, 1], [0.1, 0.2])) == {
        ("image", "auroc"),
        ("image", "ap"),
        ("image", "f1_max"),
    }
    pix = M.category_metrics(labels, scores, masks, maps, image_level=False)
    assert {k[0] for k in pix} == {"pixel"}
    assert M.category_metrics([0, 1], [0, 1], masks, maps, pixel_level=False).keys() == {
        ("image", "auroc"),
        ("image", "ap"),
        ("image", "f1_max"),
    }
    no_anomalous = M.category_metrics([0, 1], [0, 1], np.zeros((3, 4, 4)), maps)
    assert all(math.isnan(no_anomalous[("pixel", m)]) for m in ("auroc", "ap", "f1_max", "aupro"))


# ------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------


def records(rows: list[tuple]) -> pd.DataFrame:
    cols = ["method", "aux", "seed", "dataset", "category", "level", "metric", "value"]
    return pd.DataFrame(rows, columns=cols)


def test_aggregate_nan_excluded_and_sample_std() -> None:
    rows = []
    for seed, vals in [(0, [0.8, 0.6, np.nan]), (1, [0.9, 0.7, np.nan]), (2, [0.7, 0.5, None])]:
        for cat, v in zip(["a", "b", "c"], vals):
            rows.append(("m", "mvtec", seed, "visa", cat, "image", "auroc", v))
    out = M.aggregate(records(rows))
    assert len(out) == 1
    row = out.iloc[0]
    assert list(out.columns) == [
        "method",
        "aux",
        "shots",
        "dataset",
        "level",
        "metric",
        "mean",
        "std",
        "n_seeds",
        "n_categories",
        "n_excluded",
    ]
    per_seed = [0.7, 0.8, 0.6]
    assert row["mean"] == pytest.approx(np.mean(per_seed))
    assert row["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert (row["n_seeds"], row["n_categories"], row["n_excluded"]) == (3, 2, 1)
    assert row["shots"] == 0


def test_aggregate_all_nan_single_seed_and_shots() -> None:
    rows = [
        ("m", "mvtec", 0, "isic", "skin", "image", "auroc", np.nan),
        ("m", "mvtec", 0, "isic", "skin", "pixel", "auroc", 0.9),
        ("m", "mvtec", 1, "isic", "skin", "image", "auroc", np.nan),
    ]
    df = records(rows)
    df["shots"] = [None, 4, None]
    out = M.aggregate(df).set_index(["shots", "level"])
    img = out.loc[(0, "image")]
    assert math.isnan(img["mean"]) and math.isnan(img["std"])
    assert (img["n_seeds"], img["n_categories"], img["n_excluded"]) == (0, 0, 1)
    pix = out.loc[(4, "pixel")]
    assert pix["mean"] == 0.9 and math.isnan(pix["std"]) and pix["n_seeds"] == 1


def test_aggregate_seed_without_defined_mean_is_left_out() -> None:
    rows = [
        ("m", "visa", 0, "mvtec", "a", "pixel", "aupro", 0.6),
        ("m", "visa", 0, "mvtec", "b", "pixel", "aupro", 0.8),
        ("m", "visa", 1, "mvtec", "a", "pixel", "aupro", np.nan),
        ("m", "visa", 1, "mvtec", "b", "pixel", "aupro", np.nan),
    ]
    row = M.aggregate(records(rows)).iloc[0]
    assert row["mean"] == pytest.approx(0.7) and math.isnan(row["std"])
    assert (row["n_seeds"], row["n_categories"], row["n_excluded"]) == (1, 2, 0)


def test_aggregate_groups_and_duplicates() -> None:
    rows = [
        ("a", "mvtec", 0, "visa", "c1", "pixel", "aupro", 0.5),
        ("a", "mvtec", 0, "visa", "c1", "pixel", "aupro", 0.5),  # exact duplicate: once
        ("a", "mvtec", 0, "visa", "c2", "pixel", "aupro", 0.7),
        ("b", None, 0, "visa", "c1", "pixel", "aupro", 0.1),  # training-free, no aux
    ]
    out = M.aggregate(records(rows))
    assert len(out) == 2
    a = out[out["method"] == "a"].iloc[0]
    assert a["mean"] == pytest.approx(0.6) and a["n_categories"] == 2
    b = out[out["method"] == "b"].iloc[0]
    assert b["mean"] == pytest.approx(0.1) and pd.isna(b["aux"])
    conflicting = records(rows[:1] + [("a", "mvtec", 0, "visa", "c1", "pixel", "aupro", 0.4)])
    with pytest.raises(ValueError, match="differ in value"):
        M.aggregate(conflicting)
    with pytest.raises(ValueError, match="column"):
        M.aggregate(pd.DataFrame({"method": ["a"]}))
    empty = M.aggregate(records([]))
    assert empty.empty and "mean" in empty.columns
