"""A small, fabricated result store for the report tests (no model runs, seconds to build).

Three methods (``clip`` is registered; ``anomalyclip`` and ``tokenclip`` may not be yet,
which also exercises missing metadata), five seeds for the trained ones, four datasets
over two domains, undefined metrics (NaN), gallery maps with real image files, cost
records and provenance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from bench.results import ResultStore

DATASETS = {
    # dataset: (aux, categories, image metrics?, pixel metrics?)
    "mvtec": ("visa", ["bottle", "cable"], True, True),
    "visa": ("mvtec", ["candle", "pcb1"], True, True),
    "headct": ("mvtec", ["headct"], True, False),
    "isic": ("mvtec", ["isic"], False, True),
}
METHODS = {"clip": 1, "anomalyclip": 5, "tokenclip": 5}  # method -> number of seeds
METRICS = [("image", "auroc"), ("image", "ap"), ("image", "f1_max"), ("pixel", "auroc"),
           ("pixel", "aupro"), ("pixel", "ap"), ("pixel", "f1_max")]


def value(method: str, seed: int, dataset: str, category: str, level: str, metric: str) -> float:
    """A deterministic fake value in (0.4, 0.99)."""
    base = {"clip": 0.55, "anomalyclip": 0.80, "tokenclip": 0.83}[method]
    h = sum(ord(c) for c in f"{dataset}{category}{level}{metric}") % 97 / 97
    return round(min(0.99, base + 0.1 * h + 0.01 * seed * (method != "clip")), 6)


def make_store(root: Path, *, with_cost: bool = True, undefined_cell: bool = True) -> Path:
    """Write the fabricated run to ``root`` (a run directory) and return it."""
    store = ResultStore(root)
    data = root / "data"
    for method, n_seeds in METHODS.items():
        for seed in range(n_seeds):
            for ds, (aux, cats, img, pix) in DATASETS.items():
                recs = []
                for cat in cats:
                    for level, metric in METRICS:
                        if (level == "image" and not img) or (level == "pixel" and not pix):
                            continue
                        v = value(method, seed, ds, cat, level, metric)
                        if undefined_cell and method == "tokenclip" and ds == "visa" and \
                                level == "pixel" and metric == "aupro":
                            v = math.nan  # every category undefined -> "–"
                        recs.append({"method": method, "aux": aux, "seed": seed, "shots": 0,
                                     "dataset": ds, "category": cat, "level": level,
                                     "metric": metric, "value": v, "n_images": 10,
                                     "backbone": "zsad-tiny (random init) @ 64px"})
                store.append_unit(f"{method}__{aux}__s{seed}__{ds}", recs)
    # gallery: two images per category of mvtec, for every method
    for ds in ("mvtec", "isic"):
        aux, cats, _, _ = DATASETS[ds]
        for cat in cats:
            paths = []
            for i in range(2):
                rel = f"{ds}/{cat}/test/{i:03d}.png"
                (data / rel).parent.mkdir(parents=True, exist_ok=True)
                rgb = np.full((32, 32, 3), 40 * (i + 1), np.uint8)
                rgb[8:16, 8:16] = 250
                Image.fromarray(rgb).save(data / rel)
                paths.append(rel)
            masks = np.zeros((2, 96, 96), bool)
            masks[:, 24:48, 24:48] = True
            for method in METHODS:
                rng = np.random.default_rng(len(method))
                maps = rng.random((2, 96, 96)).astype(np.float16)
                np.savez_compressed(store.dir / "maps" / f"{method}__{aux}__{ds}__{cat}.npz",
                                    maps=maps, masks=masks, images=np.array(paths),
                                    labels=np.array([1, 1]), root=str(data))
    if with_cost:
        store.append_cost([cost_record(m, lat) for m, lat in
                           (("clip", 5.0), ("anomalyclip", 12.4), ("tokenclip", 13.5))])
    store.write_provenance({"protocol": "fabricated", "protocol_hash": "0123456789abcdef",
                            "seeds": [0, 1, 2, 3, 4],
                            "backbone": {"arch": "zsad-tiny", "image_size": 64},
                            "inputs": {"clip": {"class_words": "folder"},
                                       "anomalyclip": {"class_words": "readable"},
                                       "tokenclip": {"class_words": "readable"}},
                            "environment": {"git_commit": "deadbeef", "git_dirty": False,
                                            "device": "cpu", "python": "3.11",
                                            "platform": "test", "versions": {"torch": "x"}}})
    return root


def cost_record(method: str, latency_ms: float) -> dict:
    return {"method": method, "device": "cpu (test)", "device_type": "cpu",
            "backbone": "zsad-tiny (random init) @ 64px", "image_size": 64,
            "latency_median_ms": latency_ms, "latency_p90_ms": latency_ms * 1.1,
            "fps": 1000 / latency_ms, "infer_peak_mib": 10.0 + latency_ms,
            "train_peak_mib": None if method == "clip" else 50.0,
            "learnable_params": 0 if method == "clip" else 12345,
            "total_params": 1_000_000, "gflops": 0.5, "one_off_s": 0.01}


def read_json_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
