"""Shared pieces of the opt-in equivalence tests against the authors' released code.

``random_native_checkpoint`` writes the random weights both sides load: a CLIP of the
architecture's real depths and patch size (a narrow config unless the real size is asked
for), drawn at its native size with LayerNorm parameters and biases perturbed (at their init
values 1 / 0 they would hide mistakes), saved as an OpenAI/open_clip-format state dict.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

#: ViT-L-14-336.json's structure with the real depths (24 visual, 12 text blocks) and patch
#: size (14) at the native 336 px, but narrow widths (heads of 64, like OpenAI's).
NARROW_VITL_336: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 336, "layers": 24, "width": 128, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2,
                 "layers": 12},
}


def how_to(var: str, repo: str, test_file: str, extra: str = "") -> str:
    """The skip message's recipe: the variable to set, the repository, the command to run."""
    checkout = f"/tmp/{repo.rsplit('/', 1)[-1]}"
    return (f"set {var} to a checkout of https://github.com/{repo} (e.g. `git clone "
            f"https://github.com/{repo} {checkout}`){extra}, then run `{var}={checkout} "
            f"pytest --runslow {test_file}` — see this file's docstring")


def released_checkout(var: str, label: str, recipe: str,
                      importer: Callable[[Path], Any]) -> tuple[Path, Any]:
    """(checkout, imported modules) of the released code ``$var`` points to; skips the whole
    test module, saying how to run it, when the variable is unset or the import fails."""
    import pytest

    src = os.environ.get(var)
    if not src:
        pytest.skip(f"{var} is not set: {recipe}", allow_module_level=True)
    path = Path(src).expanduser()
    try:
        return path, importer(path)
    except Exception as err:  # noqa: BLE001 - any import failure means "not available here"
        pytest.skip(f"the released {label} code is not importable from {src} "
                    f"({type(err).__name__}: {err}); {recipe}", allow_module_level=True)


def assert_restated(src: Path, restated: Sequence[tuple[str, str]]) -> None:
    """Every (file, line) a test restates from the released code is still in ``src`` (verbatim,
    or with the file's lines joined by single spaces for statements split over lines)."""
    for file, line in restated:
        text = (Path(src) / file).read_text()
        joined = " ".join(x.strip() for x in text.splitlines())
        assert line in text or line in joined, f"{file} no longer contains: {line}"


def thop_stub() -> dict[str, types.ModuleType]:
    """``{"thop": stub}`` where thop is missing (AnomalyCLIP_lib imports ``thop.profile``
    and never calls it), else ``{}``."""
    if importlib.util.find_spec("thop") is not None:
        return {}
    stub = types.ModuleType("thop")
    stub.profile = None
    return {"thop": stub}


def pkg_resources_stub() -> dict[str, types.ModuleType]:
    """``{"pkg_resources": stub}`` where setuptools >= 81 no longer ships it (the released
    codes import ``pkg_resources.packaging`` and never use it), else ``{}``."""
    if importlib.util.find_spec("pkg_resources") is not None:
        return {}
    import packaging.version

    stub = types.ModuleType("pkg_resources")
    stub.packaging = packaging
    return {"pkg_resources": stub}


@contextlib.contextmanager
def isolated_import(src: Path, owned: Sequence[str],
                    stubs: dict[str, types.ModuleType] | None = None) -> Iterator[None]:
    """Import a released checkout's modules without leaking them into other tests.

    Inside the block ``src`` is first on ``sys.path``, the ``stubs`` stand in for missing
    import-only dependencies, and modules whose top-level name is in ``owned`` (or a stub's)
    are set aside; afterwards every such module is removed and the ones set aside come back.
    """
    stubs = dict(stubs or {})
    names = (*owned, *stubs)

    def is_owned(name: str) -> bool:
        return name.split(".")[0] in names

    saved = {n: m for n, m in sys.modules.items() if is_owned(n)}
    saved_path = list(sys.path)
    for name in saved:
        del sys.modules[name]
    sys.modules.update(stubs)
    sys.path.insert(0, str(src))
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in [n for n in sys.modules if is_owned(n)]:
            del sys.modules[name]
        sys.modules.update(saved)


def random_native_checkpoint(directory: Path, arch: str,
                             narrow_config: dict[str, Any] | None = None) -> Path:
    """Random QuickGELU weights of ``arch`` (registered from ``narrow_config`` if given) at
    its native size, perturbed, saved to ``directory/random_native.pt``."""
    import open_clip

    if narrow_config is not None:
        cfg = directory / f"{arch}.json"
        cfg.write_text(json.dumps(narrow_config))
        open_clip.add_model_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=True)
    state = model.state_dict()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LayerNorms and biases are 1 / 0 at init: make them count
        for name, t in state.items():
            if ".ln_" in name or name.startswith("ln_") or name.endswith(".bias"):
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    path = directory / "random_native.pt"
    torch.save(state, path)
    return path


def observer(label: str) -> tuple[dict[str, float], Callable[[str, Any], float]]:
    """``(observed, observe)``: ``observe(name, value)`` records ``float(value)`` under
    ``name`` in ``observed``, prints it (``pytest -s`` shows every measured difference) and
    returns it."""
    observed: dict[str, float] = {}

    def observe(name: str, value: Any) -> float:
        v = float(value)
        observed[name] = v
        print(f"[released {label}] {name}: {v:.3e}")
        return v

    return observed, observe


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference of two same-shaped tensors (or arrays), in float64."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.detach().double() - b.detach().double()).abs().max())


class NoHalf:
    """A prompt tensor that ignores ``.half()``: the released AnomalyCLIP-family code calls
    ``.expand(...).permute(...).half()`` on its deep text tokens and AdaCLIP's ``PromptLayer``
    ``(dynamic + static).permute(1, 0, 2).half()``; the equivalence tests compare in fp32 and
    measure the fp16 rounding on its own."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __add__(self, other: Any) -> NoHalf:
        return NoHalf(self.t + other)

    __radd__ = __add__

    def expand(self, *size: int) -> NoHalf:
        return NoHalf(self.t.expand(*size))

    def permute(self, *dims: int) -> NoHalf:
        return NoHalf(self.t.permute(*dims))

    def half(self) -> torch.Tensor:
        return self.t
