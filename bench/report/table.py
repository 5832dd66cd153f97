"""The table model: mean ± std cells (percent), columns, rows and :class:`Table`, with the
number formatting every output format shares (one decimal, ``–`` where undefined, never 0).

HTML, LaTeX, Markdown and CSV are all rendered from the same :class:`Table` objects, so they
print identical numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

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
