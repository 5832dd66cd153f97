"""FAPrompt: fine-grained abnormality prompt learning (Zhu, Ong, Shen & Pang, ICCV 2025).

arXiv 2410.10289; released code ``mala-lab/FAPrompt`` (commit 7e9d9d2, "official PyTorch
implementation"), reimplemented. Only the abstract of the paper could be read where this was
written, so the structure and every value below are those of the released code, which
implements the two modules the abstract names; ``file:line`` refers to that commit.

* **Backbone and visual side: AnomalyCLIP's** (the released code ships ``AnomalyCLIP_lib``):
  frozen OpenAI ViT-L/14@336 at 518 px, DPAM (V-V attention on a second path, FFN skipped)
  in blocks 6–24 (``DPAM_replace(DPAM_layer=20)``, train.py:48); patch tokens of the V-V path
  after the last block through ``ln_post`` + ``proj`` (AnomalyCLIP.py:386-387 — the
  ``--features_list 6 12 18 24`` argument is accepted and ignored); the global token is the
  original path's class token. Logits are cos / 0.07.
* **Compound abnormality prompts (CAP)** (FAPrompt.py:60-199): one normal prompt
  ``[SOS] N_1 … N_E object. [EOS]`` with E = 5 learnable tokens, and K = 10 abnormality
  prompts ``[SOS] N_1 … N_E A^k_1 … A^k_E' damaged object. [EOS]`` that *share the normal
  prompt's E tokens* and add E' = 2 learnable abnormal tokens of their own (all N(0, 0.02²)).
  The class name is never used ("object"). The abnormality text embedding is the mean of the
  K raw abnormality-prompt embeddings (train.py:93). AnomalyCLIP's deep text tokens (depth 9,
  length 4: 8 sets of 4 tokens replacing positions 1–4 at text blocks 2–9) are shared by all
  prompts.
* **Orthogonality of the abnormality prompts** (train.py:85-89): ``L_oc = Σ_{k<m}
  |cos(t_k, t_m)|`` over the K static abnormality embeddings (45 pairs for K = 10).
* **Data-dependent abnormality prior (DAP)** (train.py:99-129, FAPrompt.py:75-79, 169-173):
  the static prompts give patch probabilities P¹ = softmax(cos(v, [t_n, t̄_a]) / 0.07); the
  M = 10 patch tokens with the highest abnormal probability (normalised, in descending order;
  the released code means to select these but reads patches 0–9, see below)
  are concatenated and mapped by ψ = Linear(M·D → M·D/16) → ReLU → Linear(M·D/16 → W) to a
  prior p ∈ R^W that is added to every abnormal token A^k_j of every abnormality prompt of
  that image. The re-encoded prompts give a per-image text pair and P². A prior loss pulls
  ψ to zero on normal images: ``L_prior = Σ_{x normal} mean(p(x)²)`` (sum over the batch's
  normal images of the MSE to 0, train.py:126-129).
* **Loss** (train.py:138-161): ``[Focal + Dice(P¹_a, M) + Dice(P¹_n, 1−M)](map¹)
  + 0.5 · [same](map²) + CE(global logits against the image's DAP text) + BinaryFocal(s, y)
  + 0.1 · L_oc + L_prior``, maps upsampled bilinearly to the image size, focal the smoothed
  multi-class variant (AnomalyCLIP's ``FocalLoss``, γ = 2), and ``s`` the image score below.
* **Optimiser**: Adam, lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs (train.sh), 518 px.
* **Inference** (test.py:93-152): map = (P¹_a + 1 − P¹_n + P²_a + 1 − P²_n) / 4 upsampled,
  Gaussian σ = 10 (test.py's default; test.sh passes none); image score
  ``s = ½ (softmax(cos(g, DAP text)/0.07)_a + (2 max P¹_a + max P²_a) / 3)`` with the
  maxima over the patch grid.

Our choices and deviations (``docs/methods.md``):

* Layer numbers refer to ViT-L/14 and are mapped proportionally on other backbones
  (:func:`methods.common.scale_layers`): on ``zsad-tiny`` DPAM from block 1, features from
  block 4, deep tokens in text blocks 2–3. ψ's sizes follow the backbone: input M·D (the
  joint embedding width D, 768 on ViT-L/14), output the text width W (768 on ViT-L/14).
* The global embedding goes through ``ln_post`` before ``proj`` (the released
  AnomalyCLIP.py:389 omits it — AnomalyCLIP issue #14; not copied).
* **Binary focal on the image score.** The released ``BinaryFocalLoss()`` defaults to
  ``logits=True`` (loss.py:89) but is given a probability (train.py:146-148), so it applies
  a sigmoid to a value in [0, 1] (σ(s) ∈ [0.5, 0.73]: a normal image's BCE can never go
  below ``log 2``). We apply the focal loss to the probability itself;
  ``released_sigmoid_bug=True`` reproduces the released computation.
* **The DAP's patch tokens.** The released train.py:103-113 and test.py:112-122 compute the
  top-M indices ``pk_indx`` but then gather ``patch_features[1:].permute(1, 0, 2)[i, k]``
  with the *loop counter* ``k = 0 … M−1``: ψ always reads the first M patches of the grid
  (the top-left 10 of the first row of 37), whatever their abnormality, so the prior never
  sees the abnormal features the method is built on. We gather the top-M patches;
  ``released_prior_tokens_bug=True`` reproduces the released selection.
* fp32 throughout (the released text tower rounds the deep tokens to fp16,
  AnomalyCLIP.py:246); the unused ``compound_prompt_projections`` (8 × Linear(768, 896),
  FAPrompt.py:97-98, never called, no gradient) are not created.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Prediction, register
from methods.losses import segmentation_loss
from methods.prompt_learning import (
    DeepTextPrompts,
    PromptMethodBase,
    PromptTemplate,
    encode_text,
    gaussian_blur,
    init_context,
    similarity_map,
)

FAPROMPT_BIBTEX = """@inproceedings{zhu2025faprompt,
  title={Fine-grained Abnormality Prompt Learning for Zero-shot Anomaly Detection},
  author={Zhu, Jiawen and Ong, Yew-Soon and Shen, Chunhua and Pang, Guansong},
  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year={2025}}"""


def abs_cosine_pairs(features: torch.Tensor) -> torch.Tensor:
    """``Σ_{k<m} |cos(f_k, f_m)|`` over the rows of ``features`` [K, D] (CAP's orthogonality loss)."""
    f = F.normalize(features, dim=-1)
    cos = f @ f.T
    K = f.shape[0]
    upper = torch.triu(torch.ones(K, K, dtype=torch.bool, device=f.device), diagonal=1)
    return cos[upper].abs().sum()


def binary_focal_loss(score: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
                      alpha: float = 1.0, logits: bool = False) -> torch.Tensor:
    """Mean of ``alpha (1 - p_t)^gamma BCE`` with ``p_t = exp(-BCE)`` (FAPrompt's ``BinaryFocalLoss``).

    ``logits=False``: ``score`` is a probability (BCE on it; for 0/1 targets and ``alpha`` = 1
    the same as :func:`methods.losses.focal_loss_bce`); ``logits=True``: BCE with logits, the
    released class's default, which FAPrompt's train.py applies to a probability.
    """
    y = target.to(score.dtype)
    bce = (F.binary_cross_entropy_with_logits(score, y, reduction="none") if logits
           else F.binary_cross_entropy(score, y, reduction="none"))
    return (alpha * (1.0 - torch.exp(-bce)) ** gamma * bce).mean()


class FAPromptHead(nn.Module):
    """Learnable state: shared normal tokens, K × E' abnormal tokens, deep text tokens, prior net ψ."""

    def __init__(self, width: int, embed_dim: int, *, n_normal: int, n_abnormal: int,
                 n_prompts: int, deep_depth: int, deep_length: int, top_k: int,
                 reduction: int) -> None:
        super().__init__()
        self.ctx_normal = init_context(n_normal, width)                           # [E, W]
        self.ctx_abnormal = nn.Parameter(torch.randn(n_prompts, n_abnormal, width) * 0.02)
        self.deep = DeepTextPrompts(deep_depth, deep_length, width)
        hidden = max(1, top_k * embed_dim // reduction)
        self.prior = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(top_k * embed_dim, hidden)),
            ("relu", nn.ReLU()),
            ("linear2", nn.Linear(hidden, width)),
        ]))

    def abnormal_contexts(self, prior: torch.Tensor | None = None) -> torch.Tensor:
        """``[shared normal tokens | own abnormal tokens (+ prior)]`` of every abnormality prompt.

        ``prior`` None: [K, E + E', W]; ``prior`` [B, W]: [B, K, E + E', W], the image's prior
        added to each of its abnormal tokens (not to the shared normal ones).
        """
        own = self.ctx_abnormal
        if prior is not None:
            own = own.unsqueeze(0) + prior[:, None, None, :]
        shared = self.ctx_normal.expand(*own.shape[:-2], -1, -1)
        return torch.cat([shared, own], dim=-2)


@register("faprompt")
class FAPrompt(PromptMethodBase):
    """FAPrompt: compound abnormality prompts + data-dependent abnormality prior (ICCV 2025)."""

    paper = ("Zhu, Ong, Shen & Pang, Fine-grained Abnormality Prompt Learning for Zero-shot "
             "Anomaly Detection, ICCV 2025 (arXiv 2410.10289)")
    bibtex = FAPROMPT_BIBTEX
    default_hparams: dict[str, Any] = {
        "epochs": 15,                    # train.sh --epoch 15 (same for MVTec AD and VisA)
        "lr": 1e-3,
        "betas": [0.5, 0.999],
        "batch_size": 8,
        "n_normal_ctx": 5,               # E: learnable normal tokens, shared by all prompts
        "n_abnormal_ctx": 2,             # E': each abnormality prompt's own tokens
        "n_abnormal_prompts": 10,        # K
        "normal_suffix": "object.",
        "abnormal_suffix": "damaged object.",
        "deep_depth": 9,                 # text blocks 2..9 of 12 get deep tokens
        "deep_length": 4,
        "dpam_start": 6,                 # of 24 visual blocks (DPAM_layer=20)
        "feature_layers": [24],          # the released code uses the last block only
        "temperature": 0.07,
        "prior_top_k": 10,               # M patch tokens feeding ψ
        "prior_reduction": 16,           # ψ's hidden width M·D / 16
        "weight_static_map": 1.0,        # segmentation loss on map¹ (static prompts)
        "weight_dap_map": 0.5,           # ... on map² (DAP prompts)
        "weight_global": 1.0,            # CE of the global token against the DAP text
        "weight_image": 1.0,             # binary focal on the fused image score
        "weight_orthogonal": 0.1,        # L_oc
        "weight_prior": 1.0,             # L_prior
        "focal_gamma": 2.0,
        "image_focal_gamma": 2.0,
        "image_focal_alpha": 1.0,
        "image_map_weight": 0.5,         # s = (1-w) P(global) + w · (2 max¹ + max²) / 3
        "map_max_weights": [2.0, 1.0],   # weights of max P¹_a, max P²_a (normalised)
        "sigma": 10.0,                   # test.py default (test.sh passes none)
        "released_sigmoid_bug": False,   # True: BinaryFocal with logits on a probability
        "released_prior_tokens_bug": False,  # True: ψ reads patches 0..M-1, not the top M
    }
    #: The released VisionTransformer.forward resizes the position grid bilinearly (no
    #: antialias) from 336 to 518 px (AnomalyCLIP_lib/AnomalyCLIP.py:362-370); the prompts
    #: use no class words ("object").
    released_inputs = {"pos_embed_resize": "bilinear"}

    def __init__(self, backbone: Any, **hparams: Any) -> None:
        super().__init__(backbone, **hparams)
        hp = self.hparams
        if len(hp["feature_layers"]) != 1:
            raise ValueError("faprompt uses the patch tokens of one block (feature_layers=[24])")
        E, E2 = int(hp["n_normal_ctx"]), int(hp["n_abnormal_ctx"])
        self.normal_template = PromptTemplate(backbone, [hp["normal_suffix"]], E)
        self.abnormal_template = PromptTemplate(backbone, [hp["abnormal_suffix"]], E + E2)
        self.head = FAPromptHead(
            backbone.text_width, backbone.embed_dim, n_normal=E, n_abnormal=E2,
            n_prompts=int(hp["n_abnormal_prompts"]), deep_depth=self._deep_depth(),
            deep_length=int(hp["deep_length"]), top_k=int(hp["prior_top_k"]),
            reduction=int(hp["prior_reduction"])).to(backbone.device)

    # -- text ------------------------------------------------------------------------------
    def _encode(self, template: PromptTemplate, ctx: torch.Tensor) -> torch.Tensor:
        """Raw text features [n, D] of ``template`` with contexts ``ctx`` [n, n_ctx, W]."""
        n = ctx.shape[0]
        emb = torch.cat([template.prefix.to(ctx).expand(n, -1, -1), ctx,
                         template.suffix.to(ctx).expand(n, -1, -1)], dim=1)
        return encode_text(self.backbone, emb, template.tokens.expand(n, -1), self.head.deep(),
                           self.head.deep.start)

    def static_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw features of the normal prompt [D] and of the K abnormality prompts [K, D]."""
        normal = self._encode(self.normal_template, self.head.ctx_normal.unsqueeze(0))[0]
        return normal, self._encode(self.abnormal_template, self.head.abnormal_contexts())

    def dap_abnormal_text(self, prior: torch.Tensor) -> torch.Tensor:
        """Raw features [B, K, D] of the abnormality prompts with each image's prior [B, W]."""
        ctx = self.head.abnormal_contexts(prior)                          # [B, K, L, W]
        B, K = ctx.shape[:2]
        return self._encode(self.abnormal_template, ctx.flatten(0, 1)).reshape(B, K, -1)

    # -- DAP ------------------------------------------------------------------------------
    def abnormality_prior(self, patches: torch.Tensor,
                          abnormal_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prior [B, W] and the chosen patch indices [B, M] (most abnormal first).

        ``patches`` [B, N, D] normalised patch tokens; ``abnormal_probs`` [B, N] the static
        prompts' abnormal probability of each patch.
        """
        M = int(self.hparams["prior_top_k"])
        B, N = abnormal_probs.shape
        if N < M:
            raise ValueError(f"faprompt needs >= {M} patch tokens (prior_top_k), got {N}")
        if self.hparams["released_prior_tokens_bug"]:    # train.py:109: patches 0..M-1
            idx = torch.arange(M, device=patches.device).expand(B, -1)
        else:
            idx = abnormal_probs.detach().topk(M, dim=1, largest=True, sorted=True).indices
        chosen = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return self.head.prior(chosen.flatten(1)), idx

    # -- forward --------------------------------------------------------------------------
    def outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the loss and the inference rule read, for images [B, 3, S, S]."""
        T = float(self.hparams["temperature"])
        glob, patches = self.image_features(images)
        v = F.normalize(list(patches.values())[-1], dim=-1)              # [B, N, D]
        g = F.normalize(glob, dim=-1)                                      # [B, D]
        B = v.shape[0]
        normal, abnormal = self.static_text()
        text1 = F.normalize(torch.stack([normal, abnormal.mean(0)]), dim=-1)          # [2, D]
        logits1 = v @ text1.T / T                                                      # [B, N, 2]
        prior, idx = self.abnormality_prior(v, logits1.softmax(-1)[..., 1])
        dap = self.dap_abnormal_text(prior)                                            # [B, K, D]
        text2 = F.normalize(torch.stack([normal.expand(B, -1), dap.mean(1)], dim=1), dim=-1)
        logits2 = torch.einsum("bnd,bcd->bnc", v, text2) / T
        grid = (self.backbone.grid_size, self.backbone.grid_size)
        size = tuple(images.shape[-2:])
        return {
            "global_logits": torch.einsum("bd,bcd->bc", g, text2) / T,
            "patch_probs_static": logits1.softmax(-1),
            "patch_probs_dap": logits2.softmax(-1),
            "map_static": similarity_map(logits1, grid, size),
            "map_dap": similarity_map(logits2, grid, size),
            "abnormal_static": abnormal,
            "prior": prior,
            "prior_index": idx,
        }

    def image_score(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(1-w) softmax(global)_a + w (a max P¹_a + b max P²_a) / (a + b)`` (test.py:146-148)."""
        hp = self.hparams
        a, b = (float(x) for x in hp["map_max_weights"])
        mx = (a * out["patch_probs_static"][..., 1].amax(1)
              + b * out["patch_probs_dap"][..., 1].amax(1)) / (a + b)
        w = float(hp["image_map_weight"])
        return (1 - w) * out["global_logits"].softmax(-1)[:, 1] + w * mx

    # -- training -------------------------------------------------------------------------
    def loss_terms(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The six loss terms (unweighted) on one batch."""
        hp = self.hparams
        images = batch["image"].to(self.device)
        mask = batch["mask"].to(self.device)
        label = batch["label"].to(self.device).long()
        out = self.outputs(images)
        gamma = float(hp["focal_gamma"])
        normal = (label == 0).to(out["prior"].dtype)
        return {
            "static_map": segmentation_loss(out["map_static"], mask, gamma=gamma),
            "dap_map": segmentation_loss(out["map_dap"], mask, gamma=gamma),
            "global": F.cross_entropy(out["global_logits"], label),
            "image": binary_focal_loss(self.image_score(out), label,
                                       gamma=float(hp["image_focal_gamma"]),
                                       alpha=float(hp["image_focal_alpha"]),
                                       logits=bool(hp["released_sigmoid_bug"])),
            "orthogonal": abs_cosine_pairs(out["abnormal_static"]),
            "prior": (out["prior"].pow(2).mean(-1) * normal).sum(),
        }

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        terms = self.loss_terms(batch)
        return sum(float(self.hparams[f"weight_{k}"]) * v for k, v in terms.items())

    # -- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> Prediction:
        out = self.outputs(batch["image"].to(self.device))
        m1, m2 = out["map_static"], out["map_dap"]
        maps = (m1[:, 1] + 1 - m1[:, 0] + m2[:, 1] + 1 - m2[:, 0]) / 4.0
        return Prediction(self.image_score(out), gaussian_blur(maps, float(self.hparams["sigma"])))
