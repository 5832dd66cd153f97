"""Reported vs reproduced: the papers' zero-shot numbers (``bench/data/reported_results.csv``)
beside ours, with the difference in points."""

from __future__ import annotations

import math

import pandas as pd

from bench import reported
from bench.report.table import (
    ALL_METRICS,
    LEVEL_LABELS,
    METRIC_LABELS,
    Cell,
    Column,
    Row,
    Table,
    _finite,
    rounded,
)


def reported_vs_reproduced(agg: pd.DataFrame) -> pd.DataFrame:
    """The papers' zero-shot numbers next to ours, with the difference (ours − reported).

    Our rows are matched on (method, dataset, level, metric, shots); for each dataset only
    the aux the protocol trains on is in our records. One output row per reported number
    (a number reported by two papers appears twice, once per source).
    """
    rep = reported.results()
    rep = rep.dropna(subset=["method_id", "dataset_id"])
    ours = agg.rename(columns={"method": "method_id", "dataset": "dataset_id"})
    # several aux for one dataset: keep each (the aux column says which)
    rep = rep.rename(columns={"value": "reported", "std": "reported_std"})
    m = rep.merge(ours, on=["method_id", "dataset_id", "level", "metric", "shots"], how="inner")
    if m.empty:
        return pd.DataFrame(columns=["method", "dataset", "level", "metric", "shots", "source",
                                     "reported", "ours_mean", "ours_std", "n_seeds", "diff",
                                     "aux", "note"])
    out = pd.DataFrame({
        "method": m["method"], "method_id": m["method_id"], "dataset": m["dataset"],
        "dataset_id": m["dataset_id"], "level": m["level"], "metric": m["metric"],
        "shots": m["shots"], "source": m["source"], "reported": m["reported"],
        "ours_mean": m["mean"] * 100, "ours_std": m["std"] * 100, "n_seeds": m["n_seeds"],
        "aux": m["aux"], "note": m["note"],
    })
    out["diff"] = [rounded(o) - rounded(r) if _finite(o) and _finite(r) else math.nan
                   for o, r in zip(out["ours_mean"], out["reported"])]
    m_order = {k: i for i, k in enumerate(reported.METHOD_NAMES)}
    d_order = {k: i for i, k in enumerate(reported.DATASET_NAMES)}
    x_order = {lm: i for i, lm in enumerate(ALL_METRICS)}
    out["_m"] = out["method_id"].map(m_order)
    out["_d"] = out["dataset_id"].map(d_order)
    out["_x"] = [x_order.get((lv, mt), 99) for lv, mt in zip(out["level"], out["metric"])]
    out = out.sort_values(["_m", "_d", "_x", "source"]).drop(columns=["_m", "_d", "_x"])
    return out.reset_index(drop=True)


def rvr_table(rvr: pd.DataFrame) -> Table:
    cols = [Column("reported", "Reported", ranked=False), Column("ours", "Ours", ranked=False),
            Column("diff", "Δ (ours − reported)", ranked=False)]
    rows = []
    for r in rvr.itertuples():
        cells = [Cell(r.reported), Cell(r.ours_mean, r.ours_std, int(r.n_seeds)),
                 Cell(r.diff, note="signed")]
        rows.append(Row(r.method, r.method_id, r.aux, int(r.shots), cells, {
            "dataset": r.dataset, "metric": f"{LEVEL_LABELS[r.level]} {METRIC_LABELS[r.metric]}",
            "source": r.source + (f" ({r.note})" if r.note else "")}))
    return Table("reported-vs-reproduced", "Reported vs reproduced", cols, rows, kind="rvr",
                 info_columns=["dataset", "metric", "source"],
                 caption="The papers' numbers (bench/data/reported_results.csv) beside ours; "
                         "Δ = ours − reported, in points, from the printed values.")
