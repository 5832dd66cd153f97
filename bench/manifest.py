"""The one manifest format every dataset is normalised into.

One row per image, with the columns of :data:`COLUMNS`. A manifest is stored as
Parquet at ``<root>/<dataset>.manifest.parquet``; paths in it (``image``, ``mask``) are
relative to that root. :func:`read` and :func:`write` are the only IO entry points,
:func:`validate` checks a manifest against its root and says, for every problem, which
file is at fault and how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: Column name -> pandas dtype, in the order manifests are written.
COLUMNS: dict[str, str] = {
    "dataset": "string",
    "domain": "string",
    "modality": "string",
    "category": "string",
    "split": "string",
    "image": "string",
    "mask": "string",
    "label": "int8",
    "defect": "string",
    "width": "int32",
    "height": "int32",
}

#: Canonical dataset ids of the full benchmark (DESIGN §3); the demo adds its own.
DATASET_IDS = (
    "mvtec", "visa", "mpdd", "btad", "sdd", "dagm", "dtd_synthetic",
    "isic", "clinicdb", "colondb", "kvasir", "endo", "headct", "brainmri", "br35h",
)
DOMAINS = ("industrial", "medical")
SPLITS = ("train", "test")
SUFFIX = ".manifest.parquet"


class ManifestError(ValueError):
    """A manifest (or the raw data behind it) is wrong; the message names file and fix."""


@dataclass(frozen=True)
class Problem:
    """One validation finding: which file, what is wrong, how to fix it."""

    file: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message} -> {self.fix}"


def manifest_path(root: str | Path, dataset: str) -> Path:
    """Where the manifest of ``dataset`` lives under ``root``."""
    return Path(root) / f"{dataset}{SUFFIX}"


def from_rows(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Build a manifest DataFrame from row dicts, coercing dtypes and column order."""
    df = pd.DataFrame(list(rows))
    missing = [c for c in COLUMNS if c not in df.columns]
    if len(df) and missing:
        raise ManifestError(f"manifest rows lack columns {missing}; every row needs {list(COLUMNS)}")
    if not len(df):
        df = pd.DataFrame({c: [] for c in COLUMNS})
    df = df[list(COLUMNS)].copy()
    df["mask"] = df["mask"].where(df["mask"].notna() & (df["mask"] != ""), None)
    for col, dtype in COLUMNS.items():
        df[col] = df[col].astype(dtype)
    return df.reset_index(drop=True)


def check_schema(df: pd.DataFrame, source: str = "<manifest>") -> list[Problem]:
    """Schema-level problems (columns, allowed values); no file-system access."""
    problems: list[Problem] = []
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        return [Problem(source, f"missing columns {missing}",
                        "rebuild it with `zsad-bench prepare DATASET --root DIR`")]
    bad_split = sorted(set(df["split"].dropna()) - set(SPLITS))
    if bad_split:
        problems.append(Problem(source, f"unknown split values {bad_split}", f"use one of {SPLITS}"))
    bad_dom = sorted(set(df["domain"].dropna()) - set(DOMAINS))
    if bad_dom:
        problems.append(Problem(source, f"unknown domain values {bad_dom}", f"use one of {DOMAINS}"))
    bad_label = sorted(set(pd.Series(df["label"]).dropna().astype(int)) - {0, 1})
    if bad_label:
        problems.append(Problem(source, f"labels {bad_label}", "labels are 0 (normal) or 1 (anomalous)"))
    for col in ("dataset", "category", "split", "image", "label"):
        if df[col].isna().any():
            first = int(np.flatnonzero(df[col].isna().to_numpy())[0])
            problems.append(Problem(source, f"column '{col}' is empty in row {first}",
                                    "every row needs dataset, category, split, image and label"))
    dup = df["image"][df["image"].duplicated()]
    if len(dup):
        problems.append(Problem(str(dup.iloc[0]), f"listed {int(df['image'].eq(dup.iloc[0]).sum())} times",
                                "each image appears once; check the adapter's scan"))
    return problems


def validate(
    df: pd.DataFrame,
    root: str | Path | None = None,
    *,
    has_masks: bool | None = None,
    categories: Iterable[str] | None = None,
    check_files: bool = True,
    check_sizes: bool = False,
) -> list[Problem]:
    """Return every problem of ``df`` (empty list = valid).

    ``has_masks``: the dataset ships masks, so every anomalous test image needs one.
    ``categories``: the known categories; any other is reported.
    ``check_files``: the image and mask files must exist under ``root``.
    ``check_sizes``: mask header size must equal image header size (reads headers only).
    """
    problems = check_schema(df)
    if problems and any("missing columns" in p.message for p in problems):
        return problems
    if categories is not None:
        unknown = sorted(set(df["category"]) - set(categories))
        if unknown:
            problems.append(Problem("<manifest>", f"unknown categories {unknown}",
                                    f"known categories are {sorted(categories)}"))
    if has_masks:
        need = df[(df["label"] == 1) & (df["split"] == "test") & df["mask"].isna()]
        for img in need["image"].head(5):
            problems.append(Problem(str(img), "anomalous image without a mask in a dataset that has masks",
                                    "put its ground-truth mask where the dataset's layout expects it"))
    if root is not None and check_files:
        base = Path(root)
        for col in ("image", "mask"):
            for rel in df[col].dropna():
                p = base / str(rel)
                if not p.is_file():
                    problems.append(Problem(str(p), f"{col} file not found",
                                            "restore the file from the original download or re-run prepare"))
                    if len(problems) > 50:
                        return problems
    if root is not None and check_sizes:
        from PIL import Image

        base = Path(root)
        for img, mask in df[["image", "mask"]].dropna().itertuples(index=False):
            with Image.open(base / str(img)) as a, Image.open(base / str(mask)) as b:
                if a.size != b.size:
                    problems.append(Problem(str(base / str(mask)),
                                            f"mask size {b.size} differs from image size {a.size}",
                                            "use the mask shipped with this image"))
    return problems


def write(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest to Parquet atomically (a crash never leaves half a file)."""
    problems = check_schema(df, str(path))
    if problems:
        raise ManifestError("\n".join(map(str, problems)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    from_rows(df.to_dict("records")).to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def read(path: str | Path) -> pd.DataFrame:
    """Read a manifest written by :func:`write` and check its schema."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            f"{path}: manifest not found -> build it with "
            f"`zsad-bench prepare {path.name.removesuffix(SUFFIX)} --root {path.parent}`"
        )
    df = pd.read_parquet(path)
    problems = check_schema(df, str(path))
    if problems:
        raise ManifestError("\n".join(map(str, problems)))
    return from_rows(df.to_dict("records"))


def to_hf(df: pd.DataFrame, root: str | Path):
    """The manifest as a Hugging Face ``datasets.Dataset`` with Image features.

    Needs the optional ``datasets`` package (``pip install zsad-bench[hf]``).
    """
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError("to_hf needs the 'datasets' package: pip install 'zsad-bench[hf]'") from err
    base = Path(root)
    data = df.copy()
    data["image"] = [str(base / p) for p in data["image"]]
    data["mask"] = [str(base / p) if isinstance(p, str) else None for p in data["mask"]]
    features = datasets.Features({
        **{c: datasets.Value("string") for c in ("dataset", "domain", "modality", "category",
                                                  "split", "defect")},
        "image": datasets.Image(), "mask": datasets.Image(),
        "label": datasets.Value("int8"), "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
    })
    return datasets.Dataset.from_pandas(data[list(COLUMNS)], features=features, preserve_index=False)
