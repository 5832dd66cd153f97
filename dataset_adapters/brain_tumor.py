"""Brain-tumour MRI sets labelled by folder: BrainMRI and Br35H.

Both are ``no/`` (normal) and ``yes/`` (tumour) folders of MRI slices, without masks
(image metrics only). They differ in the traps of their Kaggle archives:

* BrainMRI's zip holds ``brain_tumor_dataset/{no,yes}`` *and* a duplicate top-level
  ``no/``, ``yes/``; only ``brain_tumor_dataset/`` is read, so no image counts twice.
  Its files mix ``.jpg``, ``.JPG``, ``.jpeg`` and ``.png``.
* Br35H's zip holds ``no/``, ``yes/`` and an unlabelled ``pred/`` folder, which is
  excluded (AnomalyCLIP's ``br35.py`` would count it as anomalous).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from .base import DatasetAdapter, Entry, child, norm_name, register_adapter, rel

_BRAIN_DIR = "brain_tumor_dataset"


class NoYesAdapter(DatasetAdapter):
    """Labels from the folder: ``no/`` normal, ``yes/`` tumour; everything else ignored."""

    domain: ClassVar[str] = "medical"
    modality: ClassVar[str] = "MRI"
    categories: ClassVar[tuple[str, ...]] = ("brain",)
    prompt_names: ClassVar[dict[str, str]] = {"brain": "brain"}
    has_masks: ClassVar[bool] = False
    has_image_labels: ClassVar[bool] = True
    validates_files: ClassVar[bool] = True
    mask_rule: ClassVar[str] = "no masks; label from the folder: no/ -> 0, yes/ -> 1"

    @staticmethod
    def _has_no_yes(folder: Path) -> bool:
        return all((d := child(folder, n)) is not None and d.is_dir() for n in ("no", "yes"))

    def data_dir(self, folder: Path) -> Path:
        """The folder that holds ``no/`` and ``yes/`` inside the located folder."""
        return folder

    def entries(self, folder: Path) -> list[Entry]:
        base = self.data_dir(folder)
        out: list[Entry] = []
        for name, label in (("no", 0), ("yes", 1)):
            sub = child(base, name) or base / name
            for img in self.images_or_problem(sub, f"'{name}' folder"):
                out.append(Entry("brain", "test", rel(img, folder), label, "tumor" if label else "good"))
        return out


@register_adapter("brainmri")
class BrainMRI(NoYesAdapter):
    """Brain MRI Images for Brain Tumor Detection (Chakrabarty, Kaggle 2019): 98 + 155."""

    display_name: ClassVar[str] = "BrainMRI"
    archive_names: ClassVar[tuple[str, ...]] = (
        _BRAIN_DIR, "brain-mri-images-for-brain-tumor-detection", "BrainMRI")
    download_url: ClassVar[str] = ("https://www.kaggle.com/datasets/navoneel/"
                                   "brain-mri-images-for-brain-tumor-detection")
    licence: ClassVar[str] = "See the Kaggle page (research use); do not redistribute."
    layout: ClassVar[str] = f"""\
<root>/                             (the Kaggle zip, extracted as is)
  {_BRAIN_DIR}/no/1 no.jpeg      (mixed .jpg .JPG .jpeg .png)
  {_BRAIN_DIR}/yes/Y1.jpg
  no/  yes/                         (duplicate copies in the zip: ignored)"""
    published_counts: ClassVar[dict[str, int]] = {"normal": 98, "anomalous": 155}
    protocol_notes: ClassVar[str] = (
        "All 253 images are test images, labels from brain_tumor_dataset/{no,yes}. The zip's "
        "duplicate top-level no/ and yes/ are never read, so nothing is counted twice. "
        "Extensions are matched case-insensitively (.jpg, .JPG, .jpeg, .png). Not AA-CLIP's "
        "'Brain' (BMAD's BraTS-based set with masks), which is a different dataset.")
    bibtex: ClassVar[str] = """\
@misc{chakrabarty2019brainmri,
  title        = {Brain {MRI} Images for Brain Tumor Detection},
  author       = {Chakrabarty, Navoneel},
  howpublished = {Kaggle, \\url{https://www.kaggle.com/datasets/navoneel/brain-mri-images-for-brain-tumor-detection}},
  year         = {2019}
}"""

    def data_dir(self, folder: Path) -> Path:
        if norm_name(folder.name) == norm_name(_BRAIN_DIR):
            return folder
        return child(folder, _BRAIN_DIR) or folder / _BRAIN_DIR

    def matches(self, folder: Path) -> bool:
        if norm_name(folder.name) == norm_name(_BRAIN_DIR):
            return self._has_no_yes(folder)
        inner = child(folder, _BRAIN_DIR)
        return inner is not None and self._has_no_yes(inner)


@register_adapter("br35h")
class Br35H(NoYesAdapter):
    """Br35H :: Brain Tumor Detection 2020 (Hamada, Kaggle 2020): 1500 + 1500."""

    display_name: ClassVar[str] = "Br35H"
    archive_names: ClassVar[tuple[str, ...]] = ("Br35H", "brain-tumor-detection", "br35h_anomaly_detection")
    download_url: ClassVar[str] = "https://www.kaggle.com/datasets/ahmedhamada0/brain-tumor-detection"
    licence: ClassVar[str] = "See the Kaggle page (research use); do not redistribute."
    layout: ClassVar[str] = """\
<root>/                             (the Kaggle zip, extracted as is)
  no/no0.jpg ... no1499.jpg
  yes/y0.jpg ... y1499.jpg
  pred/pred0.jpg ...                (unlabelled: ignored)"""
    published_counts: ClassVar[dict[str, int]] = {"normal": 1500, "anomalous": 1500}
    protocol_notes: ClassVar[str] = (
        "All 3000 labelled images are test images, labels from no/ and yes/. The unlabelled "
        "pred/ folder is excluded (AnomalyCLIP's br35.py lists every folder and would count "
        "it as anomalous); so is any stale meta.json.")
    bibtex: ClassVar[str] = """\
@misc{hamada2020br35h,
  title        = {{Br35H} :: Brain Tumor Detection 2020},
  author       = {Hamada, Ahmed},
  howpublished = {Kaggle, \\url{https://www.kaggle.com/datasets/ahmedhamada0/brain-tumor-detection}},
  year         = {2020}
}"""

    def matches(self, folder: Path) -> bool:
        if child(folder, _BRAIN_DIR) is not None:  # that is BrainMRI's zip (its duplicate no/yes)
            return False
        return self._has_no_yes(folder)

