"""Import and export of AnomalyCLIP / AdaCLIP / APRIL-GAN ``meta.json`` files.

Those projects describe a dataset with one JSON file, usually ``<root>/meta.json``::

    {"train": {"<cls_name>": [record, ...], ...},
     "test":  {"<cls_name>": [record, ...], ...}}
    record = {"img_path": str, "mask_path": str ("" if none), "cls_name": str,
              "specie_name": str (defect folder, "" if unknown), "anomaly": 0 | 1}

with paths relative to the folder of the file (their loaders ``os.path.join(root, p)``).
:func:`export_meta` writes our manifests in that format so an existing AnomalyCLIP or
AdaCLIP setup can run on data prepared here; :func:`import_meta` turns such a file into a
manifest so existing setups carry over.

Mapping (manifest <-> record): ``category <-> cls_name``, ``defect <-> specie_name``,
``label <-> anomaly``, ``image <-> img_path``, ``mask <-> mask_path`` (null <-> ``""``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from bench.manifest import DOMAINS, ManifestError, check_schema, from_rows

__all__ = ["export_meta", "import_meta"]


def _as_mapping(manifests: pd.DataFrame | Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    if isinstance(manifests, pd.DataFrame):
        names = sorted(set(manifests["dataset"].dropna().astype(str))) or ["<manifest>"]
        return {n: manifests[manifests["dataset"] == n] for n in names} if len(names) > 1 else {
            names[0]: manifests}
    return dict(manifests)


def export_meta(
    manifests: pd.DataFrame | Mapping[str, pd.DataFrame],
    path: str | Path,
    *,
    roots: str | Path | Mapping[str, str | Path] | None = None,
    splits: tuple[str, ...] = ("train", "test"),
) -> Path:
    """Write manifests as one AnomalyCLIP/AdaCLIP ``meta.json``.

    Args:
        manifests: one manifest, or ``{dataset: manifest}``. Categories must not repeat
            across datasets (``meta.json`` is keyed by class name only).
        path: the ``meta.json`` to write (its folder is the loaders' ``root``).
        roots: the folder each manifest's paths are relative to (one folder, or
            ``{dataset: folder}``). Without it the manifest paths are written unchanged,
            which is right when ``path`` lies in the dataset root (the usual set-up).
        splits: the splits to write; both keys are always present (AnomalyCLIP reads
            ``meta["test"]`` and AdaCLIP ``meta["train"]``).

    Returns:
        The path written.
    """
    path = Path(path)
    data = _as_mapping(manifests)
    meta: dict[str, dict[str, list[dict[str, Any]]]] = {"train": {}, "test": {}}
    owner: dict[str, str] = {}
    for dataset, df in data.items():
        problems = check_schema(df, dataset)
        if problems:
            raise ManifestError("\n".join(map(str, problems)))
        if roots is None:
            base = None
        elif isinstance(roots, Mapping):
            if dataset not in roots:
                raise ManifestError(f"export_meta: no root given for dataset '{dataset}'; "
                                    f"pass roots={{'{dataset}': DIR, ...}}")
            base = Path(roots[dataset])
        else:
            base = Path(roots)

        def out_path(p: str, base: Path | None = base) -> str:
            if base is None:
                return p
            return Path(os.path.relpath(base / p, path.parent)).as_posix()

        for cat in dict.fromkeys(df["category"].astype(str)):
            if owner.setdefault(cat, dataset) != dataset:
                raise ManifestError(f"{path}: category '{cat}' occurs in datasets '{owner[cat]}' and "
                                    f"'{dataset}'; meta.json is keyed by class name -> export them to "
                                    "separate files")
        for row in df.itertuples(index=False):
            split = str(row.split)
            if split not in splits:
                continue
            mask = row.mask if isinstance(row.mask, str) and row.mask else ""
            meta.setdefault(split, {}).setdefault(str(row.category), []).append({
                "img_path": out_path(str(row.image)),
                "mask_path": out_path(mask) if mask else "",
                "cls_name": str(row.category),
                "specie_name": "" if pd.isna(row.defect) else str(row.defect),
                "anomaly": int(row.label),
            })
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=4) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _adapter_defaults(dataset: str) -> tuple[str | None, str | None]:
    """Domain and modality of a registered adapter (None, None if there is none)."""
    try:
        from bench.registry import ADAPTERS

        if dataset in ADAPTERS:
            cls = ADAPTERS.get(dataset)
            return cls.domain, cls.modality
    except Exception:  # noqa: BLE001 - the registry is optional here
        pass
    return None, None


def _size(path: Path) -> tuple[int, int] | str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        return "file not found"
    except (UnidentifiedImageError, OSError) as err:
        return f"not a readable image ({err})"


def import_meta(
    path: str | Path,
    dataset: str,
    *,
    root: str | Path | None = None,
    domain: str | None = None,
    modality: str | None = None,
    read_sizes: bool = True,
) -> pd.DataFrame:
    """Read an AnomalyCLIP/AdaCLIP ``meta.json`` into a manifest DataFrame.

    Args:
        path: the ``meta.json`` file.
        dataset: the dataset id to put in the manifest (a registered id supplies the
            domain and modality).
        root: the folder the manifest's paths will be relative to; defaults to the
            folder of ``path`` (the loaders' convention). Absolute paths inside the file
            (AnomalyCLIP's medical scripts write them) are made relative to it.
        domain, modality: override (required when ``dataset`` is not registered).
        read_sizes: read width/height from the image headers (files must exist);
            with False they are 0.

    Returns:
        The manifest (not written; pass it to :func:`bench.manifest.write`).

    Raises:
        ManifestError: unreadable file, unknown layout, paths outside ``root``, missing or
            unreadable images; the message names the file and the fix.
    """
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ManifestError(f"{path}: cannot read meta.json ({err}) -> pass the meta.json written "
                            "by the AnomalyCLIP/AdaCLIP preparation scripts") from err
    d_dom, d_mod = _adapter_defaults(dataset)
    domain, modality = domain or d_dom, modality or d_mod
    if domain not in DOMAINS:
        raise ManifestError(f"import_meta: dataset '{dataset}' is not registered -> pass "
                            f"domain= one of {DOMAINS} (and modality=)")
    if not isinstance(meta, dict):
        raise ManifestError(f"{path}: expected {{'train': {{...}}, 'test': {{...}}}} at the top level")
    splits = {str(k).lower(): v for k, v in meta.items()}  # AnomalyCLIP's DAGM.py writes Train/Test
    unknown = sorted(set(splits) - {"train", "test"})
    if unknown:
        raise ManifestError(f"{path}: unknown top-level keys {unknown} -> expected 'train' and 'test'")

    def relative(p: str) -> str:
        q = Path(p)
        if not q.is_absolute():
            return q.as_posix()
        try:
            return q.resolve().relative_to(base.resolve()).as_posix()
        except ValueError as err:
            raise ManifestError(f"{p}: absolute path outside {base} -> pass root= a folder that "
                                "contains every image of the meta.json") from err

    rows = []
    for split, classes in splits.items():
        if not isinstance(classes, dict):
            raise ManifestError(f"{path}: '{split}' must map class names to record lists")
        for cls_name, records in classes.items():
            for rec in records:
                try:
                    label, raw_img = int(rec["anomaly"]), str(rec["img_path"])
                except (KeyError, TypeError, ValueError) as err:
                    raise ManifestError(f"{path}: record {rec!r} lacks img_path/anomaly -> "
                                        "records need img_path, mask_path, cls_name, specie_name, "
                                        "anomaly") from err
                img = relative(raw_img)
                mask = str(rec.get("mask_path") or "")
                mask_rel = relative(mask) if mask else None
                if mask_rel is not None and (base / mask_rel).is_dir():
                    mask_rel = None  # AnomalyCLIP's "classification only" convention
                specie = str(rec.get("specie_name") or "")
                rows.append({
                    "dataset": dataset, "domain": domain, "modality": modality or "",
                    "category": str(rec.get("cls_name") or cls_name), "split": split,
                    "image": img, "mask": mask_rel, "label": label,
                    "defect": specie or ("good" if label == 0 else "anomaly"),
                    "width": 0, "height": 0,
                })
    if read_sizes and rows:
        files = list(dict.fromkeys(base / r["image"] for r in rows))
        files += list(dict.fromkeys(base / r["mask"] for r in rows if r["mask"]))
        with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
            sizes = dict(zip(files, pool.map(_size, files)))
        bad = [(f, s) for f, s in sizes.items() if isinstance(s, str)]
        if bad:
            lines = [f"  {f}: {s}" for f, s in bad[:20]]
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise ManifestError(f"{path}: {len(bad)} file(s) listed in meta.json cannot be read:\n"
                                + "\n".join(lines) + more
                                + f"\n  fix: pass root= the folder the meta.json paths are relative "
                                  f"to (now {base}), or restore the files")
        for r in rows:
            r["width"], r["height"] = sizes[base / r["image"]]
            if r["mask"] and sizes[base / r["mask"]] != sizes[base / r["image"]]:
                m = sizes[base / r["mask"]]
                raise ManifestError(f"{base / r['mask']}: mask size {m[0]}x{m[1]} differs from image "
                                    f"size {r['width']}x{r['height']} -> fix the mask_path in {path}")
    df = from_rows(rows)
    problems = check_schema(df, str(path))
    if problems:
        raise ManifestError("\n".join(map(str, problems)))
    return df
