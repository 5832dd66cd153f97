"""The input pipeline: decode + resize + normalise of full-size images (no timed assertions).

MVTec AD ships 700-1024 px PNGs, VisA ~1500 x 1000 px JPEGs; every method sees them resized
to 518 px. These cases measure one worker's throughput (images/s = 1 / mean time) for
each, and check that decoding in DataLoader worker processes returns the same tensors in
the same order as the main process. Figures: docs/performance.md ("Input pipeline").

    pytest tests/test_input_pipeline_perf.py --benchmark-enable
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bench.data import ManifestDataset, load_image, load_mask, make_loader

FORMATS = {"mvtec_png_1024": ("png", (1024, 1024)), "visa_jpeg_1500x1000": ("jpg", (1500, 1000))}


def _write(root: Path, n: int, fmt: str, size: tuple[int, int]) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        w, h = size
        # smooth content with texture, like a product photo (random noise would not compress)
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3))
        img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        name = f"img_{i}.{fmt}"
        Image.fromarray(img).save(root / name, quality=95) if fmt == "jpg" else \
            Image.fromarray(img).save(root / name)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 3: h // 2, w // 3: w // 2] = 255
        Image.fromarray(mask).save(root / f"mask_{i}.png")
        names.append(name)
    return names


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    out = {}
    for key, (fmt, size) in FORMATS.items():
        root = tmp_path_factory.mktemp(key)
        out[key] = (root, _write(root, 4, fmt, size))
    return out


@pytest.mark.parametrize("key", list(FORMATS))
def test_decode_resize_normalise_one_image(benchmark, images, key):
    root, names = images[key]
    it = iter(range(10**9))

    def one() -> tuple[torch.Tensor, torch.Tensor]:
        i = next(it) % len(names)
        return load_image(root / names[i], 518), load_mask(root / f"mask_{i}.png", 518)

    img, mask = benchmark(one)
    assert img.shape == (3, 518, 518) and img.dtype == torch.float32
    assert mask.shape == (518, 518) and set(mask.unique().tolist()) == {0.0, 1.0}


def test_worker_processes_give_the_same_batches(images):
    root, names = images["mvtec_png_1024"]
    rows = pd.DataFrame({"image": names, "mask": [f"mask_{i}.png" for i in range(len(names))],
                         "label": [1] * len(names), "category": ["c"] * len(names),
                         "dataset": ["d"] * len(names), "domain": ["industrial"] * len(names)})
    ds = ManifestDataset(rows, root, 518)
    main = list(make_loader(ds, batch_size=2, shuffle=True, seed=3))
    workers = list(make_loader(ds, batch_size=2, shuffle=True, seed=3, num_workers=2))
    assert [b["path"] for b in main] == [b["path"] for b in workers]
    for a, b in zip(main, workers, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
