"""Manifest rows -> tensors, with the AnomalyCLIP preprocessing.

Images: RGB, resized to ``image_size``² (bicubic), scaled to [0, 1], normalised with
CLIP's mean/std. Masks: greyscale, binarised on the raw values with the dataset's rule
(``mask_threshold``: value >= threshold is anomalous; 128 for 8-bit 0/255 masks; 1 for
VisA's multi-valued masks), then resized to ``image_size``² by ``mask_resize``:

* ``"bilinear"`` (the benchmark's rule): the 0/255 mask resized bilinearly (PIL, which
  antialiases when shrinking) and thresholded at > 0.5 — what the anchors' released code
  does (AnomalyCLIP and VAND: ``transforms.Resize`` on the PIL mask, ``ToTensor``,
  ``gt > 0.5``), so the pixel metrics are computed on the masks every published number was
  computed on;
* ``"nearest"``: nearest-neighbour resizing of the binary mask (the suite's rule before
  issue 14);
* ``"bicubic"``: bicubic resizing, > 0.5 (AF-CLIP's released code).

``examples/mask_resize.py`` measures the differences (docs/methods.md, "Inputs").

Images without a mask get an all-zero mask.

Decoding is the same work every epoch, seed and method: :class:`DecodedCache` keeps the
tensors a process has decoded (images and masks, keyed by file and preprocessing) within a
byte budget, so a worker that loads in-process decodes each file once. The tensors are
those of a fresh decode (the cache returns copies), so numbers do not depend on it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from bench.backbone import OPENAI_MEAN, OPENAI_STD

DEFAULT_MASK_THRESHOLD = 128
#: ``mask_resize`` rules (module docstring); the first is the benchmark's default.
MASK_RESIZES = ("bilinear", "nearest", "bicubic")


class DataError(RuntimeError):
    """An image or mask cannot be read; the message names the file and the fix."""


def load_image(path: Path, image_size: int, mean: Sequence[float] = OPENAI_MEAN,
               std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """Read, resize (bicubic) and CLIP-normalise one image -> [3, S, S] float32."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read image ({err}). Re-extract it from the original "
                        "download, then re-run `zsad-bench prepare`.") from err
    t = torch.from_numpy(arr).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (t - m) / s


def load_mask(path: Path, image_size: int, threshold: int = DEFAULT_MASK_THRESHOLD,
              resize: str = "bilinear") -> torch.Tensor:
    """Read, binarise (raw value >= threshold) and resize a mask -> [S, S] float32 0/1.

    ``resize``: ``"bilinear"`` (resize the 0/255 mask bilinearly, keep values > 0.5),
    ``"nearest"`` or ``"bicubic"`` (see the module docstring).
    """
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L")) >= threshold
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read mask ({err}). Re-extract it from the original "
                        "download, then re-run `zsad-bench prepare`.") from err
    return resize_mask(arr, image_size, resize)


def resize_mask(mask: np.ndarray, image_size: int, rule: str = "bilinear") -> torch.Tensor:
    """A binary mask [H, W] resized to ``image_size``² by ``rule`` -> [S, S] float32 0/1."""
    if rule not in MASK_RESIZES:
        raise ValueError(f"mask_resize must be one of {MASK_RESIZES}, not {rule!r}")
    resample = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
                "bicubic": Image.Resampling.BICUBIC}[rule]
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize((image_size, image_size), resample)
    return torch.from_numpy(np.asarray(im) > 127).float()  # 128/255 > 0.5 >= 127/255


class DecodedCache:
    """Decoded image and mask tensors of one process, least recently used first out.

    ``max_bytes`` bounds the tensors kept (0 keeps nothing). :meth:`get` returns a copy of
    the cached tensor, so a caller that writes into what it got cannot change a later
    epoch's input. Useful where decoding runs in the training process (``[run]
    loader_workers = 0``, the CPU default); DataLoader worker processes would each start
    an empty one every epoch.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: tuple, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tensor ``load()`` returns for ``key``, decoded once while it stays cached."""
        t = self._items.get(key)
        if t is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return t.clone()
        self.misses += 1
        t = load()
        size = t.element_size() * t.nelement()
        if size <= self.max_bytes:
            self._items[key] = t.clone()
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.element_size() * old.nelement()
        return t


class ManifestDataset(Dataset):
    """A torch Dataset over manifest rows.

    Each item is a dict: ``image`` [3,S,S], ``mask`` [S,S], ``label``, ``category``,
    ``prompt_name``, ``dataset``, ``domain``, ``path`` (relative image path), ``index``.
    """

    def __init__(self, manifest: pd.DataFrame, root: str | Path, image_size: int, *,
                 mask_threshold: int = DEFAULT_MASK_THRESHOLD, mask_resize: str = "bilinear",
                 prompt_names: dict[str, str] | None = None,
                 mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD,
                 cache: DecodedCache | None = None) -> None:
        self.rows = manifest.reset_index(drop=True)
        self.root = Path(root)
        self.image_size = int(image_size)
        self.mask_threshold = mask_threshold
        if mask_resize not in MASK_RESIZES:
            raise ValueError(f"mask_resize must be one of {MASK_RESIZES}, not {mask_resize!r}")
        self.mask_resize = mask_resize
        self.prompt_names = prompt_names or {}
        self.mean, self.std = mean, std
        self.cache = cache

    def _load(self, path: Path, params: tuple, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``load()``, through the cache when there is one (keyed by the file's path, size and
        modification time and the preprocessing ``params``)."""
        if self.cache is None:
            return load()
        try:
            st = path.stat()
        except OSError:
            return load()  # raises the DataError that names the file
        return self.cache.get((str(path), st.st_size, st.st_mtime_ns, *params), load)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.rows.iloc[i]
        image_path = self.root / r["image"]
        image = self._load(
            image_path, ("image", self.image_size, tuple(self.mean), tuple(self.std)),
            lambda: load_image(image_path, self.image_size, self.mean, self.std))
        mask_rel = r["mask"]
        if isinstance(mask_rel, str) and mask_rel:
            mask_path = self.root / mask_rel
            mask = self._load(
                mask_path, ("mask", self.image_size, self.mask_threshold, self.mask_resize),
                lambda: load_mask(mask_path, self.image_size, self.mask_threshold,
                                  self.mask_resize))
        else:
            mask = torch.zeros(self.image_size, self.image_size)
        cat = str(r["category"])
        return {
            "image": image, "mask": mask, "label": int(r["label"]), "category": cat,
            "prompt_name": self.prompt_names.get(cat, cat.replace("_", " ")),
            "dataset": str(r["dataset"]), "domain": str(r["domain"]),
            "path": str(r["image"]), "index": i,
        }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep strings as lists."""
    out: dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], int | float):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


class SeededShuffle(Sampler[int]):
    """The shuffled order of ``DataLoader(shuffle=True, generator=manual_seed(seed))``,
    iterated epoch after epoch, fixed by the seed and the epoch alone.

    Torch's own loader draws its order from the generator lazily and also spends one draw
    of it on every ``iter()`` call (the workers' base seed), so the order a method trains on
    depended on how the loader was iterated: a progress bar that calls ``iter()`` once more
    (``tqdm.auto`` does) shifted every epoch's permutation, and so did a wrapper that does
    not. This sampler owns the generator and, when an epoch's first index is taken, draws
    that epoch's numbers in torch's order (the base-seed draw, the permutation, and the
    empty remainder's permutation at exhaustion), so the stream of permutations is exactly
    torch's plain iteration (tested) whatever wraps the loader or calls ``iter()``.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = int(n)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = self.generator
        torch.empty((), dtype=torch.int64).random_(generator=g)  # DataLoader's base seed
        perm = torch.randperm(self.n, generator=g).tolist()
        torch.randperm(self.n, generator=g)  # RandomSampler's remainder slice [:0]
        yield from perm


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool = False, seed: int = 0,
                num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` and the epoch: not on global RNG
    state, nor on how often the loader is wrapped or ``iter()``-ed (:class:`SeededShuffle`).

    ``num_workers`` > 0 decodes and resizes in worker processes (the order and the tensors
    are the same as with 0); ``pin_memory`` for fast, non-blocking copies to a GPU.
    """
    g = torch.Generator()  # the workers' base seeds only; the order is the sampler's
    g.manual_seed(seed)
    sampler = SeededShuffle(len(dataset), seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=g,
                      num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory,
                      worker_init_fn=_seed_worker if num_workers else None,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The batch's tensors on ``device`` (non-blocking: overlaps the copy from pinned memory)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return batch
    return {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


class DeviceLoader:
    """Iterate a loader with every batch already on ``device`` (what ``fit`` receives)."""

    def __init__(self, loader: DataLoader, device: torch.device | str) -> None:
        self.loader, self.device = loader, device
        self.dataset = loader.dataset
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield to_device(batch, self.device)


def _seed_worker(worker_id: int) -> None:
    import random

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
