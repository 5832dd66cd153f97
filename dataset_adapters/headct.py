"""HeadCT: the Kaggle "Head CT - hemorrhage" set (Kitamura, 2018).

200 CT slices ``head_ct/head_ct/NNN.png`` labelled by ``labels.csv`` (``id, hemorrhage``):
100 normal and 100 with haemorrhage. There are no masks (image metrics only). All 200
images are test images (as AdaCLIP; DRA's 75/25 split of the normals would leave 25).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import ClassVar

from .base import DatasetAdapter, Entry, child, register_adapter, rel


@register_adapter("headct")
class HeadCT(DatasetAdapter):
    """Head CT - hemorrhage: 100 normal + 100 haemorrhage slices, labels from labels.csv."""

    display_name: ClassVar[str] = "HeadCT"
    domain: ClassVar[str] = "medical"
    modality: ClassVar[str] = "CT"
    categories: ClassVar[tuple[str, ...]] = ("brain",)
    prompt_names: ClassVar[dict[str, str]] = {"brain": "brain"}
    has_masks: ClassVar[bool] = False
    has_image_labels: ClassVar[bool] = True
    validates_files: ClassVar[bool] = True
    archive_names: ClassVar[tuple[str, ...]] = ("head-ct-hemorrhage", "HeadCT", "head_ct_hemorrhage")
    download_url: ClassVar[str] = "https://www.kaggle.com/datasets/felipekitamura/head-ct-hemorrhage"
    licence: ClassVar[str] = "See the Kaggle page (research use); do not redistribute."
    layout: ClassVar[str] = """\
<root>/                             (the Kaggle zip, extracted as is)
  labels.csv                        (id, hemorrhage)
  head_ct/head_ct/000.png ... 199.png   (head_ct/000.png also accepted)"""
    mask_rule: ClassVar[str] = "no masks; labels.csv id N <-> head_ct/head_ct/NNN.png"
    published_counts: ClassVar[dict[str, int]] = {"normal": 100, "anomalous": 100}
    protocol_notes: ClassVar[str] = (
        "All 200 slices are test images (100 normal + 100 haemorrhage), labels from "
        "labels.csv, which is cross-checked against the image folder (a listed image that is "
        "missing, or an image without a row, is an error). No masks: pixel metrics undefined.")
    bibtex: ClassVar[str] = """\
@misc{kitamura2018headct,
  title        = {Head {CT} - hemorrhage},
  author       = {Kitamura, Felipe},
  howpublished = {Kaggle, \\url{https://www.kaggle.com/datasets/felipekitamura/head-ct-hemorrhage}},
  year         = {2018}
}"""

    def matches(self, folder: Path) -> bool:
        csv_file, img_dir = child(folder, "labels.csv"), child(folder, "head_ct")
        return csv_file is not None and csv_file.is_file() and img_dir is not None and img_dir.is_dir()

    def _image_dir(self, folder: Path) -> Path:
        outer = child(folder, "head_ct")
        inner = child(outer, "head_ct") if outer is not None else None
        return inner if inner is not None and inner.is_dir() else outer  # type: ignore[return-value]

    def entries(self, folder: Path) -> list[Entry]:
        csv_path = child(folder, "labels.csv")
        img_dir = self._image_dir(folder)
        images = {img.stem.lower(): img for img in self.images_or_problem(img_dir, "image folder")}
        out: list[Entry] = []
        seen: set[str] = set()
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # type: ignore[arg-type]
            reader = csv.reader(fh)
            header = [h.strip().lower() for h in next(reader, [])]
            if header[:2] != ["id", "hemorrhage"]:
                self.problem(csv_path, f"expected header 'id, hemorrhage', found {header}",
                             "restore labels.csv from the Kaggle download")
                return []
            for lineno, row in enumerate(reader, start=2):
                if not row or not "".join(row).strip():
                    continue
                try:
                    idx, flag = int(row[0].strip()), int(row[1].strip())
                    if flag not in (0, 1):
                        raise ValueError(flag)
                except (ValueError, IndexError):
                    self.problem(f"{csv_path}:{lineno}", f"cannot parse row {row}",
                                 "restore labels.csv from the Kaggle download")
                    continue
                img = images.get(f"{idx:03d}") or images.get(str(idx))
                if img is None:
                    self.problem(img_dir / f"{idx:03d}.png", f"listed in labels.csv (line {lineno}) "
                                 "but the image is missing", self.redownload_fix())
                    continue
                seen.add(img.stem.lower())
                out.append(Entry("brain", "test", rel(img, folder), flag,
                                 "hemorrhage" if flag else "good"))
        for stem, img in images.items():
            if stem not in seen:
                self.problem(img, "image has no row in labels.csv", "restore labels.csv from the Kaggle download")
        return out

