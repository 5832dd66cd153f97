"""The gallery: the runner's saved anomaly maps beside image and ground truth, inlined as
PNG data URIs (the report stays one self-contained file)."""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from bench import reported
from bench.report.meta import _slug, dataset_meta, method_order

log = logging.getLogger("zsad_bench.report")


def _png_data_uri(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _heatmap(m: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    m = m.astype(np.float32)
    lo, hi = float(np.nanmin(m)), float(np.nanmax(m))
    m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    return (colormaps["jet"](m)[..., :3] * 255).astype(np.uint8)


def _array_thumb(rgb: np.ndarray, size: int) -> str:
    from PIL import Image

    im = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    return _png_data_uri(np.asarray(im.resize((size, size), Image.BICUBIC)))


def _image_thumb(path: Path, size: int) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            return _png_data_uri(np.asarray(im))
    except (OSError, ValueError):
        return None


def gallery(results_dir: Path, methods: list[str], max_per_dataset: int = 12) -> list[dict[str, Any]]:
    """Per dataset: the runner's saved maps beside image and ground truth, as data URIs."""
    files = sorted(Path(results_dir).rglob("maps/*.npz"))
    by_ds: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for f in files:
        parts = f.stem.split("__")
        if len(parts) != 4:
            continue
        method, aux, ds, cat = parts
        try:
            z = np.load(f, allow_pickle=False)
            maps, masks, images = z["maps"], z["masks"], [str(s) for s in z["images"]]
            labels = z["labels"] if "labels" in z else np.full(len(images), -1)
            root = Path(str(z["root"])) if "root" in z else None
            thumbs = z["thumbs"] if "thumbs" in z else None
        except (OSError, ValueError, KeyError) as err:
            log.warning("gallery: cannot read %s (%s)", f, err)
            continue
        entries = by_ds.setdefault(ds, {})
        for i, img in enumerate(images):
            e = entries.setdefault((cat, img), {
                "category": cat, "image": img, "label": int(labels[i]),
                "root": root, "mask": masks[i], "maps": {}, "thumb": None})
            if e["thumb"] is None and thumbs is not None and i < len(thumbs):
                e["thumb"] = np.asarray(thumbs[i], dtype=np.uint8)
            e["maps"][(method, aux)] = maps[i]
    out = []
    for ds in sorted(by_ds):
        entries = list(by_ds[ds].values())[:max_per_dataset]
        cols = method_order({m for e in entries for m, _ in e["maps"]})
        size = int(entries[0]["mask"].shape[-1]) if entries else 96
        rows = []
        for e in entries:
            if e["thumb"] is not None:  # stored by the run: renders from anywhere
                thumb = _array_thumb(e["thumb"], size)
            else:                       # older runs: read the image from the data root
                thumb = _image_thumb(e["root"] / e["image"], size) if e["root"] is not None else None
            gt = _png_data_uri((np.asarray(e["mask"], dtype=bool) * 255).astype(np.uint8))
            cells = []
            for m in cols:
                mp = next((v for (mm, _), v in e["maps"].items() if mm == m), None)
                cells.append(None if mp is None else _png_data_uri(_heatmap(np.asarray(mp))))
            rows.append({"category": e["category"], "image": e["image"], "label": e["label"],
                         "thumb": thumb, "gt": gt, "maps": cells})
        out.append({"dataset": ds, "name": dataset_meta(ds)["name"], "slug": _slug(ds),
                    "methods": [reported.method_display(m) for m in cols], "rows": rows})
    return out
