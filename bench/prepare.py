"""``zsad-bench prepare``: raw download -> validated manifest.

:func:`prepare_dataset` is the whole command minus argument parsing: it resolves the
dataset adapter through the registry, checks that ``root`` holds that dataset (and says
which dataset it holds instead, if another adapter recognises it), scans the raw layout,
validates the result, compares the test-set counts with the published ones and writes
``<root>/<dataset>.manifest.parquet``. Every problem with the input raises
:class:`bench.manifest.ManifestError` whose message names the file and the fix (the CLI
maps it to exit status 2).

The engine stays generic: nothing here knows a specific dataset; everything
dataset-specific is adapter metadata (:mod:`dataset_adapters.base`).

Example::

    from bench.prepare import prepare_dataset, format_counts
    df, warnings = prepare_dataset("mvtec", "/data/mvtec_anomaly_detection")
    print(format_counts(df))

``python -m bench.prepare --docs docs/datasets.md`` regenerates the dataset page from
the adapters' metadata.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd

from bench.manifest import ManifestError, manifest_path, validate, write
from bench.registry import ADAPTERS, RegistryError, get_adapter

__all__ = ["prepare_dataset", "check_counts", "format_counts", "layouts_help", "render_docs"]


def _safe_detect(adapter: Any, root: Path) -> bool:
    try:
        return bool(adapter.detect(root))
    except Exception:  # noqa: BLE001 - a broken foreign adapter must not hide the real error
        return False


def _describe_other(root: Path, dataset: str) -> str | None:
    """A message if ``root`` holds another registered dataset than ``dataset``."""
    others = [name for name, cls in ADAPTERS.items() if name != dataset and _safe_detect(cls(), root)]
    if not others:
        return None
    want = ADAPTERS.get(dataset)
    held = ", ".join(f"{ADAPTERS.get(o).display_name or o} ({o})" for o in others)
    return (f"{root}: this folder holds {held}, not {want.display_name or dataset} ({dataset})\n"
            f"  fix: run `zsad-bench prepare {others[0]} --root {root}`, or point --root at the "
            f"folder where you extracted {want.display_name or dataset}; expected layout:\n"
            + textwrap.indent(want.layout.strip("\n"), "    "))


def prepare_dataset(dataset: str, root: str | Path, *, strict: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Scan, validate and write the manifest of ``dataset`` found under ``root``.

    Args:
        dataset: canonical dataset id (a registered adapter name, e.g. ``"mvtec"``).
        root: the folder the archive was extracted into, or the archive's top folder.
        strict: turn every warning (e.g. a count that differs from the published one)
            into an error.

    Returns:
        ``(manifest, warnings)``; the manifest has also been written to
        ``manifest_path(root, dataset)``.

    Raises:
        ManifestError: bad input (unknown dataset, wrong or missing folder, unreadable or
            truncated image, mask size mismatch, missing mask or category, empty folder,
            label disagreement, ...); the message names the file and the fix.
    """
    root = Path(root).expanduser()
    try:
        adapter = get_adapter(dataset)
    except RegistryError as err:
        raise ManifestError(str(err)) from err
    if not root.is_dir():
        raise ManifestError(f"{root}: folder not found\n  fix: pass --root the folder where you "
                            f"extracted {adapter.display_name or dataset} ({adapter.download_url})")
    if not adapter.detect(root):
        other = _describe_other(root, dataset)
        if other:
            raise ManifestError(other)
        if hasattr(adapter, "not_found_message"):
            raise ManifestError(adapter.not_found_message(root))
        raise ManifestError(f"{root}: no {dataset} data found\n  fix: expected layout:\n{adapter.layout}")
    df = adapter.scan(root)
    warnings = list(getattr(adapter, "scan_warnings", []))
    thorough = not getattr(adapter, "validates_files", False)
    problems = validate(df, root, has_masks=adapter.has_masks,
                        categories=adapter.categories or None,
                        check_files=thorough, check_sizes=thorough)
    wrong = sorted(set(df["dataset"].dropna()) - {dataset})
    if wrong:
        raise ManifestError(f"adapter '{dataset}' produced rows for datasets {wrong}\n  fix: its scan "
                            f"must set dataset='{dataset}' ({ADAPTERS.origin(dataset)})")
    if problems:
        lines = [f"{dataset}: {len(problems)} problem(s) in {root}:"]
        lines += [f"  {p.file}: {p.message}\n    fix: {p.fix}" for p in problems[:25]]
        raise ManifestError("\n".join(lines))
    if not (df["split"] == "test").any():
        raise ManifestError(f"{root}: no test images found for {dataset}\n  fix: "
                            f"re-extract the archive ({adapter.download_url})")
    warnings += check_counts(adapter, df)
    if strict and warnings:
        raise ManifestError(f"{dataset}: --strict and {len(warnings)} warning(s):\n"
                            + "\n".join(f"  {w}" for w in warnings)
                            + "\n  fix: use the complete original download, or drop --strict to "
                              "accept the difference")
    write(df, manifest_path(root, dataset))
    return df, warnings


def _test_counts(df: pd.DataFrame) -> pd.DataFrame:
    test = df[df["split"] == "test"]
    table = pd.crosstab(test["category"].astype(str), test["label"].astype(int))
    return table.reindex(columns=[0, 1], fill_value=0)


def check_counts(adapter: Any, df: pd.DataFrame) -> list[str]:
    """Warnings for test counts that differ from the adapter's published counts."""
    out: list[str] = []
    counts = _test_counts(df)
    n, a = int(counts[0].sum()), int(counts[1].sum())
    pub = getattr(adapter, "published_counts", {}) or {}
    src = getattr(adapter, "counts_source", "") or "published"
    name = adapter.name
    if "normal" in pub and "anomalous" in pub and (n, a) != (pub["normal"], pub["anomalous"]):
        out.append(f"{name}: test split has {n} normal + {a} anomalous images, published "
                   f"{pub['normal']} + {pub['anomalous']} ({src}): normal {n - pub['normal']:+d}, "
                   f"anomalous {a - pub['anomalous']:+d}")
    for cat, (pn, pa) in (getattr(adapter, "published_category_counts", {}) or {}).items():
        cn = int(counts[0].get(cat, 0))
        ca = int(counts[1].get(cat, 0))
        if (cn, ca) != (pn, pa):
            out.append(f"{name}/{cat}: {cn} normal + {ca} anomalous test images, published "
                       f"{pn} + {pa}: normal {cn - pn:+d}, anomalous {ca - pa:+d}")
    return out


def format_counts(df: pd.DataFrame) -> str:
    """A per-category table of normal / anomalous test images (and train images)."""
    counts = _test_counts(df)
    train = df[df["split"] == "train"]["category"].astype(str).value_counts()
    cats = list(dict.fromkeys(df["category"].astype(str)))
    rows = [("category", "normal", "anomalous", "test", "train")]
    for c in cats:
        cn, ca = int(counts[0].get(c, 0)), int(counts[1].get(c, 0))
        rows.append((c, str(cn), str(ca), str(cn + ca), str(int(train.get(c, 0)))))
    tn, ta = int(counts[0].sum()), int(counts[1].sum())
    rows.append(("total", str(tn), str(ta), str(tn + ta), str(int(train.sum()))))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])]))
        if k == 0 or k == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def layouts_help() -> str:
    """Every dataset's id, download and expected layout (for ``zsad-bench prepare --help``)."""
    parts = []
    for name, cls in ADAPTERS.items():
        if not cls.layout:
            continue
        parts.append(f"{name}: {cls.display_name}\n  download: {cls.download_url}\n"
                     + textwrap.indent(cls.layout.strip("\n"), "    "))
    return "\n\n".join(parts)


_DOCS_HEAD = """\
# Datasets

<!-- Generated by `python -m bench.prepare --docs docs/datasets.md` from the adapters'
metadata (dataset_adapters/*.py); edit the adapters, not this file. -->

zsad-bench never downloads data: the licences of these datasets forbid redistribution.
Download each archive yourself, extract it **as it is** (no re-arranging), and run

    zsad-bench prepare DATASET --root DIR

`DIR` may be the archive's top folder itself or the folder that contains it (for
Kvasir-SEG both `X/Kvasir-SEG/images/...` with `--root X` and `--root X/Kvasir-SEG`
work): adapters look at the root and one folder below it. When one folder holds several
look-alike datasets (the polyp sets are all `images/` + `masks/`), the archive's folder
name picks the right one. `prepare` writes `DIR/<DATASET>.manifest.parquet` (one row per
image, paths relative to `DIR`; see DESIGN §3) and prints the counts per category.

## Rules every adapter follows

* **Masks pair by an explicit name rule** per dataset (listed below), never by sorted
  order: the AnomalyCLIP/AdaCLIP scripts pair two sorted listings, which silently shifts
  every later mask when one file is missing. A missing mask, or a mask without its image,
  is an error that names the file.
* **Splits.** Every adapter emits the evaluation images as `split="test"`. Zero-shot
  training on an auxiliary dataset also uses its *test* split (as AnomalyCLIP and AdaCLIP
  do, confirmed in AnomalyCLIP #44/#89). Where a dataset has a train split it is emitted
  as `split="train"`.
* **Mask binarisation** is adapter metadata (`mask_threshold`): a mask pixel is anomalous
  iff its grey value (PIL mode `L`) is `>= mask_threshold`. `1` ("any non-zero") for
  lossless masks and for VisA, whose masks hold small per-region values (a `>= 128` rule
  would erase every VisA defect); `128` for the medical segmentation sets (ISIC and the
  polyp sets), because Kvasir-SEG's original masks are JPEG and a `> 0` rule turns
  compression noise into ground truth. For 0/255 masks both rules agree. The data loader
  (`bench.data`) applies it.
* **Junk is never data**: `.DS_Store`, `Thumbs.db`, `desktop.ini`, AppleDouble `._*`
  files, `__MACOSX/`, hidden files and a stale `meta.json` (which AnomalyCLIP's scripts
  write into the data folders) are skipped, never counted as images or categories.
* **Validation** (exit status 2, the file and the fix in the message): unreadable or
  truncated images (checked from the header and the file's end marker, decoding only
  when in doubt), a mask whose size differs from its image, an anomalous image without
  its mask in a dataset with masks, missing category folders (some MPDD downloads lack
  classes), empty folders, label files that disagree, and a root that holds a different
  dataset (the message names the dataset it found).
* **Counts** are compared with the published ones (`dataset_stats.csv`, per category
  where the anchor notes list them). A difference is a warning naming it;
  `prepare --strict` makes every warning an error.
* **Prompt names**: each category has a `prompt_name` (e.g. `metal_nut` -> "metal nut")
  for class-aware prompts, separate from the category id.
* **meta.json**: `bench.metajson.export_meta` / `import_meta` convert manifests to and
  from the AnomalyCLIP/AdaCLIP `meta.json` format.

## Overview

| id | dataset | domain | modality | categories | test normal | test anomalous | masks | image metrics | mask threshold |
|---|---|---|---|---|---|---|---|---|---|
"""


def _md_row(name: str, cls: Any) -> str:
    pub = cls.published_counts or {}
    thr = f">= {cls.mask_threshold}" if cls.has_masks else "-"
    return (f"| `{name}` | {cls.display_name} | {cls.domain} | {cls.modality} | {len(cls.categories)} "
            f"| {pub.get('normal', '?')} | {pub.get('anomalous', '?')} | "
            f"{'yes' if cls.has_masks else 'no'} | {'yes' if cls.has_image_labels else 'no'} | {thr} |")


def _md_section(name: str, cls: Any) -> str:
    adapter = cls()
    pub = cls.published_counts or {}
    cats = ", ".join(
        f"`{c}`" + (f" (\"{adapter.prompt_name(c)}\")" if adapter.prompt_name(c) != c else "")
        for c in cls.categories)
    lines = [f"## {cls.display_name} (`{name}`)", "", (cls.__doc__ or "").strip().splitlines()[0], "",
             f"* **Download:** {cls.download_url}",
             f"* **Licence:** {cls.licence}",
             f"* **Domain / modality:** {cls.domain} / {cls.modality}",
             f"* **Categories** (prompt name): {cats}",
             f"* **Published test counts:** {pub.get('normal', '?')} normal + "
             f"{pub.get('anomalous', '?')} anomalous ({cls.counts_source})"]
    if cls.published_category_counts:
        per = ", ".join(f"{c} {n}/{a}" for c, (n, a) in cls.published_category_counts.items())
        lines.append(f"* **Per category** (normal/anomalous): {per}")
    lines += [f"* **Mask pairing:** `{cls.mask_rule}`",
              "* **Mask binarisation:** " + (f"grey value >= {cls.mask_threshold}" if cls.has_masks
                                             else "no masks"),
              "", "Layout after extraction:", "", "```", cls.layout.strip("\n"), "```", "",
              "Protocol: " + cls.protocol_notes, "",
              "<details><summary>BibTeX</summary>", "", "```bibtex", cls.bibtex.strip(), "```", "",
              "</details>", ""]
    return "\n".join(lines)


def render_docs() -> str:
    """The text of ``docs/datasets.md``, generated from every benchmark adapter's metadata."""
    from bench.manifest import DATASET_IDS

    adapters = [(n, ADAPTERS.get(n)) for n in DATASET_IDS if n in ADAPTERS]
    out = _DOCS_HEAD + "\n".join(_md_row(n, c) for n, c in adapters) + "\n\n"
    out += "\n".join(_md_section(n, c) for n, c in adapters)
    return out.rstrip("\n") + "\n"


if __name__ == "__main__":  # pragma: no cover - developer helper
    if len(sys.argv) == 3 and sys.argv[1] == "--docs":
        Path(sys.argv[2]).write_text(render_docs(), encoding="utf-8")
        print(f"wrote {sys.argv[2]}")
    else:
        print("usage: python -m bench.prepare --docs docs/datasets.md", file=sys.stderr)
        sys.exit(2)
