"""Shared pieces of the prompt-learning family (coop, anomalyclip, tokenclip, mpa, mpama).

* :class:`PromptTemplate` — a tokenised sentence whose first ``n_ctx`` words are
  placeholders for learnable word embeddings (CoOp, Zhou et al. 2022, §3.2: ``[SOS][V]_1 …
  [V]_M [words] . [EOS]``), e.g. AnomalyCLIP's object-agnostic ``"[X]×12 object."`` /
  ``"[X]×12 damaged object."`` (Zhou et al. 2024, §3.2).
* :class:`DeepTextPrompts` — AnomalyCLIP's deep text prompts (§3.2, "refine the original
  textual space"; released ``learnabel_text_embedding_depth/length``): a set of ``length``
  learnable tokens per text block ``2 … depth`` (1-based) that replace the token
  positions ``1 … length`` at that block's input.
* :func:`encode_text` — CLIP's text tower on prompt embeddings with deep tokens, cut
  after the last end-of-text token (exact under the causal mask, ~5× shorter sequences).
* :func:`dpam_features` — AnomalyCLIP's DPAM (diagonally prominent attention map, §3.3):
  the V-V self-attention path of :func:`bench.backbone.encode_image_vv` from a start block
  on (residual, FFN skipped), with patch tokens read out through ``ln_post`` + ``proj``.
* :func:`scale_layers` — the proportional layer mapping that lets ViT-L/14 layer numbers
  (24 visual blocks, 12 text blocks) run on smaller backbones such as ``zsad-tiny``.
* :func:`similarity_map` / :func:`gaussian_blur` / :func:`avg_pool_tokens` — map helpers.
* :class:`PromptMethodBase` — layer mapping, frozen-feature cache and the Adam fit loop
  shared by the trained methods of the family.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.backbone import encode_image_vv
from methods.base import Method
from methods.common import (  # noqa: F401 - re-exported for the family's modules
    REFERENCE_TEXT_DEPTH,
    REFERENCE_VISUAL_DEPTH,
    gaussian_blur,
    scale_layer,
    scale_layers,
    train_steps,
)

# -- learnable text prompts ----------------------------------------------------------------

class PromptTemplate:
    """Sentences ``"X X … X <suffix>"`` whose ``n_ctx`` X's are learnable word embeddings.

    Tokenised once; the frozen embeddings of the start token (prefix) and of everything after
    the placeholders (suffix words, ".", end-of-text) are kept, cut after the longest
    end-of-text token. :meth:`embed` puts context vectors [T, n_ctx, W] (or one [n_ctx, W]
    shared by every sentence) between them -> [T, L, W] for :func:`encode_text`.
    """

    def __init__(self, backbone: Any, suffixes: Sequence[str], n_ctx: int) -> None:
        self.n_ctx = int(n_ctx)
        texts = [" ".join(["X"] * self.n_ctx + [s]).strip() for s in suffixes]
        tokens = backbone.tokenize(texts)
        length = int(tokens.argmax(dim=-1).max()) + 1
        if 1 + self.n_ctx >= length:
            raise ValueError(f"prompt with {n_ctx} context tokens does not fit the context length")
        self.tokens = tokens[:, :length]
        with torch.no_grad():
            emb = backbone.token_embedding(self.tokens)
        self.prefix = emb[:, :1]
        self.suffix = emb[:, 1 + self.n_ctx:]
        self.texts = texts

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def embed(self, ctx: torch.Tensor) -> torch.Tensor:
        T = len(self)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(T, -1, -1)
        if ctx.shape[:2] != (T, self.n_ctx):
            raise ValueError(f"context {tuple(ctx.shape)} does not match {T} prompts x {self.n_ctx} tokens")
        return torch.cat([self.prefix.to(ctx), ctx, self.suffix.to(ctx)], dim=1)


def init_context(n: int, width: int, std: float = 0.02) -> nn.Parameter:
    """Learnable word embeddings [n, width] ~ N(0, std²) (CoOp §3.2 / AnomalyCLIP init)."""
    return nn.Parameter(torch.randn(n, width) * std)


class DeepTextPrompts(nn.Module):
    """Per-block learnable text tokens (AnomalyCLIP's deep prompts).

    ``depth`` counts text blocks like the released code: blocks ``2 … depth`` (1-based) each
    get ``length`` tokens of their own, i.e. ``depth - 1`` sets (depth 9, length 4 on CLIP's
    12-block text tower: 8 sets × 4 tokens). ``depth`` <= 1 means no deep prompts.
    """

    def __init__(self, depth: int, length: int, width: int, std: float = 0.02) -> None:
        super().__init__()
        self.depth, self.length = int(depth), int(length)
        self.tokens = nn.ParameterList(
            [nn.Parameter(torch.randn(self.length, width) * std) for _ in range(max(self.depth - 1, 0))])

    @property
    def start(self) -> int:
        """0-based index of the first text block that receives deep tokens (block 2, 1-based)."""
        return 1

    def forward(self) -> list[torch.Tensor]:
        return list(self.tokens)


def encode_text(backbone: Any, embeddings: torch.Tensor, tokens: torch.Tensor,
                deep_prompts: Sequence[torch.Tensor] = (), deep_start: int = 1) -> torch.Tensor:
    """CLIP's text tower on prompt embeddings [T, L, W] -> raw text features [T, D].

    ``tokens`` [T, L] locate the end-of-text token (argmax, as CLIP). ``deep_prompts[j]``
    ([n, W] or [T, n, W]) replaces positions ``1 … n`` at the input of block ``deep_start + j``
    (0-based), as :meth:`bench.backbone.ClipBackbone.encode_text_embeddings` does; here the
    sequences may be shorter than the context length (cut after the end-of-text token).
    Gradients flow to ``embeddings`` and ``deep_prompts``.
    """
    m = backbone.model
    L = embeddings.shape[1]
    x = embeddings + m.positional_embedding[:L].to(embeddings.dtype)
    mask = m.attn_mask[:L, :L] if m.attn_mask is not None else None
    deep = list(deep_prompts)
    for i, blk in enumerate(m.transformer.resblocks):
        j = i - deep_start
        if 0 <= j < len(deep):
            p = deep[j]
            p = p.unsqueeze(0).expand(x.shape[0], -1, -1) if p.dim() == 2 else p
            x = torch.cat([x[:, :1], p.to(x.dtype), x[:, 1 + p.shape[1]:]], dim=1)
        x = blk(x, attn_mask=mask)
    x = m.ln_final(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    proj = m.text_projection
    return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


# -- DPAM (AnomalyCLIP §3.3) ---------------------------------------------------------------

def dpam_features(backbone: Any, images: torch.Tensor, *, start: int, layers: Sequence[int],
                  project: bool = True) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Global embedding [B, D] and V-V-path patch tokens per layer ({l: [B, N, D or W]}).

    AnomalyCLIP replaces the attention of blocks ``start … L`` (released code: layers 6–24 of
    ViT-L/14, ``DPAM_layer=20``) by V-V self-attention on a second path that skips the FFN,
    keeping the original path for the class token. The global embedding is the original
    class token read out through ``ln_post`` + ``proj`` — the released code omits ``ln_post``
    there (AnomalyCLIP issue #14); we do not copy that. ``start`` = 0 disables DPAM (patch
    tokens of the original path). ``project=False`` returns the tapped tokens before
    ``ln_post`` + ``proj`` (width W, for methods that project themselves).
    """
    with torch.no_grad():
        if start and start >= 1:
            feats = encode_image_vv(backbone, images, start=int(start), layers=list(layers))
            taps = feats.vv_taps
        else:
            feats = backbone.encode_image(images, layers=list(layers))
            taps = feats.taps
        out = {ly: (backbone.project_tokens(t[:, 1:]) if project else t[:, 1:]) for ly, t in taps.items()}
        return feats.global_embedding, out


# -- maps ----------------------------------------------------------------------------------

def two_class_logits(features: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """cos(features, text) / temperature: features [..., D], text [2, D] -> [..., 2]."""
    return F.normalize(features, dim=-1) @ F.normalize(text, dim=-1).T / temperature


def similarity_map(patch_logits: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Patch logits [B, N, 2] -> upsampled probabilities [B, 2, *size] (softmax, then bilinear).

    AnomalyCLIP's ``get_similarity_map``: softmax over {normal, anomalous} per patch, reshape
    to the patch grid, bilinear interpolation (``align_corners=False``) to the image size.
    """
    B = patch_logits.shape[0]
    probs = patch_logits.softmax(dim=-1).transpose(1, 2).reshape(B, 2, *grid)
    return F.interpolate(probs, size=size, mode="bilinear", align_corners=False)


def avg_pool_tokens(tokens: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """Average of every token's ``p × p`` neighbourhood on the patch grid: [B, N, C] -> [B, N, C].

    MPA's aggregation operator AGG_p with average pooling (§3.1): stride 1, the window
    "centred" on the token — for even ``p`` it extends one more patch to the bottom/right —
    and only tokens inside the grid are averaged (border windows are smaller). ``p`` = 1 is
    the identity.
    """
    if p <= 1:
        return tokens
    B, N, C = tokens.shape
    h, w = grid
    x = tokens.transpose(1, 2).reshape(B, C, h, w)
    lo, hi = (p - 1) // 2, p // 2
    pad = (lo, hi, lo, hi)
    s = F.avg_pool2d(F.pad(x, pad), p, stride=1, divisor_override=1)
    ones = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
    cnt = F.avg_pool2d(F.pad(ones, pad), p, stride=1, divisor_override=1)
    return (s / cnt).reshape(B, C, N).transpose(1, 2)


# -- method base ---------------------------------------------------------------------------

class PromptMethodBase(Method):
    """Common plumbing of the learnable-prompt methods: layer mapping, DPAM features, fit loop."""

    trains = True
    #: False: :meth:`image_features` returns patch tokens before ``ln_post`` + ``proj``.
    project_patch_tokens: bool = True

    def _visual_layers(self) -> tuple[int, list[int]]:
        """(DPAM start block, tapped blocks) on this backbone (proportional mapping)."""
        bb = self.backbone
        start = scale_layer(int(self.hparams.get("dpam_start", 0)), bb.num_layers)
        layers = scale_layers(self.hparams.get("feature_layers", [24]), bb.num_layers)
        if start:
            layers = [max(layer, start) for layer in layers]
            layers = list(dict.fromkeys(layers))
        return start, layers

    def _deep_depth(self) -> int:
        return scale_layer(int(self.hparams.get("deep_depth", 0)), self.backbone.text_layers,
                           REFERENCE_TEXT_DEPTH)

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Frozen visual features (global [B, D], {layer: patch tokens [B, N, D]}).

        The visual path is frozen, so under the runner these passes are served by the
        backbone's shared feature cache (:mod:`bench.feature_cache`, paths ``plain`` and
        ``vv<start>``): epochs, seeds and methods on the same images compute them once.
        """
        start, layers = self._visual_layers()
        return dpam_features(self.backbone, images.to(self.device), start=start, layers=layers,
                             project=self.project_patch_tokens)

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def parameters_to_train(self) -> list[nn.Parameter]:
        assert self.head is not None
        return [p for p in self.head.parameters() if p.requires_grad]

    def fit(self, aux_loader, *, epochs: int | None = None, seed: int = 0, progress=iter) -> None:
        hp = self.hparams
        opt = torch.optim.Adam(self.parameters_to_train(), lr=float(hp["lr"]),
                               betas=tuple(hp.get("betas", (0.9, 0.999))))
        self.losses: list[float] = []
        train_steps(self.head, opt, int(hp["epochs"] if epochs is None else epochs),
                    lambda: progress(aux_loader), self.training_loss, losses=self.losses)
