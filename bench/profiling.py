"""Cost of every method: latency, FPS, peak memory, parameters, FLOPs.

``zsad-bench profile --methods a,b [--device cpu|cuda] [--image-size N] [--results DIR]``
measures, per method, on the protocol's backbone (``--protocol``, default ``demo``):

* **latency** at batch size 1 on a preprocessed tensor already on the device
  (``predict`` only: no decoding or resizing): the first call is timed on its own,
  then ``warmup`` (≥ 10) untimed and ``iters`` (≥ 50) timed calls, the device
  synchronised before every clock read; median and p90; **FPS = 1 / median**. Also
  recorded: the minimum, and the median *process CPU time* per call, which on a shared
  CPU measures the work rather than the time spent waiting for a core (with several
  intra-op threads it sums them).
* **one-off setup** = first call − median: what a method computes once and caches
  (text features of its prompt ensembles, lazily built buffers); excluded from FPS.
* **peak memory** of one inference call (batch 1) and of one training step at the
  training batch size (``fit`` over a single batch, one epoch; trained methods only):

  - CUDA: ``torch.cuda.reset_peak_memory_stats()`` then ``max_memory_allocated()``:
    everything allocated on the device, weights included;
  - CPU: the same quantity from the allocator's own bookkeeping: ``torch.profiler``
    with ``profile_memory=True`` records every CPU allocation and free with the running
    total of bytes allocated since the profiler started; the peak of that total is the
    step's extra memory, to which the bytes of all parameters and buffers resident
    before the step are added. (Process RSS is not used: it counts the Python heap,
    the allocator's cache and other threads.)

  ``*_extra_mib`` is the part above what was allocated before the step (activations,
  temporaries, optimiser state).
* **parameters**: learnable (``Method.learnable_parameters()``) and total (every
  distinct parameter of the backbone and the method's modules);
* **GFLOPs per image**: ``torch.utils.flop_counter.FlopCounterMode`` over one
  steady-state ``predict`` call (matmuls, convolutions, attention; 1 multiply-add = 2
  FLOPs, so tools that count MACs, e.g. fvcore or thop, print half; element-wise
  operations are not counted). ``nn.MultiheadAttention``'s fused inference fast path is
  switched off while counting (the counter cannot see inside it) and the CPU attention
  kernel gets the same formula as the CUDA ones.

Cost does not depend on the weights, so where the protocol's weights are not available
(the toy checkpoint not built, an open_clip tag not cached) the same architecture is
profiled with random weights, and the output says so. On a CPU only ratios between
methods measured in one run mean anything; the report says so.

Records are appended to ``RESULTS/cost.jsonl`` (:meth:`bench.results.ResultStore.append_cost`)
with the device name, so the report can show them next to the accuracy.

Example:
    >>> from bench.profiling import profile
    >>> recs = profile(["clip"], protocol="demo", device="cpu", iters=50)   # doctest: +SKIP
    >>> recs[0]["fps"] > 0                                                  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("zsad_bench.profiling")

MIB = 1024 * 1024
MIN_WARMUP, MIN_ITERS = 10, 50


# ------------------------------------------------------------------------------------
# devices and clocks
# ------------------------------------------------------------------------------------
def device_name(device: torch.device | str) -> str:
    """A human-readable name of the device (GPU model, or CPU model and thread count)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "cpu"
    return f"CPU {model} ({torch.get_num_threads()} thread(s))"


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device | str, *, warmup: int = MIN_WARMUP,
               iters: int = MIN_ITERS, cpu_times: list[float] | None = None) -> list[float]:
    """Wall seconds of ``iters`` calls of ``fn`` after ``warmup`` untimed ones (device synchronised).

    If ``cpu_times`` is given, the process CPU time of each timed call is appended to it:
    on a shared CPU it grows with the work done, not with the time spent descheduled.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(iters):
        synchronize(device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - c0)
    return out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]) of a non-empty list."""
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# ------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------
def resident_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the distinct parameters and buffers of ``modules``."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the CPU allocator's running total (bytes allocated since the start) during ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as fh:
            trace = json.load(fh)
    finally:
        os.unlink(path)
    peak = 0
    for ev in trace.get("traceEvents", []):
        if ev.get("name") != "[memory]":
            continue
        args = ev.get("args", {})
        if int(args.get("Device Type", 0)) != 0:  # 0 = CPU
            continue
        peak = max(peak, int(args.get("Total Allocated", 0)))
    return peak


def peak_memory(fn: Callable[[], Any], device: torch.device | str,
                resident: int = 0) -> tuple[float, float, str]:
    """(peak MiB, extra MiB above the start, how it was measured) of one call of ``fn``.

    CUDA: ``max_memory_allocated`` after a reset (absolute; extra = minus
    ``memory_allocated`` before). CPU: ``resident`` bytes plus the peak of the allocator's
    running total recorded by ``torch.profiler(profile_memory=True)``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak / MIB, (peak - before) / MIB, "cuda.max_memory_allocated after reset"
    extra = _cpu_peak_bytes(fn)
    return (resident + extra) / MIB, extra / MIB, \
        "resident params+buffers + peak CPU allocator total (torch.profiler profile_memory)"


# ------------------------------------------------------------------------------------
# FLOPs and parameters
# ------------------------------------------------------------------------------------
def _raw(formula: Callable[..., int]) -> Callable[..., int]:
    """A registry formula (already taking tensors) marked so the counter does not re-wrap it."""

    def f(*args: Any, **kwargs: Any) -> int:
        return formula(*args, **kwargs)

    f._get_raw = True  # type: ignore[attr-defined]
    return f


def count_flops(fn: Callable[[], Any]) -> float:
    """Total FLOPs of one call of ``fn`` (``torch.utils.flop_counter``)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    custom = {}
    # CPU attention kernels that the flop registry does not know (same formulas as CUDA's)
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", fc.sdpa_flop),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward",
                           fc.sdpa_backward_flop)):
        op = getattr(aten, name, None)
        if op is not None:
            custom[op] = _raw(formula)
    counter = fc.FlopCounterMode(display=False, custom_mapping=custom)
    # nn.MultiheadAttention's inference fast path is one fused op the counter cannot see
    # (it would miss the QKV and output projections): count the composite path instead.
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with counter:
            fn()
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fast)
    return float(counter.get_total_flops())


def method_modules(method: Any) -> list[nn.Module]:
    """The backbone, the head and any other module a method holds as an attribute."""
    mods: list[nn.Module] = []
    for v in [getattr(method, "backbone", None), getattr(method, "head", None),
              *vars(method).values()]:
        if isinstance(v, nn.Module) and all(v is not m for m in mods):
            mods.append(v)
    return mods


def count_parameters(modules: Iterable[nn.Module]) -> int:
    seen: set[int] = set()
    n = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


# ------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------
def make_batch(image_size: int, batch_size: int = 1, *, device: torch.device | str = "cpu",
               seed: int = 0) -> dict[str, Any]:
    """A preprocessed batch like the loader's: half of it anomalous with a square mask."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    mask = torch.zeros(batch_size, image_size, image_size)
    label = torch.tensor([i % 2 for i in range(batch_size)])
    s = max(1, image_size // 4)
    for i in range(batch_size):
        if label[i]:
            mask[i, s:2 * s, s:2 * s] = 1
    return {"image": img.to(device), "mask": mask.to(device), "label": label.to(device),
            "category": ["object"] * batch_size, "prompt_name": ["object"] * batch_size,
            "dataset": ["profile"] * batch_size, "domain": ["industrial"] * batch_size}


# ------------------------------------------------------------------------------------
# one method
# ------------------------------------------------------------------------------------
def _grad_context(cls: type) -> contextlib.AbstractContextManager:
    """Gradients only where inference adapts at test time (seeded, training-free methods)."""
    needs = getattr(cls, "predict_needs_grad", None)
    if needs is None:
        needs = cls.is_seeded() and not cls.trains
    return torch.enable_grad() if needs else torch.no_grad()


def _new_method(name: str, backbone: Any, hparams: dict[str, Any], seed: int = 0) -> Any:
    from bench.registry import METHODS, create_method

    torch.manual_seed(seed)
    method = create_method(name, backbone, **hparams)
    method.to(backbone.device)
    cls = METHODS.get(name)
    if cls.requires:
        try:
            dep = create_method(cls.requires, backbone, **hparams.get("_requires", {}))
            dep.to(backbone.device)
            method.init_from(dep.state_dict())
        except Exception as err:  # noqa: BLE001 - cost does not need the dependency's state
            log.info("%s: init_from(%s) skipped for profiling: %s", name, cls.requires, err)
    return method


def profile_method(name: str, backbone: Any, *, hparams: dict[str, Any] | None = None,
                   warmup: int = MIN_WARMUP, iters: int = MIN_ITERS,
                   train_batch_size: int = 8, train: bool = True, shots: int = 1) -> dict[str, Any]:
    """Measure one method on ``backbone`` (already on its device). Returns one cost record.

    Few-shot methods get ``shots`` normal reference images through ``set_support`` first;
    that call is timed on its own (``support_s``) and, like the first call, not in FPS.
    """
    from bench.registry import METHODS

    if warmup < MIN_WARMUP or iters < MIN_ITERS:
        raise ValueError(f"profiling needs warmup >= {MIN_WARMUP} and iters >= {MIN_ITERS} "
                         f"(got {warmup}, {iters})")
    cls = METHODS.get(name)
    hparams = dict(hparams or {})
    device = backbone.device
    method = _new_method(name, backbone, hparams)
    if method.head is not None:
        method.head.eval()
    batch = make_batch(backbone.image_size, 1, device=device, seed=0)
    support_s = None
    if getattr(cls, "few_shot", False):
        support = make_batch(backbone.image_size, shots, device=device, seed=2)
        support["label"] = torch.zeros_like(support["label"])
        support["mask"] = torch.zeros_like(support["mask"])
        synchronize(device)
        t0 = time.perf_counter()
        with _grad_context(cls):
            method.set_support(support)
        synchronize(device)
        support_s = time.perf_counter() - t0

    def infer() -> Any:
        with _grad_context(cls):
            return method.predict(batch)

    synchronize(device)
    t0 = time.perf_counter()
    infer()  # first call: builds text features and caches
    synchronize(device)
    first = time.perf_counter() - t0
    cpu: list[float] = []
    times = time_calls(infer, device, warmup=warmup, iters=iters, cpu_times=cpu)
    median = statistics.median(times)
    modules = method_modules(method)
    resident = resident_bytes(modules)
    infer_peak, infer_extra, how = peak_memory(infer, device, resident)
    flops = count_flops(infer)

    rec: dict[str, Any] = {
        "method": name, "trains": bool(cls.trains),
        "device": device_name(device), "device_type": torch.device(device).type,
        "backbone": backbone.describe(), "arch": backbone.arch,
        "image_size": int(backbone.image_size), "dtype": str(next(iter(
            backbone.parameters())).dtype).replace("torch.", ""),
        "batch_size": 1, "warmup": warmup, "iters": iters,
        "latency_median_ms": median * 1e3, "latency_p90_ms": percentile(times, 90) * 1e3,
        "latency_mean_ms": statistics.fmean(times) * 1e3, "latency_min_ms": min(times) * 1e3,
        "cpu_time_median_ms": statistics.median(cpu) * 1e3, "fps": 1.0 / median,
        "first_call_ms": first * 1e3, "one_off_s": max(0.0, first - median),
        "shots": shots if getattr(cls, "few_shot", False) else 0, "support_s": support_s,
        "infer_peak_mib": infer_peak, "infer_extra_mib": infer_extra,
        "train_peak_mib": None, "train_extra_mib": None, "train_step_s": None,
        "train_batch_size": None,
        "learnable_params": int(method.learnable_parameters()),
        "total_params": count_parameters(modules),
        "gflops": flops / 1e9, "memory_method": how,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if train and cls.trains:
        rec.update(_train_step_cost(name, backbone, hparams, train_batch_size))
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rec


def method_gflops(name: str, backbone: Any, *, hparams: dict[str, Any] | None = None,
                  shots: int = 1) -> dict[str, float]:
    """GFLOPs of the first ``predict`` call (with one-off work) and of a steady-state one.

    No timing: one call each, so this is affordable for the full protocol's backbone on a
    CPU (FLOPs do not depend on the device or the weights).
    """
    from bench.registry import METHODS

    cls = METHODS.get(name)
    method = _new_method(name, backbone, dict(hparams or {}))
    if method.head is not None:
        method.head.eval()
    device = backbone.device
    if getattr(cls, "few_shot", False):
        support = make_batch(backbone.image_size, shots, device=device, seed=2)
        support["label"] = torch.zeros_like(support["label"])
        support["mask"] = torch.zeros_like(support["mask"])
        with _grad_context(cls):
            method.set_support(support)
    batch = make_batch(backbone.image_size, 1, device=device, seed=0)

    def infer() -> Any:
        with _grad_context(cls):
            return method.predict(batch)

    first = count_flops(infer)
    steady = count_flops(infer)
    return {"gflops": steady / 1e9, "first_call_gflops": first / 1e9,
            "learnable_params": float(method.learnable_parameters()),
            "total_params": float(count_parameters(method_modules(method)))}


def _train_step_cost(name: str, backbone: Any, hparams: dict[str, Any],
                     batch_size: int) -> dict[str, Any]:
    """Peak memory and time of one training step (``fit`` over one batch, one epoch)."""
    device = backbone.device
    batch = make_batch(backbone.image_size, batch_size, device=device, seed=1)
    holder: dict[str, Any] = {}

    def step() -> None:
        m = _new_method(name, backbone, hparams, seed=0)
        holder["m"] = m
        m.fit([batch], epochs=1, seed=0, progress=iter)

    step()  # first step: lazy initialisation (optimiser, caches) out of the timing
    resident = resident_bytes(method_modules(holder.pop("m")))
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    seconds = time.perf_counter() - t0
    holder.clear()
    peak, extra, _ = peak_memory(step, device, resident)
    holder.clear()
    return {"train_peak_mib": peak, "train_extra_mib": extra, "train_step_s": seconds,
            "train_batch_size": batch_size}


# ------------------------------------------------------------------------------------
# many methods, on a protocol's backbone
# ------------------------------------------------------------------------------------
def load_backbone(spec: Any, device: str, image_size: int | None = None) -> tuple[Any, str]:
    """The backbone of a protocol's spec, or random weights of the same architecture.

    Returns ``(backbone, note)``; ``note`` is empty when the protocol's weights were loaded.
    """
    from bench import protocol as protocol_mod
    from bench.backbone import load_clip, resolve_activation

    size = image_size or spec.image_size
    settings = spec.load_kwargs() if hasattr(spec, "load_kwargs") else {}
    pretrained, note = spec.pretrained, ""
    if pretrained == protocol_mod.TOY_PRETRAINED:
        try:
            from bench.demo.toyclip import checkpoint_path

            try:  # never spend minutes building the toy checkpoint just to time it
                pretrained = str(checkpoint_path(build=False))
            except TypeError:  # an older checkpoint_path() without ``build``
                pretrained = str(checkpoint_path())
        except Exception as err:  # noqa: BLE001 - toy checkpoint not available: random weights
            pretrained = None
            note = (f"random weights of {spec.arch} (toy checkpoint unavailable: "
                    f"{type(err).__name__}: {err}); cost does not depend on the weights")
    if pretrained is not None:
        try:
            return load_clip(spec.arch, pretrained, size, device, **settings), note
        except Exception as err:  # noqa: BLE001 - weights not here: random weights
            note = (f"random weights of {spec.arch} ({spec.pretrained!r} not loadable here: "
                    f"{type(err).__name__}); cost does not depend on the weights")
    # random weights with the activation and resize the real ones would get
    settings["activation"] = resolve_activation(spec.arch, spec.pretrained, settings.get("activation"))
    return load_clip(spec.arch, None, size, device, seed=0, **settings), note


def profile(methods: list[str] | None = None, *, protocol: str = "demo", device: str = "cpu",
            image_size: int | None = None, warmup: int = MIN_WARMUP, iters: int = MIN_ITERS,
            train: bool = True, on_error: str = "record",
            echo: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Profile ``methods`` (default: every registered one) on ``protocol``'s backbone(s).

    ``on_error="record"`` keeps going when a method fails and returns a record with an
    ``error`` field for it; ``"raise"`` re-raises.
    """
    from bench import protocol as protocol_mod
    from bench.registry import METHODS

    proto = protocol_mod.load(protocol)
    names = list(methods) if methods else METHODS.names()
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; registered: {', '.join(METHODS.names())}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device visible to torch on this machine")
    backbones: dict[str, tuple[Any, str]] = {}
    out = []
    for name in names:
        spec = proto.backbone_for(name)
        key = f"{spec.key()}|{image_size}"
        if key not in backbones:
            backbones[key] = load_backbone(spec, device, image_size)
            if backbones[key][1] and echo:
                echo(f"note: {backbones[key][1]}")
        bb, note = backbones[key]
        hp = dict(proto.hparams.get(name, {}))
        tbs = int(hp.get("batch_size", METHODS.get(name).default_hparams.get(
            "batch_size", proto.run.get("train_batch_size", 8))))
        shots = (getattr(proto, "few_shot", {}) or {}).get(name) or [1]
        shots = int(shots[0] if isinstance(shots, list | tuple) else shots)
        if echo:
            echo(f"profiling {name} on {bb.describe()} ({device}) ...")
        try:
            rec = profile_method(name, bb, hparams=hp, warmup=warmup, iters=iters,
                                 train_batch_size=tbs, train=train, shots=shots)
        except Exception as err:
            if on_error == "raise":
                raise
            log.exception("profiling %s failed", name)
            rec = {"method": name, "device": device_name(device), "device_type": device,
                   "backbone": bb.describe(), "image_size": bb.image_size,
                   "error": f"{type(err).__name__}: {err}"}
        rec["weights"] = note or "as in the protocol"
        rec["protocol"] = proto.name
        out.append(rec)
    return out


def format_table(records: list[dict[str, Any]]) -> str:
    """The cost records as a plain-text table, with the latency ratio to the fastest."""
    from tabulate import tabulate

    ok = [r for r in records if "error" not in r]
    ref = min((r["latency_median_ms"] for r in ok), default=math.nan)
    clip = [r["latency_median_ms"] for r in ok if r["method"] == "clip"]
    ref = clip[0] if clip else ref
    rows, failed = [], []
    for r in records:
        if "error" in r:
            failed.append(f"{r['method']}: failed: {r['error']}")
            continue

        def f(v: Any, d: int = 1) -> str:
            return "–" if v is None else f"{v:,.{d}f}"

        rows.append([r["method"], f(r["latency_median_ms"], 2), f(r["latency_p90_ms"], 2),
                     f(r["fps"], 1), f(r["latency_median_ms"] / ref, 2),
                     f(r["infer_peak_mib"]), f(r["train_peak_mib"]),
                     f(r["learnable_params"], 0), f(r["total_params"], 0), f(r["gflops"], 3),
                     f(r["one_off_s"], 3)])
    headers = ["method", "median ms", "p90 ms", "FPS", "÷ " + ("clip" if clip else "fastest"),
               "infer MiB", "train MiB", "learnable", "total params", "GFLOPs", "one-off s"]
    text = tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)
    return text + ("\n" + "\n".join(failed) if failed else "")


def profile_cli(args: argparse.Namespace) -> int:
    """``zsad-bench profile``: measure, print the table, append to ``--results`` if given."""
    from bench.protocol import ProtocolError
    from bench.registry import RegistryError
    from bench.results import ResultStore

    def echo(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        records = profile(getattr(args, "methods", None), protocol=getattr(args, "protocol", "demo"),
                          device=getattr(args, "device", "cpu") or "cpu",
                          image_size=getattr(args, "image_size", None),
                          warmup=int(getattr(args, "warmup", MIN_WARMUP) or MIN_WARMUP),
                          iters=int(getattr(args, "iters", MIN_ITERS) or MIN_ITERS), echo=echo)
    except (ValueError, RuntimeError, ProtocolError, RegistryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(records))
    dev = records[0]["device"] if records else ""
    if records and records[0].get("device_type") == "cpu":
        print(f"\nMeasured on {dev}: on a CPU only the ratios between methods of this run mean "
              "anything (column '÷ ...').")
    results = getattr(args, "results", None)
    if results:
        ResultStore(Path(results)).append_cost([r for r in records if "error" not in r])
        print(f"appended {sum('error' not in r for r in records)} cost record(s) to "
              f"{Path(results) / 'cost.jsonl'}")
    else:
        print("(not stored: pass --results RUN_DIR to add these to a result store and the report)")
    return 1 if any("error" in r for r in records) else 0
