"""Cost: the table of latency, memory, parameters and FLOPs (``cost.jsonl``), the papers'
latency ratios beside ours, and the accuracy-vs-FPS plot."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd

from bench import reported
from bench.report.meta import method_order
from bench.report.table import DASH, Cell, Column, Row, Table, _finite
from bench.results import read_jsonl

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


def _cost_on_cpu(cost: pd.DataFrame) -> bool:
    if cost.empty:
        return False
    kinds = cost.get("device_type", pd.Series(["cpu"] * len(cost)))
    return any(str(k).lower() == "cpu" for k in kinds)


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
