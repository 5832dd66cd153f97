"""How much the mask-resizing rule moves the pixel metrics (issue 14, item 4).

The anchors' released code (AnomalyCLIP, VAND) resizes each full-size mask bilinearly to the
evaluation size and keeps values > 0.5; AF-CLIP's resizes bicubically; the suite used to resize
the binary mask with nearest neighbour. All give the same mask away from defect borders; at
the borders they disagree.

This script draws full-size masks with the shapes of the synthetic defects
(``bench.demo.synthetic``: scratches, cracks, holes, stains, cut-paste patches) on canvases of
MVTec AD's and VisA's sizes, resizes them to 518 px both ways, and scores the *same* anomaly
maps against both: maps that follow the defect with a soft border (a blurred copy of the mask
at the evaluation size, plus noise), as a good ZSAD method's maps do. It prints the share of
mask pixels that differ and, per other rule, the change of pixel AUROC, AUPRO, AP and F1-max
(points; other rule minus bilinear).

    python examples/mask_resize.py [--images 60] [--size 518] [--seed 0] [--noise 0.6]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from bench import metrics
from bench.data import resize_mask
from bench.demo.synthetic import DEFECTS, apply_defect

CANVASES = (1024, 900, 700, 1500)  # MVTec AD images are 700-1024 px; VisA's ~1500 px


def draw_masks(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        side = CANVASES[i % len(CANVASES)]
        small = 256  # draw at 256 px (the generator's scale), upsample like a hand-drawn mask
        img = rng.uniform(0.3, 0.7, (small, small, 3))
        kinds = sorted(DEFECTS)
        _, mask = apply_defect(kinds[i % len(kinds)], (img * 255).astype(np.uint8), rng)
        t = torch.from_numpy(mask.astype(np.float32))[None, None]
        big = torch.nn.functional.interpolate(t, size=(side, side), mode="bilinear",
                                              align_corners=False)[0, 0].numpy() > 0.5
        out.append(big)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.6,
                    help="std of the noise added to the maps (0.6: pixel AUROC ~90, like the papers')")
    args = ap.parse_args(argv)
    full = draw_masks(args.images, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    bil = np.stack([resize_mask(m, args.size, "bilinear").numpy() > 0 for m in full])
    others = {rule: np.stack([resize_mask(m, args.size, rule).numpy() > 0 for m in full])
              for rule in ("nearest", "bicubic")}
    # one map per image, shared by both evaluations: the defect with a soft edge, plus noise
    maps = np.stack([gaussian_filter(b.astype(np.float32), 4) + rng.normal(0, args.noise, b.shape)
                     for b in bil]).astype(np.float32)
    print(f"{len(full)} masks ({', '.join(map(str, CANVASES))} px canvases) -> {args.size} px; "
          f"{int(bil.sum())} anomalous pixels with the bilinear rule")
    for rule, other in others.items():
        diff = bil != other
        print(f"{rule}: mask pixels that differ from bilinear: {int(diff.sum())} "
              f"({100 * diff.sum() / max(bil.sum(), 1):.2f}% of the anomalous ones), in "
              f"{int(diff.any(axis=(1, 2)).sum())} images")
    for name, fn in (("pixel AUROC", metrics.pixel_auroc), ("AUPRO", metrics.aupro),
                     ("pixel AP", metrics.pixel_ap), ("pixel F1-max", metrics.pixel_f1_max)):
        a = 100 * fn(bil, maps)
        cells = "   ".join(f"{rule} {100 * fn(o, maps) - a:+.3f}" for rule, o in others.items())
        print(f"{name:<13} bilinear {a:7.3f}   {cells}")

if __name__ == "__main__":
    main()
