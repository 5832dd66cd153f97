"""The numbers the seed papers report, shipped as package data, and name mappings.

``bench/data/reported_results.csv`` and ``bench/data/reported_cost.csv`` are copies of
the project's reference tables (``shared/reference/``), typed by hand from the papers'
tables. Every row names its ``source``:

* ``TokenCLIP (ICLR 2026 submission)`` — "TokenCLIP: Token-wise Prompt Learning for
  Zero-shot Anomaly Detection", main-paper tables (accuracy) and the efficiency table
  (A100, batch 1);
* ``MPA/MPAMA (ICLR 2026 submission)`` — "Learning Multi-Granularity Visual-Textual
  Alignment for Zero-Shot Anomaly Detection";
* ``AF-CLIP (ACM MM 2025)`` — Fang, Lv, Su, "AF-CLIP: Zero-Shot Anomaly Detection via
  Anomaly-Focused CLIP Adaptation" (doi:10.1145/3746027.3755635);
* ``AnoCLIP (training-free, ViT-B-16-plus-240 at 240 px)`` — Deng, Zhang, Bao, Li,
  "Bootstrap Fine-Grained Vision-Language Alignment for Unified Zero-Shot Anomaly
  Localization" (AnoVL/AnoCLIP), on ``ViT-B-16-plus-240``.

Rows whose number the citing paper copied from the method's own paper say so in
``note``; values are percent as printed, ``std`` only where the paper gives one.

Example:
    >>> from bench import reported
    >>> df = reported.results()
    >>> sorted(df["method"].unique())[:3]
    ['AA-CLIP', 'AF-CLIP', 'AF-CLIP+']
    >>> reported.method_display("anomalyclip")
    'AnomalyCLIP'
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pandas as pd

DATA_DIR = Path(__file__).parent / "data"

#: Method registry name -> the display name the papers (and the CSVs) use.
METHOD_NAMES: dict[str, str] = {
    "clip": "CLIP",
    "winclip": "WinCLIP",
    "anoclip": "AnoCLIP",
    "anoclip_plus": "AnoCLIP+",
    "coop": "CoOp",
    "anomalyclip": "AnomalyCLIP",
    "tokenclip": "TokenCLIP",
    "tokenclip_van": "TokenCLIP (vanilla OT)",
    "mpa": "MPA",
    "mpama": "MPAMA",
    "vand": "VAND",
    "afclip": "AF-CLIP",
    "afclip_plus": "AF-CLIP+",
    "adaclip": "AdaCLIP",
    "aaclip": "AA-CLIP",
    "faprompt": "FAPrompt",
}

#: Canonical dataset id -> the display name the CSVs use.
DATASET_NAMES: dict[str, str] = {
    "mvtec": "MVTec AD",
    "visa": "VisA",
    "mpdd": "MPDD",
    "btad": "BTAD",
    "sdd": "SDD",
    "dagm": "DAGM",
    "dtd_synthetic": "DTD-Synthetic",
    "isic": "ISIC",
    "clinicdb": "ClinicDB",
    "colondb": "ColonDB",
    "kvasir": "Kvasir",
    "endo": "Endo",
    "headct": "HeadCT",
    "brainmri": "BrainMRI",
    "br35h": "Br35H",
}

#: The CSVs' metric spelling -> ours (``bench.metrics`` / records.jsonl).
METRIC_NAMES: dict[str, str] = {"auroc": "auroc", "ap": "ap", "aupro": "aupro", "f1max": "f1_max"}


def method_display(name: str) -> str:
    """Display name of a registered method (its registry name if unknown)."""
    return METHOD_NAMES.get(name, name)


def dataset_display(name: str) -> str:
    """Display name of a dataset id as the papers print it (the id itself if unknown)."""
    return DATASET_NAMES.get(name, name)


@lru_cache(maxsize=1)
def _read(name: str) -> pd.DataFrame:
    return pd.read_csv(DATA_DIR / name, keep_default_na=True)


def results() -> pd.DataFrame:
    """The papers' accuracy numbers with our names added.

    Columns: ``source, method, dataset, level, metric, value, std, shots, note`` as in the
    CSV (``value``/``std`` in percent), plus ``method_id`` and ``dataset_id`` (our registry
    names; NaN where we have none) and ``metric`` rewritten to our spelling (``f1_max``).
    """
    df = _read("reported_results.csv").copy()
    inv_m = {v: k for k, v in METHOD_NAMES.items()}
    inv_d = {v: k for k, v in DATASET_NAMES.items()}
    df["method_id"] = df["method"].map(inv_m)
    df["dataset_id"] = df["dataset"].map(inv_d)
    df["metric"] = df["metric"].map(lambda m: METRIC_NAMES.get(m, m))
    df["shots"] = pd.to_numeric(df["shots"], errors="coerce").fillna(0).astype(int)
    df["note"] = df["note"].fillna("")
    return df


def cost() -> pd.DataFrame:
    """The papers' cost numbers (``reported_cost.csv``) with ``method_id`` added."""
    df = _read("reported_cost.csv").copy()
    inv_m = {v: k for k, v in METHOD_NAMES.items()}
    df["method_id"] = df["method"].map(inv_m)
    df["note"] = df["note"].fillna("")
    return df
