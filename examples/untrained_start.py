"""Where training starts from: trained methods evaluated before ``fit``, every seed.

Builds each method exactly as the runner does for a job (the protocol's backbone,
hyperparameters and class words; the job's seed for the fresh prompts, projections or
adapters), skips ``fit`` and evaluates it on the protocol's target like a trained one.
Compare the result with the trained rows of the same protocol ("learns on the demo",
docs/methods.md). Records are not written to any result store.

    python examples/untrained_start.py faprompt,adaclip,aaclip --data-root data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

from bench.registry import create_method
from bench.runner import Job, Runner, prepare_protocol, seed_everything


def untrained(method: str, protocol: str, data_root: Path, seeds: list[int] | None = None,
              plugins: list[str] | None = None) -> dict[int, dict[str, float]]:
    """seed -> {"image": AUROC, "pixel": AUROC} (means over the first target's categories)."""
    proto = prepare_protocol(protocol, plugins=plugins or [], methods=[method])
    transfer = proto.transfers[0]
    with TemporaryDirectory() as results:
        runner = Runner(proto, Path(results), data_root, progress=False)
        target = runner.dataset(transfer.targets[0])
        out = {}
        for seed in seeds if seeds is not None else proto.seeds:
            job = Job(method, transfer.aux, seed, tuple(transfer.targets))
            bb = runner.backbone(method)
            seed_everything(seed)
            m = create_method(method, bb, **runner.hparams(method, transfer.aux))
            m.to(bb.device)
            seed_everything(seed)
            recs = runner.evaluate(m, job, target)
            out[seed] = {level: float(np.nanmean([r["value"] for r in recs if r["level"] == level
                                                  and r["metric"] == "auroc" and not r.get("shots")]))
                         for level in ("image", "pixel")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("methods", help="comma-separated trained methods")
    p.add_argument("--protocol", default="demo")
    p.add_argument("--data-root", type=Path, default=Path("data"))
    p.add_argument("--seeds", default=None, help="comma-separated (default: the protocol's)")
    p.add_argument("--plugin", action="append", default=[])
    p.add_argument("--json", type=Path, help="also write the per-seed figures here")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    everything = {}
    for method in args.methods.split(","):
        res = untrained(method, args.protocol, args.data_root, seeds, args.plugin)
        everything[method] = res
        line = []
        for level in ("pixel", "image"):
            v = np.array([r[level] for r in res.values()]) * 100
            line.append(f"{level} {v.mean():.1f} ± {v.std():.1f}")
        print(f"{method} untrained ({len(res)} seeds): " + ", ".join(line), flush=True)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
