"""Where jobs run: in this process (default) or on a cluster through submitit (SLURM).

Both executors take the same :class:`~bench.runner.Runner` and job list. The result store
is the only shared state, and it is append-only with per-unit commit markers, so jobs of
one protocol can run on many nodes against one results directory (each job writes only
its own units).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class LocalExecutor:
    """Run jobs one after the other in this process."""

    def run(self, runner: Any, jobs: list[Any]) -> dict[str, int]:
        return runner.run(jobs)


class SubmititExecutor:
    """Submit each pending job as one SLURM task with submitit (``pip install zsad-bench[slurm]``).

    Slurm parameters come from ``runner.proto.run["slurm"]`` (e.g. ``partition``,
    ``gpus_per_node``, ``timeout_min``). Blocks until all tasks finish.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def run(self, runner: Any, jobs: list[Any]) -> dict[str, int]:
        try:
            import submitit
        except ImportError as err:
            raise RuntimeError("--executor slurm needs submitit: pip install 'zsad-bench[slurm]'") from err
        todo = runner.pending(jobs)
        params = dict(runner.proto.run.get("slurm", {}))
        ex = submitit.AutoExecutor(folder=str(self.folder))
        ex.update_parameters(**{"timeout_min": 240, **params})
        handles = [ex.submit(runner.run_job, job) for job in todo]
        written = sum(h.result() for h in handles)
        return {"jobs": len(jobs), "skipped": len(jobs) - len(todo), "ran": len(todo), "records": written}
