"""Runner: records, resume after kill -9, seeding, plugins from outside the repo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from bench import protocol as protocol_mod
from bench import results
from bench.registry import ADAPTERS, METHODS, load_plugin
from bench.runner import Job, Runner, expand, prepare_protocol
from tests.conftest import EXAMPLE_PLUGIN, PY, REPO, cli_env, write_protocol

KEY = ["method", "aux", "seed", "shots", "dataset", "category", "level", "metric"]


def _records(run_dir: Path) -> list[dict]:
    df = results.load(run_dir)
    return df.sort_values(KEY)[KEY + ["value"]].to_dict("records")


def _same(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if any(x[k] != y[k] for k in KEY):
            return False
        vx, vy = x["value"], y["value"]
        if not (vx == vy or (np.isnan(vx) and np.isnan(vy))):
            return False
    return True


def _run_cli(tmp: Path, proto: Path, data: Path, out: Path, *extra: str, **kw) -> subprocess.Popen:
    cmd = [PY, "-m", "bench", "--plugin", str(EXAMPLE_PLUGIN), "run", "--protocol", str(proto),
           "--data-root", str(data), "--results", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), cwd=tmp, **kw)


@pytest.fixture()
def data_copy(demo_data_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(demo_data_root, dst)
    return dst


def test_expand_seeds_and_dependency_order(tmp_path: Path):
    load_plugin(EXAMPLE_PLUGIN)
    proto = protocol_mod.load(write_protocol(tmp_path / "p.toml", seeds="[0, 1, 2]",
                                             methods='["patch_probe", "clip"]'))
    jobs = expand(proto)
    assert [j.id for j in jobs if j.method == "clip"] == ["clip__demo_aux__s0"]  # deterministic: once
    assert [j.seed for j in jobs if j.method == "patch_probe"] == [0, 1, 2]
    assert expand(proto, [2])[0].seed == 2


def test_run_records_follow_the_contract(tmp_path: Path, data_copy: Path):
    load_plugin(EXAMPLE_PLUGIN)
    proto = prepare_protocol(str(write_protocol(tmp_path / "p.toml", methods='["clip", "patch_probe"]')))
    runner = Runner(proto, tmp_path / "R", data_copy, progress=False)
    summary = runner.run(expand(proto))
    assert summary["ran"] == 3 and summary["skipped"] == 0
    lines = [json.loads(x) for x in (tmp_path / "R" / "records.jsonl").read_text().splitlines()]
    cats = set(ADAPTERS.get("demo_target").categories)
    assert {r["category"] for r in lines} == cats
    for r in lines:
        assert {"method", "aux", "seed", "dataset", "category", "level", "metric", "value"} <= set(r)
        assert r["level"] in ("image", "pixel") and r["metric"] in ("auroc", "ap", "f1_max", "aupro")
        assert r["value"] is None or 0.0 <= r["value"] <= 1.0
        assert r["dataset"] == "demo_target" and r["aux"] == "demo_aux"
    # 7 metrics x categories x (clip once + probe twice)
    assert len(lines) == 7 * len(cats) * 3
    prov = json.loads((tmp_path / "R" / "provenance.json").read_text())
    assert prov["protocol_hash"] == proto.digest()
    assert set(prov["checkpoints"]) == {"patch_probe__demo_aux__s0", "patch_probe__demo_aux__s1"}
    # a second run skips everything and writes nothing
    again = Runner(proto, tmp_path / "R", data_copy, progress=False).run(expand(proto))
    assert again == {"jobs": 3, "skipped": 3, "ran": 0, "records": 0}
    assert len((tmp_path / "R" / "records.jsonl").read_text().splitlines()) == len(lines)


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path: Path, data_copy: Path):
    load_plugin(EXAMPLE_PLUGIN)
    proto = prepare_protocol(str(write_protocol(tmp_path / "p.toml", methods='["patch_probe"]')))
    for name in ("A", "B"):
        Runner(proto, tmp_path / name, data_copy, progress=False).run(expand(proto))
    a, b = _records(tmp_path / "A"), _records(tmp_path / "B")
    assert _same(a, b)
    s0 = [r["value"] for r in a if r["seed"] == 0]
    s1 = [r["value"] for r in a if r["seed"] == 1]
    assert s0 != s1
    prov_a = json.loads((tmp_path / "A" / "provenance.json").read_text())["checkpoints"]
    prov_b = json.loads((tmp_path / "B" / "provenance.json").read_text())["checkpoints"]
    assert {k: v["sha256"] for k, v in prov_a.items()} == {k: v["sha256"] for k, v in prov_b.items()}


def test_kill_minus_9_then_resume_equals_uninterrupted_run(tmp_path: Path, data_copy: Path):
    proto = write_protocol(tmp_path / "p.toml", methods='["clip", "patch_probe"]', seeds="[0, 1, 2]")
    full = _run_cli(tmp_path, proto, data_copy, tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stderr.read()

    part = _run_cli(tmp_path, proto, data_copy, tmp_path / "killed", start_new_session=True)
    units = tmp_path / "killed" / "units.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and part.poll() is None:
        if units.is_file() and len(units.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert part.poll() is None, "the run finished before it could be killed"
    os.killpg(part.pid, signal.SIGKILL)
    part.wait()
    n_done = len(units.read_text().splitlines())
    assert 2 <= n_done < 4
    # simulate a torn write of a unit that never committed
    with open(tmp_path / "killed" / "records.jsonl", "a") as fh:
        fh.write('{"method": "patch_probe", "unit": "patch_probe__demo_aux__s2__demo_target", "val')

    resumed = _run_cli(tmp_path, proto, data_copy, tmp_path / "killed")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"{4 - n_done} job(s) run, {n_done} already complete" in out
    assert _same(_records(tmp_path / "killed"), _records(tmp_path / "full"))
    raw = [json.loads(x) for x in (tmp_path / "killed" / "records.jsonl").read_text().splitlines()]
    keys = [tuple(r[k] for k in KEY) for r in raw]
    assert len(keys) == len(set(keys))  # none twice


def test_plugin_outside_repo_appears_in_records(tmp_path: Path, data_copy: Path):
    outside = tmp_path / "elsewhere" / "my_method.py"
    outside.parent.mkdir()
    outside.write_text(EXAMPLE_PLUGIN.read_text().replace('"patch_probe"', '"outside_probe"'))
    proto = write_protocol(tmp_path / "p.toml", seeds="[0]")
    r = subprocess.run([PY, "-m", "bench", "--plugin", str(outside), "run", "--protocol", str(proto),
                        "--data-root", str(data_copy), "--results", str(tmp_path / "R"),
                        "--no-progress", "--methods", "clip,outside_probe"],
                       capture_output=True, text=True, env=cli_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert {"clip", "outside_probe"} == set(results.load(tmp_path / "R")["method"])


def test_results_dir_of_another_protocol_version_is_refused(tmp_path: Path, data_copy: Path):
    a = prepare_protocol(str(write_protocol(tmp_path / "a.toml", methods='["clip"]')))
    Runner(a, tmp_path / "R", data_copy, progress=False).run(expand(a))
    b = prepare_protocol(str(write_protocol(tmp_path / "b.toml", methods='["clip"]',
                                            extra="[hparams.clip]\nclass_aware = false\n")))
    from bench.runner import RunError

    with pytest.raises(RunError, match="another protocol version"):
        Runner(b, tmp_path / "R", data_copy, progress=False)


def test_missing_dataset_is_listed_before_any_work(tmp_path: Path):
    proto = write_protocol(tmp_path / "p.toml", targets='["mvtec"]') if "mvtec" in ADAPTERS else None
    if proto is None:
        pytest.skip("mvtec adapter not registered")
    r = subprocess.run([PY, "-m", "bench", "run", "--protocol", str(proto), "--data-root",
                        str(tmp_path / "nodata"), "--results", str(tmp_path / "R"), "--no-progress"],
                       capture_output=True, text=True, env=cli_env(), cwd=REPO)
    assert r.returncode == 2
    assert "missing: dataset mvtec" in r.stderr and "nothing was run" in r.stderr
    assert not (tmp_path / "R" / "records.jsonl").exists()


def test_job_ids_are_stable():
    j = Job("m", "a", 3, ("t",))
    assert j.id == "m__a__s3" and j.unit("t") == "m__a__s3__t"
    assert Job("m", "a", 3, ("t",), shots=2).id == "m__a__s3__k2"
    assert "clip" in METHODS
