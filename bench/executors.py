"""Where jobs run: this process, N local worker processes, or SLURM tasks through submitit.

Every executor runs the same worker code, :func:`work`: build the protocol and a
:class:`~bench.runner.Runner` from a :class:`WorkerSpec` (plain data that pickles), then
``Runner.run(jobs)``, which claims each job in the result store before running it
(:mod:`bench.results`). The store is the only shared state, so any mix of executors, started
at any time on one results directory, never doubles or loses a record and never runs a job
twice while its worker lives.

* :class:`LocalExecutor` — ``zsad-bench run --workers N [--devices cuda:0,cuda:1]``: N worker
  processes on this machine (one device each, round-robin), ``torch`` threads split evenly.
* :class:`SubmititExecutor` — ``zsad-bench run --executor slurm``: one submitit task per job,
  SLURM ``afterok`` dependencies from ``requires``, resources from ``[run.slurm]``, requeue
  on preemption or time-out (checkpointable tasks resume where they stopped), and a
  resumable submit: a second call submits only jobs that are neither finished nor queued or
  running (``<results>/slurm/submitted/<job>.json`` remembers what was submitted).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("zsad_bench")


@dataclass
class WorkerSpec:
    """Everything a worker process needs to rebuild the run (picklable, JSON-able)."""

    protocol: str
    results: str
    data_root: str
    plugins: list[str] = field(default_factory=list)
    methods: list[str] | None = None
    seeds: list[int] | None = None
    device: str = "cpu"
    threads: int | None = None
    progress: bool = False
    jobs: list[str] | None = None   # restrict to these job ids (a SLURM task: one job)
    poll: float = 1.0
    bars: bool = True               # tqdm bars (off for parallel workers: lines per job)
    tag: str = ""                   # prefix of the per-job lines


def build_runner(spec: WorkerSpec):
    """(runner, jobs) for a spec: plugins loaded, protocol validated, jobs expanded."""
    from bench.runner import Runner, expand, prepare_protocol

    proto = prepare_protocol(spec.protocol, plugins=spec.plugins, methods=spec.methods)
    runner = Runner(proto, Path(spec.results), Path(spec.data_root), device=spec.device,
                    progress=spec.progress, bars=spec.bars, tag=spec.tag)
    jobs = expand(proto, spec.seeds)
    if spec.jobs is not None:
        wanted = set(spec.jobs)
        unknown = wanted - {j.id for j in jobs}
        if unknown:
            raise ValueError(f"unknown job ids {sorted(unknown)} for protocol {proto.name}")
        jobs = [j for j in jobs if j.id in wanted]
    return runner, jobs


def work(spec: WorkerSpec) -> dict[str, int]:
    """The worker: run every job of the spec not finished yet (cooperating through claims)."""
    import torch

    if spec.threads:
        torch.set_num_threads(int(spec.threads))
    runner, jobs = build_runner(spec)
    return runner.run(jobs, poll=spec.poll)


def _work_in_subprocess(spec: WorkerSpec, index: int) -> dict[str, int]:
    logging.basicConfig(level=logging.WARNING, format=f"[worker {index}] %(levelname)s %(message)s")
    return work(spec)


class LocalExecutor:
    """``workers`` processes on this machine; one in-process worker when ``workers == 1``."""

    def __init__(self, workers: int = 1, devices: list[str] | None = None) -> None:
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self.devices = list(devices or [])

    def specs(self, spec: WorkerSpec) -> list[WorkerSpec]:
        """One spec per worker: its device (round-robin) and its share of the CPU threads."""
        cores = os.cpu_count() or 1
        out = []
        for i in range(self.workers):
            device = self.devices[i % len(self.devices)] if self.devices else spec.device
            threads = spec.threads or (max(1, cores // self.workers) if self.workers > 1 else None)
            out.append(WorkerSpec(**{**asdict(spec), "device": device, "threads": threads,
                                     "bars": self.workers == 1,
                                     "tag": f"[worker {i + 1}/{self.workers}] " if self.workers > 1 else ""}))
        return out

    def run(self, spec: WorkerSpec) -> dict[str, int]:
        specs = self.specs(spec)
        if self.workers == 1:
            return work(specs[0])
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")  # fresh interpreters: no inherited torch thread pools
        with ProcessPoolExecutor(self.workers, mp_context=ctx) as pool:
            futures = [pool.submit(_work_in_subprocess, s, i + 1) for i, s in enumerate(specs)]
            summaries = [f.result() for f in futures]
        total = {"jobs": summaries[0]["jobs"], "skipped": min(s["skipped"] for s in summaries),
                 "ran": sum(s["ran"] for s in summaries),
                 "records": sum(s["records"] for s in summaries), "workers": self.workers}
        total["by_others"] = total["jobs"] - total["skipped"] - total["ran"]
        return total


# ------------------------------------------------------------------------------------------
# SLURM (submitit)
# ------------------------------------------------------------------------------------------
#: ``[run.slurm]`` keys -> submitit's parameter names (SLURM flags in brackets)
SLURM_KEYS = {
    "partition": "slurm_partition",          # --partition
    "gpus": "gpus_per_node",                 # --gpus-per-node
    "cpus": "cpus_per_task",                 # --cpus-per-task
    "mem_gb": "mem_gb",                      # --mem
    "time_min": "timeout_min",               # --time
    "account": "slurm_account",              # --account
    "qos": "slurm_qos",                      # --qos
    "constraint": "slurm_constraint",        # --constraint
}
_ALIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING",
                 "SUSPENDED", "UNKNOWN"}


class _JobTask:
    """The callable a submitit task runs: one job of the store, resumable on requeue.

    ``checkpoint`` is submitit's preemption/time-out hook: the task is requeued with the
    same arguments, and the store's resume (finished units skipped, checkpoints reused)
    makes the rerun continue where the killed one stopped.
    """

    def __call__(self, spec: WorkerSpec) -> dict[str, int]:
        return work(spec)

    def checkpoint(self, spec: WorkerSpec):
        import submitit

        return submitit.helpers.DelayedSubmission(self, spec)


def submitit_parameters(params: dict[str, Any], cluster: str = "slurm") -> dict[str, Any]:
    """``[run.slurm]`` -> ``AutoExecutor.update_parameters`` keywords (see :data:`SLURM_KEYS`;
    other keys pass through). Off SLURM, the SLURM-only ones are dropped."""
    mapped: dict[str, Any] = {"timeout_min": 24 * 60}
    for key, value in params.items():
        if key == "max_parallel":
            continue
        mapped[SLURM_KEYS.get(key, key)] = value
    if cluster != "slurm":
        mapped = {k: v for k, v in mapped.items() if not k.startswith("slurm_")
                  and k not in ("gpus_per_node", "cpus_per_task", "mem_gb")}
    return mapped


class SubmititExecutor:
    """Submit one task per pending job with submitit; ``cluster="slurm"`` or ``"local"``.

    ``cluster="local"`` is submitit's own local executor (real subprocesses, no SLURM): what
    the tests use. ``max_parallel`` bounds the tasks running at once on it (on SLURM the
    scheduler and the QOS decide). ``wait=True`` blocks until every submitted task ended.
    """

    def __init__(self, folder: str | Path, *, cluster: str = "slurm", max_parallel: int | None = None,
                 wait: bool = True, poll: float = 2.0) -> None:
        self.folder = Path(folder)
        self.cluster = cluster
        self.max_parallel = max_parallel
        self.wait = wait
        self.poll = poll

    def _executor(self, params: dict[str, Any]):
        try:
            import submitit
        except ImportError as err:
            raise RuntimeError("--executor slurm needs submitit: pip install 'zsad-bench[slurm]'") from err
        ex = submitit.AutoExecutor(folder=str(self.folder / "logs"), cluster=self.cluster)
        ex.update_parameters(**submitit_parameters(params, self.cluster))
        return ex

    # -- what was submitted ----------------------------------------------------------------
    def _record_path(self, job_id: str) -> Path:
        return self.folder / "submitted" / f"{job_id}.json"

    def _submitted_alive(self, job_id: str) -> bool:
        """True if an earlier submission of ``job_id`` is still queued or running."""
        rec = self.folder / "submitted" / f"{job_id}.json"
        try:
            info = json.loads(rec.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if info.get("cluster") == "slurm":
            try:
                import submitit

                state = submitit.SlurmJob(str(self.folder / "logs"), info["task_id"]).state
            except Exception:  # noqa: BLE001 - cannot ask SLURM: assume it is alive
                return True
            return str(state).upper().split()[0] in _ALIVE_STATES
        from bench.results import _pid_alive

        return info.get("host") == os.uname().nodename and _pid_alive(int(info.get("pid", -1)))

    # -- submit -------------------------------------------------------------------------------
    def run(self, spec: WorkerSpec) -> dict[str, int]:
        """Submit every job that is neither finished, nor claimed by a live worker, nor queued."""
        from bench.registry import METHODS

        runner, jobs = build_runner(spec)
        stale = runner.stale_after
        todo = runner.pending(jobs)
        held = runner.store.live_claims(stale)
        submit = [j for j in todo if j.id not in held and not self._submitted_alive(j.id)]
        params = dict(runner.proto.run.get("slurm", {}))
        limit = self.max_parallel or params.get("max_parallel")
        ex = self._executor(params)
        (self.folder / "submitted").mkdir(parents=True, exist_ok=True)
        handles: dict[str, Any] = {}
        ids = {j.id for j in submit}
        for job in submit:
            if limit and self.cluster != "slurm":
                self._throttle(handles, int(limit))
            deps = []
            cls = METHODS.get(job.method)
            if cls.requires:
                dep_id = runner.checkpoint_id(type(job)(cls.requires, job.aux, job.seed, job.targets))
                dep_jobs = [h for i, h in handles.items() if i == dep_id or i.startswith(dep_id + "__k")]
                deps = [h.job_id for h in dep_jobs] if dep_id in ids else []
            if deps and self.cluster == "slurm":
                ex.update_parameters(slurm_additional_parameters={
                    "dependency": "afterok:" + ":".join(map(str, deps))})
            task_spec = WorkerSpec(**{**asdict(spec), "jobs": [job.id], "progress": False})
            handle = ex.submit(_JobTask(), task_spec)
            if deps and self.cluster == "slurm":
                ex.update_parameters(slurm_additional_parameters={})
            handles[job.id] = handle
            info = {"job": job.id, "task_id": str(handle.job_id), "cluster": self.cluster,
                    "time": round(time.time(), 3), "host": os.uname().nodename,
                    "pid": _local_pid(handle)}
            (self._record_path(job.id)).write_text(json.dumps(info, sort_keys=True))
            print(f"submitted {job.id} as {self.cluster} task {handle.job_id}"
                  + (f" (after {', '.join(map(str, deps))})" if deps else ""), file=sys.stderr)
        summary = {"jobs": len(jobs), "skipped": len(jobs) - len(todo), "submitted": len(submit),
                   "held_elsewhere": len([j for j in todo if j.id in held]),
                   "queued_before": len(todo) - len(submit) - len([j for j in todo if j.id in held]),
                   "ran": 0, "records": 0, "failed": 0}
        if self.wait:
            for job_id, h in handles.items():
                try:
                    out = h.result()
                    summary["ran"] += out.get("ran", 0)
                    summary["records"] += out.get("records", 0)
                except Exception as err:  # noqa: BLE001 - report every failed task, keep going
                    summary["failed"] += 1
                    print(f"task of {job_id} failed: {type(err).__name__}: {err}", file=sys.stderr)
            runner.store.merge()
        summary["handles"] = handles  # type: ignore[assignment]
        return summary

    def _throttle(self, handles: dict[str, Any], limit: int) -> None:
        while sum(not h.done() for h in handles.values()) >= limit:
            time.sleep(self.poll)


def _local_pid(handle: Any) -> int:
    """The process id of a submitit local task (its job id), -1 for SLURM tasks."""
    try:
        return int(str(handle.job_id))
    except ValueError:
        return -1
