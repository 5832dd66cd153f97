"""The report: leaderboards, formats that agree, reported-vs-reproduced, cost, gallery, citations."""

from __future__ import annotations

import html as html_mod
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from bench import report
from bench.metrics import aggregate
from bench.results import load
from tests.report_data import DATASETS, make_store

NUM = re.compile(r"[+-]?\d[\d,]*\.\d+|[+-]?\d[\d,]*")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    run = make_store(tmp_path_factory.mktemp("run"))
    out = tmp_path_factory.mktemp("site")
    index = report.render(run, out)
    return run, index


class _Tables(HTMLParser):
    """Collect every <table id=...>: rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._stack: list[str] = []
        self._cur: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_head = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._cur = a.get("id") or f"anon{len(self.tables)}"
            self.tables[self._cur] = []
        elif tag == "thead":
            self._in_head = True
        elif tag == "tbody":
            self._in_head = False
        elif tag == "tr" and self._cur and not self._in_head:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._cur:
            self.tables[self._cur].append(self._row)
            self._row = None
        elif tag == "table":
            self._cur = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def html_tables(index: Path) -> dict[str, list[list[str]]]:
    p = _Tables()
    p.feed(index.read_text(encoding="utf-8"))
    return p.tables


def test_every_method_listed_with_mean_and_std(site: tuple[Path, Path]) -> None:
    run, index = site
    text = index.read_text(encoding="utf-8")
    tables = html_tables(index)
    for ds in DATASETS:
        rows = tables[f"tbl-dataset-{ds}"]
        labels = [r[0] for r in rows]
        assert labels == ["CLIP", "AnomalyCLIP", "TokenCLIP"], labels
        for r in rows:
            if r[0] == "CLIP":  # one seed: no std
                assert all("±" not in c for c in r[1:]), r
            else:
                assert any(re.fullmatch(r"\d+\.\d ± \d+\.\d", c) for c in r[1:]), r
    assert "±" in text


def test_numbers_are_the_aggregate(site: tuple[Path, Path]) -> None:
    run, index = site
    agg = aggregate(load(run))
    tables = html_tables(index)
    rows = {r[0]: r for r in tables["tbl-dataset-mvtec"]}
    a = agg[(agg["dataset"] == "mvtec") & (agg["method"] == "anomalyclip")
            & (agg["level"] == "image") & (agg["metric"] == "auroc")].iloc[0]
    assert rows["AnomalyCLIP"][1] == f"{a['mean'] * 100:.1f} ± {a['std'] * 100:.1f}"


def test_undefined_is_dash_never_zero(site: tuple[Path, Path]) -> None:
    run, index = site
    tables = html_tables(index)
    visa = {r[0]: r for r in tables["tbl-dataset-visa"]}
    # columns: Method, image auroc, ap, f1, pixel auroc, aupro, ...
    assert visa["TokenCLIP"][5] == report.DASH
    # datasets without a level have no such columns at all
    headct = tables["tbl-dataset-headct"]
    assert all(len(r) == 1 + 3 for r in headct)
    isic = tables["tbl-dataset-isic"]
    assert all(len(r) == 1 + 4 for r in isic)
    md = (index.parent / "tables" / "dataset-visa.md").read_text()
    assert "| –" in md and " 0.0 " not in md


def test_best_bold_second_underlined(site: tuple[Path, Path]) -> None:
    run, index = site
    text = index.read_text(encoding="utf-8")
    m = re.search(r'<table class="lb sortable" id="tbl-dataset-mvtec".*?</table>', text, re.S)
    assert m
    tbl = m.group(0)
    tok = re.search(r'<tr data-method="tokenclip".*?</tr>', tbl, re.S).group(0)
    ano = re.search(r'<tr data-method="anomalyclip".*?</tr>', tbl, re.S).group(0)
    assert tok.count("<b>") >= 1 and ano.count("<u>") >= 1
    tex = (index.parent / "tables" / "dataset-mvtec.tex").read_text()
    assert r"\textbf{" in tex and r"\underline{" in tex and r"\toprule" in tex
    md = (index.parent / "tables" / "dataset-mvtec.md").read_text()
    assert "**" in md and "<u>" in md


def _numbers(s: str) -> list[float]:
    return [float(x.replace(",", "")) for x in NUM.findall(s)]


def _tex_rows(path: Path) -> list[list[str]]:
    body = path.read_text().split(r"\midrule")[1].split(r"\bottomrule")[0]
    rows = []
    for line in body.strip().splitlines():
        cells = [c.strip() for c in line.rstrip("\\ ").split(" & ")]
        cells[0] = re.sub(r"~\\cite\{[^}]*\}", "", cells[0])
        rows.append(cells)
    return rows


def _md_rows(path: Path) -> list[list[str]]:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")][2:]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def _tex_plain(cell: str) -> str:
    cell = re.sub(r"\\(textbf|underline)\{", "", cell)
    cell = cell.replace(r"\,{\scriptsize$\pm$\,", " ± ").replace("{,}", ",")
    cell = cell.replace("}", "").replace("--", report.DASH)
    return cell.strip()


def _md_plain(cell: str) -> str:
    return cell.replace("**", "").replace("<u>", "").replace("</u>", "").strip()


@pytest.mark.parametrize("slug", ["dataset-mvtec", "dataset-visa", "dataset-headct",
                                  "dataset-isic", "domain-industrial", "domain-medical",
                                  "overall-all", "cost", "reported-vs-reproduced"])
def test_html_latex_markdown_csv_agree(site: tuple[Path, Path], slug: str) -> None:
    run, index = site
    tdir = index.parent / "tables"
    html_rows = html_tables(index)[f"tbl-{slug}"]
    tex_rows = _tex_rows(tdir / f"{slug}.tex")
    md_rows = _md_rows(tdir / f"{slug}.md")
    csv = pd.read_csv(tdir / f"{slug}.csv")
    assert len(html_rows) == len(tex_rows) == len(md_rows) == len(csv) > 0
    for h, t, m, (_, c) in zip(html_rows, tex_rows, md_rows, csv.iterrows()):
        h = [html_mod.unescape(x) for x in h]
        assert [_tex_plain(x) for x in t] == [latex_unescape(x) for x in h], (t, h)
        assert [_md_plain(x) for x in m] == h, (m, h)
        # CSV: the printed numbers (mean columns and std columns), in column order
        value_cols = [k for k in csv.columns if k not in ("label", "method", "aux", "shots")
                      and not k.endswith("_n_seeds") and k not in ("device", "backbone",
                                                                     "datasets", "dataset",
                                                                     "metric", "source")]
        csv_nums = [float(c[k]) for k in value_cols if pd.notna(c[k])]
        n_info = len(h) - len(_data_cells(slug, csv))
        html_nums = [x for cell in h[n_info:] for x in _numbers(cell)]
        assert sorted(csv_nums) == pytest.approx(sorted(html_nums)), (csv_nums, html_nums)


def latex_unescape(s: str) -> str:
    return s  # the fabricated labels hold no LaTeX specials


def _data_cells(slug: str, csv: pd.DataFrame) -> list[str]:
    return [k for k in csv.columns if k not in ("label", "method", "aux", "shots")
            and not k.endswith("_std") and not k.endswith("_n_seeds")
            and k not in ("device", "backbone", "datasets", "dataset", "metric", "source")]


def test_reported_vs_reproduced_matches_names(site: tuple[Path, Path]) -> None:
    run, index = site
    rvr = pd.read_csv(index.parent / "tables" / "reported-vs-reproduced.csv")
    assert {"CLIP", "AnomalyCLIP", "TokenCLIP"} <= set(rvr["label"])
    rep = report.reported.results()
    row = rep[(rep["method"] == "TokenCLIP") & (rep["dataset"] == "MVTec AD")
              & (rep["level"] == "image") & (rep["metric"] == "auroc")].iloc[0]
    ours = rvr[(rvr["label"] == "TokenCLIP") & (rvr["dataset"] == "MVTec AD")
               & (rvr["metric"] == "Image AUROC")].iloc[0]
    assert ours["reported"] == pytest.approx(row["value"])
    assert ours["diff"] == pytest.approx(round(ours["ours"] - ours["reported"], 1))


def test_name_mappings_cover_the_registry_names() -> None:
    from bench import reported

    for name in ["clip", "winclip", "anoclip", "anoclip_plus", "coop", "anomalyclip", "tokenclip",
                 "mpa", "mpama", "vand", "afclip", "afclip_plus"]:
        assert reported.method_display(name) in set(reported.results()["method"]), name
    rep_ds = set(reported.results()["dataset"])
    for ds in ["mvtec", "visa", "mpdd", "btad", "sdd", "dagm", "dtd_synthetic", "isic", "clinicdb",
               "colondb", "kvasir", "endo", "headct", "brainmri", "br35h"]:
        assert reported.dataset_display(ds) in rep_ds, ds


def test_self_contained(site: tuple[Path, Path]) -> None:
    run, index = site
    text = index.read_text(encoding="utf-8")
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', text)
    assert "<link" not in text and "@import" not in text
    assert "<style>" in text and "<script>" in text
    assert re.search(r'src="data:image/png;base64,', text)


def test_cost_plot_gallery_and_citation(site: tuple[Path, Path]) -> None:
    run, index = site
    text = index.read_text(encoding="utf-8")
    assert 'id="tbl-cost"' in text and "<svg" in text and 'id="acc-fps-plot"' in text
    assert "only the ratios between methods" in text
    assert 'id="gallery-mvtec"' in text
    n_maps = len(re.findall(r'alt="anomaly map ', text))
    assert n_maps == 3 * 2 * 2 + 3 * 2  # mvtec: 2 categories x 2 images; isic: 1 x 2; 3 methods
    bib = (index.parent / "tables" / "references.bib").read_text()
    assert "@software{zsad_bench" in bib and "radford2021clip" in bib
    assert "deadbeef" in text and "0123456789abcdef" in text  # provenance: commit, protocol hash
    ratios = pd.read_csv(index.parent / "tables" / "cost-ratios-vs-papers.csv")
    tok = ratios[(ratios["method"] == "TokenCLIP") & (ratios["reference"] == "AnomalyCLIP")].iloc[0]
    assert tok["reported_ratio"] == pytest.approx(0.135 / 0.124)
    assert tok["our_ratio"] == pytest.approx(13.5 / 12.4)


def test_per_category_tables_one_click_away(site: tuple[Path, Path]) -> None:
    run, index = site
    text = index.read_text(encoding="utf-8")
    assert '<details class="cats" id="cats-dataset-mvtec">' in text
    t = html_tables(index)["tbl-cat-mvtec-image_auroc"]
    assert [r[0] for r in t] == ["CLIP", "AnomalyCLIP", "TokenCLIP"]
    assert len(t[0]) == 1 + len(DATASETS["mvtec"][1])


def test_domain_and_overall_mean_over_datasets(site: tuple[Path, Path]) -> None:
    run, index = site
    df = load(run)
    d = df[(df["method"] == "tokenclip") & (df["level"] == "image") & (df["metric"] == "auroc")]
    per_seed = d.groupby(["seed", "dataset"])["value"].mean().groupby("seed").mean()
    want = f"{per_seed.mean() * 100:.1f} ± {per_seed.std(ddof=1) * 100:.1f}"
    rows = {r[0]: r for r in html_tables(index)["tbl-overall-all"]}
    assert rows["TokenCLIP"][2] == want  # [label, datasets, image auroc, ...]
    assert rows["TokenCLIP"][1] == f"{len(DATASETS)}/{len(DATASETS)}"


def test_no_cost_no_maps_still_renders(tmp_path: Path) -> None:
    run = make_store(tmp_path / "run", with_cost=False)
    for f in (run / "maps").glob("*.npz"):
        f.unlink()
    index = report.render(run, tmp_path / "site")
    text = index.read_text()
    assert "No cost records" in text and "No anomaly maps" in text
    assert not (tmp_path / "site" / "tables" / "cost.csv").exists()


def test_empty_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        report.render(tmp_path, tmp_path / "site")


def test_formatting_helpers() -> None:
    assert report.Cell(12.345, 0.04, 5).text() == "12.3 ± 0.0"
    assert report.Cell(12.345, 1.0, 1).text() == "12.3"
    assert report.Cell(math.nan).text() == report.DASH
    assert report.fmt_num(None) == report.DASH
    assert report.latex_escape("AF-CLIP+ & a_b") == r"AF-CLIP+ \& a\_b"



def test_backbone_column_when_methods_differ(tmp_path: Path) -> None:
    run = make_store(tmp_path / "run")
    for shard in (run / "shards").glob("clip__*.jsonl"):
        shard.write_text(shard.read_text().replace("zsad-tiny (random init) @ 64px",
                                                   "ViT-B-16-plus-240 @ 240px"))
    index = report.render(run, tmp_path / "site")
    rows = {r[0]: r for r in html_tables(index)["tbl-dataset-mvtec"]}
    assert rows["CLIP"][1] == "ViT-B-16-plus-240 @ 240px"
    assert rows["TokenCLIP"][1] == "zsad-tiny (random init) @ 64px"
    csv = pd.read_csv(tmp_path / "site" / "tables" / "dataset-mvtec.csv")
    assert list(csv["backbone"]) == [rows[k][1] for k in ("CLIP", "AnomalyCLIP", "TokenCLIP")]


def test_suite_citation_matches_citation_cff() -> None:
    cff = (Path(__file__).resolve().parents[1] / "CITATION.cff").read_text()
    title = re.search(r'^title: "(.*)"$', cff, re.M).group(1)
    version = re.search(r"^version: (.*)$", cff, re.M).group(1).strip()
    assert title in report.SUITE_BIBTEX and f"version = {{{version}}}" in report.SUITE_BIBTEX


def test_few_shot_rows_are_ranked_apart() -> None:
    cols = [report.Column("image_auroc", "AUROC", "Image")]
    rows = [report.Row("A", "a", cells=[report.Cell(80.0)]),
            report.Row("B", "b", cells=[report.Cell(70.0)]),
            report.Row("C (1-shot)", "c", shots=1, cells=[report.Cell(95.0)])]
    t = report.Table("x", "x", cols, rows)
    t.rank()
    assert [r.cells[0].rank for r in rows] == [1, 2, 0]


def test_every_table_names_the_protocol_and_differing_class_words(site):
    run, index = site
    data = report.build(run)
    tables = [*data["dataset_tables"], *data["domain_tables"], data["overall"],
              *(t for ts in data["category_tables"].values() for t in ts)]
    assert tables
    for t in tables:
        assert t.caption.startswith("Protocol: fabricated. "), t.slug
        assert "folder ids (metal_nut) for clip" in t.caption
        assert "readable names (metal nut) for anomalyclip, tokenclip" in t.caption
    md = (index.parent / "tables" / f"{data['dataset_tables'][0].slug}.md").read_text()
    assert "Protocol: fabricated." in md
    # one class-word rule for all: only the protocol is named
    provs = [{"protocol": "full_uniform", "inputs": {"clip": {"class_words": "readable"},
                                                     "vand": {"class_words": "readable"}}}]
    assert report.protocol_note(provs, ["clip", "vand"]) == "Protocol: full_uniform. "
    assert report.protocol_note([], ["clip"]) == ""
