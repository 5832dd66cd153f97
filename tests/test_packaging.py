"""The installed package carries everything a non-editable install needs at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    # build from a copy of the tracked files: setuptools writes build/ next to the sources
    # and would reuse it, so the checkout is left as it was and nothing stale gets in
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    src = tmp_path_factory.mktemp("src")
    for rel in files:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{proc.stderr[-2000:]}")
    (whl,) = out.glob("zsad_bench-*.whl")
    with zipfile.ZipFile(whl) as z:
        return z.namelist()


def test_wheel_holds_the_report_templates(wheel_names):
    # reports/templates/ (DESIGN.md's place for them) is installed as bench/templates/,
    # the second of bench.report.TEMPLATE_DIRS
    from bench.report import TEMPLATE_DIRS

    assert TEMPLATE_DIRS[-1].relative_to(ROOT) == Path("bench/templates")
    shipped = {Path(n).name for n in wheel_names if n.startswith("bench/templates/")}
    assert shipped == {p.name for p in (ROOT / "reports" / "templates").iterdir() if p.is_file()}


def test_wheel_holds_protocols_configs_and_toy_checkpoint(wheel_names):
    from bench.demo.toyclip import CHECKPOINT_NAME

    for rel in ("bench/protocols/demo.toml", "bench/protocols/full.toml",
                "bench/demo/model_configs/zsad-tiny.json", f"bench/demo/{CHECKPOINT_NAME}",
                "methods/base.py", "dataset_adapters/demo.py"):
        assert rel in wheel_names, rel


def test_wheel_holds_every_tracked_module(wheel_names):
    # pyproject lists the packages by hand (to map reports/templates): a new subpackage must
    # be added there, or this fails
    tracked = subprocess.run(["git", "ls-files", "bench", "methods", "dataset_adapters"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    missing = [p for p in tracked if p.endswith(".py") and p not in wheel_names]
    assert not missing, f"not in the wheel (add the package to pyproject.toml): {missing}"
