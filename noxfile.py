"""nox sessions of zsad-bench.

Every session runs in the *current* Python environment (``python=False``): torch and the
CLIP stack are installed once, not per session. A session installs the project itself
(``pip install -e .[dev]``) only if it is not importable yet. To use a dedicated
environment, create and activate a venv first, then run nox inside it.

    nox -s demo             # demo benchmark on generated data -> reports/site/index.html
    nox -s tests            # the test suite (CI runs exactly this)
    nox -s lint             # ruff
    nox -s perf             # pytest-benchmark cases (hot paths), figures for docs/performance.md
    nox -s full_benchmark -- --data-root /data   # checks data and weights first, then runs
    nox -s report -- RESULTS_DIR
    nox -s pretrain_tiny    # retrain the demo's toy CLIP (bench/demo/toyclip/)
"""

from __future__ import annotations

import os
from importlib import metadata

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "none"

DEMO_RESULTS = "results/demo"
SITE = "reports/site"


def _ensure_installed(session: nox.Session) -> None:
    try:
        metadata.version("zsad-bench")
    except metadata.PackageNotFoundError:
        session.run("python", "-m", "pip", "install", "-e", ".[dev]", external=True)


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """Run the test suite (slow tests need --runslow: nox -s tests -- --runslow)."""
    _ensure_installed(session)
    session.run("python", "-m", "pytest", "-q", *session.posargs, external=True)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    _ensure_installed(session)
    session.run("ruff", "check", ".", external=True)


@nox.session(python=False)
def demo(session: nox.Session) -> None:
    """Every registered method on the embedded demo data (5 seeds), its cost table, the report."""
    _ensure_installed(session)
    args = list(session.posargs)
    if "--workers" not in args:  # one single-threaded worker per core (2 on the CI machine)
        args += ["--workers", str(max(1, min(4, os.cpu_count() or 1)))]
    session.run("python", "-m", "bench", "run", "--protocol", "demo", "--data-root", "data",
                "--results", DEMO_RESULTS, *args, external=True)
    session.run("python", "-m", "bench", "profile", "--protocol", "demo", "--device", "cpu",
                "--results", DEMO_RESULTS, external=True)
    session.run("python", "-m", "bench", "report", DEMO_RESULTS, "--out", SITE, external=True)
    session.log(f"open {SITE}/index.html")


@nox.session(python=False)
def full_benchmark(session: nox.Session) -> None:
    """The full protocol. Checks every dataset and checkpoint first; posargs go to `run`."""
    _ensure_installed(session)
    args = list(session.posargs) or ["--data-root", "data"]
    root = args[args.index("--data-root") + 1] if "--data-root" in args else "data"
    session.run("python", "-m", "bench", "plan", "--protocol", "full", "--data-root", root,
                "--results", "results/full", external=True)
    session.run("python", "-m", "bench", "check", "--protocol", "full", "--data-root", root,
                external=True)
    session.run("python", "-m", "bench", "run", "--protocol", "full", "--results", "results/full",
                *args, external=True)
    session.run("python", "-m", "bench", "report", "results/full", "--out", SITE, external=True)


@nox.session(python=False)
def report(session: nox.Session) -> None:
    """Render a report: nox -s report -- RESULTS_DIR [--out DIR]."""
    _ensure_installed(session)
    args = list(session.posargs) or [DEMO_RESULTS]
    if "--out" not in args:
        args += ["--out", SITE]
    session.run("python", "-m", "bench", "report", *args, external=True)


@nox.session(python=False)
def perf(session: nox.Session) -> None:
    """pytest-benchmark cases of the hot paths (add -- --runslow for the large ones)."""
    _ensure_installed(session)
    session.run("python", "-m", "pytest", "-q", "--benchmark-enable", "--benchmark-only",
                *session.posargs, external=True)


@nox.session(python=False)
def pretrain_tiny(session: nox.Session) -> None:
    """Retrain the toy CLIP of the demo from its seed (bit-reproducible)."""
    _ensure_installed(session)
    session.run("python", "-m", "bench.demo.toyclip", *session.posargs, external=True)
