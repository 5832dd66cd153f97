"""Leaderboards: per dataset, per domain and overall, and per category.

Aggregation (the same for every table): per-category values are averaged over the
categories of a dataset (undefined values left out), then mean and sample standard
deviation over seeds (:func:`bench.metrics.aggregate`). Domain and overall leaderboards
average the per-seed dataset means over the datasets of the domain (or all datasets)
first, then take mean and std over seeds. In each column the best value is bold and the
second best underlined (compared as printed, so ties share the mark).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from bench import reported
from bench.report.meta import _slug, dataset_meta, dataset_order
from bench.report.table import (
    LEVEL_LABELS,
    MAIN_METRICS,
    METRIC_LABELS,
    Cell,
    Column,
    Row,
    Table,
    _finite,
)

AGGREGATION_NOTE = (
    "Per category, then mean over the categories of a dataset (undefined values left out), "
    "then mean ± sample std over seeds. Percent; “–” = undefined (never 0); std only with ≥ 2 "
    "seeds; best bold, second underlined (as printed; few-shot rows ranked apart)."
)


def _metric_key(level: str, metric: str) -> str:
    return f"{level}_{metric}"


def _columns(metrics: Sequence[tuple[str, str]]) -> list[Column]:
    return [Column(_metric_key(lv, m), METRIC_LABELS.get(m, m), LEVEL_LABELS.get(lv, lv),
                   extra=(lv, m) not in MAIN_METRICS) for lv, m in metrics]


def _row_label(method: str, aux: str, shots: int, multi_aux: bool) -> str:
    label = reported.method_display(method)
    if shots:
        label += f" ({shots}-shot)"
    if multi_aux:
        label += f" [aux {aux}]"
    return label


def per_seed_means(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over categories per (method, aux, shots, seed, dataset, level, metric), NaN skipped."""
    keys = ["method", "aux", "shots", "seed", "dataset", "level", "metric"]
    return df.groupby(keys, dropna=False)["value"].mean().reset_index()


def backbones_of(df: pd.DataFrame) -> dict[str, str]:
    """Method -> the backbone(s) its records name (records without one are skipped)."""
    if "backbone" not in df.columns:
        return {}
    out = {}
    for m, g in df.dropna(subset=["backbone"]).groupby("method"):
        out[m] = ", ".join(sorted(set(map(str, g["backbone"]))))
    return out


def dataset_tables(df: pd.DataFrame, agg: pd.DataFrame, metrics: Sequence[tuple[str, str]],
                   methods: list[str]) -> list[Table]:
    """One leaderboard per dataset: a row per (method, aux, shots), a column per metric."""
    tables = []
    for ds in dataset_order(agg["dataset"].unique()):
        a = agg[agg["dataset"] == ds]
        present = {(lv, m) for lv, m in zip(a["level"], a["metric"])}
        mets = [lm for lm in metrics if lm in present]
        cols = _columns(mets)
        combos = a[["method", "aux", "shots"]].drop_duplicates()
        n_aux = combos.groupby("method")["aux"].nunique().to_dict()
        rows = []
        for meth in methods:
            mc = combos[combos["method"] == meth].sort_values(["shots", "aux"])
            if mc.empty:
                rows.append(Row(reported.method_display(meth), meth, "", 0,
                                [Cell() for _ in cols], {"note": "not evaluated"}))
                continue
            for aux, shots in zip(mc["aux"], mc["shots"]):
                sel = a[(a["method"] == meth) & (a["aux"] == aux) & (a["shots"] == shots)]
                look = {(r.level, r.metric): r for r in sel.itertuples()}
                cells = []
                for lv, m in mets:
                    r = look.get((lv, m))
                    cells.append(Cell() if r is None else Cell(
                        r.mean * 100, r.std * 100 if _finite(r.std) else math.nan, int(r.n_seeds)))
                rows.append(Row(_row_label(meth, aux, int(shots), n_aux.get(meth, 1) > 1),
                                meth, aux, int(shots), cells))
        meta = dataset_meta(ds)
        auxes = ", ".join(sorted(a["aux"].unique()))
        bbs = backbones_of(df[df["dataset"] == ds])
        info: list[str] = []
        if len(set(bbs.values())) > 1:
            info = ["backbone"]
            for r in rows:
                r.info["backbone"] = bbs.get(r.method, "")
            bb_note = "Backbones differ between methods (column “backbone”). "
        else:
            bb_note = f"Backbone: {next(iter(bbs.values()))}. " if bbs else ""
        t = Table(f"dataset-{_slug(ds)}", meta["name"], cols, rows, kind="dataset",
                  info_columns=info,
                  caption=f"{meta['name']} ({meta['domain']}); auxiliary training data: {auxes}. "
                          + bb_note + AGGREGATION_NOTE)
        t.rank()
        tables.append(t)
    return tables


def group_tables(df: pd.DataFrame, metrics: Sequence[tuple[str, str]], methods: list[str],
                 groups: dict[str, list[str]], kind: str) -> list[Table]:
    """Leaderboards over groups of datasets (domains, or everything).

    Per seed, the dataset means of the group's datasets are averaged (datasets where a
    metric is undefined are left out of that metric), then mean ± std over seeds. A row
    whose method lacks some of the group's datasets says so in ``info['datasets']``.
    """
    ps = per_seed_means(df)
    # several aux sets for one dataset (unusual): average them first
    ps = ps.groupby(["method", "shots", "seed", "dataset", "level", "metric"])["value"].mean()
    ps = ps.reset_index()
    tables = []
    for gname, datasets in groups.items():
        g = ps[ps["dataset"].isin(datasets)]
        if g.empty:
            continue
        present = {(lv, m) for lv, m in zip(g["level"], g["metric"])}
        mets = [lm for lm in metrics if lm in present]
        cols = _columns(mets)
        per_seed = g.groupby(["method", "shots", "seed", "level", "metric"])["value"].mean()
        per_seed = per_seed.reset_index()
        summary = per_seed.groupby(["method", "shots", "level", "metric"])["value"].agg(
            mean="mean", std=lambda v: v.std(ddof=1), n="count").reset_index()
        n_ds = g.groupby(["method", "shots"])["dataset"].nunique().to_dict()
        total = len(set(g["dataset"]))
        rows = []
        for meth in methods:
            shots_list = sorted(summary.loc[summary["method"] == meth, "shots"].unique())
            if not shots_list:
                rows.append(Row(reported.method_display(meth), meth, "", 0,
                                [Cell() for _ in cols], {"datasets": f"0/{total}"}))
                continue
            for shots in shots_list:
                sel = summary[(summary["method"] == meth) & (summary["shots"] == shots)]
                look = {(r.level, r.metric): r for r in sel.itertuples()}
                cells = []
                for lv, m in mets:
                    r = look.get((lv, m))
                    cells.append(Cell() if r is None else Cell(
                        r.mean * 100, r.std * 100 if (_finite(r.std) and r.n >= 2) else math.nan,
                        int(r.n)))
                k = n_ds.get((meth, shots), 0)
                rows.append(Row(_row_label(meth, "", int(shots), False), meth, "", int(shots),
                                cells, {"datasets": f"{k}/{total}"}))
        names = ", ".join(dataset_meta(d)["name"] for d in datasets)
        title = "Overall mean" if kind == "overall" else f"Domain: {gname}"
        t = Table(f"{kind}-{_slug(gname)}", title, cols, rows, kind=kind,
                  info_columns=["datasets"],
                  caption=f"Mean over {len(datasets)} dataset(s): {names}. Per seed the dataset "
                          "means are averaged (datasets where a metric is undefined are left out "
                          "of that metric), then mean ± sample std over seeds. “datasets” = how "
                          "many of them the row covers.")
        t.rank()
        tables.append(t)
    return tables


def category_tables(df: pd.DataFrame, metrics: Sequence[tuple[str, str]],
                    methods: list[str]) -> dict[str, list[Table]]:
    """Per dataset and metric: rows = methods, columns = categories (mean ± std over seeds)."""
    out: dict[str, list[Table]] = {}
    for ds in sorted(df["dataset"].unique()):
        d = df[df["dataset"] == ds]
        cats = sorted(d["category"].unique())
        tables = []
        for lv, m in metrics:
            dm = d[(d["level"] == lv) & (d["metric"] == m)]
            if dm.empty:
                continue
            s = dm.groupby(["method", "aux", "shots", "category"])["value"].agg(
                mean="mean", std=lambda v: v.std(ddof=1), n="count").reset_index()
            combos = s[["method", "aux", "shots"]].drop_duplicates()
            n_aux = combos.groupby("method")["aux"].nunique().to_dict()
            rows = []
            for meth in methods:
                mc = combos[combos["method"] == meth].sort_values(["shots", "aux"])
                for aux, shots in zip(mc["aux"], mc["shots"]):
                    sel = s[(s["method"] == meth) & (s["aux"] == aux) & (s["shots"] == shots)]
                    look = {r.category: r for r in sel.itertuples()}
                    cells = [Cell() if c not in look else Cell(
                        look[c].mean * 100, look[c].std * 100 if look[c].n >= 2 else math.nan,
                        int(look[c].n)) for c in cats]
                    rows.append(Row(_row_label(meth, aux, int(shots), n_aux.get(meth, 1) > 1),
                                    meth, aux, int(shots), cells))
            cols = [Column(c, c, "", ranked=True) for c in cats]
            key = _metric_key(lv, m)
            t = Table(f"cat-{_slug(ds)}-{key}", f"{LEVEL_LABELS[lv]} {METRIC_LABELS[m]}",
                      cols, rows, kind="category",
                      caption="Per category: mean ± sample std over seeds.")
            t.rank()
            tables.append(t)
        out[ds] = tables
    return out
