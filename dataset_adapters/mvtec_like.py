"""Datasets laid out like MVTec AD: MVTec AD, MPDD, BTAD and DTD-Synthetic.

All four ship one folder per category with the same shape::

    <category>/train/<normal>/*.png           normal training images
    <category>/test/<normal>/*.png            normal test images
    <category>/test/<defect>/*.png            anomalous test images, one folder per defect type
    <category>/ground_truth/<defect>/<mask>   one mask per anomalous test image

They differ only in the name of the normal folder (``good``; BTAD: ``ok``) and in the
rule that names a mask after its image (:meth:`MVTecLikeAdapter.mask_names`), so one
piece of code reads all four. Masks are paired by that name rule, never by sorted
order (AnomalyCLIP's scripts pair by sorted order, which silently mis-pairs when a file
is missing); a missing partner is an error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from .base import DatasetAdapter, Entry, list_dirs, list_images, register_adapter, rel

_NO_REDISTRIBUTION = "do not redistribute; every user downloads the archive from the link above."


class MVTecLikeAdapter(DatasetAdapter):
    """Shared reader of the MVTec AD folder layout."""

    #: name of the folder of normal images under ``train/`` and ``test/``.
    normal_folder: ClassVar[str] = "good"
    validates_files: ClassVar[bool] = True
    mask_threshold: ClassVar[int] = 1

    def mask_names(self, image: Path) -> list[str]:
        """Candidate mask file names of an anomalous image (first existing one wins)."""
        return [f"{image.stem}_mask.png"]

    def matches(self, folder: Path) -> bool:
        return any((folder / c / "test").is_dir() for c in self.categories)

    def entries(self, folder: Path) -> list[Entry]:
        out: list[Entry] = []
        missing = [c for c in self.categories if not (folder / c).is_dir()]
        for c in missing:
            self.problem(folder / c, f"category folder '{c}' missing ({len(missing)} of "
                         f"{len(self.categories)} categories absent; downloads are sometimes incomplete)",
                         f"re-download the complete archive ({self.download_url}) and extract it "
                         "without re-arranging")
        for category in self.categories:
            cdir = folder / category
            if category in missing:
                continue
            test = cdir / "test"
            defect_dirs = list_dirs(test)
            if not defect_dirs:
                self.problem(test, "missing or empty test folder", self.redownload_fix())
                continue
            claimed: set[Path] = set()
            for ddir in defect_dirs:
                imgs = self.images_or_problem(ddir, "defect folder")
                normal = ddir.name == self.normal_folder
                for img in imgs:
                    if normal:
                        out.append(Entry(category, "test", rel(img, folder), 0, "good"))
                        continue
                    mask = self.pair_mask(img, cdir / "ground_truth" / ddir.name, self.mask_names(img))
                    if mask is not None:
                        claimed.add(mask)
                    out.append(Entry(category, "test", rel(img, folder), 1, ddir.name,
                                     rel(mask, folder) if mask else None))
            if not any(d.name == self.normal_folder for d in defect_dirs):
                self.warn(f"{test}: no '{self.normal_folder}' folder, so no normal test images "
                          f"in category {category}")
            for gdir in list_dirs(cdir / "ground_truth"):
                self.check_orphans(gdir, claimed)
            for img in list_images(cdir / "train" / self.normal_folder):
                out.append(Entry(category, "train", rel(img, folder), 0, "good"))
        return out


@register_adapter("mvtec")
class MVTecAD(MVTecLikeAdapter):
    """MVTec AD (Bergmann et al., CVPR 2019): 15 object and texture categories."""

    display_name: ClassVar[str] = "MVTec AD"
    categories: ClassVar[tuple[str, ...]] = (
        "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
        "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
    )
    prompt_names: ClassVar[dict[str, str]] = {"metal_nut": "metal nut"}
    archive_names: ClassVar[tuple[str, ...]] = ("mvtec_anomaly_detection", "mvtec_ad", "mvtec")
    download_url: ClassVar[str] = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
    licence: ClassVar[str] = "CC BY-NC-SA 4.0 (non-commercial); do not redistribute."
    layout: ClassVar[str] = """\
mvtec_anomaly_detection/            (mvtec_anomaly_detection.tar.xz, extracted as is)
  bottle/train/good/000.png
  bottle/test/good/000.png
  bottle/test/broken_large/000.png
  bottle/ground_truth/broken_large/000_mask.png
  ... 15 category folders: bottle ... zipper"""
    mask_rule: ClassVar[str] = "<cat>/test/<defect>/NNN.png <-> <cat>/ground_truth/<defect>/NNN_mask.png"
    published_counts: ClassVar[dict[str, int]] = {"normal": 467, "anomalous": 1258}
    published_category_counts: ClassVar[dict[str, tuple[int, int]]] = {
        "bottle": (20, 63), "cable": (58, 92), "capsule": (23, 109), "carpet": (28, 89),
        "grid": (21, 57), "hazelnut": (40, 70), "leather": (32, 92), "metal_nut": (22, 93),
        "pill": (26, 141), "screw": (41, 119), "tile": (33, 84), "toothbrush": (12, 30),
        "transistor": (60, 40), "wood": (19, 60), "zipper": (32, 119),
    }
    counts_source: ClassVar[str] = "dataset_stats.csv; per category: AA-CLIP metadata (anchor notes 2.1)"
    protocol_notes: ClassVar[str] = (
        "Test split = evaluation set and, when MVTec AD is the auxiliary dataset, also the "
        "training set (as AnomalyCLIP does); train/good is emitted as split=train. Normal = "
        "the `good` folder, every other test folder is a defect type. Masks are 0/255 PNGs "
        "(any non-zero pixel is anomalous)."
    )
    bibtex: ClassVar[str] = """\
@inproceedings{bergmann2019mvtec,
  title     = {{MVTec AD} -- A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  author    = {Bergmann, Paul and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {9592--9600},
  year      = {2019}
}"""


@register_adapter("mpdd")
class MPDD(MVTecLikeAdapter):
    """MPDD, the Metal Parts Defect Detection dataset (Jezek et al., ICUMT 2021)."""

    display_name: ClassVar[str] = "MPDD"
    categories: ClassVar[tuple[str, ...]] = (
        "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes",
    )
    prompt_names: ClassVar[dict[str, str]] = {
        "bracket_black": "black metal bracket", "bracket_brown": "brown metal bracket",
        "bracket_white": "white metal bracket", "connector": "metal connector",
        "metal_plate": "metal plate", "tubes": "metal tubes",
    }
    archive_names: ClassVar[tuple[str, ...]] = ("MPDD", "MPDD-main", "mpdd_anomaly_detection")
    download_url: ClassVar[str] = "https://github.com/stepanje/MPDD"
    licence: ClassVar[str] = ("Research use, see the terms in the MPDD repository (cite the "
                              "paper); " + _NO_REDISTRIBUTION)
    layout: ClassVar[str] = """\
MPDD/
  bracket_black/train/good/000.png
  bracket_black/test/good/000.png
  bracket_black/test/hole/000.png
  bracket_black/ground_truth/hole/000_mask.png
  ... 6 category folders: bracket_black bracket_brown bracket_white connector metal_plate tubes"""
    mask_rule: ClassVar[str] = "<cat>/test/<defect>/NNN.png <-> <cat>/ground_truth/<defect>/NNN_mask.png"
    published_counts: ClassVar[dict[str, int]] = {"normal": 176, "anomalous": 282}
    published_category_counts: ClassVar[dict[str, tuple[int, int]]] = {
        "bracket_black": (32, 47), "bracket_brown": (26, 51), "bracket_white": (30, 30),
        "connector": (30, 14), "metal_plate": (26, 71), "tubes": (32, 69),
    }
    counts_source: ClassVar[str] = "dataset_stats.csv; per category: AA-CLIP metadata (anchor notes 2.3)"
    protocol_notes: ClassVar[str] = (
        "Same layout and rules as MVTec AD. Some downloads lack category folders "
        "(AnomalyCLIP issue #5): every one of the 6 category folders must exist, a missing one "
        "is an error that names it."
    )
    bibtex: ClassVar[str] = """\
@inproceedings{jezek2021mpdd,
  title     = {Deep learning-based defect detection of metal parts: evaluating current methods in complex conditions},
  author    = {Jezek, Stepan and Jonak, Martin and Burget, Radim and Dvorak, Pavel and Skotak, Milos},
  booktitle = {International Congress on Ultra Modern Telecommunications and Control Systems and Workshops (ICUMT)},
  pages     = {66--71},
  year      = {2021}
}"""


@register_adapter("btad")
class BTAD(MVTecLikeAdapter):
    """BTAD, the beanTech Anomaly Detection dataset (Mishra et al., ISIE 2021)."""

    display_name: ClassVar[str] = "BTAD"
    categories: ClassVar[tuple[str, ...]] = ("01", "02", "03")
    prompt_names: ClassVar[dict[str, str]] = {"01": "product", "02": "product", "03": "product"}
    normal_folder: ClassVar[str] = "ok"
    archive_names: ClassVar[tuple[str, ...]] = ("BTech_Dataset_transformed", "BTAD", "btad")
    download_url: ClassVar[str] = "https://github.com/pankajmishra000/VT-ADL (BTech_Dataset_transformed.zip)"
    licence: ClassVar[str] = "Research use, see the terms in the VT-ADL repository; " + _NO_REDISTRIBUTION
    layout: ClassVar[str] = """\
BTech_Dataset_transformed/
  01/train/ok/0000.bmp
  01/test/ok/0000.bmp
  01/test/ko/0000.bmp
  01/ground_truth/ko/0000.png        (01: .bmp images, .png masks; 02: .png/.png; 03: .bmp/.bmp)
  02/...  03/..."""
    mask_rule: ClassVar[str] = ("<cat>/test/ko/NNNN.<bmp|png> <-> <cat>/ground_truth/ko/NNNN.png "
                                "or NNNN.bmp (same stem, no _mask suffix)")
    published_counts: ClassVar[dict[str, int]] = {"normal": 451, "anomalous": 290}
    published_category_counts: ClassVar[dict[str, tuple[int, int]]] = {
        "01": (21, 49), "02": (30, 200), "03": (400, 41),
    }
    counts_source: ClassVar[str] = "dataset_stats.csv; per category: AA-CLIP metadata (anchor notes 2.4)"
    protocol_notes: ClassVar[str] = (
        "Normal folder is `ok`, anomalous `ko`. File types differ per category and are read "
        "as shipped (anomalib converts .bmp to .png on download; we do not, so bytes are the "
        "original ones). Masks have the image's stem and either suffix."
    )
    bibtex: ClassVar[str] = """\
@inproceedings{mishra2021vtadl,
  title     = {{VT-ADL}: A Vision Transformer Network for Image Anomaly Detection and Localization},
  author    = {Mishra, Pankaj and Verk, Riccardo and Fornasier, Daniele and Piciarelli, Claudio and Foresti, Gian Luca},
  booktitle = {IEEE International Symposium on Industrial Electronics (ISIE)},
  pages     = {01--06},
  year      = {2021}
}"""

    def mask_names(self, image: Path) -> list[str]:
        return [f"{image.stem}.png", f"{image.stem}.bmp"]


@register_adapter("dtd_synthetic")
class DTDSynthetic(MVTecLikeAdapter):
    """DTD-Synthetic (Aota et al., WACV 2023): 12 DTD textures with synthetic defects."""

    display_name: ClassVar[str] = "DTD-Synthetic"
    categories: ClassVar[tuple[str, ...]] = (
        "Blotchy_099", "Fibrous_183", "Marbled_078", "Matted_069", "Mesh_114", "Perforated_037",
        "Stratified_154", "Woven_001", "Woven_068", "Woven_104", "Woven_125", "Woven_127",
    )
    prompt_names: ClassVar[dict[str, str]] = {
        c: c.split("_")[0].lower() + " texture" for c in categories
    }
    archive_names: ClassVar[tuple[str, ...]] = ("DTD-Synthetic", "DTD_Synthetic", "dtd")
    download_url: ClassVar[str] = ("Google Drive link of Aota et al. (WACV 2023), as given in the "
                                   "AnomalyCLIP README: https://github.com/zqhang/AnomalyCLIP")
    licence: ClassVar[str] = ("Derived from the Describable Textures Dataset (research use only); "
                              "do not redistribute.")
    layout: ClassVar[str] = """\
DTD-Synthetic/
  Woven_001/train/good/000.png
  Woven_001/test/good/000.png
  Woven_001/test/bad/000.png
  Woven_001/ground_truth/bad/000_mask.png   (000.png also accepted)
  ... 12 texture folders: Blotchy_099 ... Woven_127"""
    mask_rule: ClassVar[str] = ("<tex>/test/bad/NNN.png <-> <tex>/ground_truth/bad/NNN_mask.png "
                                "(or NNN.png)")
    published_counts: ClassVar[dict[str, int]] = {"normal": 357, "anomalous": 947}
    protocol_notes: ClassVar[str] = (
        "MVTec AD rules. The mask naming inside ground_truth/bad could not be checked against "
        "the release, so the rule accepts `NNN_mask.png` and, failing that, `NNN.png`; never "
        "sorted order (AnomalyCLIP issue #45 reports its script failing on this release)."
    )
    bibtex: ClassVar[str] = """\
@inproceedings{aota2023zero,
  title     = {Zero-shot versus Many-shot: Unsupervised Texture Anomaly Detection},
  author    = {Aota, Toshimichi and Tong, Lloyd Teh Tzer and Okatani, Takayuki},
  booktitle = {IEEE/CVF Winter Conference on Applications of Computer Vision (WACV)},
  pages     = {5564--5572},
  year      = {2023}
}"""

    def mask_names(self, image: Path) -> list[str]:
        return [f"{image.stem}_mask.png", f"{image.stem}.png"]
