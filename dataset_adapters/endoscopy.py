"""Polyp segmentation sets: CVC-ClinicDB, CVC-ColonDB, Kvasir-SEG and EndoTect 2020.

All four are an ``images/`` folder and a ``masks/`` folder whose files share the image's
stem (``images/12.png <-> masks/12.png``; Kvasir-SEG ``images/<id>.jpg <-> masks/<id>.jpg``).
Every image shows a polyp: all are anomalous, each has a mask, there are no normal
images, so image-level metrics are undefined and only pixel metrics are reported.

Inside they look alike, so the archive's folder name tells them apart when ``--root``
holds several of them (:attr:`~dataset_adapters.base.DatasetAdapter.archive_names`).
Masks are binarised at grey value >= 128: Kvasir-SEG's original release stores its masks
as JPEG, whose compression noise turns a "> 0" rule into speckled masks; for the 0/255
PNG copies both rules agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from .base import IMAGE_SUFFIXES, DatasetAdapter, Entry, child, register_adapter, rel


class SegmentationSetAdapter(DatasetAdapter):
    """``images/`` + ``masks/`` with equal stems; every image anomalous."""

    domain: ClassVar[str] = "medical"
    modality: ClassVar[str] = "endoscopy"
    categories: ClassVar[tuple[str, ...]] = ("colon",)
    has_masks: ClassVar[bool] = True
    has_image_labels: ClassVar[bool] = False
    mask_threshold: ClassVar[int] = 128
    validates_files: ClassVar[bool] = True
    #: (image folder, mask folder) pairs accepted, in order of preference.
    folder_pairs: ClassVar[tuple[tuple[str, str], ...]] = (("images", "masks"),)
    defect: ClassVar[str] = "polyp"

    def _pair(self, folder: Path) -> tuple[Path, Path | None] | None:
        for img_name, mask_name in self.folder_pairs:
            img_dir = child(folder, img_name)
            if img_dir is not None and img_dir.is_dir():
                mask_dir = child(folder, mask_name)
                return img_dir, mask_dir if mask_dir is not None and mask_dir.is_dir() else None
        return None

    def matches(self, folder: Path) -> bool:
        return self._pair(folder) is not None

    def entries(self, folder: Path) -> list[Entry]:
        img_dir, mask_dir = self._pair(folder)  # type: ignore[misc]
        if mask_dir is None:
            self.problem(folder / self.folder_pairs[0][1], "mask folder missing",
                         f"extract the complete archive ({self.download_url})")
            return []
        out: list[Entry] = []
        claimed: set[Path] = set()
        cat = self.categories[0]
        for img in self.images_or_problem(img_dir, "image folder"):
            names = [img.name] + [img.stem + s for s in sorted(IMAGE_SUFFIXES) if s != img.suffix.lower()]
            mask = self.pair_mask(img, mask_dir, names)
            if mask is not None:
                claimed.add(mask)
            out.append(Entry(cat, "test", rel(img, folder), 1, self.defect,
                             rel(mask, folder) if mask else None))
        self.check_orphans(mask_dir, claimed)
        return out


_POLYP_DOWNLOAD = "https://figshare.com/articles/dataset/Polyp_DataSet_zip/21221579 (Polyp DataSet.zip)"


@register_adapter("clinicdb")
class ClinicDB(SegmentationSetAdapter):
    """CVC-ClinicDB (Bernal et al., 2015): 612 colonoscopy frames with polyp masks."""

    display_name: ClassVar[str] = "CVC-ClinicDB"
    archive_names: ClassVar[tuple[str, ...]] = ("CVC-ClinicDB", "ClinicDB", "CVC_ClinicDB")
    folder_pairs: ClassVar[tuple[tuple[str, str], ...]] = (
        ("images", "masks"), ("Original", "Ground Truth"))
    download_url: ClassVar[str] = (_POLYP_DOWNLOAD + "; original .tif release: "
                                   "https://polyp.grand-challenge.org/CVCClinicDB/")
    licence: ClassVar[str] = ("Research use; cite Bernal et al. 2015 (see the download page); "
                              "do not redistribute.")
    layout: ClassVar[str] = """\
CVC-ClinicDB/
  images/1.png ... 612.png
  masks/1.png ... 612.png
or the original release:
CVC-ClinicDB/
  Original/1.tif
  Ground Truth/1.tif"""
    mask_rule: ClassVar[str] = "images/N.<ext> <-> masks/N.<ext> (Original/N.tif <-> Ground Truth/N.tif)"
    published_counts: ClassVar[dict[str, int]] = {"normal": 0, "anomalous": 612}
    protocol_notes: ClassVar[str] = (
        "All 612 frames, all anomalous, masks at >= 128 (pixel metrics only). Not the 62-image "
        "PraNet TestDataset subset. AdaCLIP trains on ClinicDB; here it is only a target.")
    bibtex: ClassVar[str] = """\
@article{bernal2015wm,
  title   = {{WM-DOVA} maps for accurate polyp highlighting in colonoscopy: Validation vs. saliency maps from physicians},
  author  = {Bernal, Jorge and S{\\'a}nchez, F. Javier and Fern{\\'a}ndez-Esparrach, Gloria and Gil, Debora and Rodr{\\'i}guez, Cristina and Vilari{\\~n}o, Fernando},
  journal = {Computerized Medical Imaging and Graphics},
  volume  = {43},
  pages   = {99--111},
  year    = {2015}
}"""


@register_adapter("colondb")
class ColonDB(SegmentationSetAdapter):
    """CVC-ColonDB (Tajbakhsh et al., 2016): 380 colonoscopy frames with polyp masks."""

    display_name: ClassVar[str] = "CVC-ColonDB"
    archive_names: ClassVar[tuple[str, ...]] = ("CVC-ColonDB", "ColonDB", "CVC_ColonDB")
    download_url: ClassVar[str] = _POLYP_DOWNLOAD
    licence: ClassVar[str] = ("Research use; cite Tajbakhsh et al. 2016 (see the download page); "
                              "do not redistribute.")
    layout: ClassVar[str] = """\
CVC-ColonDB/
  images/1.png ... 380.png
  masks/1.png ... 380.png"""
    mask_rule: ClassVar[str] = "images/N.png <-> masks/N.png"
    published_counts: ClassVar[dict[str, int]] = {"normal": 0, "anomalous": 380}
    protocol_notes: ClassVar[str] = (
        "All 380 frames, all anomalous, masks at >= 128 (pixel metrics only). AdaCLIP uses "
        "ColonDB as a medical auxiliary set; here it is only a target.")
    bibtex: ClassVar[str] = """\
@article{tajbakhsh2016automated,
  title   = {Automated Polyp Detection in Colonoscopy Videos Using Shape and Context Information},
  author  = {Tajbakhsh, Nima and Gurudu, Suryakanth R. and Liang, Jianming},
  journal = {IEEE Transactions on Medical Imaging},
  volume  = {35},
  number  = {2},
  pages   = {630--644},
  year    = {2016}
}"""


@register_adapter("kvasir")
class Kvasir(SegmentationSetAdapter):
    """Kvasir-SEG (Jha et al., MMM 2020): 1000 polyp images with masks."""

    display_name: ClassVar[str] = "Kvasir-SEG"
    archive_names: ClassVar[tuple[str, ...]] = ("Kvasir-SEG", "Kvasir", "kvasir_seg")
    download_url: ClassVar[str] = "https://datasets.simula.no/kvasir-seg/ (kvasir-seg.zip)"
    licence: ClassVar[str] = ("Free for research and education; cite Jha et al. 2020; "
                              "do not redistribute.")
    layout: ClassVar[str] = """\
Kvasir-SEG/                         (kvasir-seg.zip, extracted as is)
  images/cju0qkwl35piu0993l0dewei2.jpg
  masks/cju0qkwl35piu0993l0dewei2.jpg   (JPEG masks; the polyp-dataset copy has .png)
  kavsir_bboxes.json                    (ignored)"""
    mask_rule: ClassVar[str] = "images/<id>.jpg <-> masks/<id>.jpg (or <id>.png)"
    published_counts: ClassVar[dict[str, int]] = {"normal": 0, "anomalous": 1000}
    protocol_notes: ClassVar[str] = (
        "All 1000 images, all anomalous (pixel metrics only). The original release stores "
        "masks as JPEG: binarised at >= 128, because '> 0' (what the AnomalyCLIP loader "
        "does) turns JPEG noise around the polyp into false ground truth.")
    bibtex: ClassVar[str] = """\
@inproceedings{jha2020kvasir,
  title     = {{Kvasir-SEG}: A Segmented Polyp Dataset},
  author    = {Jha, Debesh and Smedsrud, Pia H. and Riegler, Michael A. and Halvorsen, P{\\aa}l and de Lange, Thomas and Johansen, Dag and Johansen, H{\\aa}vard D.},
  booktitle = {International Conference on Multimedia Modeling (MMM)},
  pages     = {451--462},
  year      = {2020}
}"""


@register_adapter("endo")
class Endo(SegmentationSetAdapter):
    """EndoTect 2020 segmentation test set (Hicks et al., 2021): 200 images with masks."""

    display_name: ClassVar[str] = "Endo (EndoTect 2020)"
    archive_names: ClassVar[tuple[str, ...]] = (
        "EndoTect_2020_Segmentation_Test_Dataset", "EndoTect", "Endo")
    download_url: ClassVar[str] = ("https://endotect.com (EndoTect 2020 challenge, segmentation "
                                   "task test set with ground truth)")
    licence: ClassVar[str] = "Research use; cite Hicks et al. 2021; do not redistribute."
    layout: ClassVar[str] = """\
EndoTect_2020_Segmentation_Test_Dataset/
  images/<id>.jpg
  masks/<id>.<jpg|png>"""
    mask_rule: ClassVar[str] = "images/<id>.<ext> <-> masks/<id>.<any image ext>"
    published_counts: ClassVar[dict[str, int]] = {"normal": 0, "anomalous": 200}
    protocol_notes: ClassVar[str] = (
        "All 200 images, all anomalous (pixel metrics only), masks at >= 128 (their format "
        "varies between copies). Only the two folders are read, so a stale meta.json in the "
        "root (which makes AnomalyCLIP's endoTect.py crash on a second run) does no harm.")
    bibtex: ClassVar[str] = """\
@inproceedings{hicks2021endotect,
  title     = {The {EndoTect} 2020 Challenge: Evaluation and Comparison of Classification, Segmentation and Inference Time for Endoscopy},
  author    = {Hicks, Steven A. and Jha, Debesh and Thambawita, Vajira and Halvorsen, P{\\aa}l and Hammer, Hugo L. and Riegler, Michael A.},
  booktitle = {Pattern Recognition. ICPR International Workshops and Challenges},
  pages     = {263--274},
  year      = {2021}
}"""
