"""Expand a protocol into jobs, run them, resume after a crash.

A :class:`Job` is (method, aux, seed): it trains once (or not at all) and is then
evaluated on every target of its transfer. The unit of durable work is (job, target):
its records are flushed and committed together (:mod:`bench.results`), so a killed run
resumes where it stopped and loses nothing that was written.

Determinism: every unit starts from ``seed_everything(job.seed)``, and the auxiliary
loader's order depends only on the seed, so resuming gives the numbers an uninterrupted
run gives.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset
from tqdm.auto import tqdm

from bench import manifest as mf
from bench import metrics
from bench import protocol as protocol_mod
from bench.backbone import ClipBackbone, load_clip
from bench.data import (
    DEFAULT_MASK_THRESHOLD,
    MASK_RESIZES,
    DecodedCache,
    DeviceLoader,
    ManifestDataset,
    collate,
    make_loader,
    to_device,
)
from bench.feature_cache import CACHE_DTYPES, FeatureCache
from bench.registry import ADAPTERS, METHODS, create_method, get_adapter
from bench.results import ResultStore, environment, exclusive_create, state_digest

log = logging.getLogger("zsad_bench")
GALLERY_SIZE = 96  # pixels of the maps kept for the report's gallery
#: ``[run] precision`` values -> autocast dtype (None: no autocast)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: default ``[run] decoded_cache_mb`` where images are decoded in the training process
DECODED_CACHE_MB = 1024


class RunError(RuntimeError):
    """The run cannot proceed; the message says why and what to do."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


@dataclass(frozen=True)
class Job:
    method: str
    aux: str
    seed: int
    targets: tuple[str, ...]
    shots: int = 0

    @property
    def id(self) -> str:
        shots = f"__k{self.shots}" if self.shots else ""
        return f"{self.method}__{self.aux}__s{self.seed}{shots}"

    def unit(self, target: str) -> str:
        return f"{self.id}__{target}"


def expand(proto: protocol_mod.Protocol, seeds: list[int] | None = None) -> list[Job]:
    """Jobs in run order: methods another one requires come first.

    Seeded methods get every seed; unseeded (deterministic, training-free) ones run once,
    under the protocol's first seed.
    """
    seeds = list(seeds) if seeds is not None else list(proto.seeds)
    order = _dependency_order(proto.methods)
    jobs = []
    for name in order:
        cls = METHODS.get(name)
        shots = proto.few_shot.get(name, [1]) if cls.few_shot else [0]
        for t in proto.transfers:
            for s in seeds if cls.is_seeded() else seeds[:1]:
                for k in shots:
                    jobs.append(Job(name, t.aux, s, t.targets, shots=k))
    return jobs


def _dependency_order(names: list[str]) -> list[str]:
    out: list[str] = []

    def visit(n: str, stack: tuple[str, ...]) -> None:
        if n in out:
            return
        if n in stack:
            raise RunError(f"methods depend on each other in a cycle: {' -> '.join(stack + (n,))}")
        req = METHODS.get(n).requires
        if req and req in names:
            visit(req, stack + (n,))
        out.append(n)

    for n in names:
        visit(n, ())
    return out


@dataclass
class DatasetHandle:
    """A target or auxiliary dataset ready to load."""

    name: str
    root: Path
    manifest: pd.DataFrame
    adapter: Any

    @property
    def mask_threshold(self) -> int:
        return int(getattr(self.adapter, "mask_threshold", DEFAULT_MASK_THRESHOLD))

    def torch_dataset(self, rows: pd.DataFrame, image_size: int,
                      class_words: str = "readable", mask_resize: str = "bilinear",
                      cache: DecodedCache | None = None) -> ManifestDataset:
        """``class_words``: ``"readable"`` (the adapter's prompt name, "metal nut") or
        ``"folder"`` (the category's folder id verbatim, "metal_nut"), per method;
        ``cache``: the process's decoded tensors (:class:`bench.data.DecodedCache`)."""
        if class_words not in protocol_mod.CLASS_WORDS:
            raise RunError(f"class_words must be one of {protocol_mod.CLASS_WORDS}, not {class_words!r}")
        cats = rows["category"].unique()
        names = ({c: self.adapter.prompt_name(c) for c in cats} if class_words == "readable"
                 else {str(c): str(c) for c in cats})
        return ManifestDataset(rows, self.root, image_size, mask_threshold=self.mask_threshold,
                               mask_resize=mask_resize, prompt_names=names, cache=cache)


def dataset_root(proto: protocol_mod.Protocol, name: str, data_root: Path) -> Path:
    custom = proto.datasets.get(name, {}).get("root")
    return Path(custom).expanduser() if custom else data_root / name


def open_dataset(proto: protocol_mod.Protocol, name: str, data_root: Path,
                 *, generate: bool = True) -> DatasetHandle:
    """Read ``<root>/<name>.manifest.parquet``; build it (or generate demo data) if absent."""
    root = dataset_root(proto, name, data_root)
    adapter = get_adapter(name)
    path = mf.manifest_path(root, name)
    if not path.is_file():
        # several workers may open the same dataset at once: one prepares, the others wait
        with _exclusive(root.parent / f".{root.name}.prepare.lock"):
            _check_generated(adapter, name, root, generate)
            if not path.is_file():
                _prepare(adapter, name, root, path, generate)
    else:
        _check_generated(adapter, name, root, generate)
    return DatasetHandle(name, root, mf.read(path), adapter)


def _check_generated(adapter: Any, name: str, root: Path, generate: bool) -> None:
    """Refuse generated data of another generator version (it would silently mix)."""
    stale = getattr(adapter, "stale_reason", None)
    if generate and stale is not None and root.exists() and adapter.detect(root):
        reason = stale(root)
        if reason:
            raise RunError(f"{root}: generated by another version of the '{name}' generator "
                           f"({reason}). Delete {root} and re-run: it is generated again.")


def _prepare(adapter: Any, name: str, root: Path, path: Path, generate: bool) -> None:
    """Generate (demo data) and/or scan a dataset into its manifest ``path``."""
    if hasattr(adapter, "generate") and generate and not (root.exists() and adapter.detect(root)):
        root.mkdir(parents=True, exist_ok=True)
        adapter.generate(root)
    if not root.exists():
        raise RunError(f"{root}: data of '{name}' not found. Download it "
                       f"({adapter.download_url or 'see docs/datasets.md'}), extract it there "
                       f"(or set [datasets.{name}] root in the protocol), then run "
                       f"`zsad-bench prepare {name} --root {root}`.")
    try:
        from bench.prepare import prepare_dataset
    except ImportError:  # pragma: no cover - adapters issue not landed
        df = adapter.scan(root)
        mf.write(df, path)
    else:
        prepare_dataset(name, root)


class _exclusive:
    """A lock file held with an exclusive create; waits while another process holds it."""

    def __init__(self, path: Path, timeout: float = 3600) -> None:
        self.path, self.timeout = path, timeout

    def __enter__(self) -> _exclusive:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout
        while True:
            if exclusive_create(self.path, ""):
                return self
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                continue
            if age > self.timeout:  # left by a killed process
                self.path.unlink(missing_ok=True)
            elif time.monotonic() > deadline:
                raise RunError(f"{self.path}: held for over {self.timeout:.0f}s; delete it if "
                               "no process is preparing that dataset")
            time.sleep(0.2)

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def _progress(enabled: bool) -> Callable[..., Iterable]:
    def wrap(it: Iterable, **kw: Any) -> Iterable:
        # disable=None: tqdm draws only on a terminal (no bar lines in CI logs)
        return tqdm(it, disable=None if enabled else True, leave=False, dynamic_ncols=True,
                    file=sys.stderr, **kw)

    return wrap


def load_backbone(spec: protocol_mod.BackboneSpec, device: str = "cpu") -> ClipBackbone:
    """The frozen backbone a protocol names (the toy tag resolves to the shipped checkpoint)."""
    pretrained = spec.pretrained
    if pretrained == protocol_mod.TOY_PRETRAINED:
        from bench.demo.toyclip import checkpoint_path

        pretrained = str(checkpoint_path())
    bb = load_clip(spec.arch, pretrained, spec.image_size, device, **spec.load_kwargs())
    if spec.pretrained == protocol_mod.TOY_PRETRAINED and bb.weights_sha256:
        bb.weights_label = f"{spec.pretrained}, sha256 {bb.weights_sha256[:8]}"
    return bb


@dataclass
class Runner:
    """Runs the jobs of one protocol into one result directory."""

    proto: protocol_mod.Protocol
    results_dir: Path
    data_root: Path
    device: str = "cpu"
    progress: bool = True
    #: progress bars on a terminal (off for parallel workers: one line per finished job instead)
    bars: bool = True
    #: prefix of the per-job lines (a worker's number)
    tag: str = ""
    store: ResultStore = field(init=False)
    _backbones: dict[str, ClipBackbone] = field(default_factory=dict, init=False)
    _fingerprints: dict[str, str] = field(default_factory=dict, init=False)
    _datasets: dict[str, DatasetHandle] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.results_dir = Path(self.results_dir)
        self.data_root = Path(self.data_root)
        self.store = ResultStore(self.results_dir)
        prov = self.store.provenance()
        digest = self.proto.digest()
        self.stale_after = 60 * float(self.proto.run.get("claim_stale_minutes", 15))
        if prov.get("protocol_hash") not in (None, digest):
            raise RunError(
                f"{self.results_dir} holds a run of another protocol version (hash "
                f"{prov['protocol_hash']}, now {digest}). Use a new --results directory, or "
                f"restore the protocol it was run with ({prov.get('protocol_source')})."
            )
        prov = self.store.init_provenance({
            "protocol": self.proto.name, "protocol_hash": digest,
            "protocol_source": self.proto.source, "backbone": self.proto.backbone.__dict__,
            "inputs": {m: self.proto.inputs_for(m) for m in self.proto.methods},
            "precision": str(self.proto.run.get("precision", "fp32")),
            "seeds": self.proto.seeds, "environment": environment(),
        })
        if prov.get("protocol_hash") != digest:  # another process created it meanwhile
            raise RunError(f"{self.results_dir} holds a run of another protocol version (hash "
                           f"{prov.get('protocol_hash')}, now {digest}). Use a new --results "
                           "directory.")

    # -- resources ------------------------------------------------------------------
    @property
    def mask_resize(self) -> str:
        """``[run] mask_resize``: how masks reach the image size (bench.data; default bilinear)."""
        rule = str(self.proto.run.get("mask_resize", MASK_RESIZES[0]))
        if rule not in MASK_RESIZES:
            raise RunError(f"{self.proto.source}: [run] mask_resize must be one of "
                           f"{', '.join(MASK_RESIZES)}, not {rule!r}")
        return rule

    def loader_options(self, device: torch.device | str) -> dict[str, Any]:
        """``[run] loader_workers`` (decode/resize in worker processes) and pinned memory.

        Default: on a GPU, ``min(8, CPU cores)`` workers and pinned memory, so that decoding
        518-px images does not starve the device; on a CPU, 0 (the cores compute the model).
        Loading is deterministic either way (same order, same tensors).
        """
        cuda = torch.device(device).type == "cuda"
        default = min(8, os.cpu_count() or 1) if cuda else 0
        workers = int(self.proto.run.get("loader_workers", default))
        return {"num_workers": max(0, workers), "pin_memory": cuda}

    @functools.cached_property
    def decoded_cache(self) -> DecodedCache | None:
        """``[run] decoded_cache_mb``: decoded images and masks this process keeps for later
        epochs, seeds and methods (:class:`bench.data.DecodedCache`; same tensors as a fresh
        decode). Default: ``DECODED_CACHE_MB`` where the loader decodes in this process
        (``loader_workers = 0``, the CPU default), none where worker processes decode."""
        in_process = self.loader_options(self.device)["num_workers"] == 0
        mb = float(self.proto.run.get("decoded_cache_mb", DECODED_CACHE_MB if in_process else 0))
        return DecodedCache(int(mb * 2**20)) if mb > 0 else None

    def autocast(self, device: torch.device | str):
        """``[run] precision``: "fp32" (default: the papers' numbers are fp32 unless a paper
        says otherwise) or "bf16"/"fp16" mixed precision (torch.autocast)."""
        import contextlib

        precision = str(self.proto.run.get("precision", "fp32"))
        if precision not in PRECISIONS:
            raise RunError(f"{self.proto.source}: [run] precision must be one of "
                           f"{', '.join(PRECISIONS)}, not {precision!r}")
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=PRECISIONS[precision])

    def backbone(self, method: str) -> ClipBackbone:
        spec = self.proto.backbone_for(method)
        if spec.key() not in self._backbones:
            bb = load_backbone(spec, self.device)
            self._fingerprints[spec.key()] = state_digest(bb.model.state_dict())
            self.store.write_job_provenance(f"backbone-{hash_str(spec.key()):016x}", {"backbones": {
                spec.key(): {**bb.settings(), "label": bb.describe(),
                             "weights_sha256": bb.weights_sha256,
                             "state_digest": self._fingerprints[spec.key()]}}})
            mode = str(self.proto.run.get("feature_cache", "memory"))
            if mode not in ("memory", "disk", "off"):
                raise RunError(f"{self.proto.source}: [run] feature_cache must be memory, disk or "
                               f"off, not {mode!r}")
            dtype = str(self.proto.run.get("feature_cache_dtype", "fp16"))
            if dtype not in CACHE_DTYPES:
                raise RunError(f"{self.proto.source}: [run] feature_cache_dtype must be "
                               f"{' or '.join(CACHE_DTYPES)}, not {dtype!r}")
            if mode != "off":
                directory = None
                if mode == "disk":
                    directory = Path(self.proto.run.get("feature_cache_dir",
                                                        self.results_dir / "feature_cache"))
                # keyed on every setting that changes features (activation, resize, weights)
                bb.feature_cache = FeatureCache(
                    f"{spec.key()}|{bb.describe()}|{self._fingerprints[spec.key()]}",
                    max_bytes=int(float(self.proto.run.get("feature_cache_gb", 4)) * 2**30),
                    directory=directory, dtype=CACHE_DTYPES[dtype])
            self._backbones[spec.key()] = bb
        return self._backbones[spec.key()]

    def check_backbones_untouched(self, job: Job) -> None:
        """A method must never change the shared frozen backbone (others reuse it)."""
        for key, bb in self._backbones.items():
            if state_digest(bb.model.state_dict()) != self._fingerprints[key]:
                raise RunError(f"{job.method} changed the weights of the shared backbone {key} "
                               f"during {job.id}. Methods must copy the modules they adapt "
                               "(e.g. copy.deepcopy(block)) instead of editing the backbone.")

    def dataset(self, name: str) -> DatasetHandle:
        if name not in self._datasets:
            self._datasets[name] = open_dataset(self.proto, name, self.data_root)
        return self._datasets[name]

    def torch_dataset(self, handle: DatasetHandle, rows: pd.DataFrame, image_size: int,
                      class_words: str) -> ManifestDataset:
        """``rows`` of ``handle`` as this run loads them: its mask rule, its decoded cache."""
        return handle.torch_dataset(rows, image_size, class_words, self.mask_resize,
                                    self.decoded_cache)

    def aux_dataset(self, aux: str, image_size: int, class_words: str = "readable"):
        """The training images of an auxiliary split: the test split of its dataset, or the
        union of the test splits of several (``"mvtec+colondb"``), in that order."""
        parts = []
        for name in protocol_mod.aux_parts(aux):
            handle = self.dataset(name)
            rows = handle.manifest[handle.manifest["split"] == "test"]
            parts.append(self.torch_dataset(handle, rows, image_size, class_words))
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def hparams(self, method: str, aux: str) -> dict[str, Any]:
        return self.proto.training_hparams(method, aux)

    # -- running ---------------------------------------------------------------------
    def pending(self, jobs: list[Job]) -> list[Job]:
        done = self.store.done_unit_names()
        return [j for j in jobs if any(j.unit(t) not in done for t in j.targets)]

    def run(self, jobs: list[Job], *, poll: float = 1.0) -> dict[str, int]:
        """Run every job not finished yet, cooperating with any other process on the store.

        A job is claimed before it runs (:meth:`ResultStore.claim`); jobs held by a live
        worker are left to it, and a job whose ``requires`` job is being trained elsewhere
        waits for that checkpoint. Returns once every job is finished (by anyone):
        ``jobs``, ``skipped`` (finished before this call), ``ran`` (by this process),
        ``by_others``, ``records`` (written by this process).
        """
        todo = self.pending(jobs)
        skipped = len(jobs) - len(todo)
        bar = tqdm(total=len(todo), desc="jobs", disable=None if self.progress and self.bars else True,
                   dynamic_ncols=True, file=sys.stderr)
        # without a terminal (CI logs) the bar is off: one line per finished job instead
        lines = self.progress and bar.disable
        written, ran, finished = 0, 0, 0
        while True:
            todo = self.pending(jobs)
            now_finished = len(jobs) - skipped - len(todo)
            bar.update(now_finished - finished)
            finished = now_finished
            if not todo:
                break
            job = self._next_runnable(todo)
            if job is None:  # everything left is held by live workers: wait for them
                time.sleep(poll)
                continue
            claim = self.store.claim(job.id, stale_after=self.stale_after)
            if claim is None:
                continue
            with claim:
                if not self.pending([job]):  # finished by another worker meanwhile
                    continue
                bar.set_postfix_str(job.id)
                t0 = time.perf_counter()
                written += self.run_job(job)
                ran += 1
            if lines:
                print(f"{self.tag}[{finished + 1}/{len(jobs) - skipped}] {job.id} done in "
                      f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
        bar.close()
        self.store.merge()  # the merged records.jsonl view, complete once every job is done
        return {"jobs": len(jobs), "skipped": skipped, "ran": ran,
                "by_others": len(jobs) - skipped - ran, "records": written}

    def _next_runnable(self, todo: list[Job]) -> Job | None:
        """The first pending job that no live worker holds and whose dependency is not being
        trained by another worker right now (its checkpoint then appears soon)."""
        held = self.store.live_claims(self.stale_after)
        for job in todo:
            if job.id in held:
                continue
            cls = METHODS.get(job.method)
            if cls.requires:
                dep = Job(cls.requires, job.aux, job.seed, job.targets)
                if (dep.id in held and METHODS.get(cls.requires).trains
                        and not self.store.checkpoint_path(self.checkpoint_id(dep)).is_file()):
                    continue
            return job
        return None

    def trained_method(self, job: Job):
        """The job's method with its learnable state: loaded from a checkpoint or trained now."""
        name = job.method
        cls = METHODS.get(name)
        bb = self.backbone(name)
        hp = self.hparams(name, job.aux)
        seed_everything(job.seed)
        method = create_method(name, bb, **hp)
        method.to(bb.device)
        ckpt = self.store.load_checkpoint(self.checkpoint_id(job)) if cls.trains else None
        if ckpt is not None:
            method.load_state_dict({k: v.to(bb.device) for k, v in ckpt[0].items()})
            return method
        if cls.requires:  # start from the other method's trained state (same aux, same seed)
            dep = self.trained_method(Job(cls.requires, job.aux, job.seed, job.targets))
            method.init_from(dep.state_dict())
            seed_everything(job.seed)
        if not cls.trains:
            return method
        ds = self.aux_dataset(job.aux, bb.image_size, self.proto.class_words_for(name))
        # the protocol's [hparams], else the paper's (the class default), else [run]'s
        bs = int(hp.get("batch_size", cls.default_hparams.get(
            "batch_size", self.proto.run.get("train_batch_size", 8))))
        loader = DeviceLoader(make_loader(ds, batch_size=bs, shuffle=True, seed=job.seed,
                                          **self.loader_options(bb.device)), bb.device)
        seed_everything(job.seed)
        t0 = time.perf_counter()
        with self.autocast(bb.device):
            method.fit(loader, epochs=hp.get("epochs", cls.default_hparams.get("epochs")),
                       seed=job.seed, progress=_progress(self.progress and self.bars))
        digest = self.store.save_checkpoint(self.checkpoint_id(job), method.state_dict())
        self.store.write_job_provenance(self.checkpoint_id(job), {"checkpoints": {
            self.checkpoint_id(job): {
                "sha256": digest, "train_seconds": round(time.perf_counter() - t0, 3),
                "learnable_params": method.learnable_parameters(),
                "worker": self.store.worker_id, "device": str(bb.device)}}})
        return method

    @staticmethod
    def checkpoint_id(job: Job) -> str:
        """Training does not depend on the targets' shots: one checkpoint per method/aux/seed."""
        return Job(job.method, job.aux, job.seed, job.targets).id

    def run_job(self, job: Job) -> int:
        """Train (or load) the job's method and evaluate every target not committed yet."""
        done = self.store.done_unit_names()
        self.store.log("start", job=job.id)
        method = self.trained_method(job)
        written = 0
        for target in job.targets:
            unit = job.unit(target)
            if unit in done:
                continue
            seed_everything(job.seed)
            t0 = time.perf_counter()
            records = self.evaluate(method, job, self.dataset(target))
            self.check_backbones_untouched(job)
            written += self.store.append_unit(unit, records, seconds=round(time.perf_counter() - t0, 3))
        return written

    def evaluate(self, method, job: Job, target: DatasetHandle) -> list[dict[str, Any]]:
        bb = method.backbone
        test = target.manifest[target.manifest["split"] == "test"]
        bs = int(self.proto.run.get("batch_size", 16))
        records: list[dict[str, Any]] = []
        adapter = target.adapter
        image_level = bool(getattr(adapter, "has_image_labels", True))
        pixel_level = bool(getattr(adapter, "has_masks", True))
        words = self.proto.class_words_for(job.method)
        if job.shots:
            train = target.manifest[(target.manifest["split"] == "train") & (target.manifest["label"] == 0)]
            if train.empty:
                log.warning("%s has no normal training images: no %d-shot records for %s",
                            target.name, job.shots, job.method)
                return []
        for category in sorted(test["category"].unique()):
            rows = test[test["category"] == category]
            if job.shots:
                support = self.support_rows(target, category, job)
                if support is None:
                    continue
                ds_support = self.torch_dataset(target, support, bb.image_size, words)
                method.set_support(collate([ds_support[i] for i in range(len(ds_support))]))
            ds = self.torch_dataset(target, rows, bb.image_size, words)
            loader = make_loader(ds, batch_size=bs, shuffle=False, **self.loader_options(bb.device))
            scores, maps, labels, masks = [], [], [], []
            it = _progress(self.progress and self.bars)(loader, desc=f"{job.method} {target.name}/{category}")
            for batch in it:
                with self.autocast(bb.device):
                    pred = method.predict(to_device(batch, bb.device)).detach()
                scores.append(pred.image_scores.numpy())
                maps.append(pred.anomaly_maps.numpy().astype(np.float32))
                labels.append(batch["label"].numpy())
                masks.append(batch["mask"].numpy() > 0.5)
            s, m = np.concatenate(scores), np.concatenate(maps)
            lab, gt = np.concatenate(labels), np.concatenate(masks)
            finalize = getattr(method, "finalize_category", None)
            if finalize is not None:  # a per-category scoring rule (e.g. AA-CLIP's fusion)
                s, m = finalize(s, m, domain=str(getattr(adapter, "domain", "industrial")))
            values = metrics.category_metrics(lab, s, gt if pixel_level else None,
                                              m if pixel_level else None,
                                              image_level=image_level, pixel_level=pixel_level)
            for (level, metric), value in values.items():
                records.append({"method": job.method, "aux": job.aux, "seed": job.seed,
                                "shots": job.shots, "dataset": target.name, "category": category,
                                "level": level, "metric": metric, "value": float(value),
                                "n_images": int(len(lab)), "backbone": bb.describe()})
            if job.seed == self.proto.seeds[0]:
                self._save_gallery(job, target.name, category, rows, lab, m, gt)
        return records

    def support_rows(self, target: DatasetHandle, category: str, job: Job) -> pd.DataFrame | None:
        """k normal training images of ``category``, drawn with the job's seed.

        Only ``split == "train"`` rows are candidates, so references never overlap the
        evaluated (test) images. The draw depends on (seed, dataset, category) alone.
        """
        m = target.manifest
        pool = m[(m["split"] == "train") & (m["label"] == 0) & (m["category"] == category)]
        if len(pool) < job.shots:
            log.warning("%s/%s has %d normal training images, fewer than %d shots: skipped",
                        target.name, category, len(pool), job.shots)
            return None
        pool = pool.sort_values("image")
        rng = np.random.default_rng([job.seed, hash_str(f"{target.name}/{category}") % 2**32])
        pick = np.sort(rng.choice(len(pool), size=job.shots, replace=False))
        return pool.iloc[pick]

    def _save_gallery(self, job: Job, dataset: str, category: str, rows: pd.DataFrame,
                      labels: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> None:
        """Keep a few maps (same images for every method: selection seeded by name only)."""
        k = int(self.proto.run.get("gallery_per_category", 2))
        if k <= 0:
            return
        rng = np.random.default_rng(abs(hash_str(f"{dataset}/{category}")) % 2**32)
        anomalous = np.flatnonzero(labels == 1)
        pool = anomalous if len(anomalous) >= k else np.arange(len(labels))
        pick = np.sort(rng.choice(pool, size=min(k, len(pool)), replace=False))
        t = torch.from_numpy(maps[pick])[:, None]
        small = torch.nn.functional.interpolate(t, size=(GALLERY_SIZE, GALLERY_SIZE), mode="bilinear",
                                                align_corners=False)[:, 0].numpy()
        gt = torch.from_numpy(masks[pick].astype(np.float32))[:, None]
        gt = torch.nn.functional.interpolate(gt, size=(GALLERY_SIZE, GALLERY_SIZE), mode="nearest")[:, 0]
        shots = f"-k{job.shots}" if job.shots else ""
        path = self.store.dir / "maps" / f"{job.method}{shots}__{job.aux}__{dataset}__{category}.npz"
        root = self.dataset(dataset).root.resolve()
        names = [rows.iloc[i]["image"] for i in pick]
        # the report renders anywhere (another directory, another machine): keep small
        # thumbnails of the images themselves next to the maps; the root is only a fallback
        np.savez_compressed(path, maps=small.astype(np.float16), masks=gt.numpy().astype(bool),
                            images=np.array(names), labels=labels[pick], root=str(root),
                            thumbs=np.stack([_thumbnail(root / n, GALLERY_SIZE) for n in names]))


def _thumbnail(path: Path, size: int) -> np.ndarray:
    """An RGB uint8 thumbnail [size, size, 3] of an image (black if it cannot be read)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
    except (OSError, ValueError):
        return np.zeros((size, size, 3), np.uint8)


def hash_str(s: str) -> int:
    """A process-independent string hash (Python's hash() is salted per process)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big")


def prepare_protocol(name_or_path: str, plugins: Iterable[str] = (),
                     methods: list[str] | None = None) -> protocol_mod.Protocol:
    """Load plugins, read the protocol, check names against the registries, apply --methods."""
    from bench.registry import load_plugin

    for p in plugins:
        load_plugin(p)
    proto = protocol_mod.load(name_or_path)
    proto = protocol_mod.validate(proto, methods=METHODS.names(), datasets=ADAPTERS.names())
    if methods:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise protocol_mod.ProtocolError(f"--methods: unknown {unknown}; registered: "
                                             f"{', '.join(METHODS.names())}")
        proto.methods = [m for m in methods]
    return proto
