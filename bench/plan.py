"""The job graph of a protocol and its cost, as plain data, without running anything.

``zsad-bench plan --protocol full`` needs neither data nor weights:

* **jobs** — (method, aux, seed, shots), each job's ``requires`` (the job whose trained
  state it starts from) in dependency order, and which are already finished in ``--results``;
* **frozen visual paths** — which cached forward passes each method makes (path ``plain``
  or ``vv<start>`` and the tapped blocks), found by running each method's ``predict`` once
  on a probe backbone with the protocol architecture's depth and patch size but a tiny
  width and random weights, through a recording feature cache (so the engine needs no
  knowledge of any method); a method that makes no cached pass (its visual tower is
  adapted) is listed as uncached;
* **forward passes** of CLIP's visual tower with and without the feature cache, and the
  cache's disk need (fp16, or fp32 with ``[run] feature_cache_dtype = "fp32"``);
* **device time** — where ``<results>/cost.jsonl`` holds a profile (``zsad-bench profile
  --results``) of the same architecture and image size: per method, evaluation latency ×
  images plus training steps × step time (an upper bound: it ignores the cache).

Image counts come from the datasets' manifests where ``--data-root`` has them, else from
the published counts the adapters carry.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import protocol as protocol_mod


@dataclass
class PlannedJob:
    id: str
    method: str
    aux: str
    seed: int
    shots: int
    trains: bool
    requires: str | None
    targets: list[str]
    done_targets: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return set(self.done_targets) >= set(self.targets)


@dataclass
class Plan:
    protocol: str
    protocol_hash: str
    jobs: list[PlannedJob]
    images: dict[str, dict[str, Any]]                 # dataset -> {"test": n, "source": ...}
    paths: dict[str, list[dict[str, Any]]]            # method -> [{"path", "layers"}] ([] = uncached)
    backbones: dict[str, dict[str, Any]]              # method -> backbone settings + tokens, width
    forward_passes: dict[str, int]                    # {"with_cache", "without_cache"}
    cache_bytes: int
    cache_dtype: str
    device_hours: dict[str, float] | None = None      # method -> hours (None: no profile)
    profile_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for j, pj in zip(d["jobs"], self.jobs, strict=True):
            j["done"] = pj.done
        d["summary"] = {"jobs": len(self.jobs), "done": sum(j.done for j in self.jobs),
                        "trained_jobs": sum(j.trains for j in self.jobs)}
        return d


# ------------------------------------------------------------------------------------------
def dataset_sizes(proto: protocol_mod.Protocol, data_root: Path | None) -> dict[str, dict[str, Any]]:
    """Test images per dataset: from its manifest if present, else the published counts."""
    from bench import manifest as mf
    from bench.registry import get_adapter
    from bench.runner import dataset_root

    out = {}
    for name in proto.all_datasets():
        adapter = get_adapter(name)
        if data_root is not None:
            path = mf.manifest_path(dataset_root(proto, name, Path(data_root)), name)
            if path.is_file():
                df = mf.read(path)
                out[name] = {"test": int((df["split"] == "test").sum()), "source": "manifest"}
                continue
        counts = getattr(adapter, "published_counts", {}) or {}
        cats = getattr(adapter, "published_category_counts", {}) or {}
        if counts:
            n = int(counts.get("normal", 0)) + int(counts.get("anomalous", 0))
        elif cats:
            n = int(sum(a + b for a, b in cats.values()))
        else:
            n = 0
        out[name] = {"test": n, "source": "published" if n else "unknown"}
    return out


class _RecordingCache:
    """A stand-in for :class:`bench.feature_cache.FeatureCache` that records cached passes."""

    def __init__(self) -> None:
        self.calls: dict[str, set[int]] = {}

    def encode(self, backbone, images, layers):
        self.calls.setdefault("plain", set()).update(layers)
        return backbone.encode_image_uncached(images, sorted(layers))

    def get_or_compute(self, path, images, layers, compute):
        self.calls.setdefault(path, set()).update(layers)
        return compute(images, set(layers))


def probe_backbone(arch: str, patch_grid: int = 6):
    """Random weights with ``arch``'s depths and patch size but a tiny width (layer numbers
    of the methods map exactly as on the real backbone)."""
    import open_clip

    from bench.backbone import load_clip, register_model_configs

    register_model_configs()
    cfg = copy.deepcopy(open_clip.get_model_config(arch))
    if cfg is None:
        raise protocol_mod.ProtocolError(f"unknown architecture {arch}")
    vis, txt = cfg["vision_cfg"], cfg["text_cfg"]
    patch = int(vis.get("patch_size", 16))
    vis.update({"width": 64, "head_width": 64, "image_size": patch * patch_grid})
    vis.pop("mlp_ratio", None)
    txt.update({"width": 64, "heads": 1})
    cfg["embed_dim"] = 32
    name = f"zsad-plan-probe-{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(tmp)
        return load_clip(name, None, patch * patch_grid, seed=0)


def frozen_paths(method: str, hparams: dict[str, Any], backbone) -> list[dict[str, Any]]:
    """The cached visual passes ``method``'s predict makes (on ``backbone``)."""
    import torch

    from bench.registry import create_method
    from methods.base import _toy_batches

    rec = _RecordingCache()
    backbone.feature_cache = rec
    try:
        torch.manual_seed(0)
        m = create_method(method, backbone, **hparams)
        batch = _toy_batches(backbone.image_size, n_batches=1, batch_size=2)[0]
        if getattr(m, "few_shot", False):
            support = dict(batch)
            support["label"] = torch.zeros_like(batch["label"])
            m.set_support(support)
        with torch.no_grad():
            m.predict(batch)
    finally:
        backbone.feature_cache = None
    return [{"path": p, "layers": sorted(ls)} for p, ls in sorted(rec.calls.items())]


def make_plan(proto: protocol_mod.Protocol, *, results_dir: str | Path | None = None,
              data_root: str | Path | None = None, seeds: list[int] | None = None) -> Plan:
    """The plan of ``proto`` (see the module docstring)."""
    import open_clip

    from bench.backbone import native_image_size, register_model_configs
    from bench.registry import METHODS
    from bench.results import read_markers
    from bench.runner import Job, expand

    register_model_configs()
    jobs = expand(proto, seeds)
    done = read_markers(results_dir) if results_dir and Path(results_dir).is_dir() else {}
    planned = []
    for j in jobs:
        cls = METHODS.get(j.method)
        req = Job(cls.requires, j.aux, j.seed, j.targets).id if cls.requires else None
        planned.append(PlannedJob(j.id, j.method, j.aux, j.seed, j.shots, bool(cls.trains), req,
                                  list(j.targets), [t for t in j.targets if j.unit(t) in done]))
    sizes = dataset_sizes(proto, Path(data_root) if data_root else None)
    probes: dict[str, Any] = {}
    paths, backbones = {}, {}
    for m in proto.methods:
        spec = proto.backbone_for(m)
        if spec.arch not in probes:
            probes[spec.arch] = probe_backbone(spec.arch)
        hp = {k: v for k, v in proto.hparams.get(m, {}).items() if k != "epochs"}
        paths[m] = frozen_paths(m, hp, probes[spec.arch])
        cfg = open_clip.get_model_config(spec.arch) or {}
        vis = cfg.get("vision_cfg", {})
        size = spec.image_size or native_image_size(spec.arch) or 224
        tokens = (size // int(vis.get("patch_size", 16))) ** 2 + 1
        backbones[m] = {"key": spec.key(), "arch": spec.arch, "image_size": size, "tokens": tokens,
                        "width": int(vis.get("width", 768)), "embed_dim": int(cfg.get("embed_dim", 512))}
    # forward passes of the visual tower
    cache_dtype = str(proto.run.get("feature_cache_dtype", "fp16"))
    cache_on = str(proto.run.get("feature_cache", "memory")) != "off"
    nbytes = 2 if cache_dtype == "fp16" else 4
    without, with_cache, cache_bytes = 0, 0, 0
    distinct: dict[tuple[str, str], dict[str, Any]] = {}
    for pj in planned:
        n_aux = sum(sizes[d]["test"] for d in protocol_mod.aux_parts(pj.aux))
        n_tgt = sum(sizes[t]["test"] for t in pj.targets)
        epochs = _epochs(proto, pj.method, pj.aux) if pj.trains else 0
        without += epochs * n_aux + n_tgt   # one pass per image and epoch (all paths at once)
        if not paths[pj.method] or not cache_on:
            with_cache += epochs * n_aux + n_tgt
            continue
        for p in paths[pj.method]:
            key = (backbones[pj.method]["key"], p["path"])
            entry = distinct.setdefault(key, {"datasets": set(), "layers": set(),
                                              "method": pj.method})
            entry["layers"].update(p["layers"])
            if pj.trains:
                entry["datasets"].update(protocol_mod.aux_parts(pj.aux))
            entry["datasets"].update(pj.targets)
    for (_, _), entry in distinct.items():
        n = sum(sizes[d]["test"] for d in entry["datasets"])
        with_cache += n
        bb = backbones[entry["method"]]
        per_image = len(entry["layers"]) * bb["tokens"] * bb["width"] + bb["embed_dim"]
        cache_bytes += n * per_image * nbytes
    hours, note = _device_hours(proto, planned, sizes, backbones, results_dir)
    return Plan(proto.name, proto.digest(), planned, sizes, paths,
                {m: {k: v for k, v in b.items()} for m, b in backbones.items()},
                {"with_cache": with_cache, "without_cache": without}, cache_bytes, cache_dtype,
                hours, note)


def _epochs(proto: protocol_mod.Protocol, method: str, aux: str) -> int:
    from bench.registry import METHODS

    hp = proto.training_hparams(method, aux)
    return max(1, int(hp.get("epochs", METHODS.get(method).default_hparams.get("epochs", 1))))


def _device_hours(proto, planned, sizes, backbones, results_dir) -> tuple[dict[str, float] | None, str]:
    if not results_dir or not (Path(results_dir) / "cost.jsonl").is_file():
        return None, "no profile: run `zsad-bench profile --protocol P --results R` on the target device"
    from bench.results import read_jsonl

    cost = read_jsonl(Path(results_dir) / "cost.jsonl")
    hours: dict[str, float] = {}
    missing = []
    for pj in planned:
        bb = backbones[pj.method]
        recs = [r for r in cost if r.get("method") == pj.method and r.get("arch") == bb["arch"]
                and int(r.get("image_size", -1)) == bb["image_size"] and "error" not in r]
        if not recs:
            missing.append(pj.method)
            continue
        r = recs[-1]
        seconds = sum(sizes[t]["test"] for t in pj.targets) * float(r["latency_median_ms"]) / 1e3
        if pj.trains and r.get("train_step_s"):
            n_aux = sum(sizes[d]["test"] for d in protocol_mod.aux_parts(pj.aux))
            steps = _epochs(proto, pj.method, pj.aux) * math.ceil(n_aux / int(r.get("train_batch_size") or 8))
            seconds += steps * float(r["train_step_s"])
        hours[pj.method] = hours.get(pj.method, 0.0) + seconds / 3600
    devices = sorted({str(r.get("device")) for r in cost})
    note = f"from {Path(results_dir) / 'cost.jsonl'} ({', '.join(devices)}); without the cache"
    if missing:
        note += f"; no profile for {', '.join(sorted(set(missing)))}"
    return hours, note


def format_plan(plan: Plan) -> str:
    """The plan as text for a terminal."""
    from tabulate import tabulate

    d = plan.to_dict()
    lines = [f"protocol {plan.protocol} (hash {plan.protocol_hash}): {d['summary']['jobs']} jobs, "
             f"{d['summary']['trained_jobs']} trained, {d['summary']['done']} already done"]
    rows = []
    for j in plan.jobs:
        rows.append([j.id, j.method, j.aux, j.seed, j.shots or "", j.requires or "",
                     f"{len(j.done_targets)}/{len(j.targets)}"])
    lines.append(tabulate(rows, headers=["job (in run order)", "method", "aux", "seed", "shots",
                                         "requires", "targets done"], tablefmt="simple"))
    lines.append("\nimages per dataset (test split): " + ", ".join(
        f"{k} {v['test']}" + ("" if v["source"] == "manifest" else f" ({v['source']})")
        for k, v in plan.images.items()))
    lines.append("frozen visual paths per method (cached passes; '-' = adapted, uncached):")
    for m, ps in plan.paths.items():
        desc = ", ".join(f"{p['path']} blocks {p['layers']}" for p in ps) or "-"
        b = plan.backbones[m]
        lines.append(f"  {m:<14} {desc}   [{b['arch']} @ {b['image_size']}px]")
    fp = plan.forward_passes
    saved = 1 - fp["with_cache"] / fp["without_cache"] if fp["without_cache"] else 0.0
    lines.append(f"visual forward passes: {fp['without_cache']:,} without the cache, "
                 f"{fp['with_cache']:,} with it ({100 * saved:.0f}% saved); cache on disk: "
                 f"{plan.cache_bytes / 2**30:,.1f} GiB ({plan.cache_dtype})")
    if plan.device_hours is None:
        lines.append(f"device time: {plan.profile_note}")
    else:
        total = sum(plan.device_hours.values())
        lines.append(f"device time ({plan.profile_note}): " + ", ".join(
            f"{m} {h:,.2f} h" for m, h in plan.device_hours.items()) + f"; total {total:,.2f} h")
    return "\n".join(lines)
