"""The diagnostic examples: the read-out-ceiling probe is cross-fitted (no image scores itself)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_scores_each_image_without_its_own_labels():
    ceiling = _load("readout_ceiling")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 16, 8))
    y = x[..., 0] > 0.5  # separable along one channel
    folds = np.arange(20) % 5
    out = ceiling.cross_fitted_probe(x, y, folds)
    assert out.shape == (20, 16)
    assert ((out > 0) == y).mean() > 0.95
    flipped = y.copy()
    flipped[folds == 0] = ~flipped[folds == 0]  # labels of fold 0 are never used for fold 0
    again = ceiling.cross_fitted_probe(x, flipped, folds)
    np.testing.assert_allclose(again[folds == 0], out[folds == 0])
    assert not np.allclose(again[folds != 0], out[folds != 0])


def test_mask_resize_example_reports_border_differences(capsys):
    """examples/mask_resize.py: the two rules differ only at borders; metrics printed for both."""
    example = _load("mask_resize")
    masks = example.draw_masks(4, seed=0)
    assert [m.shape[0] for m in masks] == list(example.CANVASES)
    assert all(m.dtype == bool and 0 < m.mean() < 0.5 for m in masks)
    example.main(["--images", "4", "--size", "64"])
    out = capsys.readouterr().out
    assert "nearest: mask pixels that differ" in out and "bicubic: mask pixels" in out
    for name in ("pixel AUROC", "AUPRO", "pixel AP", "pixel F1-max"):
        line = next(ln for ln in out.splitlines() if ln.startswith(name)).split()
        assert 0 <= float(line[-5]) <= 100
        assert line[-4] == "nearest" and line[-2] == "bicubic"
        assert abs(float(line[-3])) < 5 and abs(float(line[-1])) < 5


def _rec(method, seed, category, value, level="pixel", dataset="demo_target", **extra):
    return {"method": method, "aux": "demo_aux", "seed": seed, "dataset": dataset,
            "category": category, "level": level, "metric": "auroc", "value": value, **extra}


def test_demo_vs_papers_means_over_categories_then_seeds():
    cmp = _load("demo_vs_papers")
    records = [_rec("vand", 0, "a", 0.6), _rec("vand", 0, "b", 0.8),   # seed 0: 70
               _rec("vand", 1, "a", 0.9), _rec("vand", 1, "b", 0.9),   # seed 1: 90
               _rec("vand", 2, "a", float("nan")),                     # undefined: skipped
               _rec("vand", 0, "a", 0.1, level="image"),               # other level
               _rec("vand", 0, "a", 0.1, shots=1),                     # few-shot
               _rec("vand", 0, "a", 0.1, dataset="demo_aux")]          # other dataset
    figures = cmp.demo_figures(records, "demo_target", "pixel")
    mean, std, n = figures["vand"]
    assert n == 2 and abs(mean - 80.0) < 1e-9 and abs(std - 10.0) < 1e-9
    assert figures["vand (k=1)"] == (10.0, 0.0, 1)  # few-shot: a row of its own


def test_demo_vs_papers_rank_correlation_and_paper_sources():
    cmp = _load("demo_vs_papers")
    papers = cmp.paper_figures("VisA", "pixel")
    # the method's own paper wins over copies; one source is named as is
    assert papers["mpa"] == (95.8, "MPA/MPAMA (ICLR 2026 submission)")
    assert papers["afclip"][1] == "AF-CLIP (ACM MM 2025)"
    assert papers["clip"][0] == 22.3 and papers["winclip"][1].startswith("median of")
    order = ["clip", "winclip", "vand", "afclip"]  # ascending paper figures: 22.3 < 79.6 < 94.2 < 96.2
    same = [_rec(m, 0, "a", 0.5 + 0.1 * i) for i, m in enumerate(order)]
    rows, rho, n = cmp.compare(same)
    assert n == 4 and abs(rho - 1.0) < 1e-12 and rows[0]["method"] == "afclip"
    reverse = [_rec(m, 0, "a", 0.9 - 0.1 * i) for i, m in enumerate(order)]
    assert abs(cmp.compare(reverse)[1] + 1.0) < 1e-12
    # a method without a paper figure is listed but not ranked
    rows, _, n = cmp.compare(same + [_rec("tokenclip_van", 0, "a", 0.99)])
    assert n == 4 and rows[0]["method"] == "tokenclip_van"
