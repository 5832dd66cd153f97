"""CLIP backbones for the methods: offline-safe loading, layer taps, text encoding.

:func:`load_clip` returns a :class:`ClipBackbone`, the frozen open_clip model every method
takes. It exposes the pieces ZSAD methods are built from:

* :meth:`ClipBackbone.encode_image` — the global embedding plus the tokens of any
  transformer blocks ("taps", 1-based like AnomalyCLIP's ``features_list=[6, 12, 18, 24]``);
* :meth:`ClipBackbone.project_tokens` — CLIP's own read-out (``ln_post`` then ``proj``)
  applied to tapped tokens, which puts patch tokens in the joint image–text space;
* :meth:`ClipBackbone.encode_text` for strings and :meth:`ClipBackbone.encode_text_embeddings`
  for learnable prompts (token embeddings in, optional deep per-layer prompt tokens).

Weights come from a local checkpoint file, from open_clip's cache, or — with
``pretrained=None`` — from a seeded random initialisation (tests). Nothing here needs the
network when the weights are already on disk.

Two settings of the backbone are part of a method (issue 14; ``docs/methods.md``):

* **activation** — OpenAI's CLIP was trained with QuickGELU (``x * sigmoid(1.702 x)``).
  open_clip's configs for the OpenAI architectures (``ViT-L-14-336`` …) build ``nn.GELU``
  and open_clip only warns for the ``openai`` tag (not at all for a checkpoint file).
  :func:`load_clip` therefore resolves ``activation=None`` to QuickGELU whenever the weights
  are OpenAI's — the ``openai`` tag, an OpenAI TorchScript archive, or a file whose path
  names ``openai`` — and protocols state it explicitly for files.
* **pos_embed_resize** — how the position-embedding grid is resized from the checkpoint's
  native size to ``image_size``: ``"open_clip"`` (bicubic with antialias at load time, as
  open_clip and VAND's released code do), ``"bilinear"`` (bilinear, no antialias,
  ``align_corners=False``: what AnomalyCLIP's released ``VisionTransformer.forward`` does) or
  ``"bicubic"`` (bicubic *without* antialias, ``align_corners=False``: AdaCLIP's released
  ``resize_pos_embed``, a different kernel from open_clip's even when enlarging the grid).
"""

from __future__ import annotations

import logging
import math
import os
import weakref
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CHECKPOINT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz"}
#: Folders of the project's own open_clip architecture configs (the demo's ``zsad-tiny``).
CONFIG_DIRS: tuple[Path, ...] = (Path(__file__).parent / "demo" / "model_configs",)

#: ``activation`` values: open_clip's QuickGELU (OpenAI's CLIP) and ``nn.GELU`` (LAION & co.).
ACTIVATIONS = ("quick_gelu", "gelu")
#: ``pos_embed_resize`` values (see the module docstring).
POS_EMBED_RESIZES = ("open_clip", "bilinear", "bicubic")
#: Keys of an OpenAI checkpoint (TorchScript state dict) that are metadata, not weights.
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")

log = logging.getLogger("zsad_bench")

#: Where the papers' weights come from, for error messages and `full_benchmark`'s check.
WEIGHT_SOURCES = {
    ("ViT-L-14-336", "openai"): "hf-hub timm/vit_large_patch14_clip_336.openai "
    "(file open_clip_pytorch_model.bin), or OpenAI's ViT-L-14-336px.pt",
    ("ViT-B-16-plus-240", "laion400m_e31"): "hf-hub timm/vit_base_patch16_plus_clip_240.laion400m_e31",
    ("ViT-B-16-plus-240", "laion400m_e32"): "hf-hub timm/vit_base_patch16_plus_clip_240.laion400m_e32",
}


class BackboneError(RuntimeError):
    """The backbone cannot be built; the message says what to put where."""


@cache
def register_model_configs() -> None:
    """Make the project's own architectures (``zsad-tiny``) known to open_clip."""
    for config_dir in CONFIG_DIRS:
        open_clip.add_model_config(config_dir)


def is_checkpoint_path(pretrained: str | os.PathLike) -> bool:
    """True if ``pretrained`` names a file rather than an open_clip tag."""
    s = str(pretrained)
    return (
        isinstance(pretrained, os.PathLike)
        or Path(s).suffix.lower() in CHECKPOINT_SUFFIXES
        or os.sep in s
        or Path(s).expanduser().exists()
    )


@dataclass
class ImageFeatures:
    """What one visual forward pass yields.

    ``global_embedding``: [B, D] projected class token (not normalised).
    ``taps``: block index (1-based) -> [B, 1 + N, W] tokens after that block (class token first).
    ``grid``: (rows, cols) of the patch grid.
    """

    global_embedding: torch.Tensor
    taps: dict[int, torch.Tensor] = field(default_factory=dict)
    grid: tuple[int, int] = (0, 0)


class ClipBackbone(nn.Module):
    """A frozen open_clip ViT CLIP with the taps ZSAD methods need."""

    def __init__(self, model: nn.Module, tokenizer, *, arch: str, pretrained: str | None,
                 image_size: int, pos_embed_resize: str = "open_clip") -> None:
        super().__init__()
        if not hasattr(model, "visual") or not hasattr(model.visual, "transformer"):
            raise BackboneError(f"{arch}: only open_clip ViT models (VisionTransformer) are supported")
        self.model = model
        self.tokenizer = tokenizer
        self.arch = arch
        self.pretrained = pretrained
        self.image_size = int(image_size)
        vis = model.visual
        if not getattr(vis.transformer, "batch_first", True):
            raise BackboneError(f"{arch}: needs a batch-first open_clip transformer (open_clip>=2.24)")
        if getattr(vis, "attn_pool", None) is not None:
            raise BackboneError(f"{arch}: attention-pooled visual towers are not supported")
        ps = vis.conv1.kernel_size
        self.patch_size = int(ps[0] if isinstance(ps, tuple) else ps)
        self.grid_size = self.image_size // self.patch_size
        self.width = int(vis.conv1.out_channels)
        self.embed_dim = int(vis.proj.shape[1])
        self.num_layers = len(vis.transformer.resblocks)
        self.text_width = int(model.token_embedding.weight.shape[1])
        self.text_layers = len(model.transformer.resblocks)
        self.context_length = int(model.positional_embedding.shape[0])
        self.mean, self.std = OPENAI_MEAN, OPENAI_STD
        #: how tables name the weights: the tag, or a file's name and short sha256 (never a
        #: local path: tables are cited; provenance.json keeps the path and the full hash)
        self.weights_label = pretrained or "random init"
        self.weights_sha256: str | None = None
        #: "quick_gelu" or "gelu": what the MLPs of both towers compute (read off the modules)
        self.activation = model_activation(model)
        #: how the position grid is resized to ``image_size`` (a no-op at the native size)
        self.pos_embed_resize = pos_embed_resize
        self.native_image_size = native_image_size(arch)
        #: False where ``image_size`` is the architecture's own (``pos_embed_resize`` unused)
        self.pos_embed_resized = self.native_image_size not in (None, self.image_size)
        self.feature_cache = None  # bench.feature_cache.FeatureCache, attached by the runner
        self.requires_grad_(False)
        self.eval()

    # -- bookkeeping ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.visual.proj.device

    def train(self, mode: bool = True) -> ClipBackbone:
        """The backbone always stays in eval mode (frozen statistics, no dropout)."""
        return super().train(False)

    def describe(self) -> str:
        act = "QuickGELU" if self.activation == "quick_gelu" else "GELU"
        resize = f", pos-embed {self.pos_embed_resize}" if self.pos_embed_resized else ""
        return f"{self.arch} ({self.weights_label}) @ {self.image_size}px, {act}{resize}"

    def settings(self) -> dict[str, object]:
        """The backbone settings that change features (provenance, cache keys)."""
        return {"arch": self.arch, "pretrained": self.pretrained, "image_size": self.image_size,
                "activation": self.activation,
                "pos_embed_resize": self.pos_embed_resize if self.pos_embed_resized else "native"}

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    # -- visual --------------------------------------------------------------------
    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + class + position embeddings and ``ln_pre``: [B, 1 + N, W]."""
        vis = self.model.visual
        x = vis.conv1(images.to(vis.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = vis.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        if x.shape[1] != vis.positional_embedding.shape[0]:
            raise BackboneError(
                f"{self.arch}: got {x.shape[1] - 1} patches but the position embedding has "
                f"{vis.positional_embedding.shape[0] - 1}; feed images of {self.image_size}px "
                f"(the size given to load_clip)"
            )
        x = x + vis.positional_embedding.to(x.dtype)
        return vis.ln_pre(x)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.visual.transformer.resblocks

    def encode_image(self, images: torch.Tensor, layers: Sequence[int] = ()) -> ImageFeatures:
        """Run the visual tower; return the projected global token and the tapped blocks.

        With a :attr:`feature_cache` attached (the runner does this), the plain frozen
        forward pass is served from :class:`bench.feature_cache.FeatureCache` (fp16).
        """
        if self.feature_cache is not None and not images.requires_grad:
            return self.feature_cache.encode(self, images, self._check_layers(layers))
        return self.encode_image_uncached(images, layers)

    def encode_image_uncached(self, images: torch.Tensor,
                              layers: Sequence[int] = ()) -> ImageFeatures:
        """:meth:`encode_image` without the feature cache."""
        wanted = self._check_layers(layers)
        x = self.embed_patches(images)
        taps: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks, start=1):
            x = blk(x)
            if i in wanted:
                taps[i] = x
        global_embedding = self.project_tokens(x[:, 0])
        return ImageFeatures(global_embedding, taps, (self.grid_size, self.grid_size))

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's visual read-out (``ln_post`` then ``proj``) on any tokens [..., W] -> [..., D]."""
        vis = self.model.visual
        return vis.ln_post(tokens) @ vis.proj

    def _check_layers(self, layers: Sequence[int]) -> set[int]:
        wanted = {int(i) for i in layers}
        bad = sorted(i for i in wanted if not 1 <= i <= self.num_layers)
        if bad:
            raise BackboneError(f"{self.arch} has blocks 1..{self.num_layers}; cannot tap {bad}")
        return wanted

    # -- text ----------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Encode strings -> [T, D]."""
        tokens = self.tokenize(texts)
        out = self.encode_text_embeddings(self.token_embedding(tokens), tokens)
        return F.normalize(out, dim=-1) if normalize else out

    @torch.no_grad()
    def encode_prompt_ensemble(self, templates: Sequence[str], states: Sequence[str],
                               obj: str) -> torch.Tensor:
        """Mean of the normalised embeddings of every ``template.format(state obj)``, normalised.

        ``templates`` contain one ``{}`` slot; each state word is combined with ``obj``
        ("damaged" + "bottle" -> "damaged bottle"). Returns [D].
        """
        texts = [t.format(f"{s} {obj}".strip()) for t in templates for s in states]
        feats = self.encode_text(texts, normalize=True)
        return F.normalize(feats.mean(dim=0), dim=-1)

    def encode_text_embeddings(
        self,
        embeddings: torch.Tensor,
        tokens: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None = None,
        deep_start: int = 1,
    ) -> torch.Tensor:
        """Text tower from token embeddings [T, L, W]; gradients flow to ``embeddings``.

        ``tokens`` [T, L] gives the end-of-text position (its argmax, as CLIP does).
        ``deep_prompts``: for blocks ``deep_start + j`` (0-based block index), the tokens
        at positions ``1 .. 1 + n`` are replaced by ``deep_prompts[j]`` ([n, W] or [T, n, W])
        before that block — the deep prompting of AnomalyCLIP-style methods.
        """
        m = self.model
        x = embeddings + m.positional_embedding.to(embeddings.dtype)
        deep_prompts = list(deep_prompts or [])
        for i, blk in enumerate(m.transformer.resblocks):
            j = i - deep_start
            if 0 <= j < len(deep_prompts):
                p = deep_prompts[j]
                p = p.unsqueeze(0).expand(x.shape[0], -1, -1) if p.dim() == 2 else p
                x = torch.cat([x[:, :1], p.to(x.dtype), x[:, 1 + p.shape[1]:]], dim=1)
            x = blk(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = m.text_projection
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (checkpoints are named by it in tables and provenance)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def native_image_size(arch: str) -> int | None:
    """The image size of ``arch``'s open_clip config (its checkpoints' position grid)."""
    register_model_configs()
    size = ((open_clip.get_model_config(arch) or {}).get("vision_cfg") or {}).get("image_size")
    if isinstance(size, tuple | list):
        size = size[0]
    return int(size) if size else None


def model_activation(model: nn.Module) -> str:
    """``"quick_gelu"`` if the model's MLPs use open_clip's QuickGELU, else ``"gelu"``."""
    quick = any(type(m).__name__ == "QuickGELU" for m in model.modules())
    return "quick_gelu" if quick else "gelu"


def is_openai_weights(pretrained: str | os.PathLike | None) -> bool:
    """True where the weights are recognisably OpenAI's CLIP (trained with QuickGELU).

    The ``openai`` tag; an OpenAI TorchScript archive (``ViT-L-14-336px.pt``); or a file whose
    path names ``openai`` (e.g. the Hugging Face cache of ``timm/…clip_336.openai``). Other
    files cannot be told apart from LAION-style ones: protocols state ``activation`` for them.
    """
    if pretrained is None:
        return False
    s = str(pretrained)
    if s == "openai":
        return True
    if not is_checkpoint_path(s):
        return False
    path = Path(s).expanduser()
    return "openai" in s.lower() or _is_torchscript(path)


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (OpenAI's release format): a zip with ``constants.pkl``."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def resolve_activation(arch: str, pretrained: str | os.PathLike | None,
                       activation: str | None) -> str:
    """The activation :func:`load_clip` builds: explicit, else QuickGELU for OpenAI weights,
    else the architecture config's own."""
    if activation is not None:
        if activation not in ACTIVATIONS:
            raise BackboneError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")
        return activation
    if is_openai_weights(pretrained):
        return "quick_gelu"
    register_model_configs()
    cfg = open_clip.get_model_config(arch) or {}
    return "quick_gelu" if cfg.get("quick_gelu") else "gelu"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's weights as an fp32 state dict (open_clip's reader; TorchScript too).

    Half-precision files are upcast (the model is fp32, and CPU bicubic interpolation of the
    position embedding has no fp16 kernel); OpenAI's metadata entries are dropped.
    """
    if _is_torchscript(path):
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = open_clip.factory.load_state_dict(str(path))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()
            if k not in _OPENAI_META_KEYS}


def resize_position_grid(pos: torch.Tensor, grid: tuple[int, int], mode: str) -> torch.Tensor:
    """Position embedding [1 + n*n, W] (class token first) resized to ``grid`` patches.

    ``"bilinear"``: ``F.interpolate(mode="bilinear")`` (``align_corners=False``, no antialias),
    AnomalyCLIP's released forward pass; ``"bicubic"``: bicubic without antialias, AdaCLIP's
    released ``resize_pos_embed``; ``"open_clip"``: bicubic with antialias, open_clip's
    ``resize_pos_embed``.
    """
    if mode not in POS_EMBED_RESIZES:
        raise BackboneError(f"pos_embed_resize must be one of {POS_EMBED_RESIZES}, not {mode!r}")
    tok, img = pos[:1], pos[1:]
    old = int(math.isqrt(img.shape[0]))
    if old * old != img.shape[0]:
        raise BackboneError(f"position embedding of {img.shape[0]} patches is not a square grid")
    if (old, old) == tuple(grid):
        return pos
    x = img.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    if mode in ("bilinear", "bicubic"):
        x = F.interpolate(x, size=tuple(grid), mode=mode, align_corners=False)
    else:
        x = F.interpolate(x, size=tuple(grid), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([tok, x.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)], dim=0)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], pos_embed_resize: str) -> None:
    """Load a checkpoint's state dict into ``model`` — open_clip's ``load_checkpoint`` steps
    (third-party conversion, old text layout, logit-scale shape, text position embedding),
    with the visual position grid resized by ``pos_embed_resize``."""
    factory = open_clip.factory
    state = factory.convert_state_dict(model, dict(state))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = factory.convert_to_custom_text_state_dict(state)
    if "logit_scale" in state and model.logit_scale.ndim != state["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    key = "visual.positional_embedding"
    if key in state and state[key].shape != model.visual.positional_embedding.shape:
        grid = model.visual.grid_size
        grid = tuple(grid) if isinstance(grid, tuple | list) else (grid, grid)
        if pos_embed_resize == "open_clip":
            factory.resize_pos_embed(state, model)      # bit for bit what open_clip does
        else:
            state[key] = resize_position_grid(state[key], grid, pos_embed_resize)
    factory.resize_text_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def load_clip(
    arch: str,
    pretrained: str | os.PathLike | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
    cache_dir: str | None = None,
    activation: str | None = None,
    pos_embed_resize: str = "open_clip",
) -> ClipBackbone:
    """Build a frozen CLIP backbone.

    ``pretrained``: an open_clip tag (e.g. ``"openai"``; works where the weights are cached
    or downloadable), a local checkpoint path (open_clip state dict, or OpenAI's TorchScript
    file), or ``None`` for seeded random weights.
    ``image_size``: input resolution; the position grid is resized to it by
    ``pos_embed_resize`` (``"open_clip"``, ``"bilinear"`` or ``"bicubic"``, see the module
    docstring), e.g.
    518 for ViT-L/14@336 as in AnomalyCLIP.
    ``activation``: ``"quick_gelu"``, ``"gelu"`` or ``None`` — QuickGELU for OpenAI weights
    (:func:`is_openai_weights`), else the architecture config's.

    Random weights (``pretrained=None``) are drawn at ``image_size`` directly with
    ``"open_clip"``; with ``"bilinear"`` or ``"bicubic"`` they are drawn at the native size and
    resized, as a checkpoint would be.
    """
    register_model_configs()
    if arch not in open_clip.list_models():
        raise BackboneError(f"unknown architecture '{arch}'. open_clip knows e.g. ViT-L-14-336, "
                            f"ViT-B-16-plus-240; the project adds zsad-tiny.")
    if pos_embed_resize not in POS_EMBED_RESIZES:
        raise BackboneError(f"pos_embed_resize must be one of {POS_EMBED_RESIZES}, "
                            f"not {pos_embed_resize!r}")
    act = resolve_activation(arch, pretrained, activation)
    build = {"force_quick_gelu": act == "quick_gelu"}
    if act == "gelu" and (open_clip.get_model_config(arch) or {}).get("quick_gelu"):
        raise BackboneError(f"{arch}'s config fixes QuickGELU; use the architecture without the "
                            "'-quickgelu' suffix for activation='gelu'")
    sized = {**build, "force_image_size": image_size} if image_size else dict(build)
    tag: str | None = None if pretrained is None else str(pretrained)
    if tag is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if pos_embed_resize == "open_clip":
                model = open_clip.create_model(arch, pretrained=None, **sized)
            else:
                native = open_clip.create_model(arch, pretrained=None, **build)
        if pos_embed_resize != "open_clip":
            model = _quiet_create(arch, **sized)
            _load_state(model, native.state_dict(), pos_embed_resize)
            del native
    elif is_checkpoint_path(tag):
        path = Path(tag).expanduser()
        if not path.is_file():
            raise BackboneError(
                f"checkpoint not found: {path}. Put the {arch} weights there "
                f"({WEIGHT_SOURCES.get((arch, 'openai'), 'an open_clip state dict')}), "
                f"or pass an open_clip tag such as 'openai' if its cache is populated."
            )
        model = _quiet_create(arch, **sized)
        try:
            _load_state(model, _read_state_dict(path), pos_embed_resize)
        except Exception as err:
            raise BackboneError(f"{path}: not a usable {arch} checkpoint ({type(err).__name__}: "
                                f"{err}). Check that the file matches the architecture.") from err
        log.info("loaded %s weights from %s (%s, position grid resized by %s)", arch, path,
                 act, pos_embed_resize)
        tag = str(path)
    else:
        known = open_clip.list_pretrained_tags_by_model(arch)
        if tag not in known:
            raise BackboneError(f"'{tag}' is neither a checkpoint file nor an open_clip tag of "
                                f"{arch} (tags: {', '.join(known) or 'none'})")
        try:
            if pos_embed_resize == "open_clip":
                model = open_clip.create_model(arch, pretrained=tag, cache_dir=cache_dir, **sized)
            else:
                native = open_clip.create_model(arch, pretrained=tag, cache_dir=cache_dir, **build)
                model = _quiet_create(arch, **sized)
                _load_state(model, native.state_dict(), pos_embed_resize)
                del native
        except Exception as err:
            where = WEIGHT_SOURCES.get((arch, tag), f"open_clip's '{tag}' weights of {arch}")
            raise BackboneError(
                f"could not load {arch} '{tag}' weights ({type(err).__name__}: {err}). This machine "
                f"may be offline: fetch {where} on a connected machine, then either copy the "
                f"Hugging Face cache (HF_HOME, or --cache-dir) here or pass the file's path as "
                f"`pretrained`."
            ) from err
    tokenizer = open_clip.get_tokenizer(arch)
    size = image_size or model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    backbone = ClipBackbone(model, tokenizer, arch=arch, pretrained=tag, image_size=int(size),
                            pos_embed_resize=pos_embed_resize)
    if tag is not None and is_checkpoint_path(tag):
        backbone.weights_sha256 = file_sha256(Path(tag))
        backbone.weights_label = f"{Path(tag).name}, sha256 {backbone.weights_sha256[:8]}"
    if backbone.activation != act:  # pragma: no cover - an open_clip that ignores the flag
        raise BackboneError(f"{arch}: asked for {act} but open_clip built {backbone.activation}")
    return backbone.to(device)


def _quiet_create(arch: str, **kwargs) -> nn.Module:
    """``open_clip.create_model`` without weights, silencing its "randomly initialised"
    message: the weights are loaded right after."""
    oc_log = logging.getLogger()
    level = oc_log.level
    oc_log.setLevel(max(level, logging.WARNING + 1))
    try:
        return open_clip.create_model(arch, pretrained=None, **kwargs)
    finally:
        oc_log.setLevel(level)


# ======================================================================================
# Training-free building blocks (issue 4): prompt ensembles, the value-value attention
# path and window re-encoding. Shared by clip / winclip / anoclip(+) and later methods.
# Everything below only reads the frozen backbone; nothing above was changed for it.
# ======================================================================================

def compose_prompts(templates: Sequence[str], states: Sequence[str], obj: str) -> list[str]:
    """Every ``template`` × ``state`` sentence about ``obj`` (template-major order).

    A state with a ``{}`` slot takes the object words (``"{} with flaw"`` -> ``"bottle with
    flaw"``); a plain state word is put in front of them (``"damaged"`` -> ``"damaged
    bottle"``; ``""`` -> ``"bottle"``). Each template has one ``{}`` slot for the result.
    """
    phrases = [s.format(obj) if "{}" in s else f"{s} {obj}".strip() for s in states]
    return [t.format(p) for t in templates for p in phrases]


#: Raw (unnormalised) text embeddings per backbone and sentence; frozen towers make them
#: reusable by every method instance and job of a run.
_PROMPT_CACHE: weakref.WeakKeyDictionary[ClipBackbone, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def _encode_tokens_truncated(backbone: ClipBackbone, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's text tower on tokens [T, L] cut after the longest end-of-text: [T, D] raw.

    The causal mask makes every position depend only on earlier ones, so dropping the padding
    after the last end-of-text token leaves the pooled (end-of-text) features unchanged while
    the sequences get ~5x shorter than the 77-token context.
    """
    m = backbone.model
    eot = tokens.argmax(dim=-1)
    L = int(eot.max()) + 1
    x = m.token_embedding(tokens[:, :L]) + m.positional_embedding[:L].to(m.token_embedding.weight.dtype)
    mask = m.attn_mask[:L, :L] if m.attn_mask is not None else None
    for blk in m.transformer.resblocks:
        x = blk(x, attn_mask=mask)
    x = m.ln_final(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]
    proj = m.text_projection
    return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


@torch.no_grad()
def encode_prompts(backbone: ClipBackbone, texts: Sequence[str], *, normalize: bool = True,
                   batch_size: int = 256, cache: bool = True) -> torch.Tensor:
    """Text embeddings [T, D] of ``texts`` (the same as :meth:`ClipBackbone.encode_text`).

    Encoded in chunks with the padding after the end-of-text token cut off (exact under the
    causal mask), and cached per backbone and sentence (``cache=False`` bypasses the cache).
    """
    texts = list(texts)
    store = _PROMPT_CACHE.setdefault(backbone, {}) if cache else {}
    todo = list(dict.fromkeys(t for t in texts if t not in store))
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        for t, e in zip(chunk, _encode_tokens_truncated(backbone, backbone.tokenize(chunk)), strict=True):
            store[t] = e
    out = torch.stack([store[t] for t in texts]) if texts else torch.empty(0, backbone.embed_dim)
    return F.normalize(out, dim=-1) if normalize else out


def ensemble_mean(embeddings: torch.Tensor, *, normalize_each: bool = True) -> torch.Tensor:
    """One class prototype [D] from prompt embeddings [T, D]: (normalised) mean, normalised.

    ``normalize_each=True`` is CLIP's prompt ensembling (Radford et al. 2021, §3.1.4: each
    prompt embedding is L2-normalised before averaging); ``False`` averages the raw
    embeddings, as anomalib's WinCLIP and AnoCLIP's released code do.
    """
    e = F.normalize(embeddings, dim=-1) if normalize_each else embeddings
    return F.normalize(e.mean(dim=0), dim=-1)


def prompt_ensemble_features(backbone: ClipBackbone, templates: Sequence[str],
                             states: Sequence[str], obj: str, *,
                             normalize_each: bool = True) -> torch.Tensor:
    """Prototype [D] of ``compose_prompts(templates, states, obj)`` (see :func:`ensemble_mean`)."""
    raw = encode_prompts(backbone, compose_prompts(templates, states, obj), normalize=False)
    return ensemble_mean(raw, normalize_each=normalize_each)


def block_attention(block: nn.Module, x: torch.Tensor, mode: str = "vv") -> torch.Tensor:
    """The attention branch of one open_clip block on already-normalised tokens ``x`` [B, L, W].

    ``mode="qkv"`` recomputes the block's own multi-head attention (queries, keys, values);
    ``mode="vv"`` is the value-value self-attention of AnoCLIP (Deng et al. 2023, §3.2, Eq. 7)
    and CLIP Surgery: queries and keys are replaced by the values, scaled by
    ``head_dim ** -0.5`` like the original. Both end with the block's output projection and
    its layer scale (``ls_1``). Returns [B, L, W].
    """
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention):
        raise BackboneError(f"block_attention needs nn.MultiheadAttention blocks, got {type(attn).__name__}")
    if mode not in ("vv", "qkv"):
        raise ValueError(f"mode must be 'vv' or 'qkv', got {mode!r}")
    W, H = attn.embed_dim, attn.num_heads
    B, L, _ = x.shape
    if attn.in_proj_weight is not None:
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3, dim=0)
    else:  # separate projection weights (kdim/vdim != embed_dim): not used by CLIP towers
        w_q, w_k, w_v = attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight
    b_q = b_k = b_v = None
    if attn.in_proj_bias is not None:
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3, dim=0)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, L, H, W // H).transpose(1, 2)  # [B, H, L, d]

    v = heads(F.linear(x, w_v, b_v))
    if mode == "vv":
        q = k = v
    else:
        q, k = heads(F.linear(x, w_q, b_q)), heads(F.linear(x, w_k, b_k))
    out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
    out = out.transpose(1, 2).reshape(B, L, W)
    out = attn.out_proj(out)
    ls = getattr(block, "ls_1", None)
    return ls(out) if ls is not None else out


@dataclass
class VVFeatures(ImageFeatures):
    """:class:`ImageFeatures` of the original path plus the value-value path.

    ``vv_taps``: block index (1-based) -> [B, 1 + N, W] tokens of the V-V path after that
    block (class token first), for the requested blocks at or after ``vv_start``.
    """

    vv_taps: dict[int, torch.Tensor] = field(default_factory=dict)
    vv_start: int = 1


def encode_image_vv(backbone: ClipBackbone, images: torch.Tensor, *, start: int = 1,
                    layers: Sequence[int] = (), original: bool = True) -> VVFeatures:
    """Run the visual tower with AnoCLIP's local-aware value-value path alongside it.

    AnoCLIP (Deng et al. 2023, §3.2, Eq. 7): from block ``start`` (1-based) on, a second path
    accumulates ``Ṽ^l = Proj(Attention(V^{l-1}, V^{l-1}, V^{l-1})) + Ṽ^{l-1}`` — the V-V
    self-attention of each block, residual, **no FFN** — where the values ``V^{l-1}`` come
    from the original path's ``ln_1`` tokens at that block and the path starts from the
    original tokens entering block ``start`` (as in the authors' dual-path code). The original
    Q-K-V path is unchanged; its projected class token is ``global_embedding``. ``layers``:
    blocks to tap (``vv_taps``, and with ``original=True`` the original path's ``taps``); a
    V-V tap needs a block ``>= start``.

    With the runner's :attr:`ClipBackbone.feature_cache` attached, the V-V taps and the global
    embedding are served from it (path ``"vv<start>"``, fp16, shared by every seed and method
    using the same path); the original taps then come from the cached plain pass.
    """
    if not 1 <= start <= backbone.num_layers:
        raise BackboneError(f"{backbone.arch}: V-V start block must be in 1..{backbone.num_layers}, "
                            f"got {start}")
    wanted = backbone._check_layers(layers)
    early = sorted(i for i in wanted if i < start)
    if early:
        raise BackboneError(f"V-V path starts at block {start}; cannot tap it at {early}")
    g = (backbone.grid_size, backbone.grid_size)
    cache = getattr(backbone, "feature_cache", None)
    if cache is not None and not images.requires_grad:
        def compute(x: torch.Tensor, ls: set[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
            glob, _, vv = _vv_forward(backbone, x, start, set(ls))
            return glob, vv

        glob, vv_taps = cache.get_or_compute(f"vv{start}", images, wanted, compute)
        taps = backbone.encode_image(images, sorted(wanted)).taps if original and wanted else {}
        return VVFeatures(glob, taps, g, vv_taps=vv_taps, vv_start=start)
    glob, taps, vv_taps = _vv_forward(backbone, images, start, wanted)
    return VVFeatures(glob, taps if original else {}, g, vv_taps=vv_taps, vv_start=start)


def _vv_forward(backbone: ClipBackbone, images: torch.Tensor, start: int, wanted: set[int]
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One pass of both paths: (global embedding, original taps, V-V taps)."""
    x = backbone.embed_patches(images)
    vv: torch.Tensor | None = None
    taps: dict[int, torch.Tensor] = {}
    vv_taps: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(backbone.blocks, start=1):
        if i < start:
            x = blk(x)
        elif _is_plain_block(blk):
            x, vv = _dual_block(blk, x, x if vv is None else vv)
        else:
            vv = (x if vv is None else vv) + block_attention(blk, blk.ln_1(x), mode="vv")
            x = blk(x)
        if i in wanted:
            taps[i] = x
            vv_taps[i] = vv
    return backbone.project_tokens(x[:, 0]), taps, vv_taps


def _is_plain_block(blk: nn.Module) -> bool:
    """An open_clip ``ResidualAttentionBlock`` whose forward :func:`_dual_block` reproduces."""
    attn = getattr(blk, "attn", None)
    return (type(blk).__name__ == "ResidualAttentionBlock" and not hasattr(blk, "ln_1_kv")
            and isinstance(attn, nn.MultiheadAttention) and attn.in_proj_weight is not None
            and attn.batch_first and all(hasattr(blk, n) for n in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")))


def _dual_block(blk: nn.Module, x: torch.Tensor, vv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One block on both paths with one Q-K-V projection (the authors' dual-path attention).

    Original path: ``x + ls_1(Attn(Q, K, V)) -> + ls_2(MLP(ln_2(.)))`` — open_clip's block
    forward; V-V path: ``vv + ls_1(Attn(V, V, V))``, no FFN. Both attentions share the values
    of ``ln_1(x)`` and run as one batched call.
    """
    attn = blk.attn
    B, L, W = x.shape
    H = attn.num_heads
    q, k, v = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, L, H, W // H).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    out = F.scaled_dot_product_attention(torch.cat([q, v]), torch.cat([k, v]), torch.cat([v, v]))
    out = blk.ls_1(attn.out_proj(out.transpose(1, 2).reshape(2 * B, L, W)))
    x = x + out[:B]
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, vv + out[B:]


def window_indices(grid: tuple[int, int], size: int, stride: int = 1,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Patch indices [n_windows, size * size] (row-major) of every ``size``×``size`` window.

    Windows slide with ``stride`` over a ``grid`` = (rows, cols) patch grid, row by row.
    """
    rows, cols = grid
    if not 1 <= size <= min(rows, cols):
        raise ValueError(f"window size {size} does not fit a {rows}x{cols} patch grid")
    idx = torch.arange(rows * cols, device=device).reshape(rows, cols)
    win = idx.unfold(0, size, stride).unfold(1, size, stride)  # [r', c', size, size]
    return win.reshape(-1, size * size)


def encode_windows(backbone: ClipBackbone, tokens: torch.Tensor, windows: torch.Tensor, *,
                   chunk: int = 4096) -> torch.Tensor:
    """Re-encode windows of patch tokens through the whole transformer: [B, n_windows, D].

    ``tokens`` [B, 1 + N, W] are the embedded input tokens (:meth:`ClipBackbone.embed_patches`:
    patch + position embeddings, ``ln_pre``). Each window keeps the class token and its own
    patch tokens (``windows`` [n_windows, k], patch indices), runs through every block, and is
    read out like the image (``ln_post`` + ``proj`` on the class token) — WinCLIP's window
    embedding (Jeong et al. 2023, §4.2). ``chunk`` bounds the sequences per forward pass.
    """
    B = tokens.shape[0]
    n, k = windows.shape
    cls = tokens[:, :1]
    patches = tokens[:, 1:]
    flat = windows.reshape(-1).to(tokens.device)
    seqs = torch.cat([cls.unsqueeze(1).expand(B, n, 1, -1),
                      patches[:, flat].reshape(B, n, k, -1)], dim=2).reshape(B * n, k + 1, -1)
    out = []
    for s in range(0, seqs.shape[0], chunk):
        x = seqs[s:s + chunk]
        for blk in backbone.blocks:
            x = blk(x)
        out.append(backbone.project_tokens(x[:, 0]))
    return torch.cat(out, dim=0).reshape(B, n, -1)
