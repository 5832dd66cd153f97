"""DAGM 2007 (Wieler & Hahn), the Kaggle "DAGM_KaggleUpload" release.

Protocol: the official ``Test`` split of every ``ClassN`` with its natural imbalance
(as AnomalyCLIP and AF-CLIP use it; AdaCLIP/FAPrompt instead build a balanced merge of
Train and Test whose file names collide, see docs/datasets.md). An image is defective
iff ``Label/NNNN_label.PNG`` exists; that is cross-checked with ``Label/Labels.txt``
(tab-separated ``index, flag, image, ?, label file``; first line a count) and any
disagreement is an error. The ``Train`` split is emitted as ``split="train"`` with the
same rules.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

from .base import DatasetAdapter, Entry, child, list_dirs, list_images, register_adapter, rel

_CLASS = re.compile(r"^class(\d+)$", re.IGNORECASE)
SPLITS = {"Test": "test", "Train": "train"}


@register_adapter("dagm")
class DAGM(DatasetAdapter):
    """DAGM 2007: 10 synthetic texture classes, coarse ellipse masks on defects."""

    display_name: ClassVar[str] = "DAGM 2007"
    categories: ClassVar[tuple[str, ...]] = tuple(f"Class{i}" for i in range(1, 11))
    prompt_names: ClassVar[dict[str, str]] = {f"Class{i}": "textured surface" for i in range(1, 11)}
    archive_names: ClassVar[tuple[str, ...]] = ("DAGM_KaggleUpload", "DAGM", "DAGM2007")
    download_url: ClassVar[str] = (
        "https://www.kaggle.com/datasets/mhskjelvareid/dagm-2007-competition-dataset-optical-inspection "
        "(DAGM_KaggleUpload); original: https://hci.iwr.uni-heidelberg.de/content/"
        "weakly-supervised-learning-industrial-optical-inspection")
    licence: ClassVar[str] = ("Free for non-commercial research; cite the DAGM 2007 paper; "
                              "do not redistribute.")
    layout: ClassVar[str] = """\
DAGM_KaggleUpload/
  Class1/Test/0001.PNG
  Class1/Test/Label/Labels.txt
  Class1/Test/Label/0002_label.PNG   (only defective images have one)
  Class1/Train/...                   (same shape)
  ... Class1 ... Class10             (ClassN/ClassN/Test/... is accepted too)"""
    mask_rule: ClassVar[str] = "ClassN/<Split>/NNNN.PNG <-> ClassN/<Split>/Label/NNNN_label.PNG"
    mask_threshold: ClassVar[int] = 1
    validates_files: ClassVar[bool] = True
    published_counts: ClassVar[dict[str, int]] = {"normal": 6996, "anomalous": 1054}
    protocol_notes: ClassVar[str] = (
        "Official Test split of every class, natural imbalance (~7:1 normal:defective), as "
        "AnomalyCLIP and AF-CLIP. AdaCLIP/FAPrompt use a balanced merge of Train and Test in "
        "which same-named files overwrite each other, so image AP/F1 are not comparable "
        "between the two. Label = existence of Label/NNNN_label.PNG, cross-checked with "
        "Label/Labels.txt (a disagreement is an error that names the image). The Train split "
        "is emitted as split=train (it contains defective images too)."
    )
    bibtex: ClassVar[str] = """\
@inproceedings{wieler2007weakly,
  title     = {Weakly Supervised Learning for Industrial Optical Inspection},
  author    = {Wieler, Matthias and Hahn, Tobias},
  booktitle = {DAGM Symposium in conjunction with the GAMM Pattern Recognition Workshop},
  year      = {2007}
}"""

    def matches(self, folder: Path) -> bool:
        return any(_CLASS.match(d.name) and child(self._class_dir(d), "Test") is not None
                   for d in list_dirs(folder))

    @staticmethod
    def _class_dir(cdir: Path) -> Path:
        """``ClassN`` itself, or ``ClassN/ClassN`` when a per-class zip was unpacked into it."""
        if child(cdir, "Test") is None:
            inner = child(cdir, cdir.name)
            if inner is not None and child(inner, "Test") is not None:
                return inner
        return cdir

    def entries(self, folder: Path) -> list[Entry]:
        present = {d.name.lower(): d for d in list_dirs(folder) if _CLASS.match(d.name)}
        out: list[Entry] = []
        for category in self.categories:
            cdir = present.get(category.lower())
            cdir = self._class_dir(cdir) if cdir is not None else None
            if cdir is None:
                self.problem(folder / category, f"category folder '{category}' missing",
                             f"re-download the complete archive ({self.download_url})")
                continue
            for split_dir, split in SPLITS.items():
                sdir = child(cdir, split_dir)
                if sdir is None:
                    if split == "test":
                        self.problem(cdir / split_dir, "official Test split missing", self.redownload_fix())
                    continue
                out += self._split(folder, category, sdir, split)
        return out

    def _split(self, folder: Path, category: str, sdir: Path, split: str) -> list[Entry]:
        images = self.images_or_problem(sdir, f"{sdir.name} folder")
        label_dir = child(sdir, "Label") or (sdir / "Label")
        flags = self._labels_txt(label_dir)
        out: list[Entry] = []
        claimed: set[Path] = set()
        names = {img.name.lower() for img in images}
        for img in images:
            mask = self._index.find(label_dir, [f"{img.stem}_label.PNG"])
            flag = flags.get(img.name.lower()) if flags is not None else None
            if flags is not None:
                if flag is None:
                    self.problem(img, f"image not listed in {label_dir / 'Labels.txt'}",
                                 "restore Labels.txt and the images from the original archive")
                elif flag != int(mask is not None):
                    has = "exists" if mask is not None else "is missing"
                    self.problem(img, f"label disagreement: Labels.txt says {'defective' if flag else 'normal'} "
                                 f"but {label_dir / (img.stem + '_label.PNG')} {has}",
                                 "restore Labels.txt and the Label/ folder from the original archive")
                    continue
            if mask is not None:
                claimed.add(mask)
                out.append(Entry(category, split, rel(img, folder), 1, "defect", rel(mask, folder)))
            else:
                out.append(Entry(category, split, rel(img, folder), 0, "good"))
        if flags is not None:
            for name in sorted(set(flags) - names):
                self.problem(sdir / name, "listed in Labels.txt but the image file is missing",
                             self.redownload_fix())
        stems = {img.stem.lower() for img in images}
        for m in list_images(label_dir):
            stem = m.stem.lower()
            if m not in claimed and stem.endswith("_label") and stem[: -len("_label")] not in stems:
                self.problem(m, "label mask without its image",
                             f"restore the image from the original archive ({self.mask_rule})")
        return out

    def _labels_txt(self, label_dir: Path) -> dict[str, int] | None:
        """Image name (lower-case) -> defect flag from ``Labels.txt``; None if it is absent."""
        path = child(label_dir, "Labels.txt")
        if path is None or not path.is_file():
            self.warn(f"{label_dir / 'Labels.txt'} missing: labels taken from the _label.PNG files "
                      "alone, without the cross-check")
            return None
        flags: dict[str, int] = {}
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            parts = line.split()
            if not parts or (lineno == 1 and len(parts) == 1):
                continue
            if len(parts) < 3 or parts[1] not in ("0", "1"):
                self.problem(f"{path}:{lineno}", f"cannot parse line {line!r} (expected index, flag "
                             "0/1, image name, ...)", "restore Labels.txt from the original archive")
                continue
            flags[parts[2].lower()] = int(parts[1])
        return flags
