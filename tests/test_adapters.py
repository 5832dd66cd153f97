"""Every benchmark adapter on a generated raw-layout fixture: exact manifests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.manifest import COLUMNS, DATASET_IDS, ManifestError, manifest_path, read
from bench.prepare import check_counts, format_counts, layouts_help, prepare_dataset, render_docs
from bench.registry import ADAPTERS, get_adapter

try:
    from tests import fixtures_raw as fx
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import fixtures_raw as fx

REPO = Path(__file__).resolve().parents[1]


def _rows(df: pd.DataFrame) -> set[tuple]:
    return {(r.category, r.split, r.image, r.mask if isinstance(r.mask, str) else None,
             int(r.label), r.defect) for r in df.itertuples()}


@pytest.mark.parametrize("dataset", DATASET_IDS)
def test_prepare_fixture_exact(dataset: str, tmp_path: Path) -> None:
    exp = fx.MAKERS[dataset](tmp_path)
    df, warnings = prepare_dataset(dataset, tmp_path)
    assert list(df.columns) == list(COLUMNS)
    assert _rows(df) == exp.as_set()
    assert len(df) == len(exp.rows)  # nothing counted twice
    adapter = get_adapter(dataset)
    assert set(df["dataset"]) == {dataset}
    assert set(df["domain"]) == {adapter.domain}
    assert set(df["modality"]) == {adapter.modality}
    assert set(df["category"]) <= set(adapter.categories)
    # header sizes are the real ones
    for r in df.head(20).itertuples():
        with Image.open(tmp_path / r.image) as im:
            assert (r.width, r.height) == im.size
    # the manifest is on disk and reads back identically
    back = read(manifest_path(tmp_path, dataset))
    pd.testing.assert_frame_equal(back, df)
    # tiny fixtures never match the published counts: a warning names the difference
    n, a = exp.test_counts()
    assert any(f"{n} normal + {a} anomalous" in w for w in warnings), warnings


@pytest.mark.parametrize("dataset", DATASET_IDS)
def test_root_may_be_the_archive_folder_itself(dataset: str, tmp_path: Path) -> None:
    """--root X and --root X/<archive folder> give the same rows (paths re-based)."""
    exp = fx.MAKERS[dataset](tmp_path, top="the_download")
    df, _ = prepare_dataset(dataset, tmp_path / "the_download")
    stripped = {(c, s, i.removeprefix("the_download/"), m.removeprefix("the_download/") if m else None, lab, d)
                for c, s, i, m, lab, d in exp.rows}
    assert _rows(df) == stripped
    df2, _ = prepare_dataset(dataset, tmp_path)
    assert _rows(df2) == exp.as_set()


STATS_NAMES = {
    "MVTec AD": "mvtec", "VisA": "visa", "MPDD": "mpdd", "BTAD": "btad", "SDD": "sdd", "DAGM": "dagm",
    "DTD-Synthetic": "dtd_synthetic", "ISIC": "isic", "ClinicDB": "clinicdb", "ColonDB": "colondb",
    "Kvasir": "kvasir", "Endo": "endo", "HeadCT": "headct", "BrainMRI": "brainmri", "Br35H": "br35h",
}


def test_published_counts_agree_with_dataset_stats() -> None:
    stats_csv = REPO.parent / "shared" / "reference" / "dataset_stats.csv"
    if not stats_csv.is_file():
        pytest.skip(f"{stats_csv} not present")
    stats = pd.read_csv(stats_csv)
    assert set(stats["dataset"]) == set(STATS_NAMES)
    for row in stats.itertuples():
        a = get_adapter(STATS_NAMES[row.dataset])
        assert len(a.categories) == row.categories, row.dataset
        assert a.domain == row.domain and a.modality == row.modality, row.dataset
        assert a.has_masks == (row.has_masks == "yes"), row.dataset
        assert a.has_image_labels == (row.has_image_labels == "yes"), row.dataset
        pub = (a.published_counts["normal"], a.published_counts["anomalous"])
        if a.name == "sdd":  # documented protocol difference: DRA crops, not the paper's 181/74
            assert (row.test_normal, row.test_anomalous) == (181, 74) and pub == (286, 54)
            assert "181/74" in a.counts_source
        else:
            assert pub == (row.test_normal, row.test_anomalous), row.dataset
        per = a.published_category_counts
        if per:
            assert set(per) == set(a.categories)
            assert (sum(v[0] for v in per.values()), sum(v[1] for v in per.values())) == pub


@pytest.mark.parametrize("dataset", DATASET_IDS)
def test_metadata_complete(dataset: str) -> None:
    a = get_adapter(dataset)
    for attr in ("display_name", "download_url", "layout", "licence", "bibtex", "mask_rule",
                 "protocol_notes", "archive_names"):
        assert getattr(a, attr), f"{dataset}: metadata '{attr}' is empty -> fill it in the adapter"
    assert a.domain in ("industrial", "medical")
    assert a.categories and all(a.prompt_name(c) for c in a.categories)
    assert a.bibtex.lstrip().startswith("@")
    assert isinstance(a.mask_threshold, int) and 1 <= a.mask_threshold <= 255
    assert a.has_image_labels == (a.published_counts["normal"] > 0)
    assert get_adapter("mvtec").prompt_name("metal_nut") == "metal nut"


def test_archive_names_are_unambiguous() -> None:
    """``data/<id>/`` (the runner's default root) is never mistaken for another dataset."""
    from dataset_adapters.base import norm_name

    owner: dict[str, str] = {}
    for name in DATASET_IDS:
        names = {norm_name(n) for n in get_adapter(name).archive_names}
        assert norm_name(name) in names, f"{name}: add '{name}' to archive_names"
        for n in names:
            assert owner.setdefault(n, name) == name, f"archive name {n!r} in {owner[n]} and {name}"


@pytest.mark.parametrize("dataset", DATASET_IDS)
def test_runner_style_root_named_like_the_id(dataset: str, tmp_path: Path) -> None:
    root = tmp_path / dataset
    exp = fx.MAKERS[dataset](root)
    df, _ = prepare_dataset(dataset, root)
    assert _rows(df) == exp.as_set()


def test_mask_thresholds() -> None:
    assert get_adapter("visa").mask_threshold == 1  # multi-valued masks: any non-zero
    assert get_adapter("kvasir").mask_threshold == 128  # JPEG masks


def test_visa_masks_are_multivalued_and_kept(tmp_path: Path) -> None:
    fx.make_visa(tmp_path)
    df, _ = prepare_dataset("visa", tmp_path)
    m = df[df["label"] == 1].iloc[0]["mask"]
    arr = np.asarray(Image.open(tmp_path / m))
    assert set(np.unique(arr)) == {0, 1, 2}
    thr = get_adapter("visa").mask_threshold
    assert (arr >= thr).sum() == (arr > 0).sum() > 0
    assert (arr >= 128).sum() == 0  # a 0/255 assumption would erase every defect


def test_kvasir_jpeg_masks_binarise_at_128(tmp_path: Path) -> None:
    fx.make_kvasir(tmp_path)
    df, _ = prepare_dataset("kvasir", tmp_path)
    assert all(str(m).endswith(".jpg") for m in df["mask"])
    arr = np.asarray(Image.open(tmp_path / df.iloc[0]["mask"]).convert("L"))
    expected = np.zeros_like(arr, bool)
    expected[2:5, 2:5] = True
    assert ((arr >= get_adapter("kvasir").mask_threshold) == expected).all()


def test_sdd_raw_derivation(tmp_path: Path) -> None:
    exp, info = fx.make_sdd_raw(tmp_path)
    df, _ = prepare_dataset("sdd", tmp_path)
    assert _rows(df) == exp.as_set()
    anomalous = sorted(Path(p).stem for p in df[df["label"] == 1]["image"])
    assert anomalous == info["defect_crops"] == ["kos01_Part1_2", "kos02_Part0_0", "kos02_Part0_1",
                                                 "kos03_Part2_1"]
    crops = tmp_path / "KolektorSDD" / "sdd_crops"
    with Image.open(crops / "test" / "defect" / "kos01_Part1_2.png") as im:
        assert im.size == (8, 4)
    mask = np.asarray(Image.open(crops / "ground_truth" / "defect" / "kos01_Part1_2_mask.png"))
    assert mask.any()
    # 12 parts x 3 crops = 36; 32 normal -> 8 test / 24 train
    assert (df["split"] == "test").sum() == 8 + 4 and (df["split"] == "train").sum() == 24
    # re-running re-uses the crops (marker unchanged) and gives the same manifest
    before = {p: p.stat().st_mtime_ns for p in crops.rglob("*.png")}
    df2, _ = prepare_dataset("sdd", tmp_path)
    pd.testing.assert_frame_equal(df, df2)
    assert {p: p.stat().st_mtime_ns for p in crops.rglob("*.png")} == before


def test_sdd_rederives_when_raw_files_change(tmp_path: Path) -> None:
    exp, _ = fx.make_sdd_raw(tmp_path)
    df, _ = prepare_dataset("sdd", tmp_path)
    exp.path("kos04/Part2.jpg").unlink()
    exp.path("kos04/Part2_label.bmp").unlink()
    df2, _ = prepare_dataset("sdd", tmp_path)
    assert len(df2) == len(df) - 3
    assert not df2["image"].str.contains("kos04_Part2").any()
    assert not list((tmp_path / "KolektorSDD" / "sdd_crops").rglob("kos04_Part2_*"))


def test_sdd_refuses_to_overwrite_a_foreign_crops_folder(tmp_path: Path) -> None:
    fx.make_sdd_raw(tmp_path)
    own = tmp_path / "KolektorSDD" / "sdd_crops"
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    with pytest.raises(ManifestError, match="not written by zsad-bench"):
        prepare_dataset("sdd", tmp_path)
    assert (own / "notes.txt").read_text() == "mine"


def test_sdd_already_derived_copy(tmp_path: Path) -> None:
    exp = fx.make_sdd_derived(tmp_path)
    df, _ = prepare_dataset("sdd", tmp_path)
    assert _rows(df) == exp.as_set()
    assert set(df["split"]) == {"test"}


def test_dagm_per_class_zip_nesting(tmp_path: Path) -> None:
    """ClassN/ClassN/{Train,Test} (a per-class zip unpacked into ClassN/) is read too."""
    exp = fx.make_dagm(tmp_path)
    top = exp.path("Class4")
    inner = tmp_path / "tmp_class4"
    top.rename(inner)
    top.mkdir()
    inner.rename(top / "Class4")
    df, _ = prepare_dataset("dagm", tmp_path)
    nested = {(c, s, i.replace("Class4/", "Class4/Class4/", 1) if c == "Class4" else i,
               m.replace("Class4/", "Class4/Class4/", 1) if (m and c == "Class4") else m, lab, d)
              for c, s, i, m, lab, d in exp.rows}
    assert _rows(df) == nested


def test_brainmri_duplicates_not_counted_twice(tmp_path: Path) -> None:
    fx.make_brainmri(tmp_path)
    df, _ = prepare_dataset("brainmri", tmp_path)
    assert len(df) == 7
    assert df["image"].str.startswith("brain_tumor_dataset/").all()
    assert sorted(Path(p).suffix for p in df["image"]) == sorted([".jpeg", ".JPG", ".jpg", ".jpg", ".png",
                                                                  ".JPG", ".jpeg"])
    # the same root is not taken for Br35H (whose layout is also no/ + yes/)
    assert not get_adapter("br35h").detect(tmp_path)


def test_br35h_excludes_pred(tmp_path: Path) -> None:
    fx.make_br35h(tmp_path)
    df, _ = prepare_dataset("br35h", tmp_path)
    assert not df["image"].str.startswith("pred/").any()
    assert (df["label"] == 1).sum() == 2 and (df["label"] == 0).sum() == 3
    assert not get_adapter("brainmri").detect(tmp_path)


def test_lookalike_polyp_sets_in_one_folder(tmp_path: Path) -> None:
    """One folder with several images/+masks/ datasets: the archive name picks each one."""
    makers = {"clinicdb": fx.make_clinicdb, "colondb": fx.make_colondb, "kvasir": fx.make_kvasir,
              "endo": fx.make_endo}
    expected = {name: make(tmp_path) for name, make in makers.items()}
    for name, exp in expected.items():
        df, _ = prepare_dataset(name, tmp_path)
        assert _rows(df) == exp.as_set(), name
        assert manifest_path(tmp_path, name).is_file()


def test_all_datasets_side_by_side(tmp_path: Path) -> None:
    """All fixtures in one folder: each dataset is found and only its own files are read."""
    expected = {name: make(tmp_path) for name, make in fx.MAKERS.items()
                if name not in ("headct", "isic", "brainmri", "br35h")}
    for name in ("headct", "isic", "brainmri", "br35h"):
        expected[name] = fx.MAKERS[name](tmp_path, top=name)
    for name, exp in expected.items():
        df, _ = prepare_dataset(name, tmp_path)
        assert _rows(df) == exp.as_set(), name


def test_format_counts(tmp_path: Path) -> None:
    fx.make_btad(tmp_path)
    df, _ = prepare_dataset("btad", tmp_path)
    text = format_counts(df)
    lines = text.splitlines()
    assert lines[0].split() == ["category", "normal", "anomalous", "test", "train"]
    assert lines[2].split() == ["01", "2", "2", "4", "1"]  # 01 has two defects (9, 10)
    assert lines[-1].split() == ["total", "6", "4", "10", "3"]


def test_check_counts_names_category_difference(tmp_path: Path) -> None:
    fx.make_mpdd(tmp_path)
    df, _ = prepare_dataset("mpdd", tmp_path)
    warnings = check_counts(get_adapter("mpdd"), df)
    assert "mpdd: test split has 12 normal + 7 anomalous images, published 176 + 282" in warnings[0]
    assert "normal -164, anomalous -275" in warnings[0]
    assert any(w.startswith("mpdd/connector: 2 normal + 1 anomalous test images, published 30 + 14")
               for w in warnings)


def test_registry_lists_all_benchmark_datasets() -> None:
    assert set(DATASET_IDS) <= set(ADAPTERS.names())


def test_layouts_help_and_docs_up_to_date() -> None:
    text = layouts_help()
    for name in DATASET_IDS:
        assert f"{name}: " in text
    docs = REPO / "docs" / "datasets.md"
    assert docs.is_file(), "docs/datasets.md missing -> python -m bench.prepare --docs docs/datasets.md"
    assert docs.read_text(encoding="utf-8") == render_docs(), (
        "docs/datasets.md is out of date -> python -m bench.prepare --docs docs/datasets.md")
