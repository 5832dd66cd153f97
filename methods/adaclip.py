"""AdaCLIP (Cao et al., ECCV 2024): hybrid (static + dynamic) learnable prompts in both CLIP towers.

AdaCLIP adapts a frozen CLIP ViT to zero-shot anomaly detection with learnable prompts in
*both* encoders, trained on auxiliary annotated anomaly data (the paper trains on two
datasets at once: MVTec AD + ColonDB for every target but MVTec AD / ColonDB, which use
VisA + ClinicDB; the runner hands the method the union as one loader). Settings are those of
the paper's method section and implementation details, as its released code
(``caoyunkang/AdaCLIP``, ``train.py`` defaults, ``method/adaclip.py``, ``method/trainer.py``)
runs them:

* **Hybrid learnable prompts** (paper: "static prompts", "dynamic prompts", "hybrid prompts").
  Prompt length L = 5 tokens, prompting depth J = 4.

  - *Static prompts* ``P_S``: learnable tokens shared by every image, N(0, 0.02²) init, one
    set of L per prompted block and tower (visual: width W, text: text width).
  - *Dynamic prompts* ``P_D``: generated per image from the image embedding ``F_I`` of the
    frozen, un-prompted CLIP (class token, ``ln_post`` + ``proj``) by learnable linear
    layers (one ``Linear(D, width)`` with bias per prompt token and tower) — the same L
    tokens for every prompted block. Two images give two different prompt sets.
  - *Hybrid prompts* ``P_H = P_S + P_D`` (element-wise).
  - *Visual tower*: before block 1 the L hybrid tokens are appended after the class and
    patch tokens; before blocks 2..J the L tokens the previous block produced there are
    replaced by that block's hybrid tokens; from block J+1 on the prompt tokens are kept
    and processed like the others. Patch tokens are read without the prompt tokens.
  - *Text tower*: before text blocks 2..J the token positions 1..L are replaced by that
    block's hybrid tokens (the first text block sees the hand-crafted sentence itself) —
    J - 1 sets of text prompts (the released ``PromptLayer.forward_text`` allocates J sets and
    never reads the first one; it gets no gradient and is not kept here).

* **Text** (released ``TextEmbebddingLayer``): 7 normal states (``{}``, ``flawless {}``, …) and
  5 anomalous ones (``damaged {}``, …) with the class name, × 4 templates (``a bad photo of
  a {}.``, ``a low resolution photo of the {}.``, ``a bad photo of the {}.``, ``a cropped photo
  of the {}.``), each sentence encoded *with that image's hybrid text prompts*, L2-normalised,
  averaged per state group and normalised again -> per-image ``T = [t_n, t_a]`` [B, 2, D].
  ``-`` in class names becomes a space.
* **Projection layers**: patch tokens after blocks 6, 12, 18, 24 (of ViT-L/14's 24; raw block
  outputs, class and prompt tokens dropped) each through their own ``Linear(W, D)``;
  the prompted image embedding (class token, ``ln_post`` + ``proj``) through ``Linear(D, D)``;
  all L2-normalised.
* **Maps**: per layer ``100 · cos(patch, T)`` logits, upsampled (bilinear,
  ``align_corners=True``) to the image size. Training: softmax per layer. Inference: the
  layers' logits averaged, then softmax; the map is ``(P_a + 1 - P_n) / 2 = P_a``, smoothed
  with a Gaussian (σ = 4 px, released ``trainer.evaluation``).
* **Hybrid semantic fusion (HSF)** — image score: the patch-level anomaly map
  ``A = softmax(mean_l logits_l)[anomalous]`` selects anomalous patch semantics ``F_P``, fused
  with the projected image embedding: ``F = norm(α F_P + (1 - α) F_img)``, α = 0.2, and
  ``score = softmax(100 · cos(F, T))[anomalous]``. ``F_P`` (``hsf``):

  - ``"paper"`` (default): k-means (K = 20) on the layer-averaged projected patch tokens;
    each cluster's anomaly score is the mean of ``A`` over its patches; ``F_P`` is the
    centroid of the cluster with the highest score — HSF as the paper reports it (the
    released code keeps it, commented out, under the note "the implementation of HSF is
    slightly different to the reported one");
  - ``"released"``: the released "upgraded" HSF — the 5K patches with the highest ``A``,
    clustered into K groups on their four layers' tokens concatenated; ``F_P`` is the mean
    of the K cluster centres (each the mean of its members' tokens over the four layers);
  - ``"off"``: ``F = F_img`` (the paper's ablation without HSF).

  Cluster labels carry no gradient; the centroids do (the released code clusters detached
  tokens and averages the differentiable ones).
* **Loss** (released ``train_one_batch``; weights 1): ``Focal(softmax(100 · cos(F, T)), y)`` +
  Σ_layers [``Focal(P_l, M) + Dice(P_l,a, M) + Dice(P_l,n, 1 - M)``]; the focal is the
  label-smoothed one of AnomalyCLIP/VAND (``methods.losses.focal_loss``, variant
  ``"smoothed"``, γ = 2 — the released ``loss.py`` ``FocalLoss``).
* **Training**: AdamW, lr 0.01, betas (0.5, 0.999) (weight decay: torch's default 0.01),
  batch size 1, 5 epochs, 518-px images; the 4-image mosaic at rate 0.2 on MVTec AD images
  only (released ``MVTecDataset(aug_rate=0.2)``; VisA, ColonDB, ClinicDB: 0).
  Learnable: static prompts, the two prompt generators, the five projection layers.

Our choices and deviations (``docs/methods.md``):

* The prompted visual pass changes the visual tower's computation, so it runs the frozen
  blocks itself (never the runner's feature cache); only the un-prompted pass that feeds the
  prompt generators is a plain frozen pass and may be served from the cache.
* Layer numbers refer to ViT-L/14 (24 visual / 12 text blocks) and are mapped with
  :func:`methods.common.scale_layer`; the prompting depth J is a block number in each tower
  (J = 4 on ViT-L/14: visual blocks 1–4, text blocks 2–4). On shallow towers the text depth
  is at least 2, so that the text prompts exist (``zsad-tiny``: visual block 1, text block 2).
* k-means is our own (k-means++ with greedy local trials, then Lloyd iterations to
  sklearn's tolerance, empty clusters moved to the farthest points — sklearn's algorithm),
  seeded per image with ``kmeans_seed``: the released ``sklearn.cluster.KMeans`` draws from
  the global NumPy stream, so its clusters depend on everything run before.
* The released code squeezes the batch-1 mask to [H, W], so its Dice loss is computed per
  image *row* and averaged over rows; the suite computes the Dice per image as the paper
  states (``dice_per_row=True`` reproduces the released loss).
* The released training selects the best epoch on the *target* test set (``train.py``
  validates every epoch and keeps the best pixel F1); the suite trains 5 epochs and keeps
  the last (no target data is seen).
* fp32 instead of the released fp16 autocast; the protocol's seeds instead of the fixed 111.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.backbone import compose_prompts
from methods.augment import Mosaic
from methods.base import Method, Prediction, register
from methods.common import (
    REFERENCE_TEXT_DEPTH,
    gaussian_blur,
    scale_layer,
    scale_layers,
    train_steps,
)
from methods.losses import dice_loss, focal_loss

#: The released ``TextEmbebddingLayer`` state words and templates (``method/adaclip.py``).
ADACLIP_NORMAL_STATES = (
    "{}", "flawless {}", "perfect {}", "unblemished {}",
    "{} without flaw", "{} without defect", "{} without damage",
)
ADACLIP_ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect",
                            "{} with damage")
ADACLIP_TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.",
)
HSF_VARIANTS = ("paper", "released", "off")

BIBTEX = """@inproceedings{cao2024adaclip,
  title={AdaCLIP: Adapting CLIP with Hybrid Learnable Prompts for Zero-Shot Anomaly Detection},
  author={Cao, Yunkang and Zhang, Jiangning and Frittoli, Luca and Cheng, Yuqi and Shen, Weiming and Boracchi, Giacomo},
  booktitle={European Conference on Computer Vision (ECCV)}, year={2024}}"""


# ======================================================================================
# k-means (HSF)
# ======================================================================================

def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, max_iter: int = 300,
           tol: float = 1e-4) -> torch.Tensor:
    """Cluster labels [N] of the rows of ``x`` [N, C] into ``min(k, N)`` clusters.

    sklearn's ``KMeans`` algorithm (``n_init=1``, ``init="k-means++"``, Lloyd): greedy
    k-means++ seeding with ``2 + ln k`` candidates per centre, Lloyd iterations until the
    labels stop changing or the centres move by at most ``tol`` × the mean feature variance
    (squared shift summed over centres), empty clusters moved to the points farthest from
    their centres. Deterministic: every draw comes from a generator seeded with ``seed``.
    Computed in float64 on ``x``'s device, without gradients.
    """
    with torch.no_grad():
        x = x.detach().to(torch.float64)
        n = x.shape[0]
        k = max(1, min(int(k), n))
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        sq = (x * x).sum(dim=1)

        def dist2(c: torch.Tensor) -> torch.Tensor:            # [N, m] squared distances
            return (sq[:, None] - 2 * x @ c.T + (c * c).sum(dim=1)[None]).clamp_min(0)

        # -- k-means++ (greedy) --------------------------------------------------------
        trials = 2 + int(math.log(k))
        first = int(torch.randint(n, (1,), generator=g))
        centers = [x[first]]
        closest = dist2(x[first:first + 1])[:, 0]
        pot = closest.sum()
        for _ in range(1, k):
            r = torch.rand(trials, generator=g, dtype=torch.float64).to(x.device) * pot
            cand = torch.searchsorted(closest.cumsum(0), r).clamp_max(n - 1)
            d = torch.minimum(closest[None], dist2(x[cand]).T)    # [trials, N]
            best = int(d.sum(dim=1).argmin())
            closest, pot = d[best], d[best].sum()
            centers.append(x[cand[best]])
        c = torch.stack(centers)
        # -- Lloyd ---------------------------------------------------------------------
        thresh = float(tol) * float(x.var(dim=0, unbiased=False).mean())
        labels = dist2(c).argmin(dim=1)
        for _ in range(int(max_iter)):
            counts = torch.bincount(labels, minlength=k)
            new = torch.zeros_like(c).index_add_(0, labels, x) / counts.clamp_min(1)[:, None]
            empty = (counts == 0).nonzero().flatten()
            if len(empty):
                far = (x - c[labels]).pow(2).sum(dim=1).argsort(descending=True)
                new[empty] = x[far[:len(empty)]]
            shift = (new - c).pow(2).sum()
            c = new
            new_labels = dist2(c).argmin(dim=1)
            if torch.equal(new_labels, labels) or float(shift) <= thresh:
                labels = new_labels
                break
            labels = new_labels
        return labels


def hsf_paper(tokens: Sequence[torch.Tensor], anomaly: torch.Tensor, k: int, *,
              seed: int = 0) -> torch.Tensor:
    """HSF as the paper reports it: centroid of the most anomalous k-means cluster.

    ``tokens``: per layer [B, N, D] (projected, normalised patch tokens); ``anomaly`` [B, N]
    patch anomaly scores. Clusters the layer-averaged tokens of each image, scores each
    cluster by the mean anomaly of its patches, returns the normalised mean token of the best
    cluster [B, D] (differentiable in ``tokens``).
    """
    avg = torch.stack(list(tokens)).mean(dim=0)
    out = []
    for b in range(avg.shape[0]):
        labels = kmeans(avg[b], k, seed=seed)
        n_clusters = int(labels.max()) + 1
        counts = torch.bincount(labels, minlength=n_clusters).to(anomaly.dtype)
        sums = torch.zeros(n_clusters, dtype=anomaly.dtype, device=anomaly.device)
        sums = sums.index_add(0, labels, anomaly[b].detach())
        score = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, -1.0))
        best = int(score.argmax())
        out.append(avg[b][labels == best].mean(dim=0))
    return F.normalize(torch.stack(out), dim=-1)


def hsf_released(tokens: Sequence[torch.Tensor], anomaly: torch.Tensor, k: int, *,
                 topk_factor: int = 5, seed: int = 0) -> torch.Tensor:
    """The released ("upgraded") HSF: mean of the cluster centres of the most anomalous patches.

    The ``topk_factor · k`` patches with the highest ``anomaly`` are clustered into ``k``
    groups on their layers' tokens concatenated; each centre is the mean of its members'
    tokens over all layers; the centres are averaged and normalised -> [B, D].
    """
    tokens = list(tokens)
    n = anomaly.shape[1]
    m = min(n, int(topk_factor) * int(k))
    idx = anomaly.detach().topk(m, dim=1).indices                       # [B, m]
    out = []
    for b in range(anomaly.shape[0]):
        sel = [t[b, idx[b]] for t in tokens]                            # each [m, D]
        labels = kmeans(torch.cat(sel, dim=1), k, seed=seed)
        centres = [torch.cat([s[labels == c] for s in sel]).mean(dim=0)
                   for c in range(int(labels.max()) + 1) if bool((labels == c).any())]
        out.append(torch.stack(centres).mean(dim=0))
    return F.normalize(torch.stack(out), dim=-1)


# ======================================================================================
# The learnable state
# ======================================================================================

class PromptGenerator(nn.Module):
    """Dynamic prompts: one ``Linear(embed_dim, width)`` (with bias) per prompt token.

    ``forward(F_I [B, D]) -> [B, length, width]``.
    """

    def __init__(self, embed_dim: int, width: int, length: int) -> None:
        super().__init__()
        self.token = nn.ModuleList([nn.Linear(embed_dim, width) for _ in range(length)])

    def forward(self, image_embedding: torch.Tensor) -> torch.Tensor:
        return torch.stack([fc(image_embedding) for fc in self.token], dim=1)


class AdaCLIPHead(nn.Module):
    """Everything AdaCLIP learns.

    ``visual_static`` [Jv, L, W] and ``text_static`` [Jt - 1, L, W_t] (absent without static
    prompts), ``visual_generator`` / ``text_generator`` (absent without dynamic prompts),
    ``patch_proj`` (one ``Linear(W, D)`` per tapped layer) and ``cls_proj`` (``Linear(D, D)``).
    """

    def __init__(self, *, width: int, text_width: int, embed_dim: int, length: int,
                 visual_depth: int, text_sets: int, n_layers: int, static: bool,
                 dynamic: bool) -> None:
        super().__init__()
        self.length = int(length)
        self.visual_depth = int(visual_depth)
        self.text_sets = int(text_sets)
        if static and visual_depth:
            self.visual_static = nn.Parameter(torch.randn(visual_depth, length, width) * 0.02)
        if static and text_sets:
            self.text_static = nn.Parameter(torch.randn(text_sets, length, text_width) * 0.02)
        if dynamic and visual_depth:
            self.visual_generator = PromptGenerator(embed_dim, width, length)
        if dynamic and text_sets:
            self.text_generator = PromptGenerator(embed_dim, text_width, length)
        self.patch_proj = nn.ModuleList([nn.Linear(width, embed_dim) for _ in range(n_layers)])
        self.cls_proj = nn.Linear(embed_dim, embed_dim)

    def _hybrid(self, static_name: str, generator_name: str, n_sets: int,
                image_embedding: torch.Tensor) -> list[torch.Tensor]:
        if n_sets == 0:
            return []
        B = image_embedding.shape[0]
        static = getattr(self, static_name, None)
        generator = getattr(self, generator_name, None)
        dynamic = generator(image_embedding) if generator is not None else None   # [B, L, w]
        out = []
        for j in range(n_sets):
            if static is not None and dynamic is not None:
                out.append(static[j].unsqueeze(0) + dynamic)
            elif static is not None:
                out.append(static[j].unsqueeze(0).expand(B, -1, -1))
            else:
                out.append(dynamic)
        return out

    def visual_prompts(self, image_embedding: torch.Tensor) -> list[torch.Tensor]:
        """Hybrid visual prompts, one [B, L, W] per prompted visual block (1..Jv)."""
        return self._hybrid("visual_static", "visual_generator", self.visual_depth, image_embedding)

    def text_prompts(self, image_embedding: torch.Tensor) -> list[torch.Tensor]:
        """Hybrid text prompts, one [B, L, W_t] per prompted text block (2..Jt)."""
        return self._hybrid("text_static", "text_generator", self.text_sets, image_embedding)


# ======================================================================================
# The method
# ======================================================================================

@register("adaclip")
class AdaCLIP(Method):
    """AdaCLIP: static + image-generated (dynamic) prompts in both CLIP towers, HSF image score."""

    trains = True
    paper = ("Cao, Zhang, Frittoli, Cheng, Shen & Boracchi, AdaCLIP: Adapting CLIP with Hybrid "
             "Learnable Prompts for Zero-Shot Anomaly Detection, ECCV 2024")
    bibtex = BIBTEX
    default_hparams: dict[str, Any] = {
        "epochs": 5,
        "lr": 0.01,
        "betas": [0.5, 0.999],
        "weight_decay": 0.01,            # torch.optim.AdamW's default (the released code sets none)
        "batch_size": 1,                 # the released train.py refuses any other value
        "prompt_length": 5,              # L
        "prompt_depth": 4,               # J: visual blocks 1..J, text blocks 2..J (ViT-L/14)
        "prompt_type": "SD",             # S static, D dynamic, SD hybrid (paper's ablation)
        "prompt_branch": "VL",           # V visual, L text, VL both (paper's ablation)
        "feature_layers": [6, 12, 18, 24],
        "logit_scale": 100.0,
        "hsf": "paper",                  # "paper" | "released" | "off"
        "hsf_clusters": 20,              # K
        "hsf_alpha": 0.2,                # F = norm(α F_P + (1 - α) F_img)
        "hsf_topk_factor": 5,            # "released" HSF: 5K most anomalous patches
        "kmeans_seed": 0,
        "focal_gamma": 2.0,
        "cls_weight": 1.0,
        "seg_weight": 1.0,
        "dice_per_row": False,           # True: the released batch-1 Dice over mask rows
        "sigma": 4.0,                    # Gaussian smoothing of test maps, pixels
        "mosaic_rate": 0.2,
        "mosaic_datasets": ["mvtec"],    # the released code mosaics MVTec AD images only
        "mosaic_pool": 8,
    }
    #: The released code puts the category folder id into its prompts (only "-" -> " ":
    #: ``metal_nut``, ``pcb1``, ``pipe_fryum``) and builds the 518-px model by resizing the
    #: position grid bicubically at load time (``method/clip_model.py`` ``resize_pos_embed``).
    #: (Its nn.GELU on OpenAI's weights is a bug: ``[backbones.adaclip] activation = "gelu"``.)
    released_inputs = {"class_words": "folder", "pos_embed_resize": "bicubic"}

    def __init__(self, backbone: Any, **hparams: Any) -> None:
        super().__init__(backbone, **hparams)
        hp = self.hparams
        ptype, branch = str(hp["prompt_type"]).upper(), str(hp["prompt_branch"]).upper()
        if hp["hsf"] not in HSF_VARIANTS:
            raise ValueError(f"adaclip: hsf must be one of {HSF_VARIANTS}, got {hp['hsf']!r}")
        if set(ptype) - {"S", "D"} or set(branch) - {"V", "L"}:
            raise ValueError(f"adaclip: prompt_type must use S/D and prompt_branch V/L, got "
                             f"{hp['prompt_type']!r}, {hp['prompt_branch']!r}")
        if branch and not ptype:
            raise ValueError("adaclip: prompted branches need a prompt_type (S, D or SD)")
        self.layers = scale_layers(hp["feature_layers"], backbone.num_layers)
        depth = int(hp["prompt_depth"])
        #: prompted visual blocks 1..visual_depth; prompted text blocks 2..text_depth
        self.visual_depth = scale_layer(depth, backbone.num_layers) if "V" in branch else 0
        text_depth = scale_layer(depth, backbone.text_layers, REFERENCE_TEXT_DEPTH)
        self.text_depth = min(max(text_depth, 2), backbone.text_layers) if "L" in branch and depth else 0
        self.length = int(hp["prompt_length"])
        self.head = AdaCLIPHead(
            width=backbone.width, text_width=backbone.text_width, embed_dim=backbone.embed_dim,
            length=self.length, visual_depth=self.visual_depth,
            text_sets=max(self.text_depth - 1, 0), n_layers=len(self.layers),
            static="S" in ptype, dynamic="D" in ptype).to(backbone.device)
        self.head.eval()
        self._tokens: dict[str, torch.Tensor] = {}
        self._fixed_text: dict[str, torch.Tensor] = {}

    # -- text ----------------------------------------------------------------------------
    @staticmethod
    def sentences(name: str) -> list[str]:
        """The 28 normal then 20 anomalous sentences about ``name`` ("-" read as a space)."""
        obj = name.replace("-", " ")
        return (compose_prompts(ADACLIP_TEMPLATES, ADACLIP_NORMAL_STATES, obj)
                + compose_prompts(ADACLIP_TEMPLATES, ADACLIP_ANOMALOUS_STATES, obj))

    def _sentence_tokens(self, name: str) -> torch.Tensor:
        if name not in self._tokens:
            tokens = self.backbone.tokenize(self.sentences(name))
            shortest = int(tokens.argmax(dim=-1).min())
            if self.text_depth and shortest <= self.length:
                raise ValueError(f"adaclip: a sentence about {name!r} has fewer than "
                                 f"{self.length} tokens before its end for the text prompts")
            self._tokens[name] = tokens
        return self._tokens[name]

    def text_features(self, names: Sequence[str], text_prompts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-image (normal, anomalous) text features [B, 2, D] (normalised).

        ``text_prompts``: one [B, L, W_t] per prompted text block 2..Jt; image ``b``'s
        sentences are encoded with ``text_prompts[j][b]``.
        """
        from methods.prompt_learning import encode_text

        n_normal = len(ADACLIP_TEMPLATES) * len(ADACLIP_NORMAL_STATES)
        if not text_prompts:  # no text prompts: the hand-crafted features, cached per class
            out = []
            for name in names:
                if name not in self._fixed_text:
                    with torch.no_grad():
                        tok = self._sentence_tokens(name)
                        raw = encode_text(self.backbone, self.backbone.token_embedding(tok), tok)
                        self._fixed_text[name] = self._group(raw.unsqueeze(0), n_normal)[0]
                out.append(self._fixed_text[name])
            return torch.stack(out)
        tokens = torch.cat([self._sentence_tokens(n) for n in names])           # [B*S, 77]
        per = tokens.shape[0] // len(names)
        length = int(tokens.argmax(dim=-1).max()) + 1
        tokens = tokens[:, :length]
        with torch.no_grad():
            emb = self.backbone.token_embedding(tokens)
        deep = [p.repeat_interleave(per, dim=0) for p in text_prompts]           # [B*S, L, W_t]
        raw = encode_text(self.backbone, emb, tokens, deep, deep_start=1)        # [B*S, D]
        return self._group(raw.reshape(len(names), per, -1), n_normal)

    @staticmethod
    def _group(raw: torch.Tensor, n_normal: int) -> torch.Tensor:
        """[B, S, D] sentence features -> [B, 2, D]: normalise, mean per state group, normalise."""
        e = F.normalize(raw, dim=-1)
        return F.normalize(torch.stack([e[:, :n_normal].mean(1), e[:, n_normal:].mean(1)], 1), dim=-1)

    # -- vision ----------------------------------------------------------------------------
    def frozen_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """``F_I`` [B, D]: the un-prompted frozen CLIP's image embedding (may come from the cache)."""
        with torch.no_grad():
            return self.backbone.encode_image(images, layers=()).global_embedding

    def encode_image_prompted(self, images: torch.Tensor, visual_prompts: Sequence[torch.Tensor]
                              ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The visual tower with hybrid prompts (run here, never through the feature cache).

        Returns the prompted image embedding [B, D] (class token, ``ln_post`` + ``proj``) and
        {block: patch tokens [B, N, W]} at :attr:`layers` (class and prompt tokens dropped).
        """
        bb = self.backbone
        n_prompts = visual_prompts[0].shape[1] if visual_prompts else 0
        x = bb.embed_patches(images)
        taps: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(bb.blocks, start=1):
            if i <= len(visual_prompts):
                p = visual_prompts[i - 1].to(x.dtype)
                x = torch.cat([x, p] if i == 1 else [x[:, :-n_prompts], p], dim=1)
            x = blk(x)
            if i in self.layers:
                taps[i] = x[:, 1:x.shape[1] - n_prompts]
        return bb.project_tokens(x[:, 0]), taps

    # -- forward -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, names: Sequence[str]
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-layer patch logits [B, N, 2] and the image probabilities [B, 2] (after HSF)."""
        hp = self.hparams
        head = self.head
        image_embedding = self.frozen_embedding(images)
        text = self.text_features(names, head.text_prompts(image_embedding))      # [B, 2, D]
        glob, taps = self.encode_image_prompted(images, head.visual_prompts(image_embedding))
        scale = float(hp["logit_scale"])
        patches = [F.normalize(fc(taps[ly]), dim=-1) for fc, ly in zip(head.patch_proj, self.layers,
                                                                         strict=True)]
        logits = [scale * torch.einsum("bnd,bkd->bnk", p, text) for p in patches]
        img = F.normalize(head.cls_proj(glob), dim=-1)
        if hp["hsf"] != "off":
            anomaly = torch.stack(logits).mean(dim=0).softmax(dim=-1)[..., 1]          # [B, N]
            k, seed = int(hp["hsf_clusters"]), int(hp["kmeans_seed"])
            if hp["hsf"] == "paper":
                semantic = hsf_paper(patches, anomaly, k, seed=seed)
            else:
                semantic = hsf_released(patches, anomaly, k, seed=seed,
                                        topk_factor=int(hp["hsf_topk_factor"]))
            a = float(hp["hsf_alpha"])
            img = F.normalize(a * semantic + (1 - a) * img, dim=-1)
        probs = (scale * torch.einsum("bd,bkd->bk", img, text)).softmax(dim=-1)
        return logits, probs

    def upsample(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Patch logits [B, N, 2] -> [B, 2, *size] (bilinear, ``align_corners=True``)."""
        g = self.backbone.grid_size
        x = logits.transpose(1, 2).reshape(logits.shape[0], 2, g, g)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    # -- training ----------------------------------------------------------------------------
    def loss(self, logits: Sequence[torch.Tensor], probs: torch.Tensor, mask: torch.Tensor,
             label: torch.Tensor) -> torch.Tensor:
        """``cls_weight · Focal(probs, y) + seg_weight · Σ_l [Focal(P_l, M) + Dice(P_l,a, M)
        + Dice(P_l,n, 1 - M)]`` with ``P_l`` the softmax of the upsampled layer logits."""
        hp = self.hparams
        gamma = float(hp["focal_gamma"])
        gt = (mask > 0.5).to(probs.dtype)
        y = (label.float() > 0.5).long()
        cls = focal_loss(probs, y, gamma=gamma, variant="smoothed")
        seg = probs.new_zeros(())
        for lg in logits:
            p = self.upsample(lg, tuple(gt.shape[-2:])).softmax(dim=1)
            pa, pn, t = p[:, 1], p[:, 0], gt
            if hp["dice_per_row"]:  # the released batch-1 squeeze: every image row a "sample"
                pa, pn, t = (v.reshape(-1, v.shape[-1]) for v in (pa, pn, gt))
            seg = seg + (focal_loss(p, gt, gamma=gamma, variant="smoothed")
                         + dice_loss(pa, t) + dice_loss(pn, 1.0 - t))
        return float(hp["cls_weight"]) * cls + float(hp["seg_weight"]) * seg

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        images = batch["image"].to(self.device)
        logits, probs = self.forward(images, list(batch["prompt_name"]))
        return self.loss(logits, probs, batch["mask"].to(self.device), batch["label"].to(self.device))

    def fit(self, aux_loader, *, epochs: int | None = None, seed: int = 0, progress=iter) -> None:
        hp = self.hparams
        include = {str(d) for d in hp["mosaic_datasets"]}
        mosaic = Mosaic(float(hp["mosaic_rate"]), seed=seed, pool_size=int(hp["mosaic_pool"]),
                        exclude=())
        opt = torch.optim.AdamW([p for p in self.head.parameters() if p.requires_grad],
                                lr=float(hp["lr"]), betas=tuple(hp["betas"]),
                                weight_decay=float(hp["weight_decay"]))
        self.losses: list[float] = []

        def loss(batch: dict[str, Any]) -> torch.Tensor:
            # mosaic only the datasets the released code mosaics (MVTec AD)
            mosaic.exclude |= {str(d) for d in batch.get("dataset", [])} - include
            return self.training_loss(mosaic(batch))

        train_steps(self.head, opt, int(epochs if epochs is not None else hp["epochs"]),
                    lambda: progress(aux_loader), loss, losses=self.losses)

    # -- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> Prediction:
        images = batch["image"].to(self.device)
        logits, probs = self.forward(images, list(batch["prompt_name"]))
        mean = self.upsample(torch.stack(logits).mean(dim=0), tuple(images.shape[-2:]))
        p = mean.softmax(dim=1)
        maps = (p[:, 1] + 1 - p[:, 0]) / 2
        return Prediction(probs[:, 1], gaussian_blur(maps, float(self.hparams["sigma"])))
