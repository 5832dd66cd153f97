"""AnomalyCLIP/AdaCLIP meta.json import and export (bench.metajson)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from bench.manifest import ManifestError
from bench.metajson import export_meta, import_meta
from bench.prepare import prepare_dataset

try:
    from tests import fixtures_raw as fx
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import fixtures_raw as fx


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["split", "image"]).reset_index(drop=True)


def test_export_format_and_round_trip(tmp_path: Path) -> None:
    fx.make_mvtec(tmp_path)
    df, _ = prepare_dataset("mvtec", tmp_path)
    out = export_meta(df, tmp_path / "meta.json")
    meta = json.loads(out.read_text())
    assert set(meta) == {"train", "test"}
    assert set(meta["test"]) == set(df["category"])
    rec = next(r for r in meta["test"]["bottle"] if r["img_path"].endswith("test/crack/10.png"))
    assert rec == {"img_path": "mvtec_anomaly_detection/bottle/test/crack/10.png",
                   "mask_path": "mvtec_anomaly_detection/bottle/ground_truth/crack/10_mask.png",
                   "cls_name": "bottle", "specie_name": "crack", "anomaly": 1}
    good = next(r for r in meta["test"]["bottle"] if r["anomaly"] == 0)
    assert good["mask_path"] == "" and good["anomaly"] == 0 and good["specie_name"] == "good"
    assert sum(len(v) for v in meta["test"].values()) == int((df["split"] == "test").sum())
    back = import_meta(out, "mvtec")
    pd.testing.assert_frame_equal(_sorted(back), _sorted(df))


def test_export_test_split_only_keeps_train_key(tmp_path: Path) -> None:
    fx.make_btad(tmp_path)
    df, _ = prepare_dataset("btad", tmp_path)
    meta = json.loads(export_meta(df, tmp_path / "meta.json", splits=("test",)).read_text())
    assert meta["train"] == {} and set(meta["test"]) == {"01", "02", "03"}


def test_export_with_roots_rebases_paths(tmp_path: Path) -> None:
    fx.make_headct(tmp_path / "h")
    fx.make_isic(tmp_path / "i")
    dfs = {"headct": prepare_dataset("headct", tmp_path / "h")[0],
           "isic": prepare_dataset("isic", tmp_path / "i")[0]}
    out = export_meta(dfs, tmp_path / "meta" / "meta.json",
                      roots={"headct": tmp_path / "h", "isic": tmp_path / "i"})
    meta = json.loads(out.read_text())
    assert meta["test"]["brain"][0]["img_path"] == "../h/head_ct/head_ct/000.png"
    assert meta["test"]["skin"][0]["mask_path"].startswith("../i/ISBI2016_ISIC_Part1_Test_GroundTruth/")


def test_export_refuses_colliding_class_names(tmp_path: Path) -> None:
    fx.make_clinicdb(tmp_path)
    fx.make_kvasir(tmp_path)
    dfs = {n: prepare_dataset(n, tmp_path)[0] for n in ("clinicdb", "kvasir")}
    with pytest.raises(ManifestError, match="category 'colon' occurs in datasets"):
        export_meta(dfs, tmp_path / "meta.json")


def test_import_anomalyclip_medical_absolute_paths(tmp_path: Path) -> None:
    """AnomalyCLIP's medical scripts leak absolute paths; they become root-relative."""
    exp = fx.make_kvasir(tmp_path)
    recs = [{"img_path": str(tmp_path / img), "mask_path": str(tmp_path / mask), "cls_name": "colon",
             "specie_name": "images", "anomaly": 1} for _, _, img, mask, _, _ in exp.rows]
    (tmp_path / "meta.json").write_text(json.dumps({"train": {}, "test": {"colon": recs}}))
    df = import_meta(tmp_path / "meta.json", "kvasir")
    assert set(df["image"]) == {r[2] for r in exp.rows}
    assert set(df["mask"]) == {r[3] for r in exp.rows}
    assert set(df["domain"]) == {"medical"} and set(df["modality"]) == {"endoscopy"}
    assert (df["width"] == 8).all()


def test_import_dagm_script_keys_and_directory_masks(tmp_path: Path) -> None:
    """AnomalyCLIP's DAGM.py writes Train/Test; a mask_path that is a folder means 'no mask'."""
    exp = fx.make_headct(tmp_path)
    recs = [{"img_path": img, "mask_path": "head_ct" if lab else "", "cls_name": "brain",
             "specie_name": "", "anomaly": lab} for _, _, img, _, lab, _ in exp.rows]
    (tmp_path / "meta.json").write_text(json.dumps({"Train": {}, "Test": {"brain": recs}}))
    df = import_meta(tmp_path / "meta.json", "headct")
    assert df["mask"].isna().all()
    assert sorted(df["defect"]) == ["anomaly", "anomaly", "good", "good"]
    assert set(df["split"]) == {"test"}


def test_import_errors_name_the_file(tmp_path: Path) -> None:
    fx.make_br35h(tmp_path)
    recs = [{"img_path": "yes/missing.jpg", "mask_path": "", "cls_name": "brain", "specie_name": "yes",
             "anomaly": 1}]
    (tmp_path / "meta.json").write_text(json.dumps({"train": {}, "test": {"brain": recs}}))
    with pytest.raises(ManifestError, match="yes/missing.jpg: file not found"):
        import_meta(tmp_path / "meta.json", "br35h")
    with pytest.raises(ManifestError, match="not registered -> pass domain="):
        import_meta(tmp_path / "meta.json", "my_set")
    df = import_meta(tmp_path / "meta.json", "my_set", domain="medical", modality="MRI", read_sizes=False)
    assert df.loc[0, "dataset"] == "my_set" and df.loc[0, "width"] == 0
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ManifestError, match="bad.json"):
        import_meta(tmp_path / "bad.json", "br35h")
    outside = [{"img_path": "/elsewhere/x.png", "mask_path": "", "cls_name": "b", "specie_name": "",
                "anomaly": 0}]
    (tmp_path / "out.json").write_text(json.dumps({"test": {"b": outside}}))
    with pytest.raises(ManifestError, match="absolute path outside"):
        import_meta(tmp_path / "out.json", "br35h")
