"""Command-line behaviour: manifest import/export, check, help texts, exit codes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd

from bench import manifest as mf
from tests.conftest import PY, REPO, cli_env, write_protocol
from tests.fixtures_raw import make_mvtec


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "bench", *args], capture_output=True, text=True,
                          env=cli_env(), cwd=cwd)


def test_manifest_export_then_import_round_trips(tmp_path: Path):
    make_mvtec(tmp_path)
    r = _cli("prepare", "mvtec", "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    before = mf.read(mf.manifest_path(tmp_path, "mvtec"))
    r = _cli("manifest", "export", "mvtec", "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    n_meta = sum(len(v) for split in meta.values() for v in split.values())
    assert n_meta == len(before)
    mf.manifest_path(tmp_path, "mvtec").unlink()
    r = _cli("manifest", "import", "mvtec", "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    after = mf.read(mf.manifest_path(tmp_path, "mvtec"))
    cols = ["category", "split", "image", "mask", "label"]
    key = ["image"]
    pd.testing.assert_frame_equal(before[cols].sort_values(key).reset_index(drop=True),
                                  after[cols].sort_values(key).reset_index(drop=True))


def test_manifest_import_of_missing_meta_exits_2(tmp_path: Path):
    r = _cli("manifest", "import", "mvtec", "--root", str(tmp_path))
    assert r.returncode == 2 and "meta.json" in r.stderr


def test_check_lists_missing_data_and_weights(tmp_path: Path):
    proto = write_protocol(tmp_path / "p.toml", targets='["mvtec"]',
                           extra='[backbones.clip]\narch = "zsad-tiny"\npretrained = "/nowhere/tiny.pt"\n')
    r = _cli("check", "--protocol", str(proto), "--data-root", str(tmp_path / "data"))
    assert r.returncode == 2
    assert "missing: dataset mvtec: nothing usable at" in r.stdout
    assert "missing: checkpoint /nowhere/tiny.pt" in r.stdout
    assert "nothing was run" in r.stdout


def test_help_texts_teach():
    r = _cli("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "resumes" in r.stdout
    r = _cli("prepare", "--help")
    assert r.returncode == 0
    assert "mvtec" in r.stdout and "kvasir" in r.stdout and "download" in r.stdout.lower()


def test_unknown_dataset_and_protocol_exit_2(tmp_path: Path):
    r = _cli("prepare", "nope", "--root", str(tmp_path))
    assert r.returncode == 2 and "unknown dataset 'nope'" in r.stderr
    r = _cli("run", "--protocol", "nope", "--results", str(tmp_path / "R"))
    assert r.returncode == 2 and "unknown protocol 'nope'" in r.stderr
