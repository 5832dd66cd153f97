"""The embedded demo datasets and the synthetic defect generators."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench.demo import synthetic
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
    assert len(train) == adapter.n_train_good * len(adapter.categories)
    assert (train["label"] == 0).all()
    for _cat, g in test.groupby("category"):
        assert (g["label"] == 0).sum() == adapter.n_test_good
        assert (g["label"] == 1).sum() == adapter.n_test_anomalous
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


def test_aux_is_larger_than_target_and_target_sizes_unchanged():
    # the trained methods learn from demo_aux's test split: a few hundred images
    aux, target = get_adapter("demo_aux"), get_adapter("demo_target")
    n_aux = len(aux.categories) * (aux.n_test_good + aux.n_test_anomalous)
    assert n_aux == sum(aux.published_counts.values()) == 280
    # the toy CLIP's model card figures are measured on this target: 3 x (8 + 12)
    assert (target.n_test_good, target.n_test_anomalous, len(target.categories)) == (8, 12, 3)


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


def test_a_tree_from_another_generator_version_is_refused_with_the_fix(tmp_path):
    from bench.protocol import load
    from bench.runner import RunError, open_dataset

    proto = load("demo")
    handle = open_dataset(proto, "demo_aux", tmp_path)  # generated now: current
    aux = get_adapter("demo_aux")
    assert len(handle.manifest) == (sum(aux.published_counts.values())
                                    + len(aux.categories) * aux.n_train_good)
    stamp = tmp_path / "demo_aux" / demo.GENERATOR_FILE
    assert get_adapter("demo_aux").stale_reason(tmp_path / "demo_aux") is None
    stamp.write_text("demo_aux from-an-older-version\n")
    with pytest.raises(RunError, match=r"GENERATOR\.txt.*Delete .*demo_aux and re-run"):
        open_dataset(proto, "demo_aux", tmp_path)
    stamp.unlink()  # trees written before the stamp existed are stale too
    with pytest.raises(RunError, match="no GENERATOR.txt"):
        open_dataset(proto, "demo_aux", tmp_path)


def test_heldout_aux_plugin_is_new_images_of_the_aux_categories(roots, tmp_path):
    # examples/heldout_aux.py: the in-domain diagnostic target of docs/methods.md
    from pathlib import Path

    from bench.registry import load_plugin

    plugin = Path(__file__).resolve().parents[1] / "examples" / "heldout_aux.py"
    load_plugin(plugin)
    held = get_adapter("demo_aux_heldout")
    aux = get_adapter("demo_aux")
    assert held.categories == aux.categories and held.sources == aux.sources
    assert held.seed != aux.seed and held.generator_stamp() != aux.generator_stamp()
    held.generate(tmp_path)
    aux_root = roots["demo_aux"][0]
    aux_rows, held_rows = aux.scan(aux_root), held.scan(tmp_path)
    assert len(held_rows) == len(aux_rows)
    aux_bytes = {(aux_root / p).read_bytes() for p in aux_rows["image"]}
    assert not any((tmp_path / p).read_bytes() in aux_bytes for p in held_rows["image"])
