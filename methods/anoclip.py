"""AnoCLIP and AnoCLIP+ (Deng et al., "Bootstrap Fine-Grained Vision-Language Alignment for
Unified Zero-Shot Anomaly Localization", 2023; code released as hq-deng/AnoVL).

AnoCLIP (training-free):

* **Local-aware tokens** (§3.2, Eq. 7): a value-value attention path runs beside the frozen
  visual tower from block ``vv_start`` on (default: every block, as the authors' code does),
  accumulating each block's V-V self-attention residually without the FFN
  (:func:`bench.backbone.encode_image_vv`). Its last-layer patch tokens, read out through
  ``ln_post`` + ``proj``, give the map; the image score uses the original path's class token.
* **Domain-aware state prompting** (§3.3, Eq. 8): "A [domain] photo of a [state] [class]" —
  22 base templates × 7 contrastive state pairs × 4 domain phrases (the supplement's counts;
  lists in :mod:`methods.prompts`), i.e. 616 prompts per state. ``t+`` / ``t-`` are the means
  of the normalised prompt embeddings. The domain phrases follow the image's benchmark domain
  (industrial or medical).
* **Scores** (§3.1, Eq. 1-2): softmax over the cosine similarities with ``[t+, t-]`` —
  no temperature in the paper (``logit_scale = 1``); the map is reorganised on the patch grid
  and upsampled (bilinear).

AnoCLIP+ (§3.4): per test image, a residual adapter ``Φ(P) = α(P̄ ωᵀ) T + P`` (Eq. 9, α = tanh,
``P̄`` the L2-normalised tokens, ``T`` the 2N normalised prompt embeddings, ``ω`` initialised
from ``T``) is trained for 5 epochs with AdamW (lr 1e-3) on ``L = L_d + L_p``: the
discriminative loss between the tokens and Gaussian-corrupted tokens (μ = 0, σ = 0.05; Eq. 10)
and the pseudo-label soft cross-entropy (Eq. 11). Only the map is refined; the image score is
AnoCLIP's (Table 2). Its output depends on the noise, so it is seeded.

See ``docs/methods.md`` for every choice the paper leaves open.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bench.backbone import compose_prompts, encode_image_vv, encode_prompts, ensemble_mean
from methods.base import Method, Prediction, register
from methods.clip import two_way_scores, upsample_map
from methods.prompts import (
    ANOCLIP_BASE_TEMPLATES,
    ANOCLIP_DOMAINS,
    ANOCLIP_STATE_PAIRS,
    domain_templates,
)

BIBTEX = """@article{deng2023anoclip,
  title={Bootstrap Fine-Grained Vision-Language Alignment for Unified Zero-Shot Anomaly Localization},
  author={Deng, Hanqiu and Zhang, Zhaoxiang and Bao, Jinan and Li, Xingyu},
  journal={arXiv preprint arXiv:2308.15939}, year={2023}}"""


class TextSet:
    """The prompt embeddings of one (class words, domain): prototypes and the full set.

    ``prototypes`` [2, D]: normalised (t+, t-) of Eq. 8. ``prompts`` [2N, D]: the normalised
    embedding of every prompt, normal ones first, ``prompts[i]`` and ``prompts[i + N]`` the
    two states of one pair under one template and domain (``T`` of Eq. 9).
    """

    def __init__(self, prototypes: torch.Tensor, prompts: torch.Tensor) -> None:
        self.prototypes = prototypes
        self.prompts = prompts


@register("anoclip")
class AnoCLIP(Method):
    """AnoCLIP: V-V attention path (multi-layer, no FFN) + domain-aware contrastive state prompts."""

    trains = False
    paper = ("Deng et al., Bootstrap Fine-Grained Vision-Language Alignment for Unified Zero-Shot "
             "Anomaly Localization (AnoCLIP), arXiv 2308.15939, 2023")
    bibtex = BIBTEX
    #: The paper's backbone (§4.1; the pretrained tag is the authors' test script's). The
    #: protocol decides; bench/protocols/full.toml sets it.
    paper_backbone = {"arch": "ViT-B-16-plus-240", "pretrained": "laion400m_e32", "image_size": 240}
    default_hparams: dict[str, Any] = {
        "vv_start": 1,                      # first block of the V-V path (1-based), §3.2
        "map_layers": None,                 # V-V blocks whose maps are averaged; None = last
        "templates": list(ANOCLIP_BASE_TEMPLATES),
        "state_pairs": [list(p) for p in ANOCLIP_STATE_PAIRS],
        "domains": {k: list(v) for k, v in ANOCLIP_DOMAINS.items()},
        "normalize_prompts": True,          # Eq. 8 over L2-normalised prompt embeddings
        "logit_scale": 1.0,                 # Eq. 1-2 use exp(cos) without a temperature
        "class_aware": True,                # class words in the prompts (False: "object")
    }

    def __init__(self, backbone: Any, **hparams: Any) -> None:
        super().__init__(backbone, **hparams)
        self._text_cache: dict[tuple[str, str], TextSet] = {}
        L = backbone.num_layers
        layers = self.hparams["map_layers"] or [L]
        self.map_layers = [int(i) if int(i) > 0 else L + 1 + int(i) for i in layers]
        start = int(self.hparams["vv_start"])
        bad = [i for i in self.map_layers if not start <= i <= L]
        if bad:
            raise ValueError(f"{type(self).__name__}: map_layers {bad} outside the V-V path "
                             f"(blocks {start}..{L})")

    # -- text (§3.3) -------------------------------------------------------------------
    def domain_phrases(self, domain: str) -> list[str]:
        """The domain-aware phrases for a benchmark domain ("photo" if the domain is unknown)."""
        return list(self.hparams["domains"].get(domain, ["photo"]))

    def prompts(self, obj: str, domain: str) -> tuple[list[str], list[str]]:
        """(normal, anomalous) sentences "A [domain] photo of a [state] [class]", paired by index."""
        obj = obj if self.hparams["class_aware"] else "object"
        templates = domain_templates(self.hparams["templates"], self.domain_phrases(domain))
        pairs = self.hparams["state_pairs"]
        return (compose_prompts(templates, [p[0] for p in pairs], obj),
                compose_prompts(templates, [p[1] for p in pairs], obj))

    def text_set(self, obj: str, domain: str) -> TextSet:
        key = (obj, domain)
        if key not in self._text_cache:
            normal, anomalous = self.prompts(obj, domain)
            raw = encode_prompts(self.backbone, normal + anomalous, normalize=False)
            n = len(normal)
            each = self.hparams["normalize_prompts"]
            protos = torch.stack([ensemble_mean(raw[:n], normalize_each=each),
                                  ensemble_mean(raw[n:], normalize_each=each)])
            self._text_cache[key] = TextSet(protos, F.normalize(raw, dim=-1))
        return self._text_cache[key]

    def batch_text(self, batch: dict[str, Any]) -> list[TextSet]:
        domains = batch.get("domain") or ["industrial"] * len(batch["prompt_name"])
        return [self.text_set(o, d) for o, d in zip(batch["prompt_name"], domains, strict=True)]

    # -- visual (§3.2) -----------------------------------------------------------------
    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
        """Projected global embedding [B, D] (original path) and V-V patch tokens [B, M, D] per map layer."""
        bb = self.backbone
        f = encode_image_vv(bb, images, start=int(self.hparams["vv_start"]), layers=self.map_layers,
                            original=False)
        tokens = [bb.project_tokens(f.vv_taps[i][:, 1:]) for i in self.map_layers]
        return f.global_embedding, tokens, f.grid

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> Prediction:
        images = batch["image"].to(self.device)
        text = torch.stack([t.prototypes for t in self.batch_text(batch)])  # [B, 2, D]
        scale = float(self.hparams["logit_scale"])
        glob, tokens, grid = self.features(images)
        image_scores = two_way_scores(glob, text, scale)                      # Eq. (1)
        patch = torch.stack([two_way_scores(p, text, scale) for p in tokens]).mean(0)  # Eq. (2)
        return Prediction(image_scores, upsample_map(patch, grid, images.shape[-2:]))


def adapt(tokens: torch.Tensor, prompts: torch.Tensor, omega: torch.Tensor,
          activation: str = "tanh") -> torch.Tensor:
    """AnoCLIP+'s residual adapter, Eq. (9): ``Φ(P) = α(P̄ ωᵀ) T + P``.

    ``tokens`` P [b, M, D]; ``prompts`` T [b, 2N, D]; ``omega`` ω [b, 2N, D]. ``P̄`` is P
    L2-normalised, so that ``P̄ ωᵀ`` starts as the cosine similarities with the prompts
    (the authors' code normalises the adapter input too); the residual adds P itself.
    """
    act = {"tanh": torch.tanh, "identity": lambda z: z, "sigmoid": torch.sigmoid}[activation]
    affinity = act(torch.einsum("bmd,bkd->bmk", F.normalize(tokens, dim=-1), omega))
    return torch.einsum("bmk,bkd->bmd", affinity, prompts) + tokens


def log_probs(features: torch.Tensor, prototypes: torch.Tensor, scale: float) -> torch.Tensor:
    """log softmax(scale · cos(features, [t+, t-])) -> [b, M, 2] (Eq. 2 in log space)."""
    cos = torch.einsum("bmd,bkd->bmk", F.normalize(features, dim=-1), prototypes)
    return (scale * cos).log_softmax(dim=-1)


def tta_loss(tokens: torch.Tensor, noisy: torch.Tensor, prompts: torch.Tensor, prototypes: torch.Tensor,
             omega: torch.Tensor, scale: float, activation: str = "tanh",
             pseudo_loss: str = "entropy") -> torch.Tensor:
    """``L = L_d + L_p`` per image [b] (Eq. 10-11).

    ``L_d = -(1/2M) Σ_i [log(1 - S(Φ(p_i))) + log S(Φ(p̂_i))]``: clean tokens normal, corrupted
    tokens anomalous. ``L_p`` with ``pseudo_loss="entropy"``: the soft cross-entropy of the
    adapted prediction against itself, ``-(1/M) Σ_i Σ_c s_ic log s_ic``; ``"anomalous_term"``:
    Eq. 11 as printed, ``-(1/M) Σ_i S log S`` (anomalous class only).
    """
    lp_clean = log_probs(adapt(tokens, prompts, omega, activation), prototypes, scale)
    lp_noisy = log_probs(adapt(noisy, prompts, omega, activation), prototypes, scale)
    l_d = -0.5 * (lp_clean[..., 0].mean(dim=1) + lp_noisy[..., 1].mean(dim=1))
    p = lp_clean.exp()
    if pseudo_loss == "entropy":
        l_p = -(p * lp_clean).sum(dim=-1).mean(dim=1)
    elif pseudo_loss == "anomalous_term":
        l_p = -(p[..., 1] * lp_clean[..., 1]).mean(dim=1)
    else:
        raise ValueError(f"pseudo_loss must be 'entropy' or 'anomalous_term', got {pseudo_loss!r}")
    return l_d + l_p


def fit_adapter(tokens: torch.Tensor, prompts: torch.Tensor, prototypes: torch.Tensor, *,
                scale: float, epochs: int = 5, lr: float = 1e-3, weight_decay: float = 0.01,
                noise_mean: float = 0.0, noise_std: float = 0.05, activation: str = "tanh",
                pseudo_loss: str = "entropy") -> tuple[torch.Tensor, list[float]]:
    """AnoCLIP+'s test-time adaptation (§3.4) of ω for b images at once.

    ``tokens`` P [b, M, D], ``prompts`` T [b, 2N, D], ``prototypes`` [b, 2, D]. ω starts as T;
    each epoch draws fresh noise ``δ ~ N(μ, σ²)`` for ``P̂ = P + δ`` and takes one AdamW step on
    the summed per-image ``L_d + L_p`` (images stay independent: each ω_b only sees its own
    loss). Noise comes from torch's global generator (seeded by the runner). Returns the
    adapted ω [b, 2N, D] and the loss of every epoch (before its step).
    """
    with torch.inference_mode(False), torch.enable_grad():
        P = tokens.detach().clone()
        T = prompts.detach().clone()
        protos = prototypes.detach().clone()
        omega = torch.nn.Parameter(T.clone())            # ω initialised from T (Eq. 9)
        opt = torch.optim.AdamW([omega], lr=lr, weight_decay=weight_decay)
        losses = []
        for _ in range(int(epochs)):
            noisy = P + torch.randn_like(P) * noise_std + noise_mean
            loss = tta_loss(P, noisy, T, protos, omega, scale, activation, pseudo_loss).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return omega.detach(), losses


@register("anoclip_plus")
class AnoCLIPPlus(AnoCLIP):
    """AnoCLIP+: AnoCLIP with per-image test-time adaptation of a text-initialised residual adapter."""

    trains = False
    seeded = True
    default_hparams: dict[str, Any] = {
        **AnoCLIP.default_hparams,
        "tta_epochs": 5,                    # optimisation steps per test image (§4.1)
        "tta_lr": 1e-3,                     # AdamW learning rate (§4.1)
        "tta_weight_decay": 0.01,           # AdamW's default (the paper states none)
        "noise_mean": 0.0,                  # μ of the token corruption (§4.1)
        "noise_std": 0.05,                  # σ of the token corruption (§4.1)
        "activation": "tanh",               # α of Eq. 9 (the authors' code: tanh)
        "pseudo_loss": "entropy",           # L_p form, see tta_loss
    }

    def learnable_parameters(self) -> int:
        """Size of ω, the adapter optimised per test image (2N prompts × embedding width)."""
        hp = self.hparams
        n_dom = max([len(v) for v in hp["domains"].values()] or [1])
        return 2 * len(hp["templates"]) * len(hp["state_pairs"]) * n_dom * self.backbone.embed_dim

    def refine(self, tokens: torch.Tensor, texts: list[TextSet], scale: float) -> torch.Tensor:
        """Per-image TTA (§3.4); returns the refined anomaly probabilities S(Φ(P)) [B, M]."""
        hp = self.hparams
        out = torch.empty(tokens.shape[:2], device=tokens.device)
        groups: dict[int, list[int]] = {}
        for i, t in enumerate(texts):  # images sharing a prompt set are adapted together
            groups.setdefault(id(t), []).append(i)
        for idx in groups.values():
            t = texts[idx[0]]
            P = tokens[idx]
            T = t.prompts.unsqueeze(0).expand(len(idx), -1, -1)
            protos = t.prototypes.unsqueeze(0).expand(len(idx), -1, -1)
            omega, _ = fit_adapter(P, T, protos, scale=scale, epochs=hp["tta_epochs"],
                                   lr=float(hp["tta_lr"]), weight_decay=float(hp["tta_weight_decay"]),
                                   noise_mean=float(hp["noise_mean"]), noise_std=float(hp["noise_std"]),
                                   activation=hp["activation"], pseudo_loss=hp["pseudo_loss"])
            with torch.no_grad():
                lp = log_probs(adapt(P, T, omega, hp["activation"]), protos, scale)
            out[idx] = lp[..., 1].exp()
        return out

    def predict(self, batch: dict[str, Any]) -> Prediction:
        images = batch["image"].to(self.device)
        texts = self.batch_text(batch)
        text = torch.stack([t.prototypes for t in texts])
        scale = float(self.hparams["logit_scale"])
        glob, tokens, grid = self.features(images)
        with torch.no_grad():
            image_scores = two_way_scores(glob, text, scale)   # untouched by TTA (Table 2)
        patch = torch.stack([self.refine(p, texts, scale) for p in tokens]).mean(0)
        return Prediction(image_scores.detach(), upsample_map(patch.detach(), grid, images.shape[-2:]))
