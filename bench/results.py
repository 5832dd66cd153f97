"""The result store of one benchmark run: plain files, safe for many writers.

Layout of ``<results>/<protocol>/<run-id>/`` (``results/README.md`` documents it)::

    records.jsonl      the merged view: every record of every finished unit, one JSON object
                       per (method, aux, seed, dataset, category, level, metric); rebuilt
                       atomically (:meth:`ResultStore.merge`) — readers may also use
                       :func:`read_records`, which reads the shards directly
    shards/<unit>.jsonl   the records of one unit of work (job x target dataset)
    units/<unit>.json     its commit marker, written after the shard: a unit is done iff
                          its marker exists
    claims/<job>.json     who is running a job (host, pid, start; heartbeat = mtime)
    jobs/<job>.json       per-job provenance (checkpoint hash, training time, host, device)
    log/<host>.<pid>.jsonl  what each worker started and finished (audit trail)
    provenance.json    run-level provenance: protocol, hash, inputs, environment of the creator
    checkpoints/       learnable state per trained job, named by job id, with a content hash
    maps/              a small, seeded selection of anomaly maps for the report's gallery
    cost.jsonl         profiling records (``zsad-bench profile``)

Guarantees, for any number of processes on any number of hosts sharing the directory (the
file system must provide atomic ``rename`` within a directory and exclusive create
``O_CREAT|O_EXCL``; local file systems and NFSv3+/Lustre/GPFS do):

* **Nothing doubled.** A unit's records live in one file named by the unit, written to a
  temporary name and renamed into place; readers take one shard per committed unit. Two
  workers that computed the same unit (possible only after a claim was wrongly judged stale)
  write the same content to the same name.
* **Nothing lost.** A shard counts only once its marker exists; a killed worker leaves at
  most a temporary file or an uncommitted shard, which the next run of that unit replaces.
  No file is ever rewritten in place, so no writer can drop another's records (the old
  single ``records.jsonl`` repair could).
* **No unit run twice** while its worker lives: a job is claimed with an exclusive create;
  a claim is taken over only when stale (its pid is dead on this host, or its heartbeat is
  older than ``[run] claim_stale_minutes``, 15 by default).

Stores written by earlier versions (``units.jsonl`` + ``records.jsonl``) are converted to
this layout the first time they are opened (under an exclusive lock).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

RECORD_KEYS = ("method", "aux", "seed", "shots", "dataset", "category", "level", "metric", "value")


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _fsync_append(path: Path, lines: list[str]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))
        fh.flush()
        os.fsync(fh.fileno())


def _tmp_name(path: Path) -> Path:
    """A temporary name next to ``path``, unique per process and thread (many writers)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}."
                          f"{threading.get_ident()}.tmp")


def atomic_write_text(path: Path, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` to a temporary file and rename it onto ``path`` (readers never see a
    partial file; concurrent writers of the same path leave one complete version)."""
    tmp = _tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file; blank lines and a torn (killed) line are skipped."""
    out = []
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run; its unit is not marked done
    return out


class ResultStore:
    """Records, commit markers, claims, checkpoints and provenance of one run directory."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("checkpoints", "maps", "shards", "units", "claims", "jobs", "log"):
            (self.dir / sub).mkdir(exist_ok=True)
        self.records_path = self.dir / "records.jsonl"
        self.cost_path = self.dir / "cost.jsonl"
        self.worker_id = f"{socket.gethostname()}.{os.getpid()}"
        _migrate_legacy(self.dir)

    # -- units and records ------------------------------------------------------------
    def _shard(self, unit: str) -> Path:
        return self.dir / "shards" / f"{unit}.jsonl"

    def _marker(self, unit: str) -> Path:
        return self.dir / "units" / f"{unit}.json"

    def done_units(self) -> dict[str, dict[str, Any]]:
        """Committed units -> their marker (``n_records``, ``seconds``, ``worker``, ``time``)."""
        return read_markers(self.dir)

    def done_unit_names(self) -> set[str]:
        """Names of the committed units: the marker files' names, none of them read (cheap
        enough to poll on a shared file system while other workers run)."""
        return {p.name[:-len(".json")] for p in (self.dir / "units").glob("*.json")}

    def is_done(self, unit: str) -> bool:
        return self._marker(unit).is_file()

    def append_unit(self, unit: str, records: Iterable[dict[str, Any]], **info: Any) -> int:
        """Write a unit's records (shard, then commit marker; both atomic). Returns their count."""
        lines = []
        for r in records:
            rec = {k: _json_value(v) for k, v in r.items()}
            rec["unit"] = unit
            lines.append(json.dumps(rec, sort_keys=True))
        atomic_write_text(self._shard(unit), "".join(line + "\n" for line in lines), fsync=True)
        marker = {"unit": unit, "n_records": len(lines), "worker": self.worker_id,
                  "time": round(time.time(), 3), **info}
        atomic_write_text(self._marker(unit), json.dumps(marker, sort_keys=True), fsync=True)
        self.log("done", unit=unit, n_records=len(lines))
        return len(lines)

    def merge(self) -> int:
        """Rebuild ``records.jsonl`` from the committed shards (atomic; repeated until no unit
        was committed meanwhile, so the last writer's view is complete). Returns its lines."""
        while True:
            done = read_markers(self.dir)
            lines = []
            for unit in sorted(done):
                shard = self._shard(unit)
                if shard.is_file():
                    lines.extend(ln for ln in shard.read_text(encoding="utf-8").splitlines() if ln)
            atomic_write_text(self.records_path, "".join(ln + "\n" for ln in lines))
            if set(read_markers(self.dir)) == set(done):
                return len(lines)

    def log(self, event: str, **info: Any) -> None:
        """Append to this worker's own audit log (``log/<host>.<pid>.jsonl``: one writer each)."""
        entry = {"event": event, "worker": self.worker_id, "time": round(time.time(), 3), **info}
        _fsync_append(self.dir / "log" / f"{self.worker_id}.jsonl", [json.dumps(entry, sort_keys=True)])

    def append_cost(self, records: Iterable[dict[str, Any]]) -> None:
        _fsync_append(self.cost_path, [json.dumps({k: _json_value(v) for k, v in r.items()},
                                                  sort_keys=True) for r in records])

    # -- claims ---------------------------------------------------------------------------
    def claim(self, job_id: str, *, stale_after: float = 15 * 60) -> Claim | None:
        """Claim ``job_id`` for this process, or None if a live worker holds it.

        An exclusive create of ``claims/<job>.json``; a stale claim (dead pid on this host, or
        a heartbeat older than ``stale_after`` seconds) is taken over under a takeover lock.
        """
        path = self.dir / "claims" / f"{job_id}.json"
        info = {"job": job_id, "host": socket.gethostname(), "pid": os.getpid(),
                "time": round(time.time(), 3), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        if exclusive_create(path, json.dumps(info, sort_keys=True)):
            self.log("claim", job=job_id)
            return Claim(path, stale_after)
        holder = claim_holder(path, stale_after)
        if holder is None or holder.get("live"):
            return None
        lock = path.with_suffix(".takeover")
        if not exclusive_create(lock, self.worker_id):
            if time.time() - _mtime(lock, time.time()) > 60:  # a takeover that died midway
                lock.unlink(missing_ok=True)
            return None
        try:
            again = claim_holder(path, stale_after)
            if again is not None and (again.get("live") or again.get("time") != holder.get("time")):
                return None
            path.unlink(missing_ok=True)
            if not exclusive_create(path, json.dumps(info, sort_keys=True)):
                return None
            self.log("takeover", job=job_id, previous=holder)
            return Claim(path, stale_after)
        finally:
            lock.unlink(missing_ok=True)

    def live_claims(self, stale_after: float = 15 * 60) -> dict[str, dict[str, Any]]:
        """Job id -> holder of every claim that is not stale."""
        out = {}
        for path in (self.dir / "claims").glob("*.json"):
            holder = claim_holder(path, stale_after)
            if holder is not None and holder.get("live"):
                out[path.stem] = holder
        return out

    # -- checkpoints ------------------------------------------------------------------
    def checkpoint_path(self, job_id: str) -> Path:
        return self.dir / "checkpoints" / f"{job_id}.pt"

    def save_checkpoint(self, job_id: str, state: dict[str, torch.Tensor]) -> str:
        """Save a learnable state atomically; return the sha256 of its tensors' content."""
        digest = state_digest(state)
        path = self.checkpoint_path(job_id)
        buf = io.BytesIO()
        torch.save({"state": state, "sha256": digest}, buf)
        tmp = _tmp_name(path)
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
        return digest

    def load_checkpoint(self, job_id: str) -> tuple[dict[str, torch.Tensor], str] | None:
        path = self.checkpoint_path(job_id)
        if not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError):
            return None
        state, digest = blob["state"], blob["sha256"]
        if state_digest(state) != digest:
            path.unlink(missing_ok=True)  # corrupt: retrain rather than trust it
            return None
        return state, digest

    # -- provenance ---------------------------------------------------------------------
    def init_provenance(self, info: dict[str, Any]) -> dict[str, Any]:
        """Create ``provenance.json`` with ``info`` unless it exists; return what is on disk.

        The first process of a run writes it (exclusive create); the others read it, so that
        they can check they run the same protocol version.
        """
        path = self.dir / "provenance.json"
        exclusive_create(path, json.dumps(info, indent=2, sort_keys=True, default=str))
        for _ in range(100):  # the creator may still be writing it
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                time.sleep(0.05)
        raise RuntimeError(f"{path}: unreadable; delete it if no run is writing this directory")

    def write_job_provenance(self, job_id: str, info: dict[str, Any]) -> None:
        """``jobs/<job>.json``: one file per job, merged with what that job wrote before."""
        path = self.dir / "jobs" / f"{job_id}.json"
        old = _read_json(path)
        merged = {**old, **info}
        for key in ("checkpoints", "backbones"):
            if isinstance(old.get(key), dict) and isinstance(info.get(key), dict):
                merged[key] = {**old[key], **info[key]}
        atomic_write_text(path, json.dumps(merged, indent=2, sort_keys=True, default=str))

    def write_provenance(self, info: dict[str, Any]) -> None:
        """Update the run-level ``provenance.json`` (single-writer use: tools and tests)."""
        path = self.dir / "provenance.json"
        old = _read_json(path)
        merged = {**old, **info}
        for key in ("checkpoints", "backbones"):  # tables filled one entry at a time
            if isinstance(old.get(key), dict) and isinstance(info.get(key), dict):
                merged[key] = {**old[key], **info[key]}
        atomic_write_text(path, json.dumps(merged, indent=2, sort_keys=True, default=str))

    def provenance(self) -> dict[str, Any]:
        """Run-level provenance with every job's ``checkpoints`` and ``backbones`` merged in."""
        return read_provenance(self.dir)


class Claim:
    """A held job claim; a daemon thread refreshes its heartbeat (mtime) until released."""

    def __init__(self, path: Path, stale_after: float) -> None:
        self.path = path
        self._stop = threading.Event()
        interval = max(1.0, min(60.0, stale_after / 5))
        self._thread = threading.Thread(target=self._beat, args=(interval,), daemon=True)
        self._thread.start()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def claim_holder(path: Path, stale_after: float) -> dict[str, Any] | None:
    """The holder of a claim file with ``live`` set, or None if there is no such file."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):  # being written right now: treat as live
        return {"live": True}
    live = age <= stale_after
    if live and info.get("host") == socket.gethostname():
        live = _pid_alive(int(info.get("pid", -1)))
    return {**info, "age_s": round(age, 1), "live": live}


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) is not alive
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def exclusive_create(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` iff it does not exist (``O_CREAT|O_EXCL``)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return default


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def read_markers(directory: str | Path) -> dict[str, dict[str, Any]]:
    """Committed units of a run directory -> their markers."""
    out = {}
    for path in sorted((Path(directory) / "units").glob("*.json")):
        marker = _read_json(path)
        out[marker.get("unit", path.stem)] = marker
    return out


def read_records(directory: str | Path) -> list[dict[str, Any]]:
    """Every record of the committed units of one run directory (shards, one per unit).

    A directory in the single-file layout without shards (a hand-made or pre-conversion
    store) is read from its ``records.jsonl``.
    """
    directory = Path(directory)
    if not (directory / "units").is_dir():
        return read_jsonl(directory / "records.jsonl")
    out = []
    for unit in read_markers(directory):
        out.extend(read_jsonl(directory / "shards" / f"{unit}.jsonl"))
    return out


def read_provenance(directory: str | Path) -> dict[str, Any]:
    """``provenance.json`` plus the per-job files (checkpoints, backbones) of a run directory."""
    directory = Path(directory)
    prov = _read_json(directory / "provenance.json")
    for path in sorted((directory / "jobs").glob("*.json")):
        job = _read_json(path)
        for key in ("checkpoints", "backbones"):
            if isinstance(job.get(key), dict):
                prov[key] = {**prov.get(key, {}), **job[key]}
    return prov


def _migrate_legacy(directory: Path) -> None:
    """Convert a store of the single-file layout (``units.jsonl``) to shards and markers."""
    legacy = directory / "units.jsonl"
    if not legacy.is_file():
        return
    lock = directory / "migrate.lock"
    if not exclusive_create(lock, socket.gethostname()):
        for _ in range(600):  # another process converts it: wait
            if not legacy.is_file():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{directory}: conversion of the old store layout did not finish; "
                           f"if no process is converting it, delete {lock} and re-run")
    try:
        if not legacy.is_file():
            return
        done = {u["unit"]: u for u in read_jsonl(legacy)}
        by_unit: dict[str, list[str]] = {}
        for rec in read_jsonl(directory / "records.jsonl"):
            if rec.get("unit") in done:
                by_unit.setdefault(rec["unit"], []).append(json.dumps(rec, sort_keys=True))
        for unit, marker in done.items():
            atomic_write_text(directory / "shards" / f"{unit}.jsonl",
                              "".join(ln + "\n" for ln in by_unit.get(unit, [])))
            atomic_write_text(directory / "units" / f"{unit}.json", json.dumps(marker, sort_keys=True))
        os.replace(legacy, directory / "units.jsonl.converted")
    finally:
        lock.unlink(missing_ok=True)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict (order-independent)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


#: Paths (relative to the repository root) that runs write into a checkout: generated demo
#: data, result stores, rendered reports, caches. They never make a checkout "dirty".
GENERATED_PATHS = ("data/", "results/", "reports/site/", ".nox/", ".benchmarks/")


def git_state(where: str | Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding ``where``; (None, None) outside git.

    Dirty means a real change: a modified, added, deleted or new (untracked, not ignored) file
    anywhere but under :data:`GENERATED_PATHS` — generated outputs are not edits.
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=where, timeout=5).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=all"],
                                capture_output=True, text=True, cwd=where, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None, None
    if commit is None or status.returncode != 0:
        return commit, None
    changed = []
    entries = status.stdout.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        code, path = entry[:2], entry[3:]
        if "R" in code or "C" in code:  # rename/copy: the next entry is the old path
            i += 1
        changed.append(path)
    dirty = any(not path.startswith(GENERATED_PATHS) for path in changed)
    return commit, dirty


def environment() -> dict[str, Any]:
    """Versions, device and git commit for provenance.json."""
    from importlib import metadata

    versions = {}
    for pkg in ("zsad-bench", "torch", "torchvision", "open-clip-torch", "numpy", "scikit-learn",
                "pandas", "scipy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    commit, dirty = git_state(Path(__file__).parent)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"git_commit": commit, "git_dirty": dirty, "python": sys.version.split()[0],
            "platform": platform.platform(), "device": device, "versions": versions}


def run_dirs(directory: str | Path) -> list[Path]:
    """The run directories at or below ``directory`` (those with markers or records)."""
    directory = Path(directory)

    def is_run(d: Path) -> bool:
        return (d / "units").is_dir() or (d / "records.jsonl").is_file()

    if is_run(directory):
        return [directory]
    found = {p.parent.parent for p in directory.rglob("units/*.json")}
    found |= {p.parent for p in directory.rglob("records.jsonl")}
    return sorted(d for d in found if is_run(d))


def load(directory: str | Path) -> pd.DataFrame:
    """The records of a run directory (or of every run below a directory) as a tidy DataFrame.

    Only records of finished units are returned. ``value`` is float with NaN where undefined.
    """
    directory = Path(directory)
    stores = run_dirs(directory)
    if not stores:
        raise FileNotFoundError(f"{directory}: no result store here or below; run "
                                f"`zsad-bench run --protocol demo --results {directory}` first")
    frames = []
    for d in stores:
        if (d / "units.jsonl").is_file():  # not converted yet (read-only here)
            done = {u["unit"] for u in read_jsonl(d / "units.jsonl")}
            recs = [r for r in read_jsonl(d / "records.jsonl") if r.get("unit") in done]
        else:
            recs = read_records(d)
        if recs:
            df = pd.DataFrame(recs)
            df["run"] = str(d)
            frames.append(df)
    if not frames:
        return pd.DataFrame(columns=[*RECORD_KEYS, "unit", "run"])
    df = pd.concat(frames, ignore_index=True)
    if "shots" not in df:
        df["shots"] = 0
    df["shots"] = df["shots"].fillna(0).astype(int)
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype(float)
    df["seed"] = df["seed"].astype(int)
    return df
