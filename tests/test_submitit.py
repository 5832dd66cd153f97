"""The SLURM path through submitit, run by submitit's own local executor (no cluster needed).

One task per job, at most 2 at once, with a ``requires`` dependency (mpa -> mpama); one task
is cancelled, and a second submission submits exactly the jobs left unfinished. The records
equal those of a single-process run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench import results
from bench.executors import SubmititExecutor, WorkerSpec, build_runner
from tests.conftest import EXAMPLE_PLUGIN, write_protocol

submitit = pytest.importorskip("submitit")

KEY = ["method", "aux", "seed", "shots", "dataset", "category", "level", "metric"]


def _values(run: Path) -> dict[tuple, float | None]:
    df = results.load(run)
    keys = [tuple(r) for r in df[KEY].itertuples(index=False)]
    assert len(keys) == len(set(keys)), "a record is doubled"
    return {k: (None if v != v else round(float(v), 12)) for k, v in zip(keys, df["value"])}


def test_submitit_local_tasks_with_dependency_and_resume(tmp_path: Path, demo_data_root: Path):
    proto = write_protocol(tmp_path / "p.toml", methods='["clip", "mpa", "mpama", "patch_probe"]',
                           seeds="[0]", extra="[hparams.mpa]\nepochs = 1\n[hparams.mpama]\n"
                                             "epochs = 1\n[hparams.patch_probe]\nepochs = 1\n")
    spec = WorkerSpec(protocol=str(proto), results=str(tmp_path / "ref"),
                      data_root=str(demo_data_root), plugins=[str(EXAMPLE_PLUGIN)], threads=1)
    runner, jobs = build_runner(spec)
    assert [j.method for j in jobs].index("mpa") < [j.method for j in jobs].index("mpama")
    runner.run(jobs)
    reference = _values(tmp_path / "ref")

    spec.results = str(tmp_path / "slurm_run")
    folder = tmp_path / "slurm_run" / "slurm"
    first = SubmititExecutor(folder, cluster="local", max_parallel=2, wait=False).run(spec)
    assert first["submitted"] == len(jobs)
    handles = first["handles"]
    victim = list(handles)[-1]                       # the last task: cancel it right away
    handles[victim].cancel(check=False)
    for job_id, h in handles.items():
        if job_id == victim:
            continue
        out = h.result()                             # raises if a task failed
        assert out["jobs"] == 1
    # a resubmission skips a task whose process is still shutting down ("running"): resume
    # once the cancelled process has ended, as after a crash (on a loaded machine the SIGINT
    # can take seconds to end a process still importing torch)
    deadline = time.monotonic() + 120
    while not handles[victim].done() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert handles[victim].done()
    store = results.ResultStore(tmp_path / "slurm_run")
    unfinished = {j.id for j in jobs if any(j.unit(t) not in store.done_units() for t in j.targets)}
    assert unfinished <= {victim}

    second = SubmititExecutor(folder, cluster="local", max_parallel=2, wait=True).run(spec)
    assert second["submitted"] == len(unfinished) and second["failed"] == 0
    assert second["skipped"] == len(jobs) - len(unfinished)
    third = SubmititExecutor(folder, cluster="local", max_parallel=2, wait=True).run(spec)
    assert third["submitted"] == 0 and third["skipped"] == len(jobs)
    assert _values(tmp_path / "slurm_run") == reference
    # mpama started from mpa's trained state: the checkpoint mpa's task saved
    prov = results.read_provenance(tmp_path / "slurm_run")
    assert {"mpa__demo_aux__s0", "mpama__demo_aux__s0"} <= set(prov["checkpoints"])


def test_slurm_parameters_from_the_protocol():
    from bench.executors import submitit_parameters

    params = {"partition": "gpu", "gpus": 1, "cpus": 8, "mem_gb": 64, "time_min": 600,
              "account": "acc", "qos": "normal", "max_parallel": 4}
    mapped = submitit_parameters(params, "slurm")
    assert mapped == {"slurm_partition": "gpu", "gpus_per_node": 1, "cpus_per_task": 8,
                      "mem_gb": 64, "timeout_min": 600, "slurm_account": "acc",
                      "slurm_qos": "normal"}
    # every mapped name is a parameter submitit's SLURM executor knows
    from submitit.auto.auto import AutoExecutor

    valid = AutoExecutor._valid_parameters() | {f"slurm_{k}" for k in
                                                submitit.SlurmExecutor._valid_parameters()}
    assert set(mapped) <= valid
    assert submitit_parameters(params, "local") == {"timeout_min": 600}
