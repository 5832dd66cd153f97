"""Many writers on one result store (issue 16): nothing doubled, nothing lost, no unit run twice.

Three ``zsad-bench run`` processes start at once on one results directory; one is killed
with ``kill -9`` while it holds a job, and a new one is started in its place. The records
must equal those of one uninterrupted run (same keys, same values, none twice), and the
workers' audit logs must show every unit committed exactly once and no job started twice
except the killed worker's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from bench import results
from bench.results import ResultStore
from tests.conftest import EXAMPLE_PLUGIN, PY, cli_env, write_protocol

KEY = ["method", "aux", "seed", "shots", "dataset", "category", "level", "metric"]


def _start(tmp: Path, proto: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [PY, "-m", "bench", "run", "--protocol", str(proto), "--plugin", str(EXAMPLE_PLUGIN),
           "--data-root", str(data), "--results", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), cwd=tmp, start_new_session=True)


def _values(run: Path) -> dict[tuple, float | None]:
    df = results.load(run)
    keys = [tuple(r) for r in df[KEY].itertuples(index=False)]
    assert len(keys) == len(set(keys)), "a record is doubled"
    return {k: (None if v != v else round(float(v), 12)) for k, v in zip(keys, df["value"])}


def _log_events(run: Path) -> list[dict]:
    out = []
    for f in (run / "log").glob("*.jsonl"):
        out.extend(results.read_jsonl(f))
    return out


@pytest.fixture()
def data(demo_data_root: Path) -> Path:
    return demo_data_root


def test_three_processes_one_killed_equal_one_uninterrupted_run(tmp_path: Path, data: Path):
    proto = write_protocol(tmp_path / "p.toml", methods='["clip", "patch_probe"]',
                           seeds="[0, 1, 2, 3]")
    ref = _start(tmp_path, proto, data, tmp_path / "ref")
    assert ref.wait(timeout=900) == 0, ref.stderr.read()

    shared = tmp_path / "shared"
    procs = [_start(tmp_path, proto, data, shared) for _ in range(3)]
    victim = procs[1]
    claims = shared / "claims"
    deadline = time.time() + 600
    held = None
    while time.time() < deadline and victim.poll() is None:
        for f in claims.glob("*.json") if claims.is_dir() else []:
            try:
                info = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if info.get("pid") == victim.pid:
                held = info["job"]
        if held:
            break
        time.sleep(0.02)
    assert victim.poll() is None and held, "the victim finished before it held a job"
    time.sleep(0.3)  # mid-way through its job
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    procs[1] = _start(tmp_path, proto, data, shared)  # restarted
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err

    assert _values(shared) == _values(tmp_path / "ref")
    merged = [json.loads(x) for x in (shared / "records.jsonl").read_text().splitlines()]
    assert len(merged) == len(_values(shared))          # the merged view is complete, no doubles
    events = _log_events(shared)
    done = Counter(e["unit"] for e in events if e["event"] == "done")
    assert set(done) == set(ResultStore(shared).done_units()) and set(done.values()) == {1}
    victim_worker = next(e["worker"] for e in events if e.get("job") == held
                         and e["event"] == "claim" and e["worker"].endswith(f".{victim.pid}"))
    starts = Counter(e["job"] for e in events if e["event"] == "start")
    twice = {j for j, n in starts.items() if n > 1}
    assert twice <= {held}, f"jobs started twice: {twice}"
    assert all(n <= 2 for n in starts.values())
    assert any(e["event"] == "takeover" and e["job"] == held for e in events) or held not in twice
    assert victim_worker  # the killed worker's claim was found in the log


def test_store_claims_are_exclusive_and_stale_claims_are_taken_over(tmp_path: Path):
    store = ResultStore(tmp_path / "R")
    first = store.claim("job_a", stale_after=60)
    assert first is not None
    assert store.claim("job_a", stale_after=60) is None            # held by a live pid (us)
    assert "job_a" in store.live_claims(60)
    first.release()
    assert store.claim("job_a", stale_after=60) is not None        # free again
    # a claim left by a dead process on this host is stale at once
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    path = tmp_path / "R" / "claims" / "job_b.json"
    path.write_text(json.dumps({"job": "job_b", "host": os.uname().nodename, "pid": dead.pid,
                                "time": time.time()}))
    assert "job_b" not in store.live_claims(60)
    taken = store.claim("job_b", stale_after=60)
    assert taken is not None and json.loads(path.read_text())["pid"] == os.getpid()
    taken.release()
    # a claim of another host is live until its heartbeat is older than stale_after
    path.write_text(json.dumps({"job": "job_c", "host": "elsewhere", "pid": 1, "time": 0}))
    other = tmp_path / "R" / "claims" / "job_c.json"
    path.rename(other)
    assert store.claim("job_c", stale_after=60) is None
    os.utime(other, (time.time() - 120, time.time() - 120))
    assert store.claim("job_c", stale_after=60) is not None


def test_units_are_idempotent_and_the_merged_view_has_each_once(tmp_path: Path):
    store = ResultStore(tmp_path / "R")
    rec = {"method": "m", "aux": "a", "seed": 0, "shots": 0, "dataset": "d", "category": "c",
           "level": "image", "metric": "auroc", "value": 0.5}
    store.append_unit("u1", [rec])
    store.append_unit("u1", [rec])                     # a unit computed twice: same file
    store.append_unit("u2", [{**rec, "category": "c2"}])
    (tmp_path / "R" / "shards" / "u3.jsonl").write_text(json.dumps({**rec, "unit": "u3"}) + "\n")
    assert sorted(r["unit"] for r in results.read_records(tmp_path / "R")) == ["u1", "u2"]
    assert store.merge() == 2
    assert len(results.load(tmp_path / "R")) == 2


def test_old_single_file_store_is_converted(tmp_path: Path):
    run = tmp_path / "R"
    run.mkdir()
    rec = {"method": "m", "aux": "a", "seed": 0, "shots": 0, "dataset": "d", "category": "c",
           "level": "image", "metric": "auroc", "value": 0.5}
    (run / "units.jsonl").write_text(json.dumps({"unit": "u1", "n_records": 1}) + "\n")
    (run / "records.jsonl").write_text(json.dumps({**rec, "unit": "u1"}) + "\n"
                                       + json.dumps({**rec, "unit": "u2"}) + "\n")  # u2 unfinished
    assert len(results.load(run)) == 1                 # readable before conversion
    store = ResultStore(run)
    assert set(store.done_units()) == {"u1"} and not (run / "units.jsonl").exists()
    assert [r["unit"] for r in results.read_records(run)] == ["u1"]


def test_workers_option_equals_one_process(tmp_path: Path, data: Path):
    proto = write_protocol(tmp_path / "p.toml", methods='["clip", "patch_probe"]', seeds="[0, 1]")
    one = _start(tmp_path, proto, data, tmp_path / "one")
    out1, err1 = one.communicate(timeout=900)
    assert one.returncode == 0, err1
    two = _start(tmp_path, proto, data, tmp_path / "two", "--workers", "2")
    out2, err2 = two.communicate(timeout=900)
    assert two.returncode == 0, err2
    assert _values(tmp_path / "two") == _values(tmp_path / "one")
    workers = {e["worker"] for e in _log_events(tmp_path / "two") if e["event"] == "done"}
    assert len(workers) == 2                       # both workers did some of the work
    assert "3 job(s) run, 0 already complete" in out2
