"""MPA and MPAMA: multi-granularity visual–textual alignment (ICLR 2026 submission).

"Learning multi-granularity visual-textual alignment for zero-shot anomaly detection"
(anonymous; ``shared/papers/mpa_mpama.txt``), reimplemented from the paper:

**MPA (stage 1)** adapts the text side only (§3.1):

* multi-perception local prompts for perception levels P = {1, 2, 3, 4}:
  ``L_n^p = [V_1]…[V_S][V_{S+1}^p]…[V_E^p][object]``,
  ``L_a^p = [W_1]…[W_S][W_{S+1}^p]…[W_E^p][damaged][object]`` with E = 12 learnable
  embeddings of which the first S = 2 are shared by all levels;
* level p compares its prompt with the patch tokens averaged over each token's p × p
  neighbourhood (AGG_p = average pooling), Eq. 1;
* a decoupled global prompt ``G_c = [V^G]×E [object]`` / ``[W^G]×E [damaged][object]``
  (Eq. 2) with the cross-level bridge ``G̃_c = MLP(Concat(G_c, max_p L̄_c^p))``;
* loss (Eq. 5): ``L_global`` (cross-entropy, Eq. 3) + ``L_local`` (Σ_p focal + two Dice,
  Eq. 4) + λ ``L_hinge`` (Σ_p, δ_a = δ_n = 0.5), λ = 5; Adam lr 1e-3, batch 8, 30 epochs,
  518 px, top-layer visual features.

**MPAMA (stage 2)** freezes the text side and adapts the visual projection with a mixture of
experts (§3.2): the expert pool holds one frozen expert, learnable experts and one zero
expert (``h^z(v) = 0``), all initialised from CLIP's projection; a learnable router
``Ro(v̄) = w v̄`` picks the top-2 experts per token, gated by the softmax of the router
logits; routing happens *before* the projection on the aggregated tokens (pre-aggregation:
``v_i^p = Σ e_i h_i(AGG_p(v̄_i))``). 5 experts when trained on MVTec AD, 4 on VisA
(§4: 1 frozen + 3 / 2 learnable + 1 zero). Loss ``L_local + λ L_hinge`` (Eq. 6), Adam
lr 1e-6, 10 epochs. MPAMA starts from the trained MPA of the same seed.

**Inference** (§3.2): the map is the mean of the per-level anomalous maps; the image score
``½ P(g̃_a, f) + ½ max(S_a)``.

Our choices where the paper is silent (hyperparameters; ``docs/methods.md``):

* The visual side follows AnomalyCLIP, whose pipeline both stages build on ("we follow the
  data processing of AnomalyCLIP"; the ablation's baseline row is AnomalyCLIP's numbers):
  DPAM (V-V attention) from block 6 and top-layer (24) patch tokens, AnomalyCLIP's deep text
  tokens (depth 9, length 4; shared by all prompts), temperature 0.07, Adam betas
  (0.5, 0.999) and the test-time Gaussian (σ = 4 px). ``dpam_start=0`` / ``deep_depth=0``
  turn them off.
* For even p the p × p window extends one patch more to the bottom/right; border windows
  average only the tokens inside the grid.
* The bridge MLP is Linear(2W → W), GELU, Linear(W → W), shared by both classes; the maximum
  is element-wise over the levels' full learnable parts (shared prefix included).
* The experts are copies of CLIP's visual ``proj`` matrix; ``ln_post`` (frozen) is applied
  before routing, so v̄ is the normalised, unprojected token. The gates are the router's
  softmax over all experts restricted to the top-2 (as Eq. in §3.2 is written, not
  renormalised; ``router_renormalize=True`` renormalises). The router is initialised
  N(0, 0.02²). The global (class-token) path is not routed.
* The image score uses the maximum of the final (smoothed) map.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Prediction, register
from methods.losses import hinge_loss, segmentation_loss
from methods.prompt_learning import (
    DeepTextPrompts,
    PromptMethodBase,
    PromptTemplate,
    avg_pool_tokens,
    encode_text,
    gaussian_blur,
    init_context,
    similarity_map,
    two_class_logits,
)

MPA_BIBTEX = """@misc{mpamama2025,
  title={Learning Multi-Granularity Visual-Textual Alignment for Zero-Shot Anomaly Detection},
  author={Anonymous},
  note={Under review at ICLR 2026 (MPA and MPAMA)}, year={2025}}"""


class MPAHead(nn.Module):
    """Stage-1 learnable state: shared prefixes, per-level contexts, global contexts, bridge, deep tokens."""

    def __init__(self, width: int, n_ctx: int, n_shared: int, n_levels: int, deep_depth: int,
                 deep_length: int) -> None:
        super().__init__()
        if not 0 <= n_shared <= n_ctx:
            raise ValueError(f"shared prefix {n_shared} must be within the {n_ctx} context tokens")
        self.n_levels = n_levels
        # index 0: normal, 1: anomalous
        self.shared = nn.ParameterList([init_context(n_shared, width) for _ in range(2)])
        self.levels = nn.ParameterList([init_context(n_ctx - n_shared, width)
                                        for _ in range(2 * n_levels)])
        self.ctx_global = nn.ParameterList([init_context(n_ctx, width) for _ in range(2)])
        self.bridge = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, width))
        self.deep = DeepTextPrompts(deep_depth, deep_length, width)

    def local_contexts(self) -> torch.Tensor:
        """[n_levels, 2, n_ctx, W]: ``[shared prefix | level-specific]`` per level and class."""
        out = [[torch.cat([self.shared[c], self.levels[2 * p + c]]) for c in range(2)]
               for p in range(self.n_levels)]
        return torch.stack([torch.stack(pair) for pair in out])

    def contexts(self) -> torch.Tensor:
        """[2 n_levels + 2, n_ctx, W]: local (level-major, normal then anomalous), then global."""
        local = self.local_contexts()
        salient = local.amax(dim=0)                                      # max_p L̄_c^p: [2, E, W]
        glob = torch.stack(list(self.ctx_global))
        bridged = self.bridge(torch.cat([glob, salient], dim=-1))
        return torch.cat([local.flatten(0, 1), bridged])


class MoEProjection(nn.Module):
    """Mixture-of-experts visual projection of MPAMA (§3.2).

    Experts (in order): one frozen copy of ``proj``, ``n_experts - 2`` learnable copies, one
    zero expert. Router: ``nn.Linear(W, n_experts, bias=False)``; top-``top_k`` gating.
    """

    def __init__(self, proj: torch.Tensor, n_experts: int, top_k: int, renormalize: bool = False,
                 router_std: float = 0.02) -> None:
        super().__init__()
        if n_experts < 3:
            raise ValueError("MPAMA needs >= 3 experts (frozen, learnable, zero)")
        W, D = proj.shape
        self.register_buffer("frozen", proj.detach().clone())
        self.learnable = nn.Parameter(proj.detach().clone().unsqueeze(0).repeat(n_experts - 2, 1, 1))
        self.router = nn.Linear(W, n_experts, bias=False)
        nn.init.normal_(self.router.weight, std=router_std)
        self.n_experts, self.top_k, self.renormalize = n_experts, int(top_k), bool(renormalize)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """[..., W] -> gates [..., n_experts], non-zero for the top-k experts only."""
        probs = self.router(x).softmax(dim=-1)
        vals, idx = probs.topk(min(self.top_k, self.n_experts), dim=-1)
        if self.renormalize:
            vals = vals / vals.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, idx, vals)

    def experts(self) -> torch.Tensor:
        """[n_experts, W, D] (the zero expert is a zero matrix)."""
        zero = torch.zeros_like(self.frozen).unsqueeze(0)
        return torch.cat([self.frozen.unsqueeze(0), self.learnable, zero])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, W] (ln_post-ed, aggregated tokens) -> Σ_e g_e h_e(x): [B, N, D]."""
        g = self.gates(x)
        out = torch.einsum("bnw,ewd->bned", x, self.experts())
        return torch.einsum("bned,bne->bnd", out, g)


MPA_DEFAULTS: dict[str, Any] = {
    "epochs": 30,
    "lr": 1e-3,
    "betas": [0.5, 0.999],
    "batch_size": 8,
    "n_ctx": 12,                     # E
    "n_shared": 2,                   # S
    "levels": [1, 2, 3, 4],          # perception set P
    "normal_suffix": "object.",
    "anomalous_suffix": "damaged object.",
    "deep_depth": 9,
    "deep_length": 4,
    "dpam_start": 6,
    "feature_layers": [24],
    "temperature": 0.07,
    "hinge_weight": 5.0,             # λ
    "hinge_delta_n": 0.5,
    "hinge_delta_a": 0.5,
    "focal_gamma": 2.0,
    "image_map_weight": 0.5,         # score = ½ P(global) + ½ max(map)
    "sigma": 4.0,
}


@register("mpa")
class MPA(PromptMethodBase):
    """MPA: multi-perception local prompts (levels 1-4) + bridged global prompt, text-only (stage 1)."""

    paper = ("Learning Multi-Granularity Visual-Textual Alignment for Zero-Shot Anomaly "
             "Detection (MPA), ICLR 2026 submission")
    bibtex = MPA_BIBTEX
    default_hparams: dict[str, Any] = dict(MPA_DEFAULTS)

    def __init__(self, backbone: Any, **hparams: Any) -> None:
        super().__init__(backbone, **hparams)
        hp = self.hparams
        self.levels = [int(p) for p in hp["levels"]]
        self.template = PromptTemplate(
            backbone, [hp["normal_suffix"], hp["anomalous_suffix"]] * (len(self.levels) + 1), hp["n_ctx"])
        self.head = self._make_text_head().to(backbone.device)

    def _make_text_head(self) -> MPAHead:
        hp = self.hparams
        return MPAHead(self.backbone.text_width, hp["n_ctx"], hp["n_shared"], len(self.levels),
                       self._deep_depth(), hp["deep_length"])

    @property
    def text_head(self) -> MPAHead:
        return self.head

    def text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(local [n_levels, 2, D], global [2, D]) raw text features."""
        h = self.text_head
        emb = self.template.embed(h.contexts())
        text = encode_text(self.backbone, emb, self.template.tokens, h.deep(), h.deep.start)
        n = len(self.levels)
        return text[:2 * n].reshape(n, 2, -1), text[2 * n:]

    def level_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Global embedding [B, D] and the aggregated patch tokens of every level [B, N, D]."""
        glob, patches = self.image_features(images)
        v = F.normalize(list(patches.values())[-1], dim=-1)
        grid = (self.backbone.grid_size, self.backbone.grid_size)
        return glob, [avg_pool_tokens(v, grid, p) for p in self.levels]

    def level_maps(self, tokens: list[torch.Tensor], local: torch.Tensor,
                   size: tuple[int, int]) -> list[torch.Tensor]:
        """Per-level upsampled softmax maps [B, 2, H, W] (Eq. 1)."""
        T = float(self.hparams["temperature"])
        grid = (self.backbone.grid_size, self.backbone.grid_size)
        return [similarity_map(two_class_logits(v, local[i], T), grid, size)
                for i, v in enumerate(tokens)]

    def local_loss(self, maps: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Σ_p [Focal + Dice + Dice] + λ Σ_p hinge (Eqs. 4–6)."""
        hp = self.hparams
        seg = sum(segmentation_loss(m, mask, gamma=float(hp["focal_gamma"])) for m in maps)
        hinge = sum(hinge_loss(m[:, 1], mask, delta_n=float(hp["hinge_delta_n"]),
                               delta_a=float(hp["hinge_delta_a"])) for m in maps)
        return seg + float(hp["hinge_weight"]) * hinge

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        images = batch["image"].to(self.device)
        mask = batch["mask"].to(self.device)
        local, glob_text = self.text_features()
        glob, tokens = self.level_tokens(images)
        ce = F.cross_entropy(two_class_logits(glob, glob_text, float(self.hparams["temperature"])),
                             batch["label"].to(self.device).long())
        return ce + self.local_loss(self.level_maps(tokens, local, tuple(images.shape[-2:])), mask)

    def _predict_from(self, images: torch.Tensor, glob: torch.Tensor, tokens: list[torch.Tensor],
                      local: torch.Tensor, glob_text: torch.Tensor) -> Prediction:
        hp = self.hparams
        maps = self.level_maps(tokens, local, tuple(images.shape[-2:]))
        amap = gaussian_blur(torch.stack([m[:, 1] for m in maps]).mean(0), float(hp["sigma"]))
        p_global = two_class_logits(glob, glob_text, float(hp["temperature"])).softmax(-1)[:, 1]
        w = float(hp["image_map_weight"])
        return Prediction((1 - w) * p_global + w * amap.flatten(1).amax(1), amap)

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> Prediction:
        images = batch["image"].to(self.device)
        local, glob_text = self.text_features()
        glob, tokens = self.level_tokens(images)
        return self._predict_from(images, glob, tokens, local, glob_text)


class MPAMAHead(nn.Module):
    """Stage-2 state: the (frozen) MPA text head and the mixture-of-experts projection."""

    def __init__(self, mpa: MPAHead, moe: MoEProjection) -> None:
        super().__init__()
        self.mpa = mpa.requires_grad_(False)
        self.moe = moe


@register("mpama")
class MPAMA(MPA):
    """MPAMA: MPA's frozen prompts + mixture-of-experts visual projection (stage 2)."""

    requires = "mpa"
    project_patch_tokens = False          # the experts are the projection
    paper = ("Learning Multi-Granularity Visual-Textual Alignment for Zero-Shot Anomaly "
             "Detection (MPAMA), ICLR 2026 submission")
    default_hparams: dict[str, Any] = {
        **MPA_DEFAULTS,
        "epochs": 10,
        "lr": 1e-6,
        "n_experts": 5,                  # 5 for MVTec AD as aux, 4 for VisA (full.toml sets it)
        "router_top_k": 2,
        "router_renormalize": False,
        "router_std": 0.02,
    }

    def _make_text_head(self) -> MPAMAHead:
        hp = self.hparams
        moe = MoEProjection(self.backbone.model.visual.proj, int(hp["n_experts"]),
                            int(hp["router_top_k"]), bool(hp["router_renormalize"]),
                            float(hp["router_std"]))
        return MPAMAHead(super()._make_text_head(), moe)

    @property
    def text_head(self) -> MPAHead:
        return self.head.mpa

    def init_from(self, state: dict[str, torch.Tensor]) -> None:
        """Start from the trained MPA (same aux, same seed): its prompts, frozen."""
        self.head.mpa.load_state_dict(state)

    def parameters_to_train(self) -> list[nn.Parameter]:
        return [p for p in self.head.moe.parameters() if p.requires_grad]

    def level_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Pre-aggregation routing: v^p = Σ_e g_e h_e(AGG_p(ln_post(v̄))) for every level p."""
        bb = self.backbone
        glob, raw = self.image_features(images)                          # unprojected tokens
        x = bb.model.visual.ln_post(list(raw.values())[-1])            # v̄: [B, N, W]
        grid = (bb.grid_size, bb.grid_size)
        return glob, [self.head.moe(avg_pool_tokens(x, grid, p)) for p in self.levels]

    def fit(self, aux_loader, *, epochs: int | None = None, seed: int = 0, progress=iter) -> None:
        with torch.no_grad():
            self._frozen_text = self.text_features()
        try:
            super().fit(aux_loader, epochs=epochs, seed=seed, progress=progress)
        finally:
            self._frozen_text = None

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        images = batch["image"].to(self.device)
        local, _ = self._frozen_text
        _, tokens = self.level_tokens(images)
        maps = self.level_maps(tokens, local, tuple(images.shape[-2:]))
        return self.local_loss(maps, batch["mask"].to(self.device))     # Eq. 6
