"""SDD: KolektorSDD (Tabernik et al., 2020) in the de-facto ZSAD protocol.

Every ZSAD paper's "SDD" is a *derived* dataset (DRA's ``convert_SDD.py``, copied by
AdaCLIP as ``sdd-pre.py``): each raw image ``kosNN/PartK.jpg`` is cut along its height into
three crops (rows ``[0, h//3)``, ``[h//3, 2h//3)``, ``[2h//3, h)``); a crop is anomalous if
the same crop of ``PartK_label.bmp`` has any non-zero pixel; the normal crops are split
75/25 with ``sklearn.model_selection.train_test_split(test_size=0.25, random_state=42)``.

This adapter derives that protocol itself from the raw release, visiting folders and
parts in natural order (the original script used ``os.listdir`` order, which differs
between file systems), and writes the crops under ``<located root>/sdd_crops/`` in the
circulating layout::

    sdd_crops/train/good/kos01_Part0_0.png
    sdd_crops/test/good/kos01_Part0_1.png
    sdd_crops/test/defect/kos01_Part5_2.png
    sdd_crops/ground_truth/defect/kos01_Part5_2_mask.png

On the full release this gives 286 normal + 54 anomalous test crops (AnomalyCLIP #19).
Already-derived copies that circulate (``SDD/{test/good,test/defect,ground_truth/defect}``,
optionally with ``train/good``) are read as they are.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import ClassVar

from PIL import Image

from bench.manifest import ManifestError

from .base import DatasetAdapter, Entry, list_dirs, list_images, natural_key, register_adapter, rel

CROPS_DIR = "sdd_crops"
MARKER = ".zsad-bench-derived.json"
_KOS = re.compile(r"^kos\d+$", re.IGNORECASE)
_PROTOCOL_VERSION = 1


def crop_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The three (left, top, right, bottom) boxes of the DRA vertical split."""
    cuts = [0, height // 3, 2 * height // 3, height]
    return [(0, cuts[i], width, cuts[i + 1]) for i in range(3)]


@register_adapter("sdd")
class SDD(DatasetAdapter):
    """KolektorSDD, three crops per image (the DRA/AdaCLIP/AnomalyCLIP protocol)."""

    display_name: ClassVar[str] = "SDD (KolektorSDD)"
    categories: ClassVar[tuple[str, ...]] = ("electrical_commutators",)
    prompt_names: ClassVar[dict[str, str]] = {"electrical_commutators": "electrical commutator"}
    archive_names: ClassVar[tuple[str, ...]] = (
        "KolektorSDD", "SDD", "sdd_crops", "SDD_anomaly_detection", "electrical_commutators",
    )
    download_url: ClassVar[str] = "https://www.vicos.si/resources/kolektorsdd/ (KolektorSDD.zip)"
    licence: ClassVar[str] = "CC BY-NC-SA 4.0 (non-commercial); do not redistribute."
    layout: ClassVar[str] = """\
KolektorSDD/                        (KolektorSDD.zip, extracted as is)
  kos01/Part0.jpg
  kos01/Part0_label.bmp
  ... kos01 ... kos50
or an already-derived copy:
SDD/
  test/good/kos01_Part0_0.png
  test/defect/kos01_Part5_2.png
  ground_truth/defect/kos01_Part5_2_mask.png
  train/good/...                    (optional)"""
    mask_rule: ClassVar[str] = ("raw: kosNN/PartK.jpg <-> kosNN/PartK_label.bmp; crops: "
                                "test/defect/X.png <-> ground_truth/defect/X_mask.png")
    mask_threshold: ClassVar[int] = 1
    validates_files: ClassVar[bool] = True
    published_counts: ClassVar[dict[str, int]] = {"normal": 286, "anomalous": 54}
    counts_source: ClassVar[str] = (
        "DRA/AdaCLIP crop protocol on the full release (AnomalyCLIP #19); the AnomalyCLIP paper's "
        "181/74 (dataset_stats.csv) is not reproducible from any released script")
    protocol_notes: ClassVar[str] = (
        "Derived from the raw KolektorSDD release: three crops along the image height, a crop "
        "is anomalous if its label crop has any non-zero pixel, normal crops split 75/25 by "
        "train_test_split(random_state=42) in natural folder/part order -> 286 normal + 54 "
        "anomalous test crops. The AnomalyCLIP paper's 181/74 cannot be reproduced from any "
        "released script, so numbers are not comparable to that table. Crops are written "
        "losslessly (PNG) to sdd_crops/ under the dataset root and re-used while the raw "
        "files are unchanged. Circulating derived copies (SDD/test/...) are read as they are."
    )
    bibtex: ClassVar[str] = """\
@article{tabernik2020segmentation,
  title   = {Segmentation-based deep-learning approach for surface-defect detection},
  author  = {Tabernik, Domen and {\\v{S}}ela, Samo and Skvar{\\v{c}}, Jure and Sko{\\v{c}}aj, Danijel},
  journal = {Journal of Intelligent Manufacturing},
  volume  = {31},
  number  = {3},
  pages   = {759--776},
  year    = {2020}
}"""

    # -- layout ----------------------------------------------------------------------
    @staticmethod
    def _raw_dirs(folder: Path) -> list[Path]:
        return [d for d in list_dirs(folder) if _KOS.match(d.name)]

    @staticmethod
    def _is_derived(folder: Path) -> bool:
        return all((folder / p).is_dir() for p in ("test/good", "test/defect", "ground_truth/defect"))

    def matches(self, folder: Path) -> bool:
        return bool(self._raw_dirs(folder)) or self._is_derived(folder)

    def entries(self, folder: Path) -> list[Entry]:
        if self._raw_dirs(folder):
            crops = self.derive(folder)
            return [Entry(e.category, e.split, f"{CROPS_DIR}/{e.image}", e.label, e.defect,
                          f"{CROPS_DIR}/{e.mask}" if e.mask else None)
                    for e in self._derived_entries(crops)]
        return self._derived_entries(folder)

    def _derived_entries(self, folder: Path) -> list[Entry]:
        cat = self.categories[0]
        out: list[Entry] = []
        for img in self.images_or_problem(folder / "test" / "good", "normal test folder"):
            out.append(Entry(cat, "test", rel(img, folder), 0, "good"))
        claimed: set[Path] = set()
        gt = folder / "ground_truth" / "defect"
        for img in self.images_or_problem(folder / "test" / "defect", "defect folder"):
            mask = self.pair_mask(img, gt, [f"{img.stem}_mask.png", f"{img.stem}.png"])
            if mask:
                claimed.add(mask)
            out.append(Entry(cat, "test", rel(img, folder), 1, "defect", rel(mask, folder) if mask else None))
        self.check_orphans(gt, claimed)
        for img in list_images(folder / "train" / "good"):
            out.append(Entry(cat, "train", rel(img, folder), 0, "good"))
        return out

    # -- derivation from the raw release ---------------------------------------------
    @staticmethod
    def _clear(out: Path, marker: Path) -> None:
        """Empty (or create) the crop folders; the marker goes first so a crash re-derives."""
        if marker.is_file():
            marker.unlink()
        for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
            d = out / sub
            d.mkdir(parents=True, exist_ok=True)
            for old in d.glob("*.png"):
                old.unlink()

    def _raw_pairs(self, folder: Path) -> list[tuple[str, Path, Path]]:
        """(crop stem prefix, image, label) of every raw part; problems for broken pairs."""
        pairs = []
        for kos in self._raw_dirs(folder):
            files = list_images(kos)
            labels = {p.name.lower(): p for p in files if p.stem.lower().endswith("_label")}
            images = [p for p in files if not p.stem.lower().endswith("_label")]
            if not images:
                self.problem(kos, "empty folder: no PartK.jpg images", self.redownload_fix())
            used = set()
            for img in images:
                lab = labels.get(f"{img.stem}_label.bmp".lower())
                if lab is None:
                    self.problem(img, f"image without its label file (expected {kos / (img.stem + '_label.bmp')})",
                                 f"restore it from the original archive ({self.mask_rule})")
                    continue
                used.add(lab.name.lower())
                pairs.append((f"{kos.name}_{img.stem}", img, lab))
            for name, lab in labels.items():
                if name not in used:
                    self.problem(lab, "label file without its image",
                                 f"restore the image from the original archive ({self.mask_rule})")
        return pairs

    def derive(self, folder: Path) -> Path:
        """Write the three-crop SDD under ``folder/sdd_crops`` (re-used while unchanged)."""
        from sklearn.model_selection import train_test_split

        pairs = self._raw_pairs(folder)
        self.raise_problems()
        out = folder / CROPS_DIR
        signature = {
            "protocol": _PROTOCOL_VERSION,
            "sources": [[p.relative_to(folder).as_posix(), p.stat().st_size, q.stat().st_size]
                        for _, p, q in pairs],
        }
        marker = out / MARKER
        if marker.is_file():
            try:
                if json.loads(marker.read_text()) == signature:
                    return out
            except (OSError, ValueError):
                pass
        elif out.exists() and any(out.iterdir()):
            raise ManifestError(
                f"{out}: folder exists but was not written by zsad-bench\n  fix: move it away; "
                "prepare writes the derived SDD crops there")

        # pass 1: labels only -> which crops are anomalous
        crops: list[tuple[str, int, int, bool]] = []  # (name, pair index, crop index, anomalous)
        ordered = sorted(pairs, key=lambda t: natural_key(t[0]))
        for k, (stem, img_path, lab_path) in enumerate(ordered):
            try:
                with Image.open(img_path) as im, Image.open(lab_path) as lab:
                    size = im.size
                    lab = lab.convert("L")
            except OSError as err:
                self.problem(lab_path, f"unreadable or truncated label or image ({err})",
                             self.redownload_fix())
                continue
            if lab.size != size:
                self.problem(lab_path, f"label size {lab.size[0]}x{lab.size[1]} differs from "
                             f"image size {size[0]}x{size[1]} of {img_path}",
                             "use the label file shipped with this image")
                continue
            for i, box in enumerate(crop_boxes(size[1], size[0])):
                crops.append((f"{stem}_{i}", k, i, lab.crop(box).getbbox() is not None))
        self.raise_problems()
        normal = [c[0] for c in crops if not c[3]]
        n_defect = len(crops) - len(normal)
        if not normal or not n_defect:
            raise ManifestError(f"{folder}: the raw release yields {len(normal)} normal and "
                                f"{n_defect} anomalous crops\n  fix: {self.redownload_fix()}")
        train, _test = train_test_split(normal, test_size=0.25, random_state=42)
        train_set = set(train)
        # pass 2: write the crops, one source image in memory at a time
        try:
            self._clear(out, marker)
        except OSError as err:
            raise ManifestError(f"{out}: cannot write the derived crops ({err})\n  fix: make the "
                                "dataset folder writable (prepare writes sdd_crops/ next to kosNN/)") from err
        by_pair: dict[int, list[tuple[str, int, bool]]] = {}
        for name, k, i, anomalous in crops:
            by_pair.setdefault(k, []).append((name, i, anomalous))
        for k, items in by_pair.items():
            _stem, img_path, lab_path = ordered[k]
            try:
                with Image.open(img_path) as im, Image.open(lab_path) as lab:
                    im.load()
                    lab = lab.convert("L")
            except OSError as err:
                self.problem(img_path, f"unreadable or truncated image ({err})", self.redownload_fix())
                continue
            boxes = crop_boxes(im.size[1], im.size[0])
            for name, i, anomalous in items:
                if anomalous:
                    targets = [(im, out / "test" / "defect" / f"{name}.png"),
                               (lab, out / "ground_truth" / "defect" / f"{name}_mask.png")]
                else:
                    sub = "train" if name in train_set else "test"
                    targets = [(im, out / sub / "good" / f"{name}.png")]
                for src, dst in targets:
                    try:
                        src.crop(boxes[i]).save(dst)
                    except OSError as err:
                        raise ManifestError(f"{dst}: cannot write a derived crop ({err})\n  fix: make "
                                            f"{out} writable and free some disk space") from err
        self.raise_problems()
        marker.write_text(json.dumps(signature))
        return out
