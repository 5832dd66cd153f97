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
    prov = results.read_provenance(tmp_path / "R")   # provenance.json + jobs/*.json
    assert prov["protocol_hash"] == proto.digest()
    assert set(prov["checkpoints"]) == {"patch_probe__demo_aux__s0", "patch_probe__demo_aux__s1"}
    # a second run skips everything and writes nothing
    again = Runner(proto, tmp_path / "R", data_copy, progress=False).run(expand(proto))
    assert again == {"jobs": 3, "skipped": 3, "ran": 0, "by_others": 0, "records": 0}
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
    prov_a = results.read_provenance(tmp_path / "A")["checkpoints"]
    prov_b = results.read_provenance(tmp_path / "B")["checkpoints"]
    assert {k: v["sha256"] for k, v in prov_a.items()} == {k: v["sha256"] for k, v in prov_b.items()}


def test_decoded_cache_changes_no_number(tmp_path: Path, data_copy: Path):
    """On the CPU the runner keeps decoded images (``[run] decoded_cache_mb``, on by default
    there): the records and the trained state equal those of a run that decodes every time."""
    load_plugin(EXAMPLE_PLUGIN)
    on = write_protocol(tmp_path / "on.toml", methods='["patch_probe"]', seeds="[0]")
    off = tmp_path / "off.toml"
    off.write_text(on.read_text().replace("[run]\n", "[run]\ndecoded_cache_mb = 0\n"))
    runs = {}
    for name, path in (("on", on), ("off", off)):
        proto = prepare_protocol(str(path))
        runner = Runner(proto, tmp_path / name, data_copy, progress=False)
        runner.run(expand(proto))
        runs[name] = (proto, runner)
    (p_on, r_on), (p_off, r_off) = runs["on"], runs["off"]
    assert p_on.digest() == p_off.digest()  # a resource setting, not in the protocol's hash
    assert r_off.decoded_cache is None
    assert r_on.decoded_cache is not None and r_on.decoded_cache.hits > 0
    assert _same(_records(tmp_path / "on"), _records(tmp_path / "off"))
    ck_on = results.read_provenance(tmp_path / "on")["checkpoints"]
    ck_off = results.read_provenance(tmp_path / "off")["checkpoints"]
    assert {k: v["sha256"] for k, v in ck_on.items()} == {k: v["sha256"] for k, v in ck_off.items()}


def test_kill_minus_9_then_resume_equals_uninterrupted_run(tmp_path: Path, data_copy: Path):
    proto = write_protocol(tmp_path / "p.toml", methods='["clip", "patch_probe"]', seeds="[0, 1, 2]")
    full = _run_cli(tmp_path, proto, data_copy, tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stderr.read()

    part = _run_cli(tmp_path, proto, data_copy, tmp_path / "killed", start_new_session=True)
    units = tmp_path / "killed" / "units"
    deadline = time.time() + 300
    while time.time() < deadline and part.poll() is None:
        if units.is_dir() and len(list(units.glob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    assert part.poll() is None, "the run finished before it could be killed"
    os.killpg(part.pid, signal.SIGKILL)
    part.wait()
    n_done = len(list(units.glob("*.json")))
    assert 2 <= n_done < 4
    # simulate what a kill mid-write leaves: a torn temporary file and a shard never committed
    shards = tmp_path / "killed" / "shards"
    (shards / ".patch_probe__demo_aux__s2__demo_target.jsonl.h.1.1.tmp").write_text('{"val')
    (shards / "patch_probe__demo_aux__s2__demo_target.jsonl").write_text(
        '{"method": "patch_probe", "unit": "patch_probe__demo_aux__s2__demo_target", "value": 2.0}\n')

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


FEW_SHOT_PLUGIN = '''
import torch
import torch.nn.functional as F
from methods.base import Method, Prediction, register

SEEN = []

@register("nn_probe")
class NNProbe(Method):
    """Few-shot nearest-neighbour distance to the reference patches (test plugin)."""
    seeded = True
    few_shot = True

    def _patches(self, images):
        bb = self.backbone
        t = bb.encode_image(images, layers=[bb.num_layers]).taps[bb.num_layers][:, 1:]
        return F.normalize(bb.project_tokens(t), dim=-1)

    def set_support(self, batch):
        SEEN.append((batch["category"], batch["path"], batch["label"].tolist()))
        with torch.no_grad():
            self.bank = self._patches(batch["image"]).flatten(0, 1)

    @torch.no_grad()
    def predict(self, batch):
        p = self._patches(batch["image"])
        d = 1 - (p @ self.bank.T).amax(-1)
        g = self.backbone.grid_size
        maps = F.interpolate(d.reshape(-1, 1, g, g), size=batch["image"].shape[-2:], mode="bilinear")[:, 0]
        return Prediction(maps.flatten(1).amax(1), maps)
'''


def test_few_shot_jobs_draw_seeded_references_from_train_split(tmp_path: Path, data_copy: Path):
    plugin = tmp_path / "nn_probe.py"
    plugin.write_text(FEW_SHOT_PLUGIN)
    load_plugin(plugin)
    import sys

    mod = next(m for n, m in sys.modules.items() if n.startswith("zsad_plugin_nn_probe"))
    proto = prepare_protocol(str(write_protocol(tmp_path / "p.toml", methods='["nn_probe"]',
                                                extra="[few_shot]\nnn_probe = [1, 2]\n")))
    jobs = expand(proto)
    assert [(j.seed, j.shots) for j in jobs] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    Runner(proto, tmp_path / "R", data_copy, progress=False).run(jobs)
    df = results.load(tmp_path / "R")
    assert sorted(df["shots"].unique()) == [1, 2]
    from bench import manifest as mf

    man = mf.read(mf.manifest_path(data_copy / "demo_target", "demo_target"))
    train_normals = set(man[(man["split"] == "train") & (man["label"] == 0)]["image"])
    test_images = set(man[man["split"] == "test"]["image"])
    seen = list(mod.SEEN)
    assert seen and all(set(paths) <= train_normals and not set(paths) & test_images
                        for _, paths, _ in seen)
    assert all(set(labels) == {0} for _, _, labels in seen)
    assert all(len(set(cats)) == 1 for cats, _, _ in seen)
    # the same (seed, shots, category) draws the same references in a fresh run
    first = list(seen)
    mod.SEEN.clear()
    Runner(proto, tmp_path / "R2", data_copy, progress=False).run(jobs)
    assert mod.SEEN == first
    # different seeds draw different references somewhere
    by_seed = {}
    for j, (cats, paths, _) in zip([jb for jb in jobs for _ in range(3)], first, strict=True):
        by_seed.setdefault((j.shots, cats[0]), []).append(tuple(paths))
    assert any(len(set(v)) > 1 for v in by_seed.values())
