"""ISIC: the ISBI 2016 skin-lesion segmentation challenge (Part 1), test set.

Two archives are extracted side by side::

    ISBI2016_ISIC_Part1_Test_Data/ISIC_0000003.jpg
    ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000003_Segmentation.png

Every image shows a lesion: all 379 are anomalous, each has a mask, so only pixel
metrics are defined.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from .base import DatasetAdapter, Entry, child, register_adapter, rel

DATA = "ISBI2016_ISIC_Part1_Test_Data"
TRUTH = "ISBI2016_ISIC_Part1_Test_GroundTruth"


@register_adapter("isic")
class ISIC(DatasetAdapter):
    """ISIC 2016 (ISBI challenge, Part 1) test set: 379 dermoscopy images with lesion masks."""

    display_name: ClassVar[str] = "ISIC 2016"
    domain: ClassVar[str] = "medical"
    modality: ClassVar[str] = "RGB"
    categories: ClassVar[tuple[str, ...]] = ("skin",)
    has_masks: ClassVar[bool] = True
    has_image_labels: ClassVar[bool] = False
    mask_threshold: ClassVar[int] = 128
    validates_files: ClassVar[bool] = True
    archive_names: ClassVar[tuple[str, ...]] = ("ISIC", "ISIC2016", "ISBI2016")
    download_url: ClassVar[str] = ("https://challenge.isic-archive.com/data/#2016 "
                                   "(ISBI2016_ISIC_Part1_Test_Data.zip and "
                                   "ISBI2016_ISIC_Part1_Test_GroundTruth.zip)")
    licence: ClassVar[str] = ("ISIC Archive terms (CC BY-NC); cite Gutman et al. 2016; "
                              "do not redistribute.")
    layout: ClassVar[str] = f"""\
<root>/                             (both zips extracted into one folder)
  {DATA}/ISIC_0000003.jpg
  {TRUTH}/ISIC_0000003_Segmentation.png"""
    mask_rule: ClassVar[str] = f"{DATA}/X.jpg <-> {TRUTH}/X_Segmentation.png"
    published_counts: ClassVar[dict[str, int]] = {"normal": 0, "anomalous": 379}
    protocol_notes: ClassVar[str] = (
        "The raw ISBI 2016 Part 1 test set is read directly (AnomalyCLIP and AdaCLIP expect "
        "re-arranged copies; AF-CLIP reads the raw folders as here). All 379 images are "
        "lesions: anomalous, with masks, no image metrics. Masks are 0/255 PNGs, binarised "
        "at >= 128.")
    bibtex: ClassVar[str] = """\
@article{gutman2016skin,
  title   = {Skin Lesion Analysis toward Melanoma Detection: A Challenge at the International Symposium on Biomedical Imaging {(ISBI)} 2016},
  author  = {Gutman, David and Codella, Noel C. F. and Celebi, Emre and Helba, Brian and Marchetti, Michael and Mishra, Nabin and Halpern, Allan},
  journal = {arXiv preprint arXiv:1605.01397},
  year    = {2016}
}"""

    def matches(self, folder: Path) -> bool:
        d = child(folder, DATA)
        return d is not None and d.is_dir()

    def entries(self, folder: Path) -> list[Entry]:
        data = child(folder, DATA)
        truth = child(folder, TRUTH)
        if truth is None or not truth.is_dir():
            self.problem(folder / TRUTH, "ground-truth folder missing",
                         f"download and extract {TRUTH}.zip next to {DATA}/ ({self.download_url})")
            return []
        out: list[Entry] = []
        claimed: set[Path] = set()
        for img in self.images_or_problem(data, "image folder"):  # type: ignore[arg-type]
            mask = self.pair_mask(img, truth, [f"{img.stem}_Segmentation.png"])
            if mask is not None:
                claimed.add(mask)
            out.append(Entry("skin", "test", rel(img, folder), 1, "lesion", rel(mask, folder) if mask else None))
        self.check_orphans(truth, claimed)
        return out
