"""`zsad-bench plan`: the job graph and its cost without data or weights (issue 16)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from bench.registry import ADAPTERS
from bench.results import ResultStore
from tests.conftest import PY, REPO, cli_env


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "bench", "plan", *args], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO, timeout=900)


def _published(name: str) -> int:
    a = ADAPTERS.get(name)()
    return int(a.published_counts["normal"]) + int(a.published_counts["anomalous"])


def test_plan_of_the_full_protocol_without_data_or_weights(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = _plan("--protocol", "full", "--data-root", str(empty))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("protocol full (hash ")
    assert "jobs" in text.splitlines()[0] and "already done" in text.splitlines()[0]
    assert "visual forward passes:" in text and "without the cache" in text
    assert "cache on disk:" in text and "GiB" in text
    # dependency order: mpa's jobs are listed before mpama's
    lines = text.splitlines()
    first_mpama = next(i for i, ln in enumerate(lines) if ln.startswith("mpama__"))
    assert all(not ln.startswith("mpa__") for ln in lines[first_mpama:])
    assert not any(empty.iterdir())  # nothing prepared, nothing downloaded


def test_plan_json_counts_dependencies_and_cache(tmp_path: Path):
    out = _plan("--protocol", "full", "--data-root", str(tmp_path), "--json",
                "--methods", "mpama,clip,mpa", "--seeds", "0,1")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    jobs = plan["jobs"]
    # mpama requires mpa: mpa's jobs are ordered first; clip (deterministic) runs once per aux
    assert [j["method"] for j in jobs].count("mpa") == 4 and [j["method"] for j in jobs].count("clip") == 2
    assert plan["summary"] == {"jobs": 10, "done": 0, "trained_jobs": 8}
    ids = [j["id"] for j in jobs]
    for i, j in enumerate(jobs):
        if j["requires"]:
            assert j["requires"] in ids[:i], f"{j['id']} listed before {j['requires']}"
    assert {j["requires"] for j in jobs if j["method"] == "mpama"} == {
        "mpa__mvtec__s0", "mpa__mvtec__s1", "mpa__visa__s0", "mpa__visa__s1"}
    assert plan["paths"]["clip"] == [{"path": "plain", "layers": [24]}]
    # clip alone: one cached plain pass per image of every dataset; disk = images x tokens x
    # width x 2 bytes (+ the projected class token), ViT-L/14 at 518 px: 37 x 37 + 1 tokens
    out = _plan("--protocol", "full", "--json", "--methods", "clip")
    plan = json.loads(out.stdout)
    n = sum(_published(d) for d in plan["images"])
    assert all(v["source"] == "published" for v in plan["images"].values())
    assert plan["forward_passes"]["with_cache"] == n
    assert plan["forward_passes"]["without_cache"] == n - _published("mvtec") - _published("visa") \
        + _published("mvtec") + _published("visa")  # each target once per aux: mvtec, visa
    assert plan["cache_bytes"] == n * (1 * (37 * 37 + 1) * 1024 + 768) * 2
    assert plan["device_hours"] is None


def test_plan_marks_done_jobs_and_estimates_device_hours(tmp_path: Path):
    store = ResultStore(tmp_path / "R")
    store.append_unit("clip__visa__s0__mvtec", [])
    store.append_cost([{"method": "clip", "arch": "ViT-L-14-336", "image_size": 518,
                        "latency_median_ms": 100.0, "train_step_s": None, "device": "H200"},
                       {"method": "vand", "arch": "ViT-L-14-336", "image_size": 518,
                        "latency_median_ms": 200.0, "train_step_s": 0.5, "train_batch_size": 8,
                        "device": "H200"}])
    out = _plan("--protocol", "full", "--json", "--methods", "clip,vand", "--seeds", "0",
                "--results", str(tmp_path / "R"))
    plan = json.loads(out.stdout)
    done = {j["id"]: j["done"] for j in plan["jobs"]}
    assert done["clip__visa__s0"] is True and done["clip__mvtec__s0"] is False
    n = {d: _published(d) for d in plan["images"]}
    targets_mvtec = sum(v for d, v in n.items() if d not in ("mvtec", "visa")) + n["visa"]
    clip_h = (targets_mvtec + n["mvtec"]) * 0.1 / 3600
    vand_eval = (targets_mvtec + n["mvtec"]) * 0.2
    vand_train = (3 * math.ceil(n["mvtec"] / 8) + 15 * math.ceil(n["visa"] / 8)) * 0.5
    assert math.isclose(plan["device_hours"]["clip"], clip_h, rel_tol=1e-9)
    assert math.isclose(plan["device_hours"]["vand"], (vand_eval + vand_train) / 3600, rel_tol=1e-9)
    assert "H200" in plan["profile_note"]
