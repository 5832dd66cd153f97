"""End to end: every registered method through `zsad-bench run` and `zsad-bench report`.

The protocol is the demo's (generated data, tiny backbone, 2 seeds) with random weights
and epochs scaled down, so the test checks the plumbing of every plugin, not accuracy.
`nox -s demo` (run in CI) does the same with the toy pretrained backbone and 5 seeds.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

from bench import results
from bench.registry import METHODS
from tests.conftest import PY, cli_env, write_protocol


def test_every_method_runs_and_appears_in_the_report_with_mean_and_std(tmp_path: Path,
                                                                         demo_data_root: Path):
    data = tmp_path / "data"
    shutil.copytree(demo_data_root, data)
    builtin = [n for n, c in METHODS.items() if c.__module__.startswith("methods.")]
    proto = write_protocol(tmp_path / "p.toml", extra="", seeds="[0, 1]")
    text = proto.read_text().replace("train_batch_size = 8", "train_batch_size = 8\nepochs_scale = 0.1")
    proto.write_text(text)
    r = subprocess.run([PY, "-m", "bench", "run", "--protocol", str(proto), "--data-root", str(data),
                        "--results", str(tmp_path / "R"), "--no-progress"],
                       capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    df = results.load(tmp_path / "R")
    assert set(df["method"]) == set(builtin)
    for name in builtin:
        seeds = set(df[df["method"] == name]["seed"])
        assert seeds == ({0, 1} if METHODS.get(name).is_seeded() else {0}), name
    r = subprocess.run([PY, "-m", "bench", "report", str(tmp_path / "R"), "--out", str(tmp_path / "S")],
                       capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    page = html.unescape((tmp_path / "S" / "index.html").read_text())
    for name in builtin:
        assert re.search(rf">\s*{re.escape(name)}\b", page), f"{name} missing from index.html"
    seeded = [n for n in builtin if METHODS.get(n).is_seeded()]
    assert seeded and re.search(r"\d+\.\d ± \d+\.\d", page)
    for ext in ("md", "tex", "csv"):
        assert list((tmp_path / "S" / "tables").glob(f"*.{ext}")), ext
