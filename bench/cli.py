"""`zsad-bench` — the command line (same as ``python -m bench``).

Subcommands: ``list``, ``prepare``, ``plan``, ``run``, ``report``, ``profile``, ``check``,
``manifest``.
Run ``zsad-bench SUBCOMMAND --help`` for each one's options and examples.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from pathlib import Path

# Before torch is imported: idle OpenMP threads sleep instead of spinning. On a shared or
# small machine the spinning made the small matrix products of the demo's tiny model
# several times slower; results do not change. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EXIT_BAD_INPUT = 2

EPILOG = """\
examples:
  zsad-bench list methods
  zsad-bench run --protocol demo --results results/demo      # generated data, toy CLIP, CPU minutes
  zsad-bench report results/demo --out reports/site           # open reports/site/index.html
  zsad-bench prepare mvtec --root /data/mvtec_anomaly_detection
  zsad-bench check --protocol full --data-root /data           # what is missing before a full run
  zsad-bench run --protocol full --data-root /data --methods clip,anomalyclip --seeds 0,1

Results are appended to RESULTS/records.jsonl as each (job, dataset) finishes; re-running
the same command resumes a killed run without losing or repeating anything.
"""


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ints(value: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from err


def _adapter_help() -> str:
    from bench.registry import ADAPTERS

    lines = ["datasets and the layout each expects under --root:"]
    for name, cls in ADAPTERS.items():
        a = cls()
        lines.append(f"\n  {name}: {a.display_name or name} ({a.domain})")
        if a.download_url:
            lines.append(f"    download: {a.download_url}")
        for ln in textwrap.dedent(a.layout or "").strip().splitlines():
            lines.append(f"      {ln}")
    return "\n".join(lines)


def _plugin_option(parser: argparse.ArgumentParser) -> None:
    """``--plugin`` after the subcommand too (``zsad-bench run --protocol demo --plugin x.py``)."""
    parser.add_argument("--plugin", dest="sub_plugins", action="append", default=[],
                        metavar="FILE.py", help="import a file that registers extra methods or "
                        "adapters (repeatable; also accepted before the subcommand)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zsad-bench",
        description="Reproducible benchmark of CLIP-based zero-shot anomaly detection.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                   help="import a file that registers extra methods or adapters (repeatable)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("list", help="list registered methods, datasets or protocols")
    ls.add_argument("what", choices=["methods", "datasets", "protocols"])
    _plugin_option(ls)

    pr = sub.add_parser("prepare", help="scan a raw dataset download into a manifest",
                        description="Scan the raw download in --root, validate it, write "
                        "ROOT/DATASET.manifest.parquet and print counts per category. Bad input "
                        "exits with status 2 and names the file and the fix.",
                        epilog=_adapter_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("dataset", help="canonical dataset id (see `zsad-bench list datasets`)")
    pr.add_argument("--root", required=True, type=Path, help="folder the archive was extracted into")
    pr.add_argument("--strict", action="store_true",
                    help="a count differing from the published one is an error, not a warning")

    rn = sub.add_parser("run", help="run (or resume) a benchmark protocol",
                        description="Expand a protocol into jobs (method x aux x seed), train, "
                        "evaluate every target per category and append records. Re-running resumes.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    rn.add_argument("--protocol", required=True, metavar="NAME_OR_PATH",
                    help="built-in protocol (demo, full) or a .toml file")
    rn.add_argument("--data-root", type=Path, default=Path("data"),
                    help="folder holding one sub-folder per dataset id (default: ./data)")
    rn.add_argument("--results", type=Path, default=None,
                    help="run directory (default: results/<protocol>/<protocol-hash>)")
    rn.add_argument("--methods", type=_csv, default=None, help="comma-separated subset of methods")
    rn.add_argument("--seeds", type=_ints, default=None, help="comma-separated subset of seeds")
    rn.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    rn.add_argument("--no-progress", action="store_true", help="no progress bars")
    rn.add_argument("--workers", type=int, default=1, metavar="N",
                    help="worker processes on this machine (default 1); they share the results "
                    "directory through job claims, as do separate runs started at the same time")
    rn.add_argument("--devices", type=_csv, default=None, metavar="DEV,DEV",
                    help="one device per worker, round-robin (e.g. cuda:0,cuda:1,cuda:2,cuda:3)")
    rn.add_argument("--executor", choices=["local", "slurm", "submitit-local"], default="local",
                    help="local worker processes (default); slurm: one SLURM task per job through "
                    "submitit ([run.slurm] in the protocol); submitit-local: the same submission "
                    "run by submitit's local executor (no cluster; for trying the SLURM path)")
    rn.add_argument("--no-wait", action="store_true",
                    help="with --executor slurm: submit and return without waiting for the tasks")
    _plugin_option(rn)

    pl = sub.add_parser("plan", help="the job graph and its cost, without running anything",
                        description="Print the jobs of a protocol in run order with their "
                        "dependencies, what --results already holds, the frozen visual paths and "
                        "the forward passes the feature cache saves, the cache's disk need, and "
                        "device hours where --results holds a profile of the same backbone "
                        "(`zsad-bench profile --results`). Needs no data and no weights.",
                        epilog="examples:\n  zsad-bench plan --protocol full --data-root /data\n"
                        "  zsad-bench plan --protocol full --results results/full --json > plan.json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("--protocol", required=True, metavar="NAME_OR_PATH")
    pl.add_argument("--data-root", type=Path, default=None,
                    help="read image counts from manifests here (default: published counts)")
    pl.add_argument("--results", type=Path, default=None,
                    help="a run directory: what is done, and cost.jsonl for device hours")
    pl.add_argument("--methods", type=_csv, default=None, help="comma-separated subset of methods")
    pl.add_argument("--seeds", type=_ints, default=None, help="comma-separated subset of seeds")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    _plugin_option(pl)

    ck = sub.add_parser("check", help="list missing datasets and checkpoints of a protocol")
    ck.add_argument("--protocol", required=True, metavar="NAME_OR_PATH")
    ck.add_argument("--data-root", type=Path, default=Path("data"))
    _plugin_option(ck)

    rp = sub.add_parser("report", help="render leaderboards from a result store")
    rp.add_argument("results", type=Path, help="a run directory (or a folder of runs)")
    rp.add_argument("--out", type=Path, default=Path("reports/site"), help="output folder")

    pf = sub.add_parser("profile", help="measure latency, FPS, memory, parameters, FLOPs")
    pf.add_argument("--methods", type=_csv, default=None, help="comma-separated (default: all)")
    pf.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    pf.add_argument("--protocol", default="demo", help="protocol whose backbone settings to use")
    pf.add_argument("--image-size", type=int, default=None)
    pf.add_argument("--results", type=Path, default=None, help="append cost records to this run")
    _plugin_option(pf)

    mn = sub.add_parser("manifest", help="import/export AnomalyCLIP/AdaCLIP meta.json")
    mn.add_argument("action", choices=["export", "import"])
    mn.add_argument("dataset")
    mn.add_argument("--root", required=True, type=Path)
    mn.add_argument("--meta", type=Path, default=None, help="meta.json path (default ROOT/meta.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("root").setLevel(logging.ERROR)
    from bench.registry import RegistryError, load_plugin

    try:
        for plugin in [*args.plugin, *getattr(args, "sub_plugins", [])]:
            load_plugin(plugin)
        return COMMANDS[args.command](args)
    except RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; everything written so far is kept — re-run to resume", file=sys.stderr)
        return 130


def cmd_list(args: argparse.Namespace) -> int:
    from bench.protocol import builtin_names
    from bench.registry import ADAPTERS, METHODS

    if args.what == "methods":
        for name, cls in METHODS.items():
            kind = "trained" if cls.trains else "training-free"
            print(f"{name:<16} {kind:<14} {cls.description()}")
    elif args.what == "datasets":
        for name, cls in ADAPTERS.items():
            print(f"{name:<16} {cls().describe()}")
    else:
        for name in builtin_names():
            print(name)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from bench.manifest import ManifestError
    from bench.registry import ADAPTERS

    if args.dataset not in ADAPTERS:
        print(f"error: unknown dataset '{args.dataset}'. Known: {', '.join(ADAPTERS.names())}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    from bench.prepare import format_counts, prepare_dataset

    try:
        df, warnings = prepare_dataset(args.dataset, args.root, strict=args.strict)
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(format_counts(df))
    from bench.manifest import manifest_path

    print(f"wrote {manifest_path(args.root, args.dataset)}")
    return 0


def _missing(proto, data_root: Path) -> list[str]:
    """Everything a protocol needs that is not on disk, each with where to get it."""
    from bench import manifest as mf
    from bench.backbone import WEIGHT_SOURCES, is_checkpoint_path
    from bench.protocol import TOY_PRETRAINED
    from bench.registry import get_adapter
    from bench.runner import dataset_root

    problems = []
    for name in proto.all_datasets():
        adapter = get_adapter(name)
        root = dataset_root(proto, name, data_root)
        if hasattr(adapter, "generate") or mf.manifest_path(root, name).is_file():
            continue
        if not root.exists() or not adapter.detect(root):
            problems.append(f"dataset {name}: nothing usable at {root}. Download: "
                            f"{adapter.download_url or 'see docs/datasets.md'}; extract there, then "
                            f"`zsad-bench prepare {name} --root {root}`")
    specs = {proto.backbone_for(m).key(): proto.backbone_for(m) for m in proto.methods}
    for spec in specs.values():
        if spec.pretrained in (None, TOY_PRETRAINED):
            continue
        if is_checkpoint_path(spec.pretrained):
            if not Path(spec.pretrained).expanduser().is_file():
                problems.append(f"checkpoint {spec.pretrained} ({spec.arch}) not found: "
                                f"{WEIGHT_SOURCES.get((spec.arch, 'openai'), 'an open_clip state dict')}")
        elif not _tag_cached(spec.arch, spec.pretrained):
            problems.append(f"weights {spec.arch} '{spec.pretrained}' not in the local cache: fetch "
                            f"{WEIGHT_SOURCES.get((spec.arch, spec.pretrained), 'them')} on a connected "
                            "machine and copy the Hugging Face cache (HF_HOME) here, or set "
                            "[backbone] pretrained to the checkpoint's file path")
    return problems


def _tag_cached(arch: str, tag: str) -> bool:
    """True if open_clip's weights ``arch``/``tag`` are in the local Hugging Face cache."""
    import open_clip

    try:
        hub = open_clip.get_pretrained_cfg(arch, tag).get("hf_hub", "")
        from huggingface_hub import try_to_load_from_cache
    except Exception:  # noqa: BLE001 - unknown tag or no hub client: not cached
        return False
    repo_id = "/".join(hub.rstrip("/").split("/")[:2])
    return bool(repo_id) and any(
        isinstance(try_to_load_from_cache(repo_id, f), str)
        for f in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"))


def cmd_check(args: argparse.Namespace) -> int:
    from bench.runner import prepare_protocol

    proto = prepare_protocol(args.protocol)
    problems = _missing(proto, args.data_root)
    for p in problems:
        print(f"missing: {p}")
    print("ready" if not problems else f"{len(problems)} missing item(s); nothing was run")
    return 0 if not problems else EXIT_BAD_INPUT


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from bench.plan import format_plan, make_plan
    from bench.protocol import ProtocolError
    from bench.runner import prepare_protocol

    try:
        proto = prepare_protocol(args.protocol, methods=args.methods)
        plan = make_plan(proto, results_dir=args.results, data_root=args.data_root,
                         seeds=args.seeds)
    except ProtocolError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(plan.to_dict(), indent=2, sort_keys=True) if args.json else format_plan(plan))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from bench.protocol import ProtocolError
    from bench.runner import RunError, Runner, prepare_protocol

    try:
        proto = prepare_protocol(args.protocol, methods=args.methods)
        if args.seeds:
            bad = [s for s in args.seeds if s not in proto.seeds]
            if bad:
                raise ProtocolError(f"--seeds {bad} are not seeds of protocol '{proto.name}' "
                                    f"({proto.seeds})")
        missing = _missing(proto, args.data_root)
        if missing:
            for p in missing:
                print(f"missing: {p}", file=sys.stderr)
            print(f"error: {len(missing)} missing item(s); nothing was run. "
                  f"`zsad-bench check --protocol {args.protocol}` lists them again.", file=sys.stderr)
            return EXIT_BAD_INPUT
        device = args.device or proto.run.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        results = args.results or Path("results") / proto.name / proto.digest()
        Runner(proto, results, args.data_root, device=device, progress=False)  # checks the store
        from bench.executors import LocalExecutor, SubmititExecutor, WorkerSpec

        protocol = Path(args.protocol)  # absolute paths: workers may run elsewhere (SLURM)
        spec = WorkerSpec(protocol=str(protocol.resolve()) if protocol.exists() else args.protocol,
                          results=str(Path(results).resolve()),
                          data_root=str(Path(args.data_root).resolve()),
                          plugins=[str(Path(x).resolve()) for x in
                                   [*args.plugin, *getattr(args, "sub_plugins", [])]],
                          methods=args.methods, seeds=args.seeds, device=device,
                          progress=not args.no_progress)
        if args.executor == "local":
            summary = LocalExecutor(args.workers, args.devices).run(spec)
        else:
            cluster = "slurm" if args.executor == "slurm" else "local"
            summary = SubmititExecutor(Path(results) / "slurm", cluster=cluster,
                                       max_parallel=args.workers if args.workers > 1 else None,
                                       wait=not args.no_wait).run(spec)
            print(f"{summary['submitted']} task(s) submitted, {summary['skipped']} job(s) already "
                  f"complete, {summary['held_elsewhere']} running elsewhere, "
                  f"{summary['queued_before']} queued before", file=sys.stderr)
    except (ProtocolError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{summary['ran']} job(s) run, {summary['skipped']} already complete, "
          f"{summary['records']} record(s) written to {results / 'records.jsonl'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report import render

    try:
        index = render(args.results, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {index}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from bench.profiling import profile_cli

    return profile_cli(args)


def cmd_manifest(args: argparse.Namespace) -> int:
    """Convert between our manifest and AnomalyCLIP/AdaCLIP's meta.json."""
    from bench import manifest as mf
    from bench import metajson

    meta = args.meta or args.root / "meta.json"
    try:
        if args.action == "export":
            df = mf.read(mf.manifest_path(args.root, args.dataset))
            path = metajson.export_meta({args.dataset: df}, meta, roots={args.dataset: args.root})
        else:
            df = metajson.import_meta(meta, args.dataset, root=args.root)
            path = mf.write(df, mf.manifest_path(args.root, args.dataset))
    except (mf.ManifestError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {path}")
    return 0


COMMANDS = {"list": cmd_list, "prepare": cmd_prepare, "run": cmd_run, "check": cmd_check,
            "plan": cmd_plan,
            "report": cmd_report, "profile": cmd_profile, "manifest": cmd_manifest}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
