"""Open the rendered report in a real headless browser (Debian's ``chromium``).

Checks that the page's script ran, every image decoded, the leaderboards, the
accuracy-vs-FPS plot and the gallery are in the rendered DOM, and that sorting a table,
switching the per-category metric and hiding the extra metrics work. The page takes its
state from the URL fragment (``#sort=…&cat=…&main=1``), so ``--dump-dom`` alone can drive
it. Skipped, with the reason, where no chromium binary is installed
(``apt-get install -y chromium``; ``.ci/run`` does this).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.report import render
from tests.report_data import make_store

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def chromium_binary() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env and shutil.which(env):
        return shutil.which(env)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = chromium_binary()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary on PATH (install Debian's: apt-get install -y chromium, "
           "or set CHROMIUM=/path/to/chrome)")


def _run(args: list[str], profile: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
           "--virtual-time-budget=15000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = make_store(tmp_path_factory.mktemp("run"))
    return render(run, tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chromium-profile")


def dom(index: Path, profile: Path, fragment: str = "") -> str:
    url = index.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    res = _run(["--dump-dom", url], profile)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "<html" in res.stdout, res.stderr[-2000:]
    return res.stdout


def _table(html: str, table_id: str) -> str:
    m = re.search(rf'<table[^>]*id="{re.escape(table_id)}".*?</table>', html, re.S)
    assert m, f"table {table_id} not in the rendered DOM"
    return m.group(0)


def _row_methods(table_html: str) -> list[str]:
    return re.findall(r'<tr data-method="([^"]+)"', table_html)


def test_page_renders_tables_plot_gallery(site: Path, profile_dir: Path) -> None:
    html = dom(site, profile_dir)
    root = re.search(r"<html[^>]*>", html).group(0)
    assert 'data-js-ready="1"' in root, root
    n_images = int(re.search(r'data-images="(\d+)"', root).group(1))
    assert n_images > 10
    assert 'data-broken-images="0"' in root, root
    for tid in ("tbl-overall-all", "tbl-domain-industrial", "tbl-dataset-mvtec", "tbl-cost",
                "tbl-reported-vs-reproduced"):
        assert _row_methods(_table(html, tid)) or "<td" in _table(html, tid)
    assert re.search(r'<figure class="plot" id="acc-fps-plot">\s*<svg', html)
    assert 'id="gallery-mvtec"' in html and "anomaly map TokenCLIP" in html


def test_sorting_by_a_column(site: Path, profile_dir: Path) -> None:
    default = _row_methods(_table(dom(site, profile_dir), "tbl-dataset-mvtec"))
    assert default == ["clip", "anomalyclip", "tokenclip"]
    desc = dom(site, profile_dir, "sort=tbl-dataset-mvtec:1:desc")
    t = _table(desc, "tbl-dataset-mvtec")
    assert _row_methods(t) == ["tokenclip", "anomalyclip", "clip"]
    assert 'data-sorted="desc"' in t
    asc = dom(site, profile_dir, "sort=tbl-dataset-mvtec:1:asc")
    assert _row_methods(_table(asc, "tbl-dataset-mvtec")) == ["clip", "anomalyclip", "tokenclip"]
    # an undefined cell ("–") sorts last either way
    visa = dom(site, profile_dir, "sort=tbl-dataset-visa:5:asc")
    assert _row_methods(_table(visa, "tbl-dataset-visa"))[-1] == "tokenclip"


def test_switching_per_category_metric_and_main_metrics(site: Path, profile_dir: Path) -> None:
    html = dom(site, profile_dir, "cat=cats-dataset-mvtec:cat-mvtec-pixel_aupro&main=1")
    det = re.search(r'<details class="cats" id="cats-dataset-mvtec"[^>]*>', html).group(0)
    assert "open" in det and 'data-shown="cat-mvtec-pixel_aupro"' in det
    shown = re.findall(r'<div class="cat-table" data-table="(cat-mvtec-[^"]+)"( hidden(="")?)?>',
                       html)
    visible = [slug for slug, hidden, _ in shown if not hidden]
    assert visible == ["cat-mvtec-pixel_aupro"], shown
    body = re.search(r"<body[^>]*>", html).group(0)
    assert "main-only" in body


def test_screenshot_is_not_blank(site: Path, profile_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "shot.png"
    res = _run([f"--screenshot={shot}", "--window-size=1280,2000", site.resolve().as_uri()],
               profile_dir)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50
