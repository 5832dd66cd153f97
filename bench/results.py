"""The append-only result store of one benchmark run.

Layout of ``<results>/<protocol>/<run-id>/``::

    records.jsonl      one JSON object per (method, aux, seed, dataset, category, level, metric)
    units.jsonl        one line per finished unit of work (job x target dataset), written
                       after that unit's records are flushed: the commit marker for resume
    provenance.json    git commit, package versions, device, protocol hash, checkpoint hashes
    checkpoints/       learnable state per trained job, named by content hash
    maps/              a small, seeded selection of anomaly maps for the report's gallery
    cost.jsonl         profiling records (``zsad-bench profile``)

A unit's records are written with one ``write`` + ``fsync`` and only then marked done in
``units.jsonl``. On resume, records of units without a marker (a run killed mid-write)
are dropped before anything new is appended, so no record is ever missing or doubled.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import subprocess
import sys
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


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
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
    """Records, commit markers, checkpoints and provenance of one run directory."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "checkpoints").mkdir(exist_ok=True)
        (self.dir / "maps").mkdir(exist_ok=True)
        self.records_path = self.dir / "records.jsonl"
        self.units_path = self.dir / "units.jsonl"
        self.cost_path = self.dir / "cost.jsonl"

    # -- units and records ------------------------------------------------------------
    def done_units(self) -> dict[str, dict[str, Any]]:
        return {u["unit"]: u for u in read_jsonl(self.units_path)}

    def repair(self) -> int:
        """Drop records whose unit never finished (killed run). Returns how many were dropped."""
        if not self.records_path.is_file():
            return 0
        done = set(self.done_units())
        raw = self.records_path.read_text(encoding="utf-8").splitlines()
        keep, dropped = [], 0
        for line in raw:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if rec.get("unit") in done:
                keep.append(line)
            else:
                dropped += 1
        if dropped:
            atomic_write_text(self.records_path, "".join(line + "\n" for line in keep))
        return dropped

    def append_unit(self, unit: str, records: Iterable[dict[str, Any]], **info: Any) -> int:
        """Write a unit's records durably, then mark the unit done."""
        lines = []
        for r in records:
            rec = {k: _json_value(v) for k, v in r.items()}
            rec["unit"] = unit
            lines.append(json.dumps(rec, sort_keys=True))
        _fsync_append(self.records_path, lines)
        _fsync_append(self.units_path, [json.dumps({"unit": unit, "n_records": len(lines), **info},
                                                   sort_keys=True)])
        return len(lines)

    def append_cost(self, records: Iterable[dict[str, Any]]) -> None:
        _fsync_append(self.cost_path, [json.dumps({k: _json_value(v) for k, v in r.items()},
                                                  sort_keys=True) for r in records])

    # -- checkpoints ------------------------------------------------------------------
    def checkpoint_path(self, job_id: str) -> Path:
        return self.dir / "checkpoints" / f"{job_id}.pt"

    def save_checkpoint(self, job_id: str, state: dict[str, torch.Tensor]) -> str:
        """Save a learnable state atomically; return the sha256 of its tensors' content."""
        digest = state_digest(state)
        path = self.checkpoint_path(job_id)
        buf = io.BytesIO()
        torch.save({"state": state, "sha256": digest}, buf)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
        return digest

    def load_checkpoint(self, job_id: str) -> tuple[dict[str, torch.Tensor], str] | None:
        path = self.checkpoint_path(job_id)
        if not path.is_file():
            return None
        blob = torch.load(path, map_location="cpu", weights_only=True)
        state, digest = blob["state"], blob["sha256"]
        if state_digest(state) != digest:
            path.unlink()  # corrupt: retrain rather than trust it
            return None
        return state, digest

    # -- provenance ---------------------------------------------------------------------
    def write_provenance(self, info: dict[str, Any]) -> None:
        path = self.dir / "provenance.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        merged = {**old, **info}
        for key in ("checkpoints", "backbones"):  # tables filled one entry at a time
            if isinstance(old.get(key), dict) and isinstance(info.get(key), dict):
                merged[key] = {**old[key], **info[key]}
        atomic_write_text(path, json.dumps(merged, indent=2, sort_keys=True, default=str))

    def provenance(self) -> dict[str, Any]:
        path = self.dir / "provenance.json"
        return json.loads(path.read_text()) if path.is_file() else {}


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


def load(directory: str | Path) -> pd.DataFrame:
    """The records of a run directory (or of every run below a directory) as a tidy DataFrame.

    Only records of finished units are returned. ``value`` is float with NaN where undefined.
    """
    directory = Path(directory)
    stores = [directory] if (directory / "records.jsonl").is_file() else sorted(
        p.parent for p in directory.rglob("records.jsonl"))
    if not stores:
        raise FileNotFoundError(f"{directory}: no records.jsonl here or below; run "
                                f"`zsad-bench run --protocol demo --results {directory}` first")
    frames = []
    for d in stores:
        done = {u["unit"] for u in read_jsonl(d / "units.jsonl")}
        recs = [r for r in read_jsonl(d / "records.jsonl") if r.get("unit") in done]
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
