"""Bad raw input: ``prepare_dataset`` raises ManifestError naming the file and the fix.

The CLI maps ManifestError to exit status 2; the subprocess check at the bottom runs only
once ``bench/cli.py`` exists.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.manifest import ManifestError, manifest_path
from bench.prepare import prepare_dataset

try:
    from tests import fixtures_raw as fx
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import fixtures_raw as fx

REPO = Path(__file__).resolve().parents[1]


def _fails(dataset: str, root: Path, *needles: str, strict: bool = False) -> str:
    with pytest.raises(ManifestError) as err:
        prepare_dataset(dataset, root, strict=strict)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in:\n{msg}"
    assert "fix" in msg, msg
    assert not manifest_path(root, dataset).exists()
    return msg


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_png(tmp_path: Path) -> None:
    exp = fx.make_mvtec(tmp_path)
    bad = exp.path("screw/test/good/001.png")
    _truncate(bad)
    _fails("mvtec", tmp_path, str(bad), "truncated")


def test_truncated_jpeg(tmp_path: Path) -> None:
    exp = fx.make_kvasir(tmp_path)
    bad = exp.path("images/cju0qoxqj9q6s0835b43399p4.jpg")
    _truncate(bad, 0.7)
    _fails("kvasir", tmp_path, str(bad), "truncated")


def test_unreadable_image(tmp_path: Path) -> None:
    exp = fx.make_br35h(tmp_path)
    bad = exp.path("yes/y1.jpg")
    bad.write_bytes(b"this is not a JPEG")
    _fails("br35h", tmp_path, str(bad), "not a readable image")


def test_mask_size_differs(tmp_path: Path) -> None:
    exp = fx.make_mvtec(tmp_path)
    mask = exp.path("zipper/ground_truth/crack/000_mask.png")
    fx.write_mask(mask, size=(8, 9))
    _fails("mvtec", tmp_path, str(mask), "mask size 8x9 differs from image size 8x8")


def test_anomalous_image_without_mask(tmp_path: Path) -> None:
    exp = fx.make_mvtec(tmp_path)
    exp.path("bottle/ground_truth/scratch/10_mask.png").unlink()
    msg = _fails("mvtec", tmp_path, str(exp.path("bottle/test/scratch/10.png")), "without its mask",
                 "10_mask.png")
    assert "9.png" not in msg.replace("19.png", "")  # its neighbour pairs fine (no sorted-order shift)


def test_mask_without_image(tmp_path: Path) -> None:
    exp = fx.make_isic(tmp_path)
    orphan = tmp_path / "ISBI2016_ISIC_Part1_Test_GroundTruth" / "ISIC_0000999_Segmentation.png"
    fx.write_mask(orphan)
    _fails("isic", tmp_path, str(orphan), "without a matching image")
    assert exp.rows


def test_missing_category_folder(tmp_path: Path) -> None:
    exp = fx.make_mpdd(tmp_path)
    shutil.rmtree(exp.path("tubes"))
    _fails("mpdd", tmp_path, str(exp.path("tubes")), "category folder 'tubes' missing", "re-download")


def test_empty_defect_folder(tmp_path: Path) -> None:
    exp = fx.make_mvtec(tmp_path)
    folder = exp.path("wood/test/crack")
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "Thumbs.db").write_bytes(b"junk")  # junk does not make a folder non-empty
    shutil.rmtree(exp.path("wood/ground_truth/crack"))
    _fails("mvtec", tmp_path, str(folder), "empty defect folder")


def test_empty_label_folder(tmp_path: Path) -> None:
    exp = fx.make_br35h(tmp_path)
    shutil.rmtree(exp.path("yes"))
    exp.path("yes").mkdir()
    _fails("br35h", tmp_path, str(exp.path("yes")), "empty 'yes' folder")


def test_empty_or_missing_root(tmp_path: Path) -> None:
    _fails("mvtec", tmp_path, str(tmp_path), "no MVTec AD (mvtec) data found", "mvtec_anomaly_detection/")
    _fails("mvtec", tmp_path / "nope", str(tmp_path / "nope"), "folder not found")


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="unknown dataset adapter 'mvtech'"):
        prepare_dataset("mvtech", tmp_path)


@pytest.mark.parametrize(("make", "asked", "held"), [
    (fx.make_visa, "mvtec", "VisA (visa)"),
    (fx.make_brainmri, "br35h", "BrainMRI (brainmri)"),
    (fx.make_br35h, "brainmri", "Br35H (br35h)"),
    (fx.make_mvtec, "mpdd", "MVTec AD (mvtec)"),
    (fx.make_dagm, "sdd", "DAGM 2007 (dagm)"),
])
def test_root_holds_another_dataset(tmp_path: Path, make, asked: str, held: str) -> None:
    make(tmp_path)
    _fails(asked, tmp_path, str(tmp_path), f"holds {held}", f"zsad-bench prepare {held.split('(')[1][:-1]}")


def test_lookalike_archive_name_is_another_dataset(tmp_path: Path) -> None:
    fx.make_clinicdb(tmp_path)
    _fails("kvasir", tmp_path / "CVC-ClinicDB", "holds CVC-ClinicDB (clinicdb)")
    _fails("kvasir", tmp_path, "holds CVC-ClinicDB (clinicdb)")


def test_dagm_label_disagreement(tmp_path: Path) -> None:
    exp = fx.make_dagm(tmp_path)
    # Labels.txt says 0002 is defective, but its _label.PNG is gone
    exp.path("Class3/Test/Label/0002_label.PNG").unlink()
    _fails("dagm", tmp_path, str(exp.path("Class3/Test/0002.PNG")), "label disagreement",
           "Labels.txt says defective")


def test_dagm_label_disagreement_other_way(tmp_path: Path) -> None:
    exp = fx.make_dagm(tmp_path)
    fx.write_mask(exp.path("Class7/Train/Label/0004_label.PNG"), fmt="PNG")
    _fails("dagm", tmp_path, str(exp.path("Class7/Train/0004.PNG")), "Labels.txt says normal")


def test_dagm_image_not_in_labels_txt(tmp_path: Path) -> None:
    exp = fx.make_dagm(tmp_path)
    extra = fx.write_image(exp.path("Class2/Test/0005.PNG"), mode="L", fmt="PNG")
    _fails("dagm", tmp_path, str(extra), "not listed in")


def test_dagm_missing_labels_txt_is_a_warning(tmp_path: Path) -> None:
    exp = fx.make_dagm(tmp_path)
    exp.path("Class1/Test/Label/Labels.txt").unlink()
    df, warnings = prepare_dataset("dagm", tmp_path)
    assert len(df) == len(exp.rows)
    assert any("Labels.txt missing" in w for w in warnings)


def test_headct_labels_and_folder_disagree(tmp_path: Path) -> None:
    exp = fx.make_headct(tmp_path)
    extra = fx.write_image(exp.path("head_ct/head_ct/004.png"), mode="L")
    _fails("headct", tmp_path, str(extra), "no row in labels.csv")
    extra.unlink()
    exp.path("head_ct/head_ct/001.png").unlink()
    _fails("headct", tmp_path, str(exp.path("head_ct/head_ct/001.png")), "listed in labels.csv")


def test_visa_without_split_csv(tmp_path: Path) -> None:
    exp = fx.make_visa(tmp_path)
    exp.path("split_csv/1cls.csv").unlink()
    _fails("visa", tmp_path, str(exp.path("split_csv/1cls.csv")), "split file")


def test_visa_missing_mask(tmp_path: Path) -> None:
    exp = fx.make_visa(tmp_path)
    exp.path("pcb3/Data/Masks/Anomaly/000.png").unlink()
    _fails("visa", tmp_path, str(exp.path("pcb3/Data/Images/Anomaly/000.JPG")), "without its mask")


def test_sdd_image_without_label(tmp_path: Path) -> None:
    exp, _ = fx.make_sdd_raw(tmp_path)
    exp.path("kos02/Part1_label.bmp").unlink()
    with pytest.raises(ManifestError) as err:
        prepare_dataset("sdd", tmp_path)
    assert str(exp.path("kos02/Part1.jpg")) in str(err.value)
    assert "Part1_label.bmp" in str(err.value)


def test_isic_without_ground_truth(tmp_path: Path) -> None:
    fx.make_isic(tmp_path)
    shutil.rmtree(tmp_path / "ISBI2016_ISIC_Part1_Test_GroundTruth")
    _fails("isic", tmp_path, "ISBI2016_ISIC_Part1_Test_GroundTruth", "ground-truth folder missing")


def test_strict_turns_count_warning_into_error(tmp_path: Path) -> None:
    fx.make_headct(tmp_path)
    df, warnings = prepare_dataset("headct", tmp_path)
    assert warnings == ["headct: test split has 2 normal + 2 anomalous images, published 100 + 100 "
                        "(shared/reference/dataset_stats.csv): normal -98, anomalous -98"]
    manifest_path(tmp_path, "headct").unlink()
    _fails("headct", tmp_path, "--strict", "normal -98, anomalous -98", strict=True)


def test_several_problems_reported_together(tmp_path: Path) -> None:
    exp = fx.make_mvtec(tmp_path)
    exp.path("pill/ground_truth/crack/000_mask.png").unlink()
    _truncate(exp.path("tile/test/good/000.png"))
    fx.write_mask(exp.path("grid/ground_truth/crack/000_mask.png"), size=(4, 4))
    msg = _fails("mvtec", tmp_path, "3 problem(s)", "pill/test/crack/000.png", "tile/test/good/000.png",
                 "grid/ground_truth/crack/000_mask.png")
    assert "truncated" in msg and "without its mask" in msg and "differs" in msg


@pytest.mark.skipif(not (REPO / "bench" / "cli.py").is_file(), reason="bench/cli.py not written yet")
def test_cli_prepare_exit_codes(tmp_path: Path) -> None:
    fx.make_mvtec(tmp_path / "good")
    ok = subprocess.run([sys.executable, "-m", "bench", "prepare", "mvtec", "--root", str(tmp_path / "good")],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert manifest_path(tmp_path / "good", "mvtec").is_file()
    assert "bottle" in ok.stdout + ok.stderr
    exp = fx.make_mvtec(tmp_path / "bad")
    exp.path("cable/ground_truth/crack/000_mask.png").unlink()
    bad = subprocess.run([sys.executable, "-m", "bench", "prepare", "mvtec", "--root", str(tmp_path / "bad")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "cable/test/crack/000.png" in bad.stdout + bad.stderr
