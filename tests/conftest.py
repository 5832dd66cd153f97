"""Shared fixtures: a tiny random CLIP, generated demo data, a small test protocol."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = REPO / "examples" / "patch_probe.py"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (long benchmarks, cross-checks)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_backbone():
    from bench.backbone import load_clip

    return load_clip("zsad-tiny", None, image_size=64, seed=0)


@pytest.fixture(scope="session")
def demo_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated demo data (both datasets), built once per test session."""
    from bench.registry import get_adapter

    root = tmp_path_factory.mktemp("demo_data")
    for name in ("demo_aux", "demo_target"):
        (root / name).mkdir()
        get_adapter(name).generate(root / name)
    return root


def write_protocol(path: Path, *, methods: str = '"all"', seeds: str = "[0, 1]", extra: str = "",
                   targets: str = '["demo_target"]', aux: str = "demo_aux") -> Path:
    path.write_text(f"""
name = "test"
methods = {methods}
seeds = {seeds}
[backbone]
arch = "zsad-tiny"
image_size = 64
[run]
batch_size = 16
train_batch_size = 8
[[transfers]]
aux = "{aux}"
targets = {targets}
{extra}
""")
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


PY = sys.executable
