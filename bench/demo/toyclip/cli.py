"""The toy CLIP's command line (``python -m bench.demo.toyclip``): train, write the
checkpoint, optionally evaluate it and verify its hash."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench.demo.toyclip.arch import ARCH, IMAGE_SIZE
from bench.demo.toyclip.checkpoint import (
    CHECKPOINT_NAME,
    CHECKPOINT_SHA256,
    save_checkpoint,
    state_dict_fp16,
)
from bench.demo.toyclip.evaluation import PAIR_PROMPTS, _fmt, evaluate
from bench.demo.toyclip.training import RECIPE_SHA256, RECIPES, TrainConfig, train

# -- command line ------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None, *, prog: str = "python -m bench.demo.toyclip") -> int:
    from bench.demo import toyclip  # its docstring describes the toy CLIP

    p = argparse.ArgumentParser(prog=prog, description=toyclip.__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(CHECKPOINT_NAME), help="checkpoint file to write")
    p.add_argument("--eval", action="store_true", help="print zero-shot AUROCs on demo_target")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate during training (debug)")
    p.add_argument("--verify", action="store_true",
                   help="fail unless the written file has the recorded CHECKPOINT_SHA256")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="free-patches",
                   help="named settings (default free-patches, the shipped checkpoint; "
                        "aligned-patches trains the patch tokens against the state prompts, "
                        "the recipe shipped before issue 15); the flags below override them")
    for f, v in asdict(TrainConfig()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=None,
                       help=f"default {v} (or the recipe's)")
    args = p.parse_args(argv)
    cfg = TrainConfig.recipe(args.recipe, **{f: getattr(args, f) for f in asdict(TrainConfig())
                                             if getattr(args, f) is not None})
    bb = train(cfg, progress=not args.no_progress, eval_every=args.eval_every)
    sha = save_checkpoint(state_dict_fp16(bb.model), args.out)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB) sha256 {sha}")
    if args.eval:
        from bench.backbone import load_clip

        loaded = load_clip(ARCH, pretrained=str(args.out), image_size=IMAGE_SIZE)
        print(f"zero-shot on demo_target, prompt ensemble: {_fmt(evaluate(loaded))}")
        print(f"zero-shot on demo_target, normal/abnormal pair: "
              f"{_fmt(evaluate(loaded, prompts=PAIR_PROMPTS))}")
    if args.verify:
        if cfg != TrainConfig.recipe(args.recipe):
            print(f"--verify compares against the {args.recipe} recipe's settings; "
                  "other flags given", file=sys.stderr)
            return 1
        expected = RECIPE_SHA256[args.recipe]
        if sha != expected:
            print(f"sha256 {sha} differs from the recorded {expected} ({args.recipe})",
                  file=sys.stderr)
            return 1
        print(f"sha256 matches the recorded {args.recipe} checkpoint"
              + (" (the shipped one)" if expected == CHECKPOINT_SHA256 else ""))
    return 0

