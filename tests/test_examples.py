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
