"""AA-CLIP (Ma et al., CVPR 2025): anomaly-aware CLIP by two-stage residual adaptation.

"AA-CLIP: Enhancing Zero-shot Anomaly Detection via Anomaly-Aware CLIP" (arXiv:2503.06661),
as its paper describes it and its released code (``Mwxinnn/AA-CLIP``, commit 53db195:
``model/adapter.py``, ``train.py``, ``test.py``, ``forward_utils.py``, ``dataset/``) runs it.
Layer numbers are ViT-L/14's (24 visual, 12 text blocks), mapped proportionally on other
depths (:func:`methods.common.scale_layer`).

* **Residual adapter** (Eq. 1–2): after each of the first K blocks of a tower,
  ``x_res = Norm(Act(W x))`` with ``W`` a bias-free square linear layer, ``Act`` LeakyReLU
  (slope 0.01) and ``Norm`` rescaling every token to the norm of ``x`` (``a · ||x|| / ||a||``,
  released ``AdaptedCLIP.forward`` / ``encode_text``); ``x ← λ x_res + (1 − λ) x``, λ = 0.1
  (:func:`residual_adapt`). K_T = 3 text blocks, K_I = 6 visual blocks.
* **Text anchors**: per class, the prompt ensemble of the released ``dataset/constants.py``
  (normal states ``{}``, ``a {}``, ``the {}``; anomalous ``a damaged {}``, ``a broken {}``,
  ``a {} with flaw``, ``a {} with defect``, ``a {} with damage``; templates ``{}.`` and
  ``a photo of {}.``: 6 + 10 sentences) through the adapted text tower; each sentence embedding
  L2-normalised, averaged per state, normalised again -> ``T = [T_N, T_A]``. The adapted
  tower's read-out replaces CLIP's text projection by a learnable bias-free linear layer and
  LeakyReLU (released ``text_adapter[-1]``, ``SimpleProj(768, 768, relu=True)``).
* **Stage 1 — text anchors** (Eq. 5–6): the visual tower is frozen; patch features are those
  of CLIP with V-V attention (``Attn(V, V, V)``) in place of Q-K-V attention in blocks 6–24
  (released ``DAPM_replace(DPAM_layer=20)``: the last 19 blocks; FFNs kept, one path), read
  out at blocks 6, 12, 18, 24 through ``ln_post`` + ``proj``, L2-normalised, plus the
  normalised global embedding of the plain tower (released ``train.py:75–85``). Per level,
  ``softmax(up(100 · f·T))`` (bilinear, ``align_corners=True``) against the mask:
  ``L_seg = Focal + Dice(P_A, M) + Dice(P_N, 1 − M)``; ``L_dis = (mean_b <T_N, T_A>)²``;
  ``L = Σ_levels L_seg + γ L_dis``, γ = 0.1. Only the text adapters and the text read-out train:
  Adam lr 1e-5, betas (0.5, 0.999), batch 16, 5 epochs.
* **Stage 2 — patch alignment** (Eq. 3–4, 7): anchors frozen (computed once, no gradient);
  residual adapters after visual blocks 1–6; tokens after blocks 6, 12, 18, 24 (after the
  adapter where one applies) -> ``ln_post`` -> a learnable bias-free linear projector per level
  (``Linear(W, D)``; the released ``--relu`` flag is off) -> L2-normalised ``V_patch^l``; the
  image feature is the mean over patches of the normalised ``det_proj(ln_post(tokens_24))``
  (a fifth projector, not normalised after the mean). ``L = CE(V_image·T, y) + Σ_levels L_seg``
  (the CE on the raw cosines, released ``train.py:148–154``). Adam lr 5e-4, betas (0.5, 0.999),
  ``MultiStepLR`` milestones 16,000 / 32,000 iterations, γ 0.5; batch 2; 20 epochs.
* **Augmentation** (released ``dataset/__init__.py``, both stages): rotation U(−30°, 30°)
  (p 0.5), translation up to 15 % (p 0.5), horizontal and vertical flips (p 0.5 each), image and
  mask together, nearest neighbour, fill 0 (:class:`AACLIPAugment`); stage 2 adds brightness,
  contrast and saturation jitter (factor U(0.5, 1.5), p 0.7 each) before them.
* **Inference** (released ``test.py``, ``forward_utils.calculate_similarity_map(test=True)``):
  per level ``m_l = (100 cos(V, T_A) + 1 − 100 cos(V, T_N)) / 2`` on the patch grid, Gaussian
  blur there (kernel 7, σ 1 for industrial; kernel 9, σ 1.5 for medical; reflect border),
  bilinear upsampling (``align_corners=True``); the map is ``Σ_l m_l``. Image score
  ``s = (V_image·T_A + 1) / 2``. Per category (``metrics_eval``): map and scores are min-max
  normalised over the category's test images; industrial image score ``½ max(map) + ½ s``,
  medical ``max(map)`` — :meth:`AACLIP.finalize_category`, which needs the whole category
  (``predict`` alone returns ``s``).

Where the released code departs from the paper, or has clear bugs, see ``docs/methods.md``
(AA-CLIP): the switches ``released_stage1_loss`` and ``released_vv_batch_axis`` reproduce its
two stage-1 bugs; ``class_names = "released"`` its hand-written class descriptions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from bench.backbone import block_attention
from methods.base import Method, Prediction, register
from methods.common import (
    REFERENCE_TEXT_DEPTH,
    REFERENCE_VISUAL_DEPTH,
    scale_layer,
    scale_layers,
    train_steps,
)
from methods.losses import segmentation_loss

BIBTEX = """@inproceedings{ma2025aaclip,
  title={AA-CLIP: Enhancing Zero-shot Anomaly Detection via Anomaly-Aware CLIP},
  author={Ma, Wenxin and Zhang, Xu and Yao, Qingsong and Tang, Fenghe and Wu, Chenxu and Li, Yingtai and Yan, Rui and Jiang, Zihang and Zhou, S. Kevin},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2025}, note={arXiv:2503.06661}}"""
PAPER = ("Ma, Zhang, Yao, Tang, Wu, Li, Yan, Jiang & Zhou, AA-CLIP: Enhancing Zero-shot Anomaly "
         "Detection via Anomaly-Aware CLIP, CVPR 2025 (arXiv:2503.06661)")

#: State phrases and templates of the released ``dataset/constants.py`` (``PROMPTS``).
NORMAL_STATES = ("{}", "a {}", "the {}")
ANOMALOUS_STATES = ("a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect",
                    "a {} with damage")
TEMPLATES = ("{}.", "a photo of {}.")

#: The released hand-written class descriptions (``dataset/constants.py`` ``REAL_NAMES``),
#: keyed by the suite's (dataset id, category). Used only with ``class_names = "released"``;
#: datasets AA-CLIP never ran (SDD, DAGM, DTD-Synthetic, ISIC, Endo, HeadCT, BrainMRI, Br35H)
#: keep the protocol's class words. (AA-CLIP's "Brain" is BMAD's BraTS set, not BrainMRI.)
RELEASED_NAMES: dict[tuple[str, str], str] = {
    **{("mvtec", c): n for c, n in {
        "bottle": "dark bottle", "cable": "top view of three cables",
        "capsule": "black and orange capsule", "carpet": "gray carpet",
        "grid": "metal or plastic mesh", "hazelnut": "single brown hazelnut",
        "leather": "brown leather", "metal_nut": "metal nut which has four notched edges",
        "pill": "oval white pill with small red speckles and the letters 'FF' engraved",
        "screw": "screw", "tile": "speckled tile surface",
        "transistor": "a three-legged transistor placed vertically",
        "toothbrush": "toothbrush head", "wood": "wood surface", "zipper": "a black zipper",
    }.items()},
    **{("visa", c): n for c, n in {
        "candle": "candle", "pcb3": "infrared sensor pcb module", "capsules": "capsules",
        "pipe_fryum": "pipe-shaped fryum", "pcb4": "battery charging pcb module",
        "macaroni2": "scattered yellow macaroni", "pcb2": "integrated circuits board",
        "chewinggum": "chewing gum", "macaroni1": "orange macaroni", "cashew": "cashew nut",
        "fryum": "wheel-shaped fryum snack", "pcb1": "dual ultrasonic distance sensor pcb module",
    }.items()},
    **{("mpdd", c): n for c, n in {
        "connector": "metal clamps with black adjustment knobs",
        "tubes": "scattered metal objects",
        "metal_plate": "blue rectangular metal plate with a notch on one side",
        "bracket_white": "white, elongated triangular metal bracket with a smooth, matte finish",
        "bracket_brown": "brown L-shaped metal bracket with smooth, glossy finish and multiple "
                         "mounting holes along its arms",
        "bracket_black": "black ornamental metal bracket with spiral design attached to a "
                         "rectangular frame",
    }.items()},
    **{("btad", c): n for c, n in {
        "01": "Bright concentric rings in neon yellow and blue tones against a dark blue "
              "background, resembling a stylized wave or energy field radiating outward.",
        "02": "vertical fabric lines in warm, dusty pink and beige tones",
        "03": "oval concentric circular rings in gradient shades of blue and white",
    }.items()},
    ("clinicdb", "colon"): "colon endoscopy image",
    ("colondb", "colon"): "colon endoscopy image",
    ("kvasir", "colon"): "colon endoscopy image",
}

#: Test-time smoothing of the patch-grid maps (released ``calculate_similarity_map``):
#: domain -> (kernel size, sigma).
BLUR = {"industrial": (7, 1.0), "medical": (9, 1.5)}


# ======================================================================================
# Building blocks
# ======================================================================================

def residual_adapt(x: torch.Tensor, linear: nn.Linear, weight: float) -> torch.Tensor:
    """Residual adapter (Eq. 1–2): ``λ · Norm(LeakyReLU(W x)) + (1 − λ) · x``.

    ``Norm`` rescales each token of the adapter output to the norm of the same token of ``x``.
    """
    a = F.leaky_relu(linear(x), negative_slope=0.01)
    a = a * (x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return weight * a + (1.0 - weight) * x


def disentangle_loss(anchors: torch.Tensor) -> torch.Tensor:
    """``L_dis = (mean_b <T_N^b, T_A^b>)²`` for per-sample anchors [B, 2, D] (Eq. 5).

    As in the released ``train.py:91–95``: the inner products of every sample's (normal,
    anomalous) pair are averaged over the batch, then squared.
    """
    return (anchors[:, 0] * anchors[:, 1]).sum(dim=-1).mean() ** 2


def gaussian_kernel1d(size: int, sigma: float) -> torch.Tensor:
    """Normalised Gaussian weights at offsets ``−size//2 … size//2`` (kornia's kernel, odd size)."""
    x = torch.arange(size, dtype=torch.float64) - size // 2
    k = torch.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return k / k.sum()


def grid_blur(maps: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of maps [B, h, w] with a ``size``-tap kernel, reflect border.

    kornia's ``gaussian_blur2d(x, (size, size), (sigma, sigma))`` (border ``"reflect"``, i.e.
    torch's reflection without repeating the edge), which the released test code applies to
    the patch-grid maps. Grids too small for the reflection pad replicate the edge instead.
    """
    k = gaussian_kernel1d(size, sigma).to(maps)
    r = size // 2
    B, h, w = maps.shape
    mode = "reflect" if r < min(h, w) else "replicate"
    x = F.pad(maps[:, None], (r, r, r, r), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


def _cat(batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in batches[0]:
        vals = [b[k] for b in batches]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.cat(vals)
        else:
            out[k] = [v for vs in vals for v in vs]
    return out


def _slice(batch: dict[str, Any], start: int, stop: int | None = None) -> dict[str, Any]:
    return {k: v[start:stop] for k, v in batch.items()}


def _batch_len(batch: dict[str, Any]) -> int:
    return int(batch["image"].shape[0])


def rebatch(batches: Iterable[dict[str, Any]], size: int) -> Iterator[dict[str, Any]]:
    """Regroup a stream of batches into batches of exactly ``size`` samples (the last smaller).

    Samples keep their order, so one pass over a shuffled loader gives what a
    ``DataLoader(batch_size=size, shuffle=True)`` over the same permutation would: AA-CLIP
    trains stage 1 with batch 16 and stage 2 with batch 2 from the runner's one loader.
    """
    pending: list[dict[str, Any]] = []
    count = 0
    for b in batches:
        pending.append(b)
        count += _batch_len(b)
        while count >= size:
            joined = _cat(pending)
            yield _slice(joined, 0, size)
            rest = _slice(joined, size)
            count -= size
            pending = [rest] if count else []
    if count:
        yield _cat(pending)


class AACLIPAugment:
    """The released training augmentation, seeded (``dataset/__init__.py`` ``BaseDataset``).

    Per sample: with ``color`` (stage 2) brightness, contrast and saturation jitter, each with
    probability 0.7 and a factor drawn from U(0.5, 1.5), on the un-normalised image in [0, 1];
    then on image and mask together: rotation by U(−30°, 30°) (p 0.5), translation by up to
    15 % of the side in x and y (rounded to pixels, p 0.5), horizontal flip (p 0.5), vertical
    flip (p 0.5) — nearest neighbour, fill 0 (the mean colour of the normalised image, no
    mask). Every draw comes from the augmenter's own generator.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, seed: int = 0) -> None:
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.generator = torch.Generator().manual_seed(int(seed))

    def _u(self, lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=self.generator))

    def _p(self, p: float) -> bool:
        return bool(torch.rand((), generator=self.generator) < p)

    def _jitter(self, img: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(img), self.std.to(img)
        x = (img * std + mean).clamp(0, 1)
        for adjust in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
            if self._p(0.7):
                x = adjust(x, self._u(0.5, 1.5))
        return (x - mean) / std

    def sample(self, img: torch.Tensor, mask: torch.Tensor, *, color: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if color:
            img = self._jitter(img)
        x = torch.cat([img, mask[None].to(img)], dim=0)
        nearest = InterpolationMode.NEAREST
        if self._p(0.5):
            x = TF.rotate(x, self._u(-30.0, 30.0), interpolation=nearest, fill=0.0)
        if self._p(0.5):
            h, w = x.shape[-2:]
            tx = int(round(self._u(-0.15 * w, 0.15 * w)))
            ty = int(round(self._u(-0.15 * h, 0.15 * h)))
            x = TF.affine(x, angle=0.0, translate=[tx, ty], scale=1.0, shear=[0.0, 0.0],
                          interpolation=nearest, fill=0.0)
        if self._p(0.5):
            x = TF.hflip(x)
        if self._p(0.5):
            x = TF.vflip(x)
        return x[:3], x[3].to(mask.dtype)

    def __call__(self, batch: dict[str, Any], *, color: bool) -> dict[str, Any]:
        imgs, masks = [], []
        for img, mask in zip(batch["image"], batch["mask"], strict=True):
            i, m = self.sample(img, mask, color=color)
            imgs.append(i)
            masks.append(m)
        return {**batch, "image": torch.stack(imgs), "mask": torch.stack(masks)}


class AACLIPHead(nn.Module):
    """AA-CLIP's learnable parts (released ``AdaptedCLIP.text_adapter`` / ``image_adapter``).

    * ``text_adapters`` — K_T bias-free ``Linear(text_width, text_width)`` (stage 1);
    * ``text_proj`` — bias-free ``Linear(text_width, D)``, the text read-out (stage 1);
    * ``image_adapters`` — K_I bias-free ``Linear(W, W)`` (stage 2);
    * ``seg_proj`` — one bias-free ``Linear(W, D)`` per feature level (stage 2);
    * ``det_proj`` — bias-free ``Linear(W, D)`` for the image feature (stage 2);
    * buffer ``text_trained`` — 1 once stage 1 has run; until then the anchors come from
      CLIP's own text tower (released ``train.py``/``test.py`` without a text checkpoint).

    All weights Xavier-uniform (released ``_init_weights_``).
    """

    def __init__(self, *, width: int, text_width: int, embed_dim: int, n_text: int,
                 n_image: int, n_levels: int) -> None:
        super().__init__()
        self.image_adapters = nn.ModuleList([nn.Linear(width, width, bias=False) for _ in range(n_image)])
        self.seg_proj = nn.ModuleList([nn.Linear(width, embed_dim, bias=False) for _ in range(n_levels)])
        self.det_proj = nn.Linear(width, embed_dim, bias=False)
        self.text_adapters = nn.ModuleList(
            [nn.Linear(text_width, text_width, bias=False) for _ in range(n_text)])
        self.text_proj = nn.Linear(text_width, embed_dim, bias=False)
        self.register_buffer("text_trained", torch.zeros(()))
        for group in (self.image_adapters, self.seg_proj, self.det_proj, self.text_adapters,
                      self.text_proj):
            for p in group.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    #: parameter-name prefixes trained in each stage
    STAGES = {"text": ("text_adapters.", "text_proj."),
              "image": ("image_adapters.", "seg_proj.", "det_proj.")}

    def stage_parameters(self, stage: str) -> list[tuple[str, nn.Parameter]]:
        prefixes = self.STAGES[stage]
        return [(n, p) for n, p in self.named_parameters() if n.startswith(prefixes)]


# ======================================================================================
# The method
# ======================================================================================

@register("aaclip")
class AACLIP(Method):
    """AA-CLIP: residual adapters, text anchors (stage 1) then patch alignment (stage 2)."""

    trains = True
    paper = PAPER
    bibtex = BIBTEX
    default_hparams: dict[str, Any] = {
        # architecture (layer numbers of ViT-L/14: 24 visual, 12 text blocks)
        "text_layers": 3,                   # K_T: adapters after text blocks 1..3
        "image_layers": 6,                  # K_I: adapters after visual blocks 1..6
        "text_adapt_weight": 0.1,           # λ of the text adapters (Eq. 2)
        "image_adapt_weight": 0.1,          # λ of the visual adapters
        "feature_layers": [6, 12, 18, 24],  # multi-granularity levels (Eq. 7)
        "surgery_start": 6,                 # stage-1 features: V-V attention in blocks 6..24
        "proj_relu": False,                 # released --relu (off): LeakyReLU after projectors
        "logit_scale": 100.0,
        # stage 1 (text anchors)
        "text_epochs": 5,
        "text_lr": 1e-5,
        "text_batch_size": 16,
        "dis_weight": 0.1,                  # γ (Eq. 6)
        # stage 2 (patch alignment): the runner's `epochs`, `lr`, `batch_size`
        "epochs": 20,
        "lr": 5e-4,
        "batch_size": 2,
        "lr_milestones": [16000, 32000],    # MultiStepLR, in iterations
        "lr_gamma": 0.5,
        "betas": [0.5, 0.999],              # both stages
        "focal_gamma": 2.0,
        "augment": True,
        # class words: "prompt_name" (the protocol's) or "released" (AA-CLIP's REAL_NAMES)
        "class_names": "prompt_name",
        # switches that reproduce bugs of the released stage 1 (docs/methods.md)
        "released_stage1_loss": False,      # only the last level's L_seg (loss overwritten)
        "released_vv_batch_axis": False,    # V-V attention over the batch axis (LND bug)
    }
    #: The released code resizes the position grid at load time with open_clip's bicubic
    #: (``model/model.py`` ``resize_pos_embed``) and writes hand-made class descriptions
    #: (``REAL_NAMES``), never folder ids — closest to "readable" (``class_names`` above).
    #: Its GELU on OpenAI's weights is a bug, not a setting (``[backbones.aaclip] activation``).
    released_inputs = {"pos_embed_resize": "open_clip", "class_words": "readable"}
    epoch_hparams = ("epochs", "text_epochs")  # [run] epochs_scale scales both stages

    def __init__(self, backbone: Any, **hparams: Any) -> None:
        super().__init__(backbone, **hparams)
        hp = self.hparams
        if hp["class_names"] not in ("prompt_name", "released"):
            raise ValueError(f"aaclip: class_names must be 'prompt_name' or 'released', "
                             f"not {hp['class_names']!r}")
        bb = backbone
        self.n_text = scale_layer(int(hp["text_layers"]), bb.text_layers, REFERENCE_TEXT_DEPTH)
        self.n_image = scale_layer(int(hp["image_layers"]), bb.num_layers, REFERENCE_VISUAL_DEPTH)
        self.levels = scale_layers(hp["feature_layers"], bb.num_layers)
        self.surgery_start = scale_layer(int(hp["surgery_start"]), bb.num_layers)
        self.head = AACLIPHead(width=bb.width, text_width=bb.text_width, embed_dim=bb.embed_dim,
                               n_text=self.n_text, n_image=self.n_image,
                               n_levels=len(self.levels)).to(bb.device)
        self._anchor_cache: dict[str, torch.Tensor] = {}
        self.losses: dict[str, list[float]] = {"text": [], "image": []}

    # -- class words -----------------------------------------------------------------
    def class_words(self, batch: dict[str, Any]) -> list[str]:
        names = list(batch["prompt_name"])
        if self.hparams["class_names"] == "released":
            names = [RELEASED_NAMES.get((d, c), n) for d, c, n in
                     zip(batch["dataset"], batch["category"], names, strict=True)]
        return names

    # -- text ------------------------------------------------------------------------
    def prompts(self, obj: str) -> tuple[list[str], list[str]]:
        """(normal, anomalous) sentences for object words ``obj`` (state-major, released order)."""
        def sentences(states: Sequence[str]) -> list[str]:
            return [t.format(s.format(obj)) for s in states for t in TEMPLATES]
        return sentences(NORMAL_STATES), sentences(ANOMALOUS_STATES)

    def encode_text(self, tokens: torch.Tensor, *, adapted: bool = True) -> torch.Tensor:
        """Text tower on tokens [T, L] -> raw features [T, D].

        ``adapted``: residual adapters after the first K_T blocks and the learnable read-out
        ``LeakyReLU(text_proj(ln_final(x_eot)))``; else CLIP's own tower and projection. The
        sequences are cut after the last end-of-text token (exact: causal mask, per-token
        adapters).
        """
        m = self.backbone.model
        eot = tokens.argmax(dim=-1)
        L = int(eot.max()) + 1
        x = m.token_embedding(tokens[:, :L]) + m.positional_embedding[:L].to(m.token_embedding.weight.dtype)
        mask = m.attn_mask[:L, :L] if m.attn_mask is not None else None
        lam = float(self.hparams["text_adapt_weight"])
        for i, blk in enumerate(m.transformer.resblocks, start=1):
            x = blk(x, attn_mask=mask)
            if adapted and i <= self.n_text:
                x = residual_adapt(x, self.head.text_adapters[i - 1], lam)
        x = m.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        if adapted:
            return F.leaky_relu(self.head.text_proj(pooled), negative_slope=0.01)
        proj = m.text_projection
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj

    def anchors(self, names: Sequence[str], *, adapted: bool | None = None) -> torch.Tensor:
        """Text anchors [len(names), 2, D] (normal, anomalous), L2-normalised; differentiable.

        Each unique name is encoded once (released ``train.py:63–72``). ``adapted`` (default:
        whether stage 1 has run) picks the adapted tower or CLIP's own.
        """
        if adapted is None:
            adapted = bool(self.head.text_trained)
        uniq = list(dict.fromkeys(names))
        out = {}
        for obj in uniq:
            normal, anomalous = self.prompts(obj)
            feats = F.normalize(self.encode_text(self.backbone.tokenize(normal + anomalous),
                                                 adapted=adapted), dim=-1)
            n = len(normal)
            out[obj] = torch.stack([F.normalize(feats[:n].mean(0), dim=-1),
                                    F.normalize(feats[n:].mean(0), dim=-1)])
        return torch.stack([out[o] for o in names])

    @torch.no_grad()
    def frozen_anchors(self, names: Sequence[str]) -> torch.Tensor:
        """Anchors [B, 2, D] without gradients, cached per name (stage 2 and inference)."""
        for obj in dict.fromkeys(names):
            if obj not in self._anchor_cache:
                self._anchor_cache[obj] = self.anchors([obj])[0]
        return torch.stack([self._anchor_cache[o] for o in names])

    # -- visual ----------------------------------------------------------------------
    def stage1_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen stage-1 patch features per level [B, N, D] (released ``train.py:74–85``).

        One pass shares the blocks before ``surgery_start``; from there the surgery path runs
        ``x + Attn_VV(ln_1 x)`` then the block's FFN, and the plain path runs the blocks as
        they are, for the global embedding. Each level: ``normalize(proj(ln_post(patches)))
        + normalize(global)``. Not served by the feature cache (training images are augmented).
        """
        bb = self.backbone
        start = self.surgery_start
        batch_axis = bool(self.hparams["released_vv_batch_axis"])
        wanted = set(self.levels)
        with torch.no_grad():
            x = bb.embed_patches(images)
            plain: torch.Tensor | None = None
            taps: dict[int, torch.Tensor] = {}
            for i, blk in enumerate(bb.blocks, start=1):
                if start and i >= start:
                    plain = blk(x if plain is None else plain)
                    h = blk.ln_1(x)
                    if batch_axis:  # the released Attention on LND tokens: B and L swapped
                        a = block_attention(blk, h.transpose(0, 1), mode="vv").transpose(0, 1)
                    else:
                        a = block_attention(blk, h, mode="vv")
                    x = x + a
                    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
                else:
                    x = blk(x)
                if i in wanted:
                    taps[i] = x
            glob = F.normalize(bb.project_tokens((x if plain is None else plain)[:, 0]), dim=-1)
            return [F.normalize(bb.project_tokens(taps[ly][:, 1:]), dim=-1) + glob[:, None]
                    for ly in self.levels]

    def adapted_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Stage-2 visual pass: (per-level patch features [B, N, D] normalised, image feature [B, D]).

        The blocks run here (never through the feature cache: the adapters after blocks
        1..K_I change every later block's input); the backbone's weights are only read.
        """
        bb = self.backbone
        head = self.head
        lam = float(self.hparams["image_adapt_weight"])
        relu = bool(self.hparams["proj_relu"])
        x = bb.embed_patches(images)
        taps: dict[int, torch.Tensor] = {}
        last = max(max(self.levels), self.n_image)
        for i, blk in enumerate(bb.blocks, start=1):
            if i > last:
                break
            x = blk(x)
            if i <= self.n_image:
                x = residual_adapt(x, head.image_adapters[i - 1], lam)
            if i in self.levels:
                taps[i] = x[:, 1:]
        vis = bb.model.visual

        def project(lin: nn.Linear, t: torch.Tensor) -> torch.Tensor:
            y = lin(vis.ln_post(t))
            return F.leaky_relu(y, negative_slope=0.01) if relu else y

        seg = [F.normalize(project(head.seg_proj[j], taps[ly]), dim=-1)
               for j, ly in enumerate(self.levels)]
        det = F.normalize(project(head.det_proj, taps[self.levels[-1]]), dim=-1).mean(dim=1)
        return seg, det

    # -- maps and losses --------------------------------------------------------------
    def level_probs(self, feats: torch.Tensor, text: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``softmax(up(scale · f·T))`` [B, 2, *size] (released ``calculate_similarity_map``)."""
        B, N, _ = feats.shape
        g = int(round(math.sqrt(N)))
        logits = float(self.hparams["logit_scale"]) * torch.einsum("bnd,bkd->bkn", feats, text)
        logits = F.interpolate(logits.reshape(B, 2, g, g), size=size, mode="bilinear",
                               align_corners=True)
        return logits.softmax(dim=1)

    def seg_loss(self, probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``Focal(P, M) + Dice(P_A, M) + Dice(P_N, 1 − M)`` (released ``calculate_seg_loss``)."""
        return segmentation_loss(probs, mask, gamma=float(self.hparams["focal_gamma"]))

    def stage1_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage-1 objective ``Σ_l L_seg^l + γ L_dis`` (Eq. 6); parts returned for inspection."""
        images = batch["image"].to(self.device)
        mask = batch["mask"].to(self.device)
        text = self.anchors(self.class_words(batch), adapted=True)  # [B, 2, D], differentiable
        feats = self.stage1_features(images)
        segs = [self.seg_loss(self.level_probs(f, text, images.shape[-2:]), mask) for f in feats]
        dis = disentangle_loss(text)
        seg = segs[-1] if self.hparams["released_stage1_loss"] else torch.stack(segs).sum()
        total = seg + float(self.hparams["dis_weight"]) * dis
        return total, {"seg": seg, "dis": dis}

    def stage2_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage-2 objective ``CE(V_image·T, y) + Σ_l L_seg^l`` (Eq. 4) with frozen anchors."""
        images = batch["image"].to(self.device)
        mask = batch["mask"].to(self.device)
        label = torch.as_tensor(batch["label"]).long().to(self.device)
        text = self.frozen_anchors(self.class_words(batch))
        seg_feats, det = self.adapted_features(images)
        cls = F.cross_entropy(torch.einsum("bd,bkd->bk", det, text), label)
        seg = torch.stack([self.seg_loss(self.level_probs(f, text, images.shape[-2:]), mask)
                           for f in seg_feats]).sum()
        return cls + seg, {"cls": cls, "seg": seg}

    # -- training ----------------------------------------------------------------------
    def _set_stage(self, stage: str | None) -> None:
        """requires_grad on the parameters of ``stage`` only (None: all, after training)."""
        for name, p in self.head.named_parameters():
            p.requires_grad_(stage is None or name.startswith(AACLIPHead.STAGES[stage]))

    def fit_text(self, aux_loader: Iterable[dict[str, Any]], *, epochs: int, seed: int = 0,
                 progress=iter, augment: AACLIPAugment | None = None) -> None:
        """Stage 1: train the text adapters and read-out; the visual side stays frozen."""
        hp = self.hparams
        self._anchor_cache.clear()
        if epochs <= 0:
            return
        params = [p for _, p in self.head.stage_parameters("text")]
        opt = torch.optim.Adam(params, lr=float(hp["text_lr"]), betas=tuple(hp["betas"]))
        self._set_stage("text")
        try:
            train_steps(self.head, opt, int(epochs),
                        lambda: rebatch(progress(aux_loader), int(hp["text_batch_size"])),
                        lambda batch: self.stage1_loss(
                            augment(batch, color=False) if augment is not None else batch)[0],
                        losses=self.losses["text"])
            self.head.text_trained.fill_(1.0)
        finally:
            self._set_stage(None)
            self._anchor_cache.clear()

    def fit_image(self, aux_loader: Iterable[dict[str, Any]], *, epochs: int, seed: int = 0,
                  progress=iter, augment: AACLIPAugment | None = None) -> None:
        """Stage 2: train the visual adapters and projectors against the frozen anchors."""
        hp = self.hparams
        if epochs <= 0:
            return
        params = [p for _, p in self.head.stage_parameters("image")]
        opt = torch.optim.Adam(params, lr=float(hp["lr"]), betas=tuple(hp["betas"]))
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[int(m) for m in hp["lr_milestones"]], gamma=float(hp["lr_gamma"]))
        self._set_stage("image")
        try:
            train_steps(self.head, opt, int(epochs),
                        lambda: rebatch(progress(aux_loader), int(hp["batch_size"])),
                        lambda batch: self.stage2_loss(
                            augment(batch, color=True) if augment is not None else batch)[0],
                        scheduler=sched, losses=self.losses["image"])
        finally:
            self._set_stage(None)

    def fit(self, aux_loader, *, epochs: int | None = None, seed: int = 0, progress=iter) -> None:
        """Stage 1 (``text_epochs``) then stage 2 (``epochs``, the runner's epoch count)."""
        hp = self.hparams
        bb = self.backbone
        augment = AACLIPAugment(bb.mean, bb.std, seed=seed) if hp["augment"] else None
        self.fit_text(aux_loader, epochs=int(hp["text_epochs"]), seed=seed, progress=progress,
                      augment=augment)
        self.fit_image(aux_loader, epochs=int(hp["epochs"] if epochs is None else epochs),
                       seed=seed, progress=progress, augment=augment)

    # -- inference ----------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> Prediction:
        """Map ``Σ_l up(blur((100 cos_A + 1 − 100 cos_N) / 2))``, image score ``(cos_A + 1) / 2``."""
        images = batch["image"].to(self.device)
        text = self.frozen_anchors(self.class_words(batch))
        seg_feats, det = self.adapted_features(images)
        scores = (torch.einsum("bd,bd->b", det, text[:, 1]) + 1.0) / 2.0
        scale = float(self.hparams["logit_scale"])
        B = images.shape[0]
        domains = [str(d) for d in batch.get("domain", ["industrial"] * B)]
        maps = torch.zeros(B, *images.shape[-2:], dtype=images.dtype, device=images.device)
        for f in seg_feats:
            g = int(round(math.sqrt(f.shape[1])))
            logits = scale * torch.einsum("bnd,bkd->bkn", f, text).reshape(B, 2, g, g)
            m = (logits[:, 1] + 1.0 - logits[:, 0]) / 2.0
            m = torch.stack([grid_blur(m[b:b + 1], *BLUR.get(domains[b], BLUR["industrial"]))[0]
                             for b in range(B)])
            maps += F.interpolate(m[:, None], size=images.shape[-2:], mode="bilinear",
                                  align_corners=True)[:, 0]
        return Prediction(scores, maps)

    @staticmethod
    def finalize_category(image_scores: np.ndarray, anomaly_maps: np.ndarray, *,
                          domain: str = "industrial") -> tuple[np.ndarray, np.ndarray]:
        """The released per-category scoring (``forward_utils.metrics_eval``).

        Over one category's test images: maps and image scores min-max normalised (each unless
        its maximum is already 1); image score ``½ max(map) + ½ s`` (industrial) or
        ``max(map)`` (medical). Pixel metrics are unchanged (a monotone map per category).
        """
        def minmax(a: np.ndarray) -> np.ndarray:
            a = np.asarray(a, dtype=np.float64)
            lo, hi = a.min(), a.max()
            if hi == 1 or hi == lo:
                return a
            return (a - lo) / (hi - lo)

        maps = minmax(anomaly_maps)
        scores = minmax(image_scores)
        pmax = maps.reshape(maps.shape[0], -1).max(axis=1)
        fused = pmax if str(domain).lower() == "medical" else 0.5 * pmax + 0.5 * scores
        return fused, maps

    # -- state ---------------------------------------------------------------------------
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self._anchor_cache.clear()
