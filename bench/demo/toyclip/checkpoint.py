"""The toy CLIP's checkpoint: byte-for-byte deterministic fp16 files, the recorded hash of
the shipped one, and :func:`checkpoint_path` (the shipped copy, else one built into the
cache on first use)."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import zipfile
from pathlib import Path

import torch

from bench.demo.toyclip.training import RECIPE_SHA256, TrainConfig, train

CHECKPOINT_NAME = "zsad-tiny-toy.pt"
#: The checkpoint shipped with the package: ``bench/demo/zsad-tiny-toy.pt``.
SHIPPED_CHECKPOINT = Path(__file__).parent.parent / CHECKPOINT_NAME


#: sha256 of the checkpoint that ``python -m bench.demo.toyclip`` writes with the default
#: settings on the reference machine - the shipped one (see docs/toy_clip.md).
CHECKPOINT_SHA256: str | None = RECIPE_SHA256["free-patches"]


# -- checkpoint IO -----------------------------------------------------------------------

def state_dict_fp16(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.detach()
            for k, v in model.state_dict().items()}


def save_checkpoint(state: dict[str, torch.Tensor], path: str | os.PathLike) -> str:
    """Write ``state`` as a deflate-compressed torch zip, byte-for-byte deterministic.

    Returns the file's sha256.
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(buf) as zin:
        infos = zin.infolist()
        prefix = infos[0].filename.split("/", 1)[0]
        entries = []
        for info in infos:
            name = "zsad_tiny_toy/" + info.filename.split("/", 1)[1]
            data = zin.read(info.filename)
            entries.append((name, data))
    digest = hashlib.sha256(b"".join(d for n, d in entries if not n.endswith("serialization_id")))
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w") as zout:
        for name, data in entries:
            if name.endswith(".data/serialization_id"):
                data = str(int(digest.hexdigest()[:30], 16)).encode()
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED
            zi.external_attr = 0o644 << 16
            zi.create_system = 3
            zout.writestr(zi, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    del prefix
    tmp.replace(path)
    return file_sha256(path)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where a built-on-first-use checkpoint goes ($ZSAD_BENCH_CACHE or ~/.cache/zsad-bench)."""
    base = os.environ.get("ZSAD_BENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "zsad-bench")
    return Path(base)


def checkpoint_path(build: bool = True) -> Path:
    """The toy checkpoint: the shipped ``bench/demo`` copy, else one built into the cache.

    Building takes about ten minutes on two CPU cores and shows a progress bar; it
    happens once (the cached file is reused).
    """
    if SHIPPED_CHECKPOINT.is_file():
        return SHIPPED_CHECKPOINT
    cached = cache_dir() / CHECKPOINT_NAME
    if cached.is_file():
        return cached
    if not build:
        raise FileNotFoundError(f"no toy checkpoint at {SHIPPED_CHECKPOINT} or {cached}; "
                                "build it with `python -m bench.demo.toyclip --out PATH`")
    print(f"building the toy CLIP checkpoint into {cached} (once; ~10 min on 2 CPU cores)",
          file=sys.stderr)
    bb = train(TrainConfig(), log=lambda s: print(s, file=sys.stderr))
    save_checkpoint(state_dict_fp16(bb.model), cached)
    return cached
