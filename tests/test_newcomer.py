"""What a new user meets first (issue 18): --plugin positions, a clean tree, a report that
renders anywhere, tables without local paths, the dirty flag."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import report
from bench.results import git_state
from tests.conftest import EXAMPLE_PLUGIN, PY, REPO, cli_env, write_protocol


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "bench", *args], capture_output=True, text=True,
                          env=cli_env(), cwd=cwd, timeout=600)


@pytest.mark.parametrize("before", [True, False])
def test_plugin_before_and_after_the_subcommand(before: bool):
    plugin = ["--plugin", str(EXAMPLE_PLUGIN)]
    args = [*plugin, "list", "methods"] if before else ["list", "methods", *plugin]
    out = _cli(*args)
    assert out.returncode == 0, out.stderr
    assert "patch_probe" in out.stdout


def test_plugin_after_run_subcommand_reaches_the_protocol(tmp_path: Path):
    """`zsad-bench run --protocol P --plugin x.py` (DESIGN.md §5) is accepted and loads x.py."""
    proto = write_protocol(tmp_path / "p.toml", methods='["patch_probe"]', seeds="[0]")
    out = _cli("check", "--protocol", str(proto), "--data-root", str(tmp_path / "data"),
               "--plugin", str(EXAMPLE_PLUGIN))
    assert "unrecognized arguments" not in out.stderr
    assert "unknown methods" not in out.stderr + out.stdout
    out = _cli("run", "--protocol", str(proto), "--plugin", str(EXAMPLE_PLUGIN), "--help")
    assert out.returncode == 0 and "--plugin" in out.stdout


@pytest.fixture(scope="module")
def run_dir(demo_data_root: Path, tmp_path_factory) -> Path:
    """A tiny run started in its own working directory with a *relative* data root."""
    work = tmp_path_factory.mktemp("work")
    shutil.copytree(demo_data_root, work / "data")
    proto = write_protocol(work / "p.toml", methods='["clip"]', seeds="[0]")
    out = _cli("run", "--protocol", str(proto), "--data-root", "data", "--results", "R",
               "--no-progress", cwd=work)
    assert out.returncode == 0, out.stderr
    return work / "R"


def test_report_renders_from_another_directory_without_the_data(run_dir: Path, tmp_path: Path):
    # the data the run read is gone (another machine, another checkout): the gallery still shows
    shutil.rmtree(run_dir.parent / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _cli("report", str(run_dir), "--out", "site", cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    html = (elsewhere / "site" / "index.html").read_text()
    data = report.build(run_dir)
    assert data["gallery"] and all(r["thumb"] and r["thumb"].startswith("data:image/png")
                                   for g in data["gallery"] for r in g["rows"])
    assert "image not found" not in html.lower()


def test_tables_name_no_local_path(run_dir: Path, tmp_path: Path):
    report.render(run_dir, tmp_path / "site")
    tables = list((tmp_path / "site" / "tables").iterdir())
    assert tables
    local = [str(REPO), str(run_dir.parent), str(Path.home()), "/tmp/", "/work/"]
    for f in tables:
        text = f.read_text(errors="replace")
        hits = [p for p in local if p in text]
        assert not hits, f"{f.name} names local paths {hits}"


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})


def test_dirty_flag_ignores_generated_outputs_not_edits(tmp_path: Path):
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "bench" / "x.py").write_text("a = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "init")
    commit, dirty = git_state(repo)
    assert commit and dirty is False
    for generated in ("data/demo_aux/a.png", "results/demo/records.jsonl", "reports/site/index.html"):
        (repo / generated).parent.mkdir(parents=True, exist_ok=True)
        (repo / generated).write_text("x")
    assert git_state(repo) == (commit, False)
    (repo / "methods").mkdir()
    (repo / "methods" / "new_method.py").write_text("b = 2\n")   # a new, untracked plugin
    assert git_state(repo)[1] is True
    (repo / "methods" / "new_method.py").unlink()
    (repo / "bench" / "x.py").write_text("a = 2\n")              # an edit of a tracked file
    assert git_state(repo)[1] is True
    outside = tmp_path / "not_a_repo"
    outside.mkdir()
    assert git_state(outside) == (None, None)


def test_demo_data_is_ignored_by_git():
    out = subprocess.run(["git", "check-ignore", "data/demo_aux/x.png"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, ".gitignore must list the demo's generated ./data"
