"""The dataset-adapter plugin API.

An adapter turns one dataset's raw download, laid out exactly as distributed, into
manifest rows (:mod:`bench.manifest`). Subclass :class:`DatasetAdapter`, fill in the
metadata and implement :meth:`~DatasetAdapter.detect` and :meth:`~DatasetAdapter.scan`,
and register it with ``@register_adapter("id")``.

Most adapters do not write ``detect``/``scan`` themselves. They implement two smaller
hooks and let the base class do the rest:

* :meth:`DatasetAdapter.matches` — does this one folder hold the raw layout?
  :meth:`~DatasetAdapter.locate` asks it for ``--root`` itself and for every folder one
  level below (the user may point at the archive's top folder or at the folder that
  contains it), preferring folders named like the archive (:attr:`archive_names`) and
  never taking a folder named like another dataset's archive.
* :meth:`DatasetAdapter.entries` — list the images of the located folder as
  :class:`Entry` objects (category, split, image, mask, label, defect), pairing masks by
  the dataset's explicit name rule (:meth:`~DatasetAdapter.pair_mask`) and reporting every
  problem through :meth:`~DatasetAdapter.problem`.

The base :meth:`~DatasetAdapter.scan` then reads every image and mask header (in
parallel, never decoding whole images), checks that no file is unreadable or truncated
and that each mask has its image's size, and raises :class:`bench.manifest.ManifestError`
listing every problem with its file and fix. Paths in the manifest are relative to the
``root`` the user gave (so they include the archive folder when ``root`` is its parent).

Shared helpers for adapters live here too: junk-file filtering (:func:`is_junk`),
image listing (:func:`list_images`), case-insensitive child look-up (:func:`child`),
natural sort (:func:`natural_key`) and header-only image checks (:func:`image_info`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
from PIL import Image, UnidentifiedImageError

from bench.manifest import ManifestError, Problem, from_rows
from bench.registry import ADAPTERS

#: File names that are never data, whatever folder they sit in (compared lower-case).
#: ``meta.json`` is the AnomalyCLIP/AdaCLIP manifest that their scripts write *into*
#: the data folders; a stale copy must never be counted as an image or a category.
JUNK_NAMES: frozenset[str] = frozenset({
    ".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini", "meta.json", "icon\r",
})
#: Suffixes (lower-case) of the image files adapters read.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

_PNG_END = b"IEND\xaeB`\x82"
_SERIAL_BELOW = 48  # header reads below this many files run in the calling thread


def register_adapter(name: str):
    """Class decorator: register a :class:`DatasetAdapter` subclass under ``name``."""
    return ADAPTERS.decorator(name)


# -- file-system helpers ---------------------------------------------------------------
def is_junk(name: str) -> bool:
    """True for files and folders that are never data.

    Hidden names (``.DS_Store``, AppleDouble ``._000.png``, ``.ipynb_checkpoints``),
    Windows/macOS thumbnails (``Thumbs.db``, ``desktop.ini``), a stale ``meta.json`` and
    our own manifests (``*.manifest.parquet``).
    """
    low = name.lower()
    return (low in JUNK_NAMES or low.startswith(".") or low.startswith("__macosx")
            or low.endswith(".manifest.parquet"))


def is_image_file(path: Path) -> bool:
    """A non-junk regular file with an image suffix (case-insensitive)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not is_junk(path.name) and path.is_file()


def natural_key(text: str) -> tuple:
    """Sort key that orders ``img2`` before ``img10`` (digits compared as numbers)."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text))


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, junk skipped, in natural order."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: natural_key(p.name))


def list_dirs(folder: Path) -> list[Path]:
    """The sub-folders of ``folder`` (hidden and junk ones skipped), in natural order."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and not is_junk(p.name)),
                  key=lambda p: natural_key(p.name))


def child(folder: Path, name: str) -> Path | None:
    """``folder/name`` if it exists, matching the name case-insensitively; else None."""
    exact = folder / name
    if exact.exists():
        return exact
    if not folder.is_dir():
        return None
    low = name.lower()
    for p in folder.iterdir():
        if p.name.lower() == low:
            return p
    return None


def norm_name(name: str) -> str:
    """A folder name reduced for comparison: lower-case, without ``-``, ``_``, spaces."""
    return re.sub(r"[-_ .]", "", name.lower())


class _FolderIndex:
    """Case-insensitive name -> file look-up of one folder, cached (for mask pairing)."""

    def __init__(self) -> None:
        self._cache: dict[Path, dict[str, Path]] = {}

    def files(self, folder: Path) -> dict[str, Path]:
        if folder not in self._cache:
            self._cache[folder] = (
                {p.name.lower(): p for p in folder.iterdir() if p.is_file() and not is_junk(p.name)}
                if folder.is_dir() else {}
            )
        return self._cache[folder]

    def find(self, folder: Path, names: Iterable[str]) -> Path | None:
        files = self.files(folder)
        for name in names:
            hit = files.get(name.lower())
            if hit is not None:
                return hit
        return None


# -- header-only image checks ----------------------------------------------------------
class ImageProblem(Exception):
    """An image file cannot be read, or is truncated."""


def _tail(path: Path, n: int = 64) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - n))
        return fh.read()


def _complete(path: Path, fmt: str | None) -> bool | None:
    """Cheap end-of-file check: True/False when the format allows one, else None."""
    if fmt == "PNG":
        return _tail(path).endswith(_PNG_END)
    if fmt == "JPEG":
        return _tail(path, 1024).rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")
    if fmt == "BMP":
        with open(path, "rb") as fh:
            head = fh.read(6)
        declared = int.from_bytes(head[2:6], "little") if len(head) == 6 else 0
        return None if declared == 0 else path.stat().st_size >= declared
    return None


def image_info(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image from its header, after checking it is complete.

    PNG, JPEG and BMP files are checked by their end marker / declared size; only when
    that check fails (or for other formats) is the image decoded to be sure. Raises
    :class:`ImageProblem` with a short reason for unreadable or truncated files.
    """
    try:
        with Image.open(path) as im:
            size = im.size
            fmt = im.format
            ok = _complete(path, fmt)
            if ok is not True:
                im.load()  # decode: raises on truncated data
    except FileNotFoundError as err:
        raise ImageProblem("file not found") from err
    except UnidentifiedImageError as err:
        raise ImageProblem("not a readable image (unknown or damaged format)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageProblem(f"truncated or damaged image ({err})") from err
    if size[0] <= 0 or size[1] <= 0:
        raise ImageProblem(f"empty image ({size[0]}x{size[1]})")
    return size


def read_image_infos(paths: Sequence[Path], workers: int | None = None) -> dict[Path, tuple[int, int] | str]:
    """:func:`image_info` for many files, in threads; a failure maps to its reason."""

    def one(p: Path) -> tuple[int, int] | str:
        try:
            return image_info(p)
        except ImageProblem as err:
            return str(err)

    if len(paths) < _SERIAL_BELOW:
        return {p: one(p) for p in paths}
    workers = workers or min(16, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(paths, pool.map(one, paths, chunksize=32)))


# -- adapter API -----------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One image found by an adapter; paths are relative to the located folder (posix)."""

    category: str
    split: str
    image: str
    label: int
    defect: str
    mask: str | None = None


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
    #: published test-set counts per category: {category: (normal, anomalous)}.
    published_category_counts: ClassVar[dict[str, tuple[int, int]]] = {}
    #: where the published counts come from (shown with count warnings and in the docs).
    counts_source: ClassVar[str] = "shared/reference/dataset_stats.csv"
    #: names the archive's top folder is known under (compared by :func:`norm_name`).
    archive_names: ClassVar[tuple[str, ...]] = ()
    #: mask binarisation: a mask pixel is anomalous iff its grey value (PIL mode "L")
    #: is >= mask_threshold. 1 = "any non-zero" (lossless masks, VisA's multi-valued
    #: masks); 128 for JPEG or possibly lossy masks. Unused when ``has_masks`` is False
    #: (kept an int so loaders can always pass it on).
    mask_threshold: ClassVar[int] = 1
    #: the explicit rule that pairs an image with its mask (for docs and error messages).
    mask_rule: ClassVar[str] = ""
    #: protocol decisions of this adapter and why (rendered into docs/datasets.md).
    protocol_notes: ClassVar[str] = ""
    #: True when :meth:`scan` already checked that every file is readable, complete and
    #: mask sizes match (so ``prepare`` need not read the headers a second time).
    validates_files: ClassVar[bool] = False

    def __init__(self) -> None:
        self.scan_warnings: list[str] = []
        self._problems: list[Problem] = []
        self._index = _FolderIndex()

    def prompt_name(self, category: str) -> str:
        return self.prompt_names.get(category, category.replace("_", " "))

    def describe(self) -> str:
        """A short human description (one line)."""
        return f"{self.display_name} ({self.domain}, {self.modality}, {len(self.categories)} categories)"

    # -- hooks for subclasses -----------------------------------------------------------
    def matches(self, folder: Path) -> bool:
        """True if ``folder`` itself holds this dataset's raw layout (cheap checks only)."""
        raise NotImplementedError

    def entries(self, folder: Path) -> list[Entry]:
        """The images of the raw layout in ``folder``; report problems via :meth:`problem`."""
        raise NotImplementedError

    # -- problem reporting ----------------------------------------------------------------
    def problem(self, file: Path | str, message: str, fix: str) -> None:
        """Record one problem with the raw data; :meth:`scan` raises them all together."""
        self._problems.append(Problem(str(file), message, fix))

    def warn(self, message: str) -> None:
        """Record a warning; ``prepare`` prints it (and never fails because of it)."""
        self.scan_warnings.append(message)

    def raise_problems(self) -> None:
        """Raise :class:`ManifestError` listing the recorded problems, if there are any."""
        if not self._problems:
            return
        probs, self._problems = self._problems, []
        shown = probs[:25]
        lines = [f"{self.name}: {len(probs)} problem(s) with the raw data:"]
        lines += [f"  {p.file}: {p.message}\n    fix: {p.fix}" for p in shown]
        if len(probs) > len(shown):
            lines.append(f"  ... and {len(probs) - len(shown)} more of the same kinds")
        raise ManifestError("\n".join(lines))

    def redownload_fix(self) -> str:
        """The standard fix for a damaged or incomplete download."""
        return f"re-extract the original archive (download: {self.download_url})"

    # -- pairing helpers ------------------------------------------------------------------
    def pair_mask(self, image: Path, mask_dir: Path, candidates: Sequence[str]) -> Path | None:
        """The mask of ``image`` in ``mask_dir`` under one of the names ``candidates``.

        Names are compared case-insensitively; a missing mask is recorded as a problem
        naming the image and the expected mask file.
        """
        hit = self._index.find(mask_dir, candidates)
        if hit is None:
            self.problem(image, f"anomalous image without its mask (expected {mask_dir / candidates[0]})",
                         f"restore the mask from the original archive; masks pair by name: {self.mask_rule}")
        return hit

    def check_orphans(self, mask_dir: Path, claimed: set[Path], what: str = "mask") -> None:
        """Report every image file in ``mask_dir`` that no image claimed as its mask."""
        for m in list_images(mask_dir):
            if m not in claimed:
                self.problem(m, f"{what} without a matching image",
                             f"restore the image from the original archive or delete this file; "
                             f"masks pair by name: {self.mask_rule}")

    def images_or_problem(self, folder: Path, what: str = "folder") -> list[Path]:
        """The images of ``folder``; an empty or missing folder is recorded as a problem."""
        if not folder.is_dir():
            self.problem(folder, f"{what} missing", self.redownload_fix())
            return []
        imgs = list_images(folder)
        if not imgs:
            self.problem(folder, f"empty {what}: no image files in it", self.redownload_fix())
        return imgs

    # -- root resolution ------------------------------------------------------------------
    def _foreign_names(self) -> set[str]:
        own = {norm_name(n) for n in self.archive_names}
        out: set[str] = set()
        for name, cls in ADAPTERS.items():
            if name != self.name:
                out |= {norm_name(n) for n in getattr(cls, "archive_names", ())}
        return out - own

    def locate(self, root: Path | str) -> Path | None:
        """The folder holding the raw layout: ``root`` itself or one folder below it.

        Preference: ``root`` itself; then a child named like the archive
        (:attr:`archive_names`); then any other child. A folder named like another
        dataset's archive is never taken (CVC-ClinicDB and Kvasir-SEG look alike inside).
        """
        root = Path(root)
        if not root.is_dir():
            return None
        foreign = self._foreign_names()
        own = {norm_name(n) for n in self.archive_names}
        if norm_name(root.name) not in foreign and self.matches(root):
            return root
        children = [c for c in list_dirs(root) if norm_name(c.name) not in foreign]
        children.sort(key=lambda c: norm_name(c.name) not in own)  # stable: own names first
        for c in children:
            if self.matches(c):
                return c
        return None

    def not_found_message(self, root: Path) -> str:
        return (f"{root}: no {self.display_name} ({self.name}) data found in this folder or one "
                f"level below.\n  fix: point --root at the folder where you extracted the archive; "
                f"expected layout:\n{_indent(self.layout)}\n  download: {self.download_url}")

    # -- the adapter API --------------------------------------------------------------------
    def detect(self, root: Path) -> bool:
        """True if ``root`` (or one level below) holds this dataset's raw layout."""
        return self.locate(root) is not None

    def scan(self, root: Path) -> pd.DataFrame:
        """Read the raw layout under ``root`` into a manifest DataFrame.

        Raises :class:`ManifestError` naming every bad file and its fix; warnings (never
        fatal) are left in :attr:`scan_warnings`.
        """
        root = Path(root)
        self.scan_warnings = []
        self._problems = []
        self._index = _FolderIndex()
        folder = self.locate(root)
        if folder is None:
            raise ManifestError(self.not_found_message(root))
        found = self.entries(folder)
        if not found:
            self.raise_problems()
            raise ManifestError(f"{folder}: no images found\n  fix: {self.redownload_fix()}")
        rows = self._rows(root, folder, found)  # header checks run even after pairing problems,
        self.raise_problems()  # so one run reports every problem
        return from_rows(rows)

    def _rows(self, root: Path, folder: Path, found: list[Entry]) -> list[dict]:
        prefix = folder.relative_to(root).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        paths = list(dict.fromkeys([folder / e.image for e in found]
                                   + [folder / e.mask for e in found if e.mask]))
        infos = read_image_infos(paths)
        for p, info in infos.items():
            if isinstance(info, str):
                self.problem(p, info, self.redownload_fix())
        order = {c: i for i, c in enumerate(self.categories)}
        found = sorted(found, key=lambda e: (e.split != "test", order.get(e.category, len(order)),
                                             e.category, natural_key(e.image)))
        rows = []
        reported = {p.file for p in self._problems}
        for e in found:
            size = infos[folder / e.image]
            if self.has_masks and e.label == 1 and not e.mask and str(folder / e.image) not in reported:
                self.problem(folder / e.image, "anomalous image without a mask in a dataset that has masks",
                             f"restore its mask from the original archive ({self.mask_rule})")
            if e.mask:
                msize = infos[folder / e.mask]
                if isinstance(size, tuple) and isinstance(msize, tuple) and msize != size:
                    self.problem(folder / e.mask,
                                 f"mask size {msize[0]}x{msize[1]} differs from image size "
                                 f"{size[0]}x{size[1]} of {folder / e.image}",
                                 "use the mask shipped with this image in the original archive")
            w, h = size if isinstance(size, tuple) else (0, 0)
            rows.append({
                "dataset": self.name, "domain": self.domain, "modality": self.modality,
                "category": e.category, "split": e.split, "image": prefix + e.image,
                "mask": prefix + e.mask if e.mask else None, "label": int(e.label),
                "defect": e.defect, "width": w, "height": h,
            })
        return rows


def _indent(text: str, pad: str = "    ") -> str:
    return "\n".join(pad + line for line in text.strip("\n").splitlines())


def rel(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` as a posix string (for :class:`Entry`)."""
    return path.relative_to(folder).as_posix()
