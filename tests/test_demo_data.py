"""The embedded demo datasets and the synthetic defect generators."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench import synthetic
from bench.manifest import validate
from bench.registry import get_adapter
from dataset_adapters import demo

DEMOS = ("demo_aux", "demo_target")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    out = {}
    for name in DEMOS:
        a, b = tmp_path_factory.mktemp(f"{name}_a"), tmp_path_factory.mktemp(f"{name}_b")
        get_adapter(name).generate(a)
        get_adapter(name).generate(b)
        out[name] = (a, b)
    return out


@pytest.mark.parametrize("name", DEMOS)
def test_generation_is_deterministic(roots, name):
    a, b = roots[name]
    assert demo.tree_digest(a) == demo.tree_digest(b)


@pytest.mark.parametrize("name", DEMOS)
def test_scan_counts_and_manifest(roots, name):
    adapter = get_adapter(name)
    root = roots[name][0]
    assert adapter.detect(root)
    df = adapter.scan(root)
    assert set(df["dataset"]) == {name}
    assert tuple(sorted(df["category"].unique())) == tuple(sorted(adapter.categories))
    test = df[df["split"] == "test"]
    train = df[df["split"] == "train"]
    assert (test["label"] == 0).sum() == adapter.published_counts["normal"]
    assert (test["label"] == 1).sum() == adapter.published_counts["anomalous"]
    assert len(train) == demo.N_TRAIN_GOOD * len(adapter.categories)
    assert (train["label"] == 0).all()
    for _cat, g in test.groupby("category"):
        assert (g["label"] == 0).sum() == demo.N_TEST_GOOD
        assert (g["label"] == 1).sum() == demo.N_TEST_ANOMALOUS
        assert set(g.loc[g["label"] == 1, "defect"]) == set(demo.DEFECT_TYPES)
    assert (df["width"] == demo.IMAGE_SIZE).all() and (df["height"] == demo.IMAGE_SIZE).all()
    assert validate(df, root, has_masks=True, categories=adapter.categories, check_sizes=True) == []


@pytest.mark.parametrize("name", DEMOS)
def test_masks_binary_nonempty_and_sized(roots, name):
    root = roots[name][0]
    df = get_adapter(name).scan(root)
    anomalous = df[df["label"] == 1]
    assert anomalous["mask"].notna().all()
    assert df.loc[df["label"] == 0, "mask"].isna().all()
    for img, mask in anomalous[["image", "mask"]].itertuples(index=False):
        m = np.asarray(Image.open(root / mask))
        im = Image.open(root / img)
        assert m.shape == (im.height, im.width)
        assert set(np.unique(m)) <= {0, 255}
        assert (m > 0).any()
        assert (m > 0).mean() < 0.5


def test_sources_disjoint():
    aux = set(demo.AUX_SOURCES.values())
    target = set(demo.TARGET_SOURCES.values())
    for name in list(target):
        target |= set(demo.SOURCE_ALIASES.get(name, ()))
    assert not aux & target
    assert not set(demo.AUX_SOURCES) & set(demo.TARGET_SOURCES)


def test_detect_one_level_below(tmp_path):
    adapter = get_adapter("demo_aux")
    assert not adapter.detect(tmp_path)
    adapter.generate(tmp_path / "demo_aux")
    assert adapter.detect(tmp_path)
    df = adapter.scan(tmp_path)
    assert df["image"].str.startswith("demo_aux/").all()
    assert validate(df, tmp_path, has_masks=True) == []


@pytest.mark.parametrize("kind", sorted(synthetic.DEFECTS))
def test_defect_generators(kind):
    rng = np.random.default_rng(0)
    img = (rng.random((64, 64, 3)) * 80 + 100).astype(np.uint8)
    out1, m1 = synthetic.apply_defect(kind, img, np.random.default_rng(5))
    out2, m2 = synthetic.apply_defect(kind, img, np.random.default_rng(5))
    assert out1.dtype == np.uint8 and out1.shape == img.shape
    assert m1.dtype == bool and m1.shape == img.shape[:2]
    assert np.array_equal(out1, out2) and np.array_equal(m1, m2)
    assert m1.any()
    changed = (out1 != img).any(axis=-1)
    assert not (changed & ~m1).any(), "pixels outside the mask changed"
    # visible: inside the mask the image differs clearly on average
    assert np.abs(out1.astype(int) - img.astype(int))[m1].mean() > 15
