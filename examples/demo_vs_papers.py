"""The demo's ordering of methods next to the papers': a table and a Spearman correlation.

For every method in a demo result store: pixel (and image) AUROC on the demo target, mean
over categories per seed, then mean ± std over seeds; beside it the figure the papers
report for the same method on the field's main zero-shot transfer, MVTec AD -> VisA
(``bench/data/reported_results.csv``; the method's own paper where it reports one, else the
median over the papers that copy it), and the Spearman rank correlation between the two
columns over the methods that have both. The demo is a toy (docs/toy_clip.md): the
correlation says whether it shows the field's main effect, not whether it predicts a paper.

    python examples/demo_vs_papers.py results/demo
    python examples/demo_vs_papers.py results/demo --level image --paper-dataset "MVTec AD"
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from bench import reported
from bench.results import read_records


def demo_figures(records: list[dict], dataset: str, level: str,
                 metric: str = "auroc") -> dict[str, tuple[float, float, int]]:
    """method -> (mean over seeds, std over seeds, number of seeds), in percent.

    Each seed's figure is the mean over the dataset's categories (NaN categories skipped);
    the std is the population std (0 for one seed). Few-shot records form their own rows,
    ``"afclip_plus (k=1)"`` (the papers' zero-shot figures are not compared with them).
    """
    per = defaultdict(lambda: defaultdict(list))
    for r in records:
        if (r["dataset"], r["level"], r["metric"]) != (dataset, level, metric):
            continue
        v = r["value"]
        if v is not None and not np.isnan(v):
            key = f"{r['method']} (k={r['shots']})" if r.get("shots") else r["method"]
            per[key][r["seed"]].append(float(v))
    out = {}
    for method, seeds in per.items():
        means = np.array([np.mean(v) for v in seeds.values()]) * 100
        out[method] = (float(means.mean()), float(means.std()), len(means))
    return out


def paper_figures(dataset: str = "VisA", level: str = "pixel",
                  metric: str = "auroc") -> dict[str, tuple[float, str]]:
    """method id -> (reported zero-shot figure in percent, where it comes from)."""
    df = reported.results()
    df = df[(df.dataset == dataset) & (df.level == level) & (df.metric == metric)
            & (df.shots == 0) & df.method_id.notna()]
    out = {}
    for mid, rows in df.groupby("method_id"):
        own = rows[[_is_own_paper(r.method, r.source) for r in rows.itertuples()]]
        if len(own):
            out[mid] = (float(own.value.iloc[0]), f"{own.source.iloc[0]}")
        elif rows.source.nunique() == 1:
            out[mid] = (float(rows.value.iloc[0]), f"{rows.source.iloc[0]}")
        else:
            out[mid] = (float(rows.value.median()),
                        "median of " + ", ".join(sorted(rows.source.unique())))
    return out


def _is_own_paper(method: str, source: str) -> bool:
    """Whether ``source`` ("MPA/MPAMA (ICLR 2026 submission)") is ``method``'s own paper."""
    names = source.split(" (")[0].split("/")
    return method.rstrip("+") in names


def compare(records: list[dict], *, dataset: str = "demo_target", level: str = "pixel",
            paper_dataset: str = "VisA") -> tuple[list[dict], float, int]:
    """Rows (method, demo mean/std/seeds, paper figure/source) sorted by the demo figure,
    the Spearman rho over the methods with both figures, and how many there are."""
    demo = demo_figures(records, dataset, level)
    papers = paper_figures(paper_dataset, level)
    rows = [{"method": m, "demo": d[0], "std": d[1], "seeds": d[2],
             "paper": papers.get(m, (float("nan"), ""))[0],
             "source": papers.get(m, (float("nan"), ""))[1]} for m, d in demo.items()]
    rows.sort(key=lambda r: -r["demo"])
    both = [r for r in rows if not np.isnan(r["paper"])]
    rho = float(spearmanr([r["demo"] for r in both], [r["paper"] for r in both]).statistic) \
        if len(both) >= 3 else float("nan")
    return rows, rho, len(both)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="a demo result store (zsad-bench run --results)")
    p.add_argument("--dataset", default="demo_target")
    p.add_argument("--level", default="pixel", choices=["pixel", "image"])
    p.add_argument("--paper-dataset", default="VisA",
                   help="the papers' target of the MVTec AD transfer to compare with")
    args = p.parse_args(argv)
    records = read_records(args.results)
    if not records:
        p.error(f"{args.results}: no records (run `zsad-bench run --protocol demo "
                f"--results {args.results}` first)")
    rows, rho, n = compare(records, dataset=args.dataset, level=args.level,
                           paper_dataset=args.paper_dataset)
    clip = next((r["demo"] for r in rows if r["method"] == "clip"), float("nan"))
    print(f"| method | demo {args.level} AUROC ({args.dataset}) | vs clip | "
          f"paper, MVTec AD → {args.paper_dataset} | paper source |")
    print("|---|---|---|---|---|")
    for r in rows:
        demo = f"{r['demo']:.1f}" + (f" ± {r['std']:.1f}" if r["seeds"] > 1 else "")
        paper = "—" if np.isnan(r["paper"]) else f"{r['paper']:.1f}"
        print(f"| {r['method']} | {demo} | {r['demo'] - clip:+.1f} | {paper} | {r['source']} |")
    print(f"\nSpearman rank correlation, demo vs papers, over {n} methods: rho = {rho:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
