"""Render a result store into a self-contained HTML report and LaTeX/Markdown/CSV tables.

``render(results_dir, out_dir)`` writes::

    out_dir/index.html          one file: CSS, JS, plots and gallery images inline, no network
    out_dir/tables/*.csv|md|tex every leaderboard, the cost table, reported-vs-reproduced
    out_dir/tables/references.bib  BibTeX of the suite and of every method and dataset shown

Aggregation (the same for every table): per-category values are averaged over the
categories of a dataset (undefined values left out), then mean and sample standard
deviation over seeds (:func:`bench.metrics.aggregate`). Domain and overall leaderboards
average the per-seed dataset means over the datasets of the domain (or all datasets)
first, then take mean and std over seeds. Numbers are printed in percent with one
decimal; ``±`` std only where at least two seeds exist; ``–`` where a value is undefined
(never 0). In each column the best value is bold and the second best underlined
(compared as printed, so ties share the mark).

Every output format is built from the same :class:`Table` objects, so HTML, LaTeX,
Markdown and CSV print identical numbers.

Example:
    >>> from bench.report import render
    >>> render("results/demo", "reports/site")          # doctest: +SKIP
    PosixPath('reports/site/index.html')
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import reported
from bench.results import load, read_jsonl, read_provenance

log = logging.getLogger("zsad_bench.report")

#: The checkout's reports/templates/ (DESIGN.md), or the copy that an installed wheel carries
#: as bench/templates/ (pyproject.toml maps one onto the other).
TEMPLATE_DIRS = (Path(__file__).resolve().parents[1] / "reports" / "templates",
                 Path(__file__).resolve().parent / "templates")

#: Every metric column, in the order the papers print them.
ALL_METRICS: tuple[tuple[str, str], ...] = (
    ("image", "auroc"), ("image", "ap"), ("image", "f1_max"),
    ("pixel", "auroc"), ("pixel", "aupro"), ("pixel", "ap"), ("pixel", "f1_max"),
)
#: The columns every ZSAD paper prints; the others can be hidden in the HTML.
MAIN_METRICS: tuple[tuple[str, str], ...] = (
    ("image", "auroc"), ("image", "ap"), ("pixel", "auroc"), ("pixel", "aupro"),
)
METRIC_LABELS = {"auroc": "AUROC", "ap": "AP", "f1_max": "F1-max", "aupro": "AUPRO"}
LEVEL_LABELS = {"image": "Image", "pixel": "Pixel"}
DASH = "–"  # undefined value (en dash); LaTeX gets "--"

#: Domains of the canonical datasets, used when an adapter is not importable.
KNOWN_DOMAINS = {
    **dict.fromkeys(["mvtec", "visa", "mpdd", "btad", "sdd", "dagm", "dtd_synthetic"], "industrial"),
    **dict.fromkeys(["isic", "clinicdb", "colondb", "kvasir", "endo", "headct", "brainmri",
                     "br35h"], "medical"),
}

SUITE_BIBTEX = """@software{zsad_bench,
  title   = {zsad-bench: A Reproducible Benchmark Suite for CLIP-based Zero-Shot Anomaly Detection},
  author  = {{zsad-bench contributors}},
  year    = {2026},
  version = {0.1.0},
  license = {Apache-2.0},
  note    = {See CITATION.cff}
}"""

AGGREGATION_NOTE = (
    "Per category, then mean over the categories of a dataset (undefined values left out), "
    "then mean ± sample std over seeds. Percent; “–” = undefined (never 0); std only with ≥ 2 "
    "seeds; best bold, second underlined (as printed; few-shot rows ranked apart)."
)


# ------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------
def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def fmt_num(x: Any, digits: int = 1) -> str:
    """``x`` with ``digits`` decimals, or ``–`` if undefined."""
    return f"{float(x):.{digits}f}" if _finite(x) else DASH


def rounded(x: Any, digits: int = 1) -> float:
    """The value as printed (NaN if undefined): what every output format shows."""
    return float(f"{float(x):.{digits}f}") if _finite(x) else math.nan


@dataclass
class Cell:
    """One mean ± std cell (percent)."""

    mean: float = math.nan
    std: float = math.nan
    n_seeds: int = 0
    rank: int = 0  # 1 best, 2 second, 0 otherwise
    note: str = ""

    @property
    def defined(self) -> bool:
        return _finite(self.mean)

    @property
    def show_std(self) -> bool:
        return self.defined and self.n_seeds >= 2 and _finite(self.std)

    def text(self) -> str:
        if not self.defined:
            return DASH
        if self.note == "signed":
            return f"{self.mean:+.1f}"
        s = fmt_num(self.mean)
        return f"{s} ± {fmt_num(self.std)}" if self.show_std else s


@dataclass
class Column:
    key: str                # e.g. "image_auroc"
    label: str              # e.g. "AUROC"
    group: str = ""         # e.g. "Image"
    extra: bool = False     # hidden with "main metrics only"
    ranked: bool = True


@dataclass
class Row:
    label: str
    method: str = ""
    aux: str = ""
    shots: int = 0
    cells: list[Cell] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Table:
    """A leaderboard (or any table of cells) that every output format renders identically."""

    slug: str
    title: str
    columns: list[Column]
    rows: list[Row]
    caption: str = ""
    kind: str = "dataset"
    info_columns: list[str] = field(default_factory=list)

    def groups(self) -> list[tuple[str, int, int]]:
        """Consecutive column groups: (group label, span, span without the extra columns)."""
        out: list[tuple[str, int, int]] = []
        for c in self.columns:
            if out and out[-1][0] == c.group:
                g, n, k = out[-1]
                out[-1] = (g, n + 1, k + (not c.extra))
            else:
                out.append((c.group, 1, int(not c.extra)))
        return out

    def rank(self) -> None:
        """Mark the best (1) and second-best (2) printed value of each ranked column.

        Rows of different ``shots`` are ranked separately: a few-shot method is not
        compared with the zero-shot ones.
        """
        for j, col in enumerate(self.columns):
            if not col.ranked:
                continue
            for shots in {r.shots for r in self.rows}:  # few-shot rows ranked apart
                rows = [r for r in self.rows if r.shots == shots]
                if len(rows) < 2 and len(self.rows) > 1:  # a lone few-shot row: nothing to rank
                    for r in rows:
                        r.cells[j].rank = 0
                    continue
                vals = sorted({rounded(r.cells[j].mean) for r in rows if r.cells[j].defined},
                              reverse=True)
                for r in rows:
                    c = r.cells[j]
                    c.rank = 0
                    if c.defined and vals:
                        v = rounded(c.mean)
                        c.rank = 1 if v == vals[0] else 2 if len(vals) > 1 and v == vals[1] else 0


# ------------------------------------------------------------------------------------
# metadata of methods and datasets (registries are optional: missing metadata is fine)
# ------------------------------------------------------------------------------------
def _method_cls(name: str) -> Any:
    try:
        from bench.registry import METHODS

        return METHODS.get(name) if name in METHODS else None
    except Exception:  # noqa: BLE001 - a broken plugin must not break the report
        return None


def _adapter_cls(name: str) -> Any:
    try:
        from bench.registry import ADAPTERS

        return ADAPTERS.get(name) if name in ADAPTERS else None
    except Exception:  # noqa: BLE001
        return None


def dataset_meta(name: str) -> dict[str, str]:
    """Display name, domain and BibTeX of a dataset id (falls back to known defaults)."""
    cls = _adapter_cls(name)
    display = getattr(cls, "display_name", "") or reported.DATASET_NAMES.get(name, name)
    domain = getattr(cls, "domain", "") if cls is not None else ""
    domain = domain or KNOWN_DOMAINS.get(name, "other")
    return {"id": name, "name": display, "domain": domain,
            "bibtex": (getattr(cls, "bibtex", "") or "").strip()}


def method_meta(name: str) -> dict[str, Any]:
    """Display name, paper, BibTeX and training kind of a registered method."""
    cls = _method_cls(name)
    return {"id": name, "name": reported.method_display(name),
            "paper": getattr(cls, "paper", "") or "",
            "bibtex": (getattr(cls, "bibtex", "") or "").strip(),
            "trains": getattr(cls, "trains", None)}


def bibtex_key(bib: str) -> str:
    m = re.match(r"\s*@\w+\s*\{\s*([^,\s]+)\s*,", bib or "")
    return m.group(1) if m else ""


def method_order(names: Iterable[str]) -> list[str]:
    """Known methods in the papers' (roughly chronological) order, then the rest by name."""
    known = list(reported.METHOD_NAMES)
    names = set(names)
    return [n for n in known if n in names] + sorted(names - set(known))


# ------------------------------------------------------------------------------------
# aggregation into tables
# ------------------------------------------------------------------------------------
def dataset_order(names: Iterable[str]) -> list[str]:
    """Canonical datasets in the design's order, then the rest by name."""
    known = list(reported.DATASET_NAMES)
    names = set(names)
    return [n for n in known if n in names] + sorted(names - set(known))


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


def _slug(s: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", str(s)).strip("-").lower() or "x"


# ------------------------------------------------------------------------------------
# reported vs reproduced
# ------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------
# cost
# ------------------------------------------------------------------------------------
COST_COLUMNS: tuple[tuple[str, str, int], ...] = (
    # key, label, decimals
    ("latency_median_ms", "Latency median (ms)", 2),
    ("latency_p90_ms", "Latency p90 (ms)", 2),
    ("fps", "FPS", 1),
    ("latency_ratio", "Latency ÷ reference", 2),
    ("infer_peak_mib", "Inference peak (MiB)", 1),
    ("train_peak_mib", "Training-step peak (MiB)", 1),
    ("learnable_params", "Learnable params", 0),
    ("total_params", "Total params", 0),
    ("gflops", "GFLOPs / image", 2),
    ("one_off_s", "One-off setup (s)", 3),
)


def load_cost(results_dir: Path) -> pd.DataFrame:
    """Every ``cost.jsonl`` at or below ``results_dir``; the latest record per measurement."""
    recs = [r for p in sorted(Path(results_dir).rglob("cost.jsonl")) for r in read_jsonl(p)]
    if not recs:
        return pd.DataFrame()
    df = pd.DataFrame(recs)
    for c in ("device", "backbone", "image_size"):
        if c not in df:
            df[c] = ""
    df = df.drop_duplicates(["method", "device", "backbone", "image_size"], keep="last")
    return df.reset_index(drop=True)


def cost_table(cost: pd.DataFrame, methods: list[str]) -> Table:
    """Rows = (method, device); latency ratio against CLIP (or the fastest) on that device."""
    cols = [Column(k, label, ranked=False) for k, label, _ in COST_COLUMNS]
    rows = []
    cost = cost.copy()
    cost["latency_ratio"] = math.nan
    refs: dict[str, str] = {}
    for dev, g in cost.groupby("device"):
        lat = pd.to_numeric(g["latency_median_ms"], errors="coerce")
        ref_idx = g.index[g["method"] == "clip"]
        ref_idx = ref_idx[0] if len(ref_idx) else lat.idxmin()
        refs[dev] = reported.method_display(cost.loc[ref_idx, "method"])
        cost.loc[g.index, "latency_ratio"] = lat / lat[ref_idx]
    order = method_order(cost["method"])
    cost["_o"] = cost["method"].map({m: i for i, m in enumerate(order)})
    for r in cost.sort_values(["device", "_o"]).to_dict("records"):
        cells = []
        for key, _, dec in COST_COLUMNS:
            v = r.get(key)
            c = Cell(float(v) if _finite(v) else math.nan)
            c.note = str(dec)
            cells.append(c)
        rows.append(Row(reported.method_display(r["method"]), r["method"], "", 0, cells, {
            "device": r.get("device", ""), "backbone": f"{r.get('backbone', '')}",
            "reference": refs.get(r.get("device"), "")}))
    info = ["device", "backbone"]
    where = ""
    if len({(r.info["device"], r.info["backbone"]) for r in rows}) == 1 and rows:
        info = []  # one machine, one backbone: say it once
        where = f"Device: {rows[0].info['device']}; backbone: {rows[0].info['backbone']}. "
    return Table("cost", "Cost", cols, rows, kind="cost",
                 info_columns=info,
                 caption=where + "Batch size 1, preprocessed tensor on the device, median and p90 of the "
                         "timed iterations after warm-up; FPS = 1 / median. Latency ÷ reference "
                         "= this method's median over CLIP's (else the fastest method's) on the "
                         "same device. On a CPU only such ratios mean anything. One-off setup = "
                         "first call minus the steady-state median (text features, caches).")


def cost_cell_text(c: Cell) -> str:
    """Cost cells have their own decimals (stored in ``note``), no std."""
    if not c.defined:
        return DASH
    dec = int(c.note or 1)
    return f"{c.mean:,.0f}" if dec == 0 else f"{c.mean:.{dec}f}"


def cost_ratio_table(cost: pd.DataFrame) -> pd.DataFrame:
    """Papers' latency ratios (within one source) beside ours (within one device)."""
    rep = reported.cost().dropna(subset=["method_id"])
    rows = []
    if cost.empty:
        return pd.DataFrame()
    for src, g in rep.groupby("source", sort=False):
        g = g.dropna(subset=["inference_s_per_image"])
        if len(g) < 2:
            continue
        ref = next((g[g["method_id"] == m].iloc[0] for m in ("anomalyclip", "clip", "mpa")
                    if (g["method_id"] == m).any()), g.iloc[0])
        for dev, c in cost.groupby("device"):
            lat = dict(zip(c["method"], pd.to_numeric(c["latency_median_ms"], errors="coerce")))
            for r in g.itertuples():
                ours = (lat.get(r.method_id, math.nan) / lat[ref.method_id]
                        if ref.method_id in lat else math.nan)
                rows.append({"source": src, "hardware": r.hardware, "method": r.method,
                             "reference": ref.method,
                             "reported_ratio": r.inference_s_per_image / ref.inference_s_per_image,
                             "our_ratio": ours, "our_device": dev})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------
# plot and gallery
# ------------------------------------------------------------------------------------
def accuracy_fps_svg(overall: Table | None, cost: pd.DataFrame) -> str:
    """An SVG scatter of accuracy (overall mean) against FPS, one panel per metric shown."""
    if overall is None or cost.empty or "fps" not in cost:
        return ""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = cost.get("device_type", pd.Series([""] * len(cost), index=cost.index)).astype(str)
    gpu = cost[kinds.str.lower() == "cuda"]
    device = (gpu if len(gpu) else cost)["device"].iloc[-1]  # a GPU if measured, else the latest
    c = cost[cost["device"] == device]
    fps = dict(zip(c["method"], pd.to_numeric(c["fps"], errors="coerce")))
    panels = [k for k in ("image_auroc", "pixel_auroc") if k in [col.key for col in overall.columns]]
    if not panels:
        return ""
    plt.rcParams["svg.hashsalt"] = "zsad-bench"
    plt.rcParams["svg.fonttype"] = "none"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    any_point = False
    for ax, key in zip(axes[0], panels):
        j = [col.key for col in overall.columns].index(key)
        for row in overall.rows:
            x, y = fps.get(row.method, math.nan), row.cells[j].mean
            if not (_finite(x) and _finite(y)):
                continue
            any_point = True
            ax.scatter([x], [y], s=28)
            ax.annotate(row.label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
        ax.set_xscale("log")
        ax.margins(x=0.25, y=0.15)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"FPS (batch 1, {device})")
        ax.set_ylabel(f"{overall.columns[j].group} {overall.columns[j].label} (%, overall mean)")
        ax.grid(True, alpha=0.3)
    fig.suptitle("Accuracy vs speed" + (" (CPU: compare ratios only)" if _cost_on_cpu(c) else ""),
                 fontsize=10)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    if not any_point:
        return ""
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def _png_data_uri(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _heatmap(m: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    m = m.astype(np.float32)
    lo, hi = float(np.nanmin(m)), float(np.nanmax(m))
    m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    return (colormaps["jet"](m)[..., :3] * 255).astype(np.uint8)


def _array_thumb(rgb: np.ndarray, size: int) -> str:
    from PIL import Image

    im = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    return _png_data_uri(np.asarray(im.resize((size, size), Image.BICUBIC)))


def _image_thumb(path: Path, size: int) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            return _png_data_uri(np.asarray(im))
    except (OSError, ValueError):
        return None


def gallery(results_dir: Path, methods: list[str], max_per_dataset: int = 12) -> list[dict[str, Any]]:
    """Per dataset: the runner's saved maps beside image and ground truth, as data URIs."""
    files = sorted(Path(results_dir).rglob("maps/*.npz"))
    by_ds: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for f in files:
        parts = f.stem.split("__")
        if len(parts) != 4:
            continue
        method, aux, ds, cat = parts
        try:
            z = np.load(f, allow_pickle=False)
            maps, masks, images = z["maps"], z["masks"], [str(s) for s in z["images"]]
            labels = z["labels"] if "labels" in z else np.full(len(images), -1)
            root = Path(str(z["root"])) if "root" in z else None
            thumbs = z["thumbs"] if "thumbs" in z else None
        except (OSError, ValueError, KeyError) as err:
            log.warning("gallery: cannot read %s (%s)", f, err)
            continue
        entries = by_ds.setdefault(ds, {})
        for i, img in enumerate(images):
            e = entries.setdefault((cat, img), {
                "category": cat, "image": img, "label": int(labels[i]),
                "root": root, "mask": masks[i], "maps": {}, "thumb": None})
            if e["thumb"] is None and thumbs is not None and i < len(thumbs):
                e["thumb"] = np.asarray(thumbs[i], dtype=np.uint8)
            e["maps"][(method, aux)] = maps[i]
    out = []
    for ds in sorted(by_ds):
        entries = list(by_ds[ds].values())[:max_per_dataset]
        cols = method_order({m for e in entries for m, _ in e["maps"]})
        size = int(entries[0]["mask"].shape[-1]) if entries else 96
        rows = []
        for e in entries:
            if e["thumb"] is not None:  # stored by the run: renders from anywhere
                thumb = _array_thumb(e["thumb"], size)
            else:                       # older runs: read the image from the data root
                thumb = _image_thumb(e["root"] / e["image"], size) if e["root"] is not None else None
            gt = _png_data_uri((np.asarray(e["mask"], dtype=bool) * 255).astype(np.uint8))
            cells = []
            for m in cols:
                mp = next((v for (mm, _), v in e["maps"].items() if mm == m), None)
                cells.append(None if mp is None else _png_data_uri(_heatmap(np.asarray(mp))))
            rows.append({"category": e["category"], "image": e["image"], "label": e["label"],
                         "thumb": thumb, "gt": gt, "maps": cells})
        out.append({"dataset": ds, "name": dataset_meta(ds)["name"], "slug": _slug(ds),
                    "methods": [reported.method_display(m) for m in cols], "rows": rows})
    return out


# ------------------------------------------------------------------------------------
# table writers
# ------------------------------------------------------------------------------------
def _cell_text(t: Table, c: Cell) -> str:
    return cost_cell_text(c) if t.kind == "cost" else c.text()


def table_to_csv(t: Table) -> pd.DataFrame:
    """Wide CSV: per column its printed mean, std and number of seeds (percent)."""
    recs = []
    for r in t.rows:
        rec: dict[str, Any] = {"label": r.label, "method": r.method}
        if t.kind not in ("cost", "rvr") and t.kind != "category":
            rec.update({"aux": r.aux, "shots": r.shots})
        for k in t.info_columns:
            rec[k] = r.info.get(k, "")
        for col, c in zip(t.columns, r.cells):
            if t.kind == "cost":
                dec = int(c.note or 1)
                rec[col.key] = rounded(c.mean, dec) if c.defined else None
                continue
            rec[col.key] = rounded(c.mean) if c.defined else None
            if t.kind in ("dataset", "domain", "overall", "category") or col.key == "ours":
                rec[f"{col.key}_std"] = rounded(c.std) if c.show_std else None
                rec[f"{col.key}_n_seeds"] = c.n_seeds
        recs.append(rec)
    return pd.DataFrame(recs)


def table_to_markdown(t: Table) -> str:
    from tabulate import tabulate

    headers = ["Method", *[k.capitalize() for k in t.info_columns],
               *[f"{c.group} {c.label}".strip() for c in t.columns]]
    body = []
    for r in t.rows:
        cells = []
        for c in r.cells:
            s = _cell_text(t, c)
            cells.append(f"**{s}**" if c.rank == 1 else f"<u>{s}</u>" if c.rank == 2 else s)
        body.append([r.label, *[r.info.get(k, "") for k in t.info_columns], *cells])
    md = f"### {t.title}\n\n" + tabulate(body, headers=headers, tablefmt="github",
                                          disable_numparse=True)
    return md + (f"\n\n{t.caption}\n" if t.caption else "\n")


_TEX_ESCAPES = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "\\": r"\textbackslash{}", "–": "--", "−": "--", "Δ": r"$\Delta$",
                "÷": r"$\div$", "±": r"$\pm$", "≥": r"$\geq$", "“": "``", "”": "''"}


def latex_escape(s: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(s))


def _tex_cell(t: Table, c: Cell) -> str:
    if not c.defined:
        return "--"
    if t.kind == "cost":
        s = cost_cell_text(c).replace(",", "{,}")
    elif c.note == "signed":
        s = c.text()
    else:
        s = fmt_num(c.mean) + (rf"\,{{\scriptsize$\pm$\,{fmt_num(c.std)}}}" if c.show_std else "")
    return rf"\textbf{{{s}}}" if c.rank == 1 else rf"\underline{{{s}}}" if c.rank == 2 else s


def table_to_latex(t: Table, cite_keys: dict[str, str] | None = None) -> str:
    """A booktabs ``tabular`` (with a comment header), ready to ``\\input``."""
    cite_keys = cite_keys or {}
    n_info = len(t.info_columns)
    spec = "l" + "l" * n_info + "r" * len(t.columns)
    lines = [f"% {t.title} -- generated by zsad-bench (bench/report.py); needs \\usepackage{{booktabs}}",
             f"% {t.caption}".replace("\n", " "),
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    groups = [c.group for c in t.columns]
    if any(groups):
        head, rules, j = ["" for _ in range(1 + n_info)], [], 2 + n_info
        i = 0
        while i < len(groups):
            k = i
            while k < len(groups) and groups[k] == groups[i]:
                k += 1
            head.append(rf"\multicolumn{{{k - i}}}{{c}}{{{latex_escape(groups[i])}}}")
            rules.append(rf"\cmidrule(lr){{{j + i}-{j + k - 1}}}")
            i = k
        lines.append(" & ".join(head) + r" \\")
        lines.append(" ".join(rules))
    lines.append(" & ".join(["Method", *[latex_escape(k.capitalize()) for k in t.info_columns],
                             *[latex_escape(c.label) for c in t.columns]]) + r" \\")
    lines.append(r"\midrule")
    for r in t.rows:
        label = latex_escape(r.label)
        key = cite_keys.get(r.method)
        if key:
            label += rf"~\cite{{{key}}}"
        cells = [_tex_cell(t, c) for c in r.cells]
        lines.append(" & ".join([label, *[latex_escape(r.info.get(k, "")) for k in t.info_columns],
                                 *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def write_table(t: Table, tables_dir: Path, cite_keys: dict[str, str]) -> dict[str, str]:
    """Write ``<slug>.csv|md|tex``; return the file names."""
    names = {}
    for ext, text in (("csv", None), ("md", table_to_markdown(t)),
                      ("tex", table_to_latex(t, cite_keys))):
        p = tables_dir / f"{t.slug}.{ext}"
        if ext == "csv":
            table_to_csv(t).to_csv(p, index=False)
        else:
            p.write_text(text, encoding="utf-8")
        names[ext] = p.name
    return names


# ------------------------------------------------------------------------------------
# provenance and citations
# ------------------------------------------------------------------------------------
def provenances(results_dir: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(Path(results_dir).rglob("provenance.json")):
        try:
            json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        d = read_provenance(p.parent)  # with the per-job files (checkpoints, backbones)
        env = d.get("environment", {})
        out.append({
            "run": str(p.parent), "protocol": d.get("protocol", ""),
            "protocol_hash": d.get("protocol_hash", ""),
            "git_commit": env.get("git_commit") or "unknown",
            "git_dirty": env.get("git_dirty"), "device": env.get("device", ""),
            "python": env.get("python", ""), "platform": env.get("platform", ""),
            "versions": env.get("versions", {}), "backbone": d.get("backbone", {}),
            "inputs": d.get("inputs", {}),
            "seeds": d.get("seeds", []), "n_checkpoints": len(d.get("checkpoints", {})),
            "json": json.dumps(d, indent=2, sort_keys=True, default=str),
        })
    return out


def protocol_note(provs: list[dict[str, Any]], methods: Sequence[str]) -> str:
    """The sentence every table starts with: which protocol(s) the numbers come from, and
    the class words each method got where they differ (backbone settings are in the
    backbone line or column)."""
    names = sorted({p["protocol"] for p in provs if p.get("protocol")})
    if not names:
        return ""
    note = f"Protocol: {', '.join(names)}. "
    words: dict[str, list[str]] = {}
    for p in provs:
        for m, inp in (p.get("inputs") or {}).items():
            if m in methods and inp.get("class_words"):
                words.setdefault(str(inp["class_words"]), [])
                if m not in words[str(inp["class_words"])]:
                    words[str(inp["class_words"])].append(m)
    if len(words) > 1:
        label = {"folder": "folder ids (metal_nut)", "readable": "readable names (metal nut)"}
        parts = [f"{label.get(w, w)} for {', '.join(ms)}" for w, ms in sorted(words.items())]
        note += f"Class words: {'; '.join(parts)}. "
    return note


def _template_env():
    import jinja2

    dirs = [str(d) for d in TEMPLATE_DIRS if d.is_dir()]
    if not dirs:
        raise FileNotFoundError(f"report templates not found in {[str(d) for d in TEMPLATE_DIRS]}")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(dirs),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals["cell_text"] = _cell_text
    return env


# ------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------
def build(results_dir: str | Path, metrics: Sequence[tuple[str, str]] = ALL_METRICS,
          gallery_per_dataset: int = 12) -> dict[str, Any]:
    """Everything the report shows, as plain Python objects (used by :func:`render`)."""
    from bench.metrics import aggregate

    results_dir = Path(results_dir)
    df = load(results_dir)
    if df.empty:
        raise FileNotFoundError(f"{results_dir}: the result store has no finished records yet; "
                                "run `zsad-bench run` (it resumes) before `zsad-bench report`.")
    agg = aggregate(df)
    methods = method_order(df["method"].unique())
    ds_tables = dataset_tables(df, agg, metrics, methods)
    domains: dict[str, list[str]] = {}
    ds_ids = dataset_order(agg["dataset"].unique())
    for ds in ds_ids:
        domains.setdefault(dataset_meta(ds)["domain"], []).append(ds)
    domain_tables = group_tables(df, metrics, methods, domains, "domain") if len(domains) else []
    overall = group_tables(df, metrics, methods, {"all": ds_ids}, "overall")
    cats = category_tables(df, metrics, methods)
    rvr = reported_vs_reproduced(agg)
    cost = load_cost(results_dir)
    provs = provenances(results_dir)
    note = protocol_note(provs, methods)
    if note:  # every table names the protocol its numbers come from
        for t in [*ds_tables, *domain_tables, *overall, *(t for ts in cats.values() for t in ts)]:
            t.caption = note + t.caption
    return {
        "df": df, "agg": agg, "methods": methods, "dataset_tables": ds_tables,
        "domain_tables": domain_tables, "overall": overall[0] if overall else None,
        "category_tables": cats, "rvr": rvr, "cost": cost,
        "cost_table": cost_table(cost, methods) if not cost.empty else None,
        "cost_ratios": cost_ratio_table(cost),
        "gallery": gallery(results_dir, methods, gallery_per_dataset),
        "provenance": provs, "protocol_note": note,
    }


def render(results_dir: str | Path, out_dir: str | Path, *,
           metrics: Sequence[tuple[str, str]] = ALL_METRICS,
           gallery_per_dataset: int = 12) -> Path:
    """Render ``out_dir/index.html`` and ``out_dir/tables/`` from a result store.

    Args:
        results_dir: a run directory (with ``records.jsonl``) or a folder of runs.
        out_dir: where the site goes (created).
        metrics: (level, metric) columns of the leaderboards, in order; those outside
            :data:`MAIN_METRICS` can be hidden in the HTML with one click.
        gallery_per_dataset: at most this many gallery images per dataset.

    Returns:
        The path of ``index.html``.
    """
    out_dir = Path(out_dir)
    tables_dir = out_dir / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    data = build(results_dir, metrics, gallery_per_dataset)
    methods = data["methods"]
    mmeta = {m: method_meta(m) for m in methods}
    datasets = list(dict.fromkeys(data["agg"]["dataset"]))
    dmeta = {d: dataset_meta(d) for d in datasets}
    cite_keys = {m: bibtex_key(v["bibtex"]) for m, v in mmeta.items() if v["bibtex"]}

    # tables on disk
    files: dict[str, dict[str, str]] = {}
    all_tables: list[Table] = [*data["dataset_tables"], *data["domain_tables"]]
    if data["overall"] is not None:
        all_tables.append(data["overall"])
    for t in all_tables:
        files[t.slug] = write_table(t, tables_dir, cite_keys)
    for ds, tabs in data["category_tables"].items():
        long = []
        for t in tabs:
            df = table_to_csv(t)
            df.insert(0, "metric", t.slug.rsplit("-", 1)[-1])
            long.append(df)
        if long:
            pd.concat(long, ignore_index=True).to_csv(tables_dir / f"categories-{_slug(ds)}.csv",
                                                      index=False)
    rvr_t = rvr_table(data["rvr"]) if not data["rvr"].empty else None
    if rvr_t is not None:
        rvr_t.caption = data.get("protocol_note", "") + rvr_t.caption
        files[rvr_t.slug] = write_table(rvr_t, tables_dir, cite_keys)
    if data["cost_table"] is not None:
        files["cost"] = write_table(data["cost_table"], tables_dir, cite_keys)
    if not data["cost_ratios"].empty:
        data["cost_ratios"].to_csv(tables_dir / "cost-ratios-vs-papers.csv", index=False)
    agg = data["agg"].copy()
    agg["mean_pct"], agg["std_pct"] = agg["mean"] * 100, agg["std"] * 100
    agg.to_csv(tables_dir / "aggregate-full-precision.csv", index=False)

    # citations
    bib = [SUITE_BIBTEX]
    bib += [v["bibtex"] for v in mmeta.values() if v["bibtex"]]
    bib += [v["bibtex"] for v in dmeta.values() if v["bibtex"]]
    bib = list(dict.fromkeys(bib))
    (tables_dir / "references.bib").write_text("\n\n".join(bib) + "\n", encoding="utf-8")

    # reported numbers for the methods we ran (shown when nothing overlaps)
    rep = reported.results()
    rep_ours = rep[rep["method_id"].isin(methods)]
    rep_cost = reported.cost()

    env = _template_env()
    html = env.get_template("index.html.j2").render(
        title="zsad-bench report",
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        aggregation_note=AGGREGATION_NOTE,
        dataset_tables=data["dataset_tables"], domain_tables=data["domain_tables"],
        overall=data["overall"],
        category_tables={f"dataset-{_slug(k)}": v for k, v in data["category_tables"].items()},
        dataset_meta=dmeta, method_meta=mmeta, files=files, rvr=rvr_t,
        reported_ours=rep_ours, reported_cost=rep_cost,
        cost=data["cost_table"], cost_ratios=data["cost_ratios"],
        cost_devices=sorted(set(data["cost"].get("device", pd.Series(dtype=str)))),
        cost_on_cpu=_cost_on_cpu(data["cost"]),
        plot_svg=accuracy_fps_svg(data["overall"], data["cost"]),
        gallery=data["gallery"], provenance=data["provenance"],
        bibtex="\n\n".join(bib), suite_bibtex=SUITE_BIBTEX,
        n_records=len(data["df"]), fmt_num=fmt_num,
        css=_read_template_file("style.css"), js=_read_template_file("report.js"),
    )
    index = out_dir / "index.html"
    index.write_text(html, encoding="utf-8")
    return index


def _cost_on_cpu(cost: pd.DataFrame) -> bool:
    if cost.empty:
        return False
    kinds = cost.get("device_type", pd.Series(["cpu"] * len(cost)))
    return any(str(k).lower() == "cpu" for k in kinds)


def _read_template_file(name: str) -> str:
    for d in TEMPLATE_DIRS:
        if (d / name).is_file():
            return (d / name).read_text(encoding="utf-8")
    return ""
