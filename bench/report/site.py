"""The entry point: :func:`build` gathers everything the report shows from a result store,
:func:`render` writes ``index.html`` and ``tables/`` (what ``zsad-bench report`` calls)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bench import reported
from bench.report.cost import (
    _cost_on_cpu,
    accuracy_fps_svg,
    cost_ratio_table,
    cost_table,
    load_cost,
)
from bench.report.exports import (
    SUITE_BIBTEX,
    bibliography,
    bibtex_key,
    table_to_csv,
    write_table,
)
from bench.report.gallery_maps import gallery
from bench.report.leaderboards import (
    AGGREGATION_NOTE,
    category_tables,
    dataset_tables,
    group_tables,
)
from bench.report.meta import _slug, dataset_meta, dataset_order, method_meta, method_order
from bench.report.provenance import protocol_note, provenances
from bench.report.reproduction import reported_vs_reproduced, rvr_table
from bench.report.table import ALL_METRICS, Table, fmt_num
from bench.report.templating import _read_template_file, _template_env
from bench.results import load


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
    bib = bibliography(mmeta, dmeta)
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
