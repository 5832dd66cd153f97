"""The dataset-adapter plugin API.

An adapter turns one dataset's raw download, laid out exactly as distributed, into
manifest rows (:mod:`bench.manifest`). Subclass :class:`DatasetAdapter`, fill in the
metadata and implement :meth:`~DatasetAdapter.detect` and :meth:`~DatasetAdapter.scan`,
and register it with ``@register_adapter("id")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pandas as pd

from bench.registry import ADAPTERS


def register_adapter(name: str):
    """Class decorator: register a :class:`DatasetAdapter` subclass under ``name``."""
    return ADAPTERS.decorator(name)


class DatasetAdapter:
    """Base class of every dataset adapter.

    Class attributes are the dataset's metadata; they are shown by
    ``zsad-bench prepare --help`` and in ``docs/datasets.md``.
    """

    name: ClassVar[str] = ""  # canonical id, set by @register_adapter
    display_name: ClassVar[str] = ""
    domain: ClassVar[str] = "industrial"  # industrial | medical
    modality: ClassVar[str] = "RGB"
    categories: ClassVar[tuple[str, ...]] = ()
    #: object words used by class-aware prompts; defaults to the category with '_' -> ' '.
    prompt_names: ClassVar[dict[str, str]] = {}
    has_masks: ClassVar[bool] = True
    has_image_labels: ClassVar[bool] = True  # has normal test images -> image metrics defined
    download_url: ClassVar[str] = ""
    layout: ClassVar[str] = ""
    licence: ClassVar[str] = ""
    bibtex: ClassVar[str] = ""
    #: published test-set counts: {"normal": n, "anomalous": m} (optionally per category).
    published_counts: ClassVar[dict[str, int]] = {}

    def prompt_name(self, category: str) -> str:
        return self.prompt_names.get(category, category.replace("_", " "))

    def detect(self, root: Path) -> bool:
        """True if ``root`` (or one level below) holds this dataset's raw layout."""
        raise NotImplementedError

    def scan(self, root: Path) -> pd.DataFrame:
        """Read the raw layout under ``root`` into a manifest DataFrame."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short human description (one line)."""
        return f"{self.display_name} ({self.domain}, {self.modality}, {len(self.categories)} categories)"
