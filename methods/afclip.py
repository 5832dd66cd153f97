"""AF-CLIP and AF-CLIP+ (Fang, Lv & Su, ACM MM 2025): anomaly-focused adaptation of CLIP's visual features.

AF-CLIP (zero-shot, §4.1–4.4), on a frozen CLIP ViT:

* **Features** (§4.1, Eq. 2): the tokens ``a^ℓ = [a_CLS, a_1..a_N]`` after four blocks
  ℓ ∈ {6, 12, 18, 24} of ViT-L/14 (mapped proportionally on other depths,
  :func:`methods.vand.scale_layers`).
* **Multi-scale spatial aggregation** (§4.1, Eq. 5–6): for each window size r ∈ {1, 3, 5}
  every patch feature is replaced by a Gaussian-weighted average (σ = 4, the released code's
  value) of its r×r neighbourhood, centre included; r = 1 is the identity; the class token is
  kept: ``c^{ℓr} = [a_CLS; b̃^{ℓr}]`` (:func:`aggregate`). At the grid's borders the weights
  are renormalised over the positions inside the grid; the released code applies the fixed
  kernel to a zero-padded grid, which scales each border feature by a constant — immaterial
  here, since every consumer is invariant to a per-token scale (the adapter starts with a
  LayerNorm, the memory bank of AF-CLIP+ compares cosines): the two agree to LayerNorm's eps.
* **Attention adapter** (§4.1, Eq. 3–4): one lightweight multi-head attention module
  ``H_a`` — LayerNorm, then Q, K, V projections (no bias) to ``heads × head_dim`` and an output
  projection O back to the width — shared by all blocks and scales, applied to the CLS and
  patch tokens together: ``c̃^{ℓr} = H_a(c^{ℓr})`` (:class:`AttentionAdapter`). Its output
  replaces the features (no residual), as in the released code.
* **Projection** (Eq. 7): CLIP's own visual head (``ln_post`` + ``proj``), frozen.
* **Text** (§4.2, Eq. 8): M = 12 learnable word embeddings shared by two prompts with fixed
  suffixes "without defect." (normal) and "with defect." (anomalous), through the frozen
  text encoder (:class:`StatePrompts`).
* **Scores** (§4.3, Eq. 9–10): ``S_i = Σ_{ℓ,r} cos(z_i^{ℓr}, t) / τ`` (τ = 0.07), a softmax
  over {normal, anomalous}; ``p_CLS`` is the image score, the patch probabilities ``P̃`` the map,
  upsampled (bilinear) and smoothed with a Gaussian (σ = 4) at inference (§4.4).
* **Loss** (§4.3, Eq. 11–15): ``L = L_cls + λ1 L_seg + λ2 L_pal`` with λ1 = λ2 = 1;
  ``L_cls = Focal(p_CLS, y)``; ``L_seg = Focal(P̃, M̃) + L1(P̃, M̃)`` (Eq. 13); ``L_pal`` the
  patch alignment hinge (Eq. 14, :func:`patch_alignment_loss`). As in the released
  ``main.py``: the focal is the plain BCE-based one, γ = 4
  (:func:`methods.losses.focal_loss_bce`, ``focal_variant="bce"``), not the label-smoothed
  focal of AnomalyCLIP/VAND; the target ``M̃`` is the mask down-sampled to the patch grid
  (bilinear) with values < 0.5 set to 0 and > 0.5 set to 1 — a cell of exactly 0.5 (a mask
  edge at mid-patch) stays 0.5 (:func:`grid_targets`) and is in no pair of ``L_pal``.
* **The released gradient bug** (``released_grad_bug``, default False): the released
  ``patch_alignment_loss`` overwrites 0 → −1 in place on a storage-sharing copy of the target
  after the map's focal saved it for backward, so its backward differentiates that focal with
  target −1 at every normal cell (the loss value is unaffected). By default the suite
  computes the gradient of the stated loss; ``released_grad_bug=True`` reproduces the
  released gradient exactly (:func:`released_target_overwrite`).
* **Training** (§5.1): Adam lr 1e-4 (betas (0.5, 0.999) as in the released code), batch 8,
  2 epochs, image size 518 (the protocol's), learnable parts: adapter + prompt embeddings.

AF-CLIP+ (few-shot, §4.4, Eq. 16–18): memory banks ``B^{ℓr}`` of the aggregated (not adapted)
patch features ``c^{ℓr}`` of k normal reference images of the target category; per test
patch ``A_i^{ℓr} = min_b (1 - cos(c_i^{ℓr}, b)) / 2``, averaged over blocks and scales;
``S_img = max_i A_i + α p_CLS``, ``S_map = A + β P̃`` with α = β = 0.1. No further training:
it reuses AF-CLIP's trained state (same aux, same seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Method, Prediction, register
from methods.common import gaussian_blur, scale_layers, train_steps
from methods.losses import dice_loss, focal_loss, focal_loss_bce

BIBTEX = """@inproceedings{fang2025afclip,
  title={AF-CLIP: Zero-Shot Anomaly Detection via Anomaly-Focused CLIP Adaptation},
  author={Fang, Qingqing and Lv, Wenxi and Su, Qinliang},
  booktitle={Proceedings of the 33rd ACM International Conference on Multimedia (MM '25)},
  year={2025}, doi={10.1145/3746027.3755635}}"""
PAPER = ("Fang, Lv & Su, AF-CLIP: Zero-Shot Anomaly Detection via Anomaly-Focused CLIP "
         "Adaptation, ACM MM 2025")


# ======================================================================================
# Building blocks
# ======================================================================================

def aggregation_kernel(r: int, sigma: float) -> torch.Tensor:
    """Unnormalised Gaussian weights η [r, r] of an r×r window around its centre (§4.1)."""
    if r < 1 or r % 2 == 0:
        raise ValueError(f"aggregation window must be odd and >= 1, got {r}")
    d = torch.arange(r, dtype=torch.float64) - (r - 1) / 2
    return torch.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma ** 2))


AGGREGATION_BORDERS = ("renormalise", "zero_pad")


def aggregate(tokens: torch.Tensor, grid: tuple[int, int], r: int, sigma: float = 4.0,
              border: str = "renormalise") -> torch.Tensor:
    """Multi-scale spatial aggregation of AF-CLIP (§4.1, Eq. 5–6) at one window size ``r``.

    ``tokens`` [B, 1 + N, W] (class token first) on a ``grid`` = (rows, cols) patch grid.
    Each patch becomes ``Σ_j η_j^r b_j`` over the r×r window around it, with
    ``η_j^r = η_j / Σ_{j'} η_{j'}``. ``border="renormalise"``: normalised over the window
    positions that lie inside the grid (so the weights sum to one everywhere, borders
    included); ``"zero_pad"``: normalised over the whole window and applied to the
    zero-padded grid (the released ``aggerate_neighbor``: border features shrink). The two
    differ by a positive scale per token, which AF-CLIP's consumers (LayerNorm, cosines) do
    not see. The class token is kept unchanged; ``r = 1`` returns ``tokens`` itself.
    """
    if border not in AGGREGATION_BORDERS:
        raise ValueError(f"aggregation border must be one of {AGGREGATION_BORDERS}, got {border!r}")
    if r == 1:
        return tokens
    B, L, W = tokens.shape
    h, w = grid
    if L != 1 + h * w:
        raise ValueError(f"expected 1 + {h}x{w} tokens, got {L}")
    k = aggregation_kernel(r, sigma).to(tokens)
    x = tokens[:, 1:].transpose(1, 2).reshape(B, W, h, w)
    num = F.conv2d(x, k.expand(W, 1, r, r), padding=r // 2, groups=W)
    if border == "zero_pad":
        den = k.sum()
    else:
        den = F.conv2d(torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device), k[None, None],
                       padding=r // 2)
    patches = (num / den).reshape(B, W, h * w).transpose(1, 2)
    return torch.cat([tokens[:, :1], patches], dim=1)


class AttentionAdapter(nn.Module):
    """AF-CLIP's adapter ``H_a`` (§4.1, Eq. 3–4): ``Attention(a W_Q, a W_K, a W_V) W_O`` after a LayerNorm.

    Multi-head (``heads`` × ``head_dim``) self-attention over all tokens of one set, CLS
    included; Q, K, V without bias, O with bias. Learnable parameters:
    :meth:`parameter_count` = ``4 · width · heads · head_dim + 3 · width``.
    """

    def __init__(self, width: int, heads: int = 8, head_dim: int = 64) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, inner, bias=False)
        self.k = nn.Linear(width, inner, bias=False)
        self.v = nn.Linear(width, inner, bias=False)
        self.o = nn.Linear(inner, width)

    @staticmethod
    def parameter_count(width: int, heads: int = 8, head_dim: int = 64) -> int:
        """LayerNorm (2W) + Q, K, V (3 · W · h·d) + O (h·d · W + W)."""
        return 4 * width * heads * head_dim + 3 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        y = self.norm(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, L, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(y)), split(self.k(y)), split(self.v(y)))
        return self.o(out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))


class StatePrompts(nn.Module):
    """M learnable word embeddings shared by the normal and anomalous state prompts (§4.2, Eq. 8)."""

    def __init__(self, length: int, width: int) -> None:
        super().__init__()
        self.ctx = nn.Parameter(torch.empty(length, width))
        nn.init.normal_(self.ctx, std=0.01)  # released code's init


class AFCLIPHead(nn.Module):
    """The learnable state of AF-CLIP: the adapter and the prompt embeddings."""

    def __init__(self, width: int, text_width: int, *, heads: int, head_dim: int,
                 prompt_len: int) -> None:
        super().__init__()
        self.adapter = AttentionAdapter(width, heads, head_dim)
        self.prompts = StatePrompts(prompt_len, text_width)


def grid_targets(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The target ``M̃`` [B, h, w] of ``L_seg`` and ``L_pal``: the mask [B, H, W] on the patch grid.

    As the released ``main.py``: bilinear down-sampling (``align_corners=False``, no
    antialias), then ``gts[gts < 0.5] = 0; gts[gts > 0.5] = 1``. A cell of exactly 0.5 is
    kept: with an even down-sampling factor (patch 14 at 518 px, 8 in the demo) bilinear
    reads the two pixels at the middle of the patch with weights 1/2 each, so a mask edge
    falling there gives exactly 0.5.
    """
    g = F.interpolate(mask.float()[:, None], size=tuple(grid), mode="bilinear",
                      align_corners=False)[:, 0]
    return torch.where(g < 0.5, torch.zeros_like(g), torch.where(g > 0.5, torch.ones_like(g), g))


def released_target_overwrite(target: torch.Tensor) -> None:
    """Reproduce the side effect of the released ``patch_alignment_loss`` on ``target``.

    ``main.py`` does ``new_gts = copy.copy(gts)`` — a second tensor on the same storage
    with its own version counter — then ``new_gts[new_gts == 0] = -1``, after
    ``focal_loss(predict_masks, gts)`` saved ``gts`` for backward (as the target of
    ``F.binary_cross_entropy`` and the ``y`` of ``p * y``). Backward then reads −1 at every
    normal cell; autograd does not notice (the saved tensor's version is not bumped) and the
    loss value, computed before, is unchanged. ``target.data`` is the same kind of alias.
    Called after every term is computed, on the very tensor the focal saved.
    """
    alias = target.data
    alias[alias == 0] = -1


def patch_alignment_loss(patches: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """AF-CLIP's patch alignment loss (§4.3, Eq. 14), averaged over the given feature sets.

    ``patches``: one [B, N, D] tensor of projected patch features per (block, scale);
    ``mask`` [B, N]: 0 = normal, 1 = anomalous; cells with any other value (the 0.5 cells of
    :func:`grid_targets`) are in no pair — in the released code their products with ±1 and
    0.5 are neither −1 nor 1. Within each image, pairs are normal–anomalous (N-A) or
    same-kind (N-N, A-A, each patch with itself included); over the batch,
    ``max(0, mean_{N-A} cos - mean_{N-N ∪ A-A} cos)``. A set without any N-A pair contributes
    0. Computed from per-image sums of normalised features, O(N·D) instead of O(N²·D).
    """
    dtype = patches[0].dtype
    a = (mask == 1).to(dtype)                        # [B, N]
    n = (mask == 0).to(dtype)
    n_a = a.sum(1)
    n_n = n.sum(1)
    pairs_na = (n_n * n_a).sum()
    pairs_same = (n_n ** 2 + n_a ** 2).sum()
    total = patches[0].new_zeros(())
    if pairs_na == 0:
        return total
    for z in patches:
        z = F.normalize(z, dim=-1)
        s_a = torch.einsum("bn,bnd->bd", a, z)
        s_n = torch.einsum("bn,bnd->bd", n, z)
        mean_na = (s_n * s_a).sum() / pairs_na
        mean_same = ((s_n * s_n).sum() + (s_a * s_a).sum()) / pairs_same
        total = total + F.relu(mean_na - mean_same)
    return total / len(patches)


# ======================================================================================
# AF-CLIP
# ======================================================================================

@register("afclip")
class AFCLIP(Method):
    """AF-CLIP: multi-scale spatial aggregation + attention adapter on 4 blocks, learnable state prompts."""

    trains = True
    paper = PAPER
    bibtex = BIBTEX
    default_hparams: dict[str, Any] = {
        "layers": [6, 12, 18, 24],       # of a 24-block ViT; mapped by scale_layers
        "radii": [1, 3, 5],              # aggregation windows r
        "sigma": 4.0,                    # σ of the aggregation weights (released code)
        "adapter_heads": 8,              # released code: 8 heads × 64
        "adapter_head_dim": 64,
        "adapter_residual": False,       # paper/code: none (Eq. 4); True = x + H_a(x), an ablation
        "prompt_len": 12,                # M
        "normal_suffix": "without defect.",
        "anomalous_suffix": "with defect.",
        "temperature": 0.07,             # τ of Eq. 9
        "lambda1": 1.0,                  # weight of L_seg
        "lambda2": 1.0,                  # weight of L_pal
        "focal_gamma": 4.0,              # released code's focal loss
        "focal_variant": "bce",          # released main.py's BCE focal; "smoothed" = AnomalyCLIP's
        "released_grad_bug": False,      # True: the released backward (target -1 at normal cells)
        "seg_loss": ["focal", "l1"],     # Eq. 13; "dice" may replace or join "l1"
        "epochs": 2,
        "lr": 1e-4,
        "betas": [0.5, 0.999],
        "batch_size": 8,
        "smooth_sigma": 4.0,             # Gaussian smoothing of the upsampled map (§4.4)
    }

    #: The released VisionTransformer.forward (clip/model.py) resizes the position grid
    #: bilinearly (no antialias) from 336 to the image size; the prompts use no class words.
    #: AF-CLIP+ inherits it (it shares AF-CLIP's trained state, hence its backbone).
    released_inputs = {"pos_embed_resize": "bilinear"}

    def __init__(self, backbone: Any, **hparams: Any) -> None:
        super().__init__(backbone, **hparams)
        hp = self.hparams
        unknown = sorted(set(hp["seg_loss"]) - {"focal", "l1", "dice"})
        if unknown:
            raise ValueError(f"afclip: unknown seg_loss terms {unknown}; use focal, l1, dice")
        if hp["focal_variant"] not in ("bce", "smoothed"):
            raise ValueError(f"afclip: focal_variant must be 'bce' or 'smoothed', "
                             f"got {hp['focal_variant']!r}")
        self.layers = scale_layers(hp["layers"], backbone.num_layers)
        self.radii = [int(r) for r in hp["radii"]]
        self.head = AFCLIPHead(backbone.width, backbone.text_width, heads=int(hp["adapter_heads"]),
                               head_dim=int(hp["adapter_head_dim"]),
                               prompt_len=int(hp["prompt_len"])).to(backbone.device)
        self.head.eval()
        tokens = backbone.tokenize([hp["normal_suffix"], hp["anomalous_suffix"]])
        self._suffix_tokens = tokens

    # -- text ----------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """[2, D] normalised (normal, anomalous) features of the learnable state prompts.

        As in the released code, the M learnable embeddings precede the tokenised suffix
        (start token included), the sequence is cut to the context length, and the text
        feature is read at the end-of-text token, shifted by M.
        """
        bb = self.backbone
        tokens = self._suffix_tokens.to(bb.device)
        M = self.head.prompts.ctx.shape[0]
        L = bb.context_length
        emb = bb.token_embedding(tokens)
        ctx = self.head.prompts.ctx.to(emb.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        x = torch.cat([ctx, emb], dim=1)[:, :L]
        shifted = torch.cat([tokens.new_zeros(tokens.shape[0], M), tokens], dim=1)[:, :L]
        return F.normalize(bb.encode_text_embeddings(x, shifted), dim=-1)

    # -- visual ----------------------------------------------------------------------------
    @torch.no_grad()
    def aggregated(self, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """The frozen multi-scale features ``c^{ℓr}`` [B, 1 + N, W], block-major, and the grid."""
        feats = self.backbone.encode_image(images, layers=self.layers)
        sigma = float(self.hparams["sigma"])
        sets = [aggregate(feats.taps[layer], feats.grid, r, sigma)
                for layer in self.layers for r in self.radii]
        return sets, feats.grid

    def adapted(self, sets: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``z^{ℓr} = f_p(H_a(c^{ℓr}))`` [B, 1 + N, D] (Eq. 7).

        With the ablation ``adapter_residual=True`` (not the paper's), ``f_p(c + H_a(c))``.
        """
        adapter = self.head.adapter
        if self.hparams["adapter_residual"]:
            return [self.backbone.project_tokens(c + adapter(c)) for c in sets]
        return [self.backbone.project_tokens(adapter(c)) for c in sets]

    def probabilities(self, z: Sequence[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """Eq. 9–10: p_i = softmax_k(Σ_{ℓ,r} cos(z_i^{ℓr}, t_k) / τ)[anomalous] -> [B, 1 + N]."""
        logits = sum(F.normalize(t, dim=-1) @ text.T for t in z) / float(self.hparams["temperature"])
        return logits.softmax(dim=-1)[..., 1]

    def zero_shot(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor],
                                                       list[torch.Tensor], tuple[int, int]]:
        """p_CLS [B], P̃ [B, h, w], the aggregated sets c, the adapted sets z and the grid."""
        sets, grid = self.aggregated(images)
        z = self.adapted(sets)
        p = self.probabilities(z, self.text_features())
        return p[:, 0], p[:, 1:].reshape(-1, *grid), sets, z, grid

    def finish_map(self, grid_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Upsample [B, h, w] -> [B, *size] (bilinear) and smooth (Gaussian, ``smooth_sigma``)."""
        up = F.interpolate(grid_map[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return gaussian_blur(up, float(self.hparams["smooth_sigma"]))

    # -- training --------------------------------------------------------------------------
    def focal(self, prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The focal loss of ``L_cls`` and ``L_seg`` on anomalous-class probabilities [B, ...].

        ``focal_variant="bce"`` (default): the released ``main.py``'s
        (:func:`methods.losses.focal_loss_bce`, soft targets kept); ``"smoothed"``:
        AnomalyCLIP's label-smoothed focal on (1 - p, p) (0.5 targets count as normal).
        """
        gamma = float(self.hparams["focal_gamma"])
        if self.hparams["focal_variant"] == "bce":
            return focal_loss_bce(prob, target, gamma=gamma)
        return focal_loss(torch.stack([1 - prob, prob], dim=1), target, gamma=gamma,
                          variant="smoothed")

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The terms of Eq. 15 for one batch: ``cls``, ``seg``, ``pal`` and ``total``.

        With ``released_grad_bug`` the target is overwritten afterwards as the released code
        does (:func:`released_target_overwrite`): same values, the released gradient.
        """
        hp = self.hparams
        dev = self.device
        images = batch["image"].to(dev)
        p_cls, p_map, _, z, grid = self.zero_shot(images)
        y = batch["label"].to(dev).float()
        # float32 (or wider): the focal then saves this very tensor (released_grad_bug)
        gt = grid_targets(batch["mask"].to(dev), grid).to(
            torch.promote_types(p_map.dtype, torch.float32))
        l_cls = self.focal(p_cls, y)
        terms = {"focal": lambda: self.focal(p_map, gt),
                 "l1": lambda: F.l1_loss(p_map, gt),
                 "dice": lambda: dice_loss(p_map, gt)}
        l_seg = sum(terms[name]() for name in hp["seg_loss"])
        l_pal = patch_alignment_loss([t[:, 1:] for t in z], gt.flatten(1))
        total = l_cls + float(hp["lambda1"]) * l_seg + float(hp["lambda2"]) * l_pal
        if hp["released_grad_bug"]:
            released_target_overwrite(gt)
        return {"cls": l_cls, "seg": l_seg, "pal": l_pal, "total": total}

    def fit(self, aux_loader, *, epochs: int | None = None, seed: int = 0, progress=iter) -> None:
        hp = self.hparams
        params = [p for p in self.head.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=float(hp["lr"]), betas=tuple(hp["betas"]))
        train_steps(self.head, opt, int(hp["epochs"] if epochs is None else epochs),
                    lambda: progress(aux_loader), lambda batch: self.losses(batch)["total"])

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> Prediction:
        images = batch["image"].to(self.device)
        p_cls, p_map, *_ = self.zero_shot(images)
        return Prediction(p_cls, self.finish_map(p_map, tuple(images.shape[-2:])))


# ======================================================================================
# AF-CLIP+ (few-shot)
# ======================================================================================

@register("afclip_plus")
class AFCLIPPlus(AFCLIP):
    """AF-CLIP+: AF-CLIP fused with nearest-neighbour memory banks of k normal references (few-shot)."""

    trains = False
    seeded = True
    few_shot = True
    requires = "afclip"
    default_hparams: dict[str, Any] = {
        **AFCLIP.default_hparams,
        "alpha": 0.1,                    # weight of p_CLS in S_img (Eq. 18)
        "beta": 0.1,                     # weight of P̃ in S_map (Eq. 18)
    }

    def __init__(self, backbone: Any, **hparams: Any) -> None:
        super().__init__(backbone, **hparams)
        #: (block, scale) -> normalised reference patch features [k · N, W]
        self.memory: list[torch.Tensor] | None = None

    def init_from(self, state: dict[str, torch.Tensor]) -> None:
        """Take AF-CLIP's trained adapter and prompts (same aux, same seed); nothing is trained."""
        self.head.load_state_dict(state)

    def fit(self, aux_loader, *, epochs: int | None = None, seed: int = 0, progress=iter) -> None:
        """No training: AF-CLIP+ reuses AF-CLIP's state (§5.3, "needs no further training")."""

    @torch.no_grad()
    def set_support(self, batch: dict[str, Any]) -> None:
        """Build the memory banks ``B^{ℓr}`` (Eq. 16) from the k normal reference images."""
        sets, _ = self.aggregated(batch["image"].to(self.device))
        self.memory = [F.normalize(c[:, 1:], dim=-1).reshape(-1, c.shape[-1]) for c in sets]

    def memory_scores(self, sets: Sequence[torch.Tensor]) -> torch.Tensor:
        """Eq. 17 averaged over blocks and scales: A [B, N] = mean_{ℓ,r} min_b (1 - cos(c_i, b)) / 2."""
        if self.memory is None:
            raise RuntimeError("afclip_plus: set_support(batch of k normal references) must be "
                               "called before predict")
        total = None
        for c, bank in zip(sets, self.memory, strict=True):
            q = F.normalize(c[:, 1:], dim=-1)
            a = torch.stack([(1 - (qi @ bank.T).amax(dim=-1)) / 2 for qi in q])  # per image
            total = a if total is None else total + a
        return total / len(sets)

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> Prediction:
        images = batch["image"].to(self.device)
        p_cls, p_map, sets, _, grid = self.zero_shot(images)
        A = self.memory_scores(sets).reshape(-1, *grid)
        hp = self.hparams
        image_scores = A.flatten(1).amax(dim=1) + float(hp["alpha"]) * p_cls
        grid_map = A + float(hp["beta"]) * p_map
        return Prediction(image_scores, self.finish_map(grid_map, tuple(images.shape[-2:])))

