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

The package, by output:

    table.py          the table model: Cell, Column, Row, Table; number formatting
    meta.py           display names, domains and BibTeX of methods and datasets
    leaderboards.py   per-dataset, per-domain, overall and per-category leaderboards
    reproduction.py   the papers' numbers beside ours (reported vs reproduced)
    cost.py           the cost table, the papers' latency ratios, the accuracy-vs-FPS plot
    gallery_maps.py   the gallery of anomaly maps (inline PNGs)
    exports.py        CSV, Markdown, LaTeX and BibTeX
    provenance.py     the runs' provenance and the protocol note of every caption
    templating.py     where the jinja2 templates are, and their environment
    site.py           build() and render(): index.html and tables/

Example:
    >>> from bench.report import render
    >>> render("results/demo", "reports/site")          # doctest: +SKIP
    PosixPath('reports/site/index.html')
"""

from bench import reported
from bench.report.cost import (
    COST_COLUMNS,
    accuracy_fps_svg,
    cost_cell_text,
    cost_ratio_table,
    cost_table,
    load_cost,
)
from bench.report.exports import (
    SUITE_BIBTEX,
    bibliography,
    bibtex_key,
    latex_escape,
    table_to_csv,
    table_to_latex,
    table_to_markdown,
    write_table,
)
from bench.report.gallery_maps import gallery
from bench.report.leaderboards import (
    AGGREGATION_NOTE,
    backbones_of,
    category_tables,
    dataset_tables,
    group_tables,
    per_seed_means,
)
from bench.report.meta import KNOWN_DOMAINS, dataset_meta, dataset_order, method_meta, method_order
from bench.report.provenance import protocol_note, provenances
from bench.report.reproduction import reported_vs_reproduced, rvr_table
from bench.report.site import build, render
from bench.report.table import (
    ALL_METRICS,
    DASH,
    LEVEL_LABELS,
    MAIN_METRICS,
    METRIC_LABELS,
    Cell,
    Column,
    Row,
    Table,
    fmt_num,
    rounded,
)
from bench.report.templating import TEMPLATE_DIRS

__all__ = [
    "AGGREGATION_NOTE", "ALL_METRICS", "COST_COLUMNS", "DASH", "KNOWN_DOMAINS", "LEVEL_LABELS",
    "MAIN_METRICS", "METRIC_LABELS", "SUITE_BIBTEX", "TEMPLATE_DIRS",
    "Cell", "Column", "Row", "Table",
    "accuracy_fps_svg", "backbones_of", "bibliography", "bibtex_key", "build", "category_tables",
    "cost_cell_text", "cost_ratio_table", "cost_table", "dataset_meta", "dataset_order",
    "dataset_tables", "fmt_num", "gallery", "group_tables", "latex_escape", "load_cost",
    "method_meta", "method_order", "per_seed_means", "protocol_note", "provenances", "render",
    "reported", "reported_vs_reproduced", "rounded", "rvr_table", "table_to_csv",
    "table_to_latex", "table_to_markdown", "write_table",
]
