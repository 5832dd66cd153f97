"""A content-addressed cache of frozen visual features, shared by seeds and methods.

Most methods keep CLIP's visual tower frozen, so the plain forward pass of an image gives
the same tokens for every seed, every epoch and every method on the same backbone. The
cache keys each image by the bytes of its preprocessed tensor (sha1) and stores the
projected class token and each tapped block's tokens in **fp16**, in memory (LRU within a
byte budget) and optionally on disk. ViT-L/14 at 518 px is ~1,370 tokens x 1,024 dims per
layer per image (2.8 MB in fp16), so only the layers a method asks for are kept.

Rule that keeps numbers reproducible: whenever the cache is on, features are *always*
returned through fp16 — a miss is computed, rounded, stored and returned exactly as a
later hit would be. A killed and resumed run therefore gives the same numbers as an
uninterrupted one, whichever images happened to be cached. The rounding moves maps by
≲ 1e-4; ``[run] feature_cache_dtype = "fp32"`` stores fp32 instead (twice the memory and
disk) for runs that want the exact fp32 path of an uncached forward pass.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import torch

GLOBAL = 0  # key of the projected class token; blocks are 1-based
#: ``[run] feature_cache_dtype`` values -> storage dtype
CACHE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def tensor_key(x: torch.Tensor) -> str:
    """sha1 of a tensor's dtype, shape and bytes."""
    t = x.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha1(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """fp16 (or fp32) features per (image content, layer) for one backbone (``namespace``)."""

    def __init__(self, namespace: str, max_bytes: int = 4 << 30,
                 directory: str | Path | None = None, dtype: torch.dtype = torch.float16) -> None:
        self.dtype = dtype
        if dtype not in CACHE_DTYPES.values():
            raise ValueError(f"feature cache dtype must be float16 or float32, not {dtype}")
        if dtype != torch.float16:  # fp16 keeps the namespace of earlier versions
            namespace = f"{namespace}|{dtype}"
        self.namespace = hashlib.sha1(namespace.encode()).hexdigest()[:16]
        self.max_bytes = int(max_bytes)
        self.directory = Path(directory) / self.namespace if directory else None
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._mem: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    # -- storage ----------------------------------------------------------------------
    def _disk_path(self, key: str) -> Path:
        assert self.directory is not None
        path, _, digest = key.rpartition(":")
        return self.directory / path / digest[:2] / f"{digest}.pt"

    def _remember(self, k: tuple[str, int], t: torch.Tensor) -> None:
        if k in self._mem:
            self._mem.move_to_end(k)
            return
        self._mem[k] = t
        self._bytes += t.numel() * t.element_size()
        while self._bytes > self.max_bytes and self._mem:
            _, old = self._mem.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def _lookup(self, key: str, layers: set[int]) -> dict[int, torch.Tensor] | None:
        found = {}
        for layer in layers:
            t = self._mem.get((key, layer))
            if t is None:
                break
            self._mem.move_to_end((key, layer))
            found[layer] = t
        else:
            return found
        if self.directory is not None:
            path = self._disk_path(key)
            if path.is_file():
                stored = torch.load(path, map_location="cpu", weights_only=True)
                if layers <= set(stored):
                    for layer, t in stored.items():
                        self._remember((key, layer), t)
                    return {layer: stored[layer] for layer in layers}
        return None

    def _store(self, key: str, feats: dict[int, torch.Tensor]) -> None:
        for layer, t in feats.items():
            self._remember((key, layer), t)
        if self.directory is not None:
            path = self._disk_path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            old = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save({**old, **feats}, tmp)
            os.replace(tmp, path)

    # -- the cached forward -------------------------------------------------------------
    def encode(self, backbone, images: torch.Tensor, layers: set[int]):
        """``backbone.encode_image`` through the cache (see the module docstring)."""
        from bench.backbone import ImageFeatures

        glob, taps = self.get_or_compute(
            "plain", images, layers,
            lambda x, ls: _as_pair(backbone.encode_image_uncached(x, sorted(ls))))
        return ImageFeatures(glob, taps, (backbone.grid_size, backbone.grid_size))

    def get_or_compute(self, path: str, images: torch.Tensor, layers: set[int] | list[int],
                       compute) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Features of a frozen visual ``path`` (e.g. ``"plain"``, ``"dpam6"``) through the cache.

        ``compute(images_subset, layers) -> (global [b, D], {layer: [b, ...]})`` runs on the
        images not cached yet. Returns (global [B, D], {layer: [B, ...]}) on the images' device,
        always rounded through the cache's dtype (see the module docstring).
        """
        layers = set(layers)
        need = layers | {GLOBAL}
        keys = [f"{path}:{tensor_key(img)}" for img in images]
        per_sample: list[dict[int, torch.Tensor] | None] = [self._lookup(k, need) for k in keys]
        missing = [i for i, f in enumerate(per_sample) if f is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        dtype = torch.float32
        if missing:
            glob, taps = compute(images[missing], layers)
            dtype = glob.dtype
            for j, i in enumerate(missing):
                feats = {GLOBAL: glob[j].detach().to("cpu", self.dtype)}
                feats.update({layer: taps[layer][j].detach().to("cpu", self.dtype)
                              for layer in layers})
                self._store(keys[i], feats)
                per_sample[i] = feats
        dev = images.device

        def stack(layer: int) -> torch.Tensor:
            return torch.stack([f[layer] for f in per_sample]).to(dev, dtype)  # type: ignore[index]

        return stack(GLOBAL), {layer: stack(layer) for layer in layers}


def _as_pair(feats) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    return feats.global_embedding, feats.taps
