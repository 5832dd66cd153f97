"""VisA, the Visual Anomaly dataset (Zou et al., ECCV 2022).

The split is the one shipped with the release, ``split_csv/1cls.csv`` (columns
``object, split, label, image, mask``), as AnomalyCLIP, AdaCLIP and APRIL-GAN use it.
Its mask column is cross-checked against the name rule
``<cls>/Data/Images/Anomaly/NNN.JPG <-> <cls>/Data/Masks/Anomaly/NNN.png``.
VisA masks are not 0/255: each defect region has its own small grey value, so any
non-zero pixel is anomalous (:attr:`VisA.mask_threshold` = 1).
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath
from typing import ClassVar

from .base import DatasetAdapter, Entry, child, register_adapter

SPLIT_CSV = "split_csv/1cls.csv"


@register_adapter("visa")
class VisA(DatasetAdapter):
    """VisA: 12 categories, normal/anomaly folders, the 1cls split CSV."""

    display_name: ClassVar[str] = "VisA"
    categories: ClassVar[tuple[str, ...]] = (
        "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
        "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
    )
    prompt_names: ClassVar[dict[str, str]] = {
        "capsules": "capsules", "chewinggum": "chewing gum", "macaroni1": "macaroni",
        "macaroni2": "macaroni", "pcb1": "printed circuit board", "pcb2": "printed circuit board",
        "pcb3": "printed circuit board", "pcb4": "printed circuit board", "pipe_fryum": "pipe fryum",
    }
    archive_names: ClassVar[tuple[str, ...]] = ("VisA", "VisA_20220922", "visa_anomaly_detection")
    download_url: ClassVar[str] = ("https://github.com/amazon-science/spot-diff "
                                   "(VisA_20220922.tar)")
    licence: ClassVar[str] = "CC BY 4.0 (see LICENSE-DATASET in the archive)."
    layout: ClassVar[str] = """\
VisA/                               (VisA_20220922.tar, extracted as is)
  split_csv/1cls.csv
  candle/Data/Images/Normal/0000.JPG
  candle/Data/Images/Anomaly/000.JPG
  candle/Data/Masks/Anomaly/000.png
  candle/image_anno.csv
  ... 12 category folders: candle ... pipe_fryum"""
    mask_rule: ClassVar[str] = ("<cls>/Data/Images/Anomaly/NNN.JPG <-> <cls>/Data/Masks/Anomaly/NNN.png "
                                "(as listed in split_csv/1cls.csv)")
    mask_threshold: ClassVar[int] = 1
    validates_files: ClassVar[bool] = True
    published_counts: ClassVar[dict[str, int]] = {"normal": 962, "anomalous": 1200}
    published_category_counts: ClassVar[dict[str, tuple[int, int]]] = {
        "candle": (100, 100), "capsules": (60, 100), "cashew": (50, 100), "chewinggum": (50, 100),
        "fryum": (50, 100), "macaroni1": (100, 100), "macaroni2": (100, 100), "pcb1": (100, 100),
        "pcb2": (100, 100), "pcb3": (101, 100), "pcb4": (101, 100), "pipe_fryum": (50, 100),
    }
    counts_source: ClassVar[str] = "dataset_stats.csv; per category: AA-CLIP metadata (anchor notes 2.2)"
    protocol_notes: ClassVar[str] = (
        "Split from the release's split_csv/1cls.csv (test rows = evaluation and, with VisA as "
        "auxiliary set, training; train rows emitted as split=train). Masks are multi-valued "
        "(one small grey value per defect region), so any non-zero pixel is anomalous; a "
        "'> 127' rule would lose every defect. The defect type is not in the CSV, so anomalous "
        "rows carry defect='anomaly'."
    )
    bibtex: ClassVar[str] = """\
@inproceedings{zou2022spot,
  title     = {{SPot-the-Difference} Self-supervised Pre-training for Anomaly Detection and Segmentation},
  author    = {Zou, Yang and Jeong, Jongheon and Pemula, Latha and Zhang, Dongqing and Dabeer, Onkar},
  booktitle = {European Conference on Computer Vision (ECCV)},
  pages     = {392--408},
  year      = {2022}
}"""

    def matches(self, folder: Path) -> bool:
        return (folder / "split_csv").is_dir() or any(
            (folder / c / "Data" / "Images").is_dir() for c in self.categories)

    def entries(self, folder: Path) -> list[Entry]:
        csv_path = folder / SPLIT_CSV
        if not csv_path.is_file():
            self.problem(csv_path, "the split file of the release is missing",
                         f"extract VisA_20220922.tar completely (it ships split_csv/); {self.download_url}")
            return []
        missing = [c for c in self.categories if not (folder / c).is_dir()]
        for c in missing:
            self.problem(folder / c, f"category folder '{c}' missing",
                         f"re-download and extract the complete archive ({self.download_url})")
        out: list[Entry] = []
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            need = {"object", "split", "label", "image", "mask"}
            if not reader.fieldnames or not need <= {f.strip() for f in reader.fieldnames}:
                self.problem(csv_path, f"expected columns {sorted(need)}, found {reader.fieldnames}",
                             "restore split_csv/1cls.csv from the original archive")
                return []
            for lineno, raw in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
                cat, split, label = row["object"], row["split"].lower(), row["label"].lower()
                if cat in missing:
                    continue
                where = f"{csv_path}:{lineno}"
                if cat not in self.categories:
                    self.problem(where, f"unknown category '{cat}'", "restore the original 1cls.csv")
                    continue
                if split not in ("train", "test") or label not in ("normal", "anomaly"):
                    self.problem(where, f"unexpected split/label '{split}'/'{label}'",
                                 "restore the original 1cls.csv")
                    continue
                image = folder / row["image"]
                if not image.is_file():
                    self.problem(image, f"image listed in {SPLIT_CSV} (line {lineno}) not found",
                                 self.redownload_fix())
                    continue
                if label == "normal":
                    out.append(Entry(cat, split, row["image"], 0, "good"))
                    continue
                mask = self._mask(folder, image, row["mask"], where)
                out.append(Entry(cat, split, row["image"], 1, "anomaly", mask))
        return out

    def _mask(self, folder: Path, image: Path, listed: str, where: str) -> str | None:
        """The mask of an anomalous image: the CSV's entry, checked against the name rule."""
        expected = image.parent.parent.parent / "Masks" / image.parent.name / f"{image.stem}.png"
        if listed:
            if PurePosixPath(listed).stem != image.stem:
                self.problem(where, f"mask '{listed}' does not belong to image '{image.name}'",
                             f"restore the original 1cls.csv ({self.mask_rule})")
                return None
            mask = folder / listed
        else:
            mask = expected
        found = mask if mask.is_file() else child(mask.parent, mask.name)
        if found is None or not found.is_file():
            self.problem(image, f"anomalous image without its mask (expected {mask})",
                         f"restore the mask from the original archive ({self.mask_rule})")
            return None
        return found.relative_to(folder).as_posix()
