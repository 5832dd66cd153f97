"""Training of the toy CLIP: :class:`TrainConfig` and the named :data:`RECIPES` with
their recorded hashes, the compact text tower, and the training loop (:func:`train`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bench.demo.toyclip.arch import ARCH, IMAGE_SIZE
from bench.demo.toyclip.corpus import Corpus, build_corpus
from bench.demo.toyclip.evaluation import PAIR_PROMPTS, _fmt, evaluate
from bench.demo.toyclip.words import (
    ANOMALOUS_STATES,
    NORMAL_STATES,
    TEMPLATES,
    _sentence,
    _Vocab,
    known_token_ids,
    tokenizer,
)

# -- configuration -----------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the checkpoint (change any field -> another hash)."""

    seed: int = 0
    corpus_size: int = 4000  # base images per corpus chunk; each clean and defective
    steps: int = 1350
    batch_pairs: int = 32  # clean/defective twins per batch -> batch of 64 images
    lr: float = 1e-3
    warmup: int = 120
    weight_decay: float = 0.05
    w_contrastive: float = 0.5
    w_image: float = 0.5
    w_rank: float = 0.0
    # The default recipe ("free-patches", docs/toy_clip.md): the patch tokens learn the
    # local state against two free state vectors, never against the prompts, so that -
    # as in OpenAI's CLIP - the local state is present in the patches but not aligned
    # with text, and aligning it is left to the trained ZSAD methods. The class token
    # stays aligned with the state prompts at the image level (w_image).
    w_patch: float = 0.0  # patch tokens against the state prompts ("aligned-patches": 1)
    w_pool: float = 0.0  # class token pulled to the pooled patch evidence ("aligned-patches": 2)
    w_patch_free: float = 1.0  # patch tokens against free state vectors ("aligned-patches": 0)
    # experiment, off by default: the free-vector patch term also on every earlier block's
    # tokens (read out through ln_post + proj; a pair of free vectors per block), so that
    # methods reading intermediate blocks (VAND, AF-CLIP) find the local state there too
    w_patch_deep: float = 0.0
    unknown_object_p: float = 0.35  # replace the object words by unseen tokens
    threads: int = 2
    photo_fraction: float = 0.7
    # corpus variants that were tried and did not improve image-level transfer (docs):
    mosaic_p: float = 0.0  # photo images made of two crops joined along a line
    recolour_p: float = 0.0  # duotone grey photos / hue-rotated colour photos
    natural_p: float = 0.0  # procedural images that are dead-leaves collages or 1/f clouds

    @classmethod
    def recipe(cls, name: str, **overrides) -> TrainConfig:
        """The settings of a named recipe (:data:`RECIPES`), with ``overrides`` applied."""
        if name not in RECIPES:
            raise ValueError(f"unknown toy CLIP recipe {name!r}; choose one of {sorted(RECIPES)}")
        return cls(**{**RECIPES[name], **overrides})


#: Named training recipes (the fields they change from :class:`TrainConfig`'s defaults).
#: ``free-patches`` is the default and the shipped checkpoint; ``aligned-patches`` is the
#: recipe shipped before issue 15, whose patch tokens were trained against the very state
#: prompts the ``clip`` method reads them with (kept for comparison, docs/toy_clip.md).
RECIPES: dict[str, dict] = {
    "free-patches": {},
    "aligned-patches": {"w_patch": 1.0, "w_pool": 2.0, "w_patch_free": 0.0},
}
#: sha256 of the checkpoint each recipe writes on the reference machine (docs/toy_clip.md).
RECIPE_SHA256: dict[str, str] = {
    "free-patches": "291281e4a4abafde452653f43d66a934cf934cf8a46e2ada71d803cef8202bc6",
    "aligned-patches": "f1549d7eca0826e3e4c43e9ba9800a92febeb698ed03cf57c94776a908d34446",
}


# -- model -------------------------------------------------------------------------------

class _CompactText:
    """The text tower with a compact token table (known ids + one all-zero 'unknown' row).

    Runs the transformer only up to the longest sequence in the batch: with CLIP's causal
    mask and end-of-text pooling this is the same computation as padding to 77.
    """

    def __init__(self, model, known: Sequence[int], generator: torch.Generator) -> None:
        self.model = model
        self.known = torch.tensor(list(known), dtype=torch.long)
        vocab = model.token_embedding.weight.shape[0]
        width = model.token_embedding.weight.shape[1]
        remap = torch.full((vocab,), len(known), dtype=torch.long)
        remap[self.known] = torch.arange(len(known))
        self.remap = remap
        self.weight = torch.nn.Parameter(torch.randn(len(known), width, generator=generator) * 0.02)
        self.zero = torch.zeros(1, width)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        length = int(tokens.argmax(dim=-1).max()) + 1
        tokens = tokens[:, :length]
        table = torch.cat([self.weight, self.zero], dim=0)
        x = F.embedding(self.remap[tokens], table) + m.positional_embedding[:length]
        mask = m.attn_mask[:length, :length]
        for blk in m.transformer.resblocks:
            x = blk(x, attn_mask=mask)
        x = m.ln_final(x)
        pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
        proj = m.text_projection
        return proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj

    def export(self) -> None:
        """Write the compact table into the model's full token embedding (zeros elsewhere)."""
        with torch.no_grad():
            full = torch.zeros_like(self.model.token_embedding.weight)
            full[self.known] = self.weight.detach()
            self.model.token_embedding.weight.copy_(full)


def _new_model(seed: int):
    import open_clip

    from bench.backbone import ClipBackbone, register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(ARCH, pretrained=None)
    bb = ClipBackbone(model, tokenizer(), arch=ARCH, pretrained=None, image_size=IMAGE_SIZE)
    model.requires_grad_(True)
    model.token_embedding.requires_grad_(False)  # replaced by the compact table in training
    return bb


def _pad(ids: list[int], length: int = 77) -> list[int]:
    return ids + [0] * (length - len(ids))


# -- training ----------------------------------------------------------------------------

_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> CLIP-normalised float [B, 3, S, S] (as bench.data does)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).permute(0, 3, 1, 2)
    return (x - _MEAN) / _STD


def _augment(rng: np.random.Generator, *arrays: np.ndarray) -> list[np.ndarray]:
    """The same random rot90/flip applied to each [S, S, ...] array."""
    k = int(rng.integers(4))
    flip = rng.random() < 0.5
    out = []
    for a in arrays:
        a = np.rot90(a, k)
        out.append(a[:, ::-1] if flip else a)
    return out


def _prompt_pair(rng: np.random.Generator, vocab: _Vocab, phrase: str, unknown: Sequence[int],
                 p_unknown: float) -> tuple[list[int], list[int]]:
    """Token ids of one (normal, anomalous) state-prompt pair about ``phrase``."""
    tpl = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    sn = NORMAL_STATES[int(rng.integers(len(NORMAL_STATES)))]
    sa = ANOMALOUS_STATES[int(rng.integers(len(ANOMALOUS_STATES)))]
    r = rng.random()
    if r < p_unknown:  # object words the model has never seen (zero embeddings)
        obj = [int(unknown[int(rng.integers(len(unknown)))]) for _ in range(int(rng.integers(1, 4)))]

        def ids(state: str) -> list[int]:
            pre, post = _sentence(tpl, state, "\x00").split("\x00")
            return _pad([vocab.sot] + vocab.piece(pre) + obj + vocab.piece(post) + [vocab.eot])
    else:
        obj_text = "object" if r < p_unknown + 0.1 else phrase

        def ids(state: str) -> list[int]:
            return _pad(vocab.encode(_sentence(tpl, state, obj_text)))

    return ids(sn), ids(sa)


def _state_logits(feats: torch.Tensor, text_n: torch.Tensor, text_a: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
    """scale * (cos(f, anomalous) - cos(f, normal)); feats [B, D] or [B, N, D], text [B, D]."""
    f = F.normalize(feats, dim=-1)
    tn, ta = F.normalize(text_n, dim=-1), F.normalize(text_a, dim=-1)
    if f.dim() == 3:
        return scale * torch.einsum("bnd,bd->bn", f, ta - tn)
    return scale * (f * (ta - tn)).sum(-1)


def train(config: TrainConfig = TrainConfig(), *, log: Callable[[str], None] = print,
          progress: bool = True, eval_every: int = 0,
          on_eval: Callable[[int, object], None] | None = None):
    """Pre-train ``zsad-tiny``; return the frozen :class:`~bench.backbone.ClipBackbone`.

    Runs with ``config.threads`` torch threads and deterministic algorithms; the process's
    previous settings are restored afterwards.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(config, log=log, progress=progress, eval_every=eval_every, on_eval=on_eval)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(config: TrainConfig, *, log: Callable[[str], None], progress: bool, eval_every: int,
           on_eval: Callable[[int, object], None] | None = None):
    t0 = time.time()
    tq = _tqdm() if progress else None
    vocab = _Vocab()
    known = known_token_ids(vocab)
    known_set = set(known)
    unknown = [i for i in range(1000, 49000) if i not in known_set][::97]

    def chunk(k: int) -> tuple[Corpus, torch.Tensor, torch.Tensor]:
        """Corpus chunk ``k``: fresh twins, so (almost) no image is seen twice."""
        t = time.time()
        c = build_corpus(config.seed, config.corpus_size, chunk=k,
                         photo_fraction=config.photo_fraction, mosaic_p=config.mosaic_p,
                         recolour_p=config.recolour_p, natural_p=config.natural_p)
        caps = [torch.tensor([_pad(vocab.encode(x)) for x in lst])
                for lst in (c.caption_clean, c.caption_defective)]
        log(f"corpus chunk {k}: {len(c)} twins in {time.time() - t:.0f}s")
        return c, caps[0], caps[1]

    bb = _new_model(config.seed)
    model = bb.model
    gen = torch.Generator().manual_seed(config.seed + 1)
    text = _CompactText(model, known, gen)
    params = [p for p in model.parameters() if p.requires_grad] + [text.weight]
    free_states = None
    if config.w_patch_free > 0:  # only then: the aligned-patches recipe's RNG stream is as it was
        free_states = torch.nn.Parameter(0.02 * torch.randn(2, model.text_projection.shape[1],
                                                            generator=gen))
        params.append(free_states)
    deep_states = None
    if config.w_patch_deep > 0:  # only then: the other recipes' RNG streams are as they were
        deep_states = torch.nn.Parameter(0.02 * torch.randn(
            bb.num_layers - 1, 2, model.text_projection.shape[1], generator=gen))
        params.append(deep_states)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=config.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return config.lr * (step + 1) / config.warmup
        q = (step - config.warmup) / max(1, config.steps - config.warmup)
        return config.lr * 0.5 * (1 + math.cos(math.pi * q))

    rng = np.random.default_rng([config.seed, 2])
    bp = config.batch_pairs
    n_chunk = 0
    corpus, cap_c, cap_d = chunk(n_chunk)
    n = len(corpus)
    order = rng.permutation(n)
    pos = 0
    steps = range(config.steps)
    bar = tq(steps, desc="train", total=config.steps) if tq else steps
    for step in bar:
        if pos + bp > n:
            n_chunk += 1
            corpus, cap_c, cap_d = chunk(n_chunk)
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + bp]
        pos += bp
        imgs, masks, toks, pn, pa = [], [], [], [], []
        for i in idx:
            c, d, m = _augment(rng, corpus.clean[i], corpus.defective[i], corpus.mask[i])
            imgs += [c, d]
            masks += [np.zeros_like(m), m]
            toks += [cap_c[i], cap_d[i]]
            a, b = _prompt_pair(rng, vocab, corpus.phrase[i], unknown, config.unknown_object_p)
            pn.append(a)
            pa.append(b)
        x = to_tensor(np.stack(imgs))
        mk = torch.from_numpy(np.stack(masks).astype(np.float32))
        labels = torch.tensor([0.0, 1.0] * bp)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)

        taps = list(range(1, bb.num_layers + 1)) if deep_states is not None else [bb.num_layers]
        feats = bb.encode_image_uncached(x, layers=taps)
        glob = feats.global_embedding
        patches = bb.project_tokens(feats.taps[bb.num_layers][:, 1:])
        all_text = text(torch.cat([torch.stack(toks), torch.tensor(pn), torch.tensor(pa)]))
        b2 = 2 * bp
        t_cap = all_text[:b2]
        # each twin pair shares one (normal, anomalous) prompt pair
        t_n = all_text[b2:b2 + bp].repeat_interleave(2, dim=0)
        t_a = all_text[b2 + bp:].repeat_interleave(2, dim=0)
        scale = model.logit_scale.exp().clamp(max=100)

        # CLIP contrastive loss (twins share a batch: only the state tells them apart)
        gi, ti = F.normalize(glob, dim=-1), F.normalize(t_cap, dim=-1)
        logits = scale * gi @ ti.T
        target = torch.arange(b2)
        l_con = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        # state alignment, image level
        ilog = _state_logits(glob, t_n, t_a, scale)
        l_img = F.binary_cross_entropy_with_logits(ilog, labels)
        # twin ranking: the defective image above its own clean twin (content cancels out)
        l_rank = F.softplus(ilog[0::2] - ilog[1::2]).mean()
        # state alignment, patch level, supervised by the masks (balanced)
        g = bb.grid_size
        cover = F.adaptive_avg_pool2d(mk[:, None], (g, g)).flatten(1)  # [B, N]
        ptarget = (cover / 0.1).clamp(max=1.0)
        plog = _state_logits(patches, t_n, t_a, scale)
        pos_w = (ptarget > 0).float()
        w = pos_w / pos_w.sum().clamp(min=1) + (1 - pos_w) / (1 - pos_w).sum().clamp(min=1)
        l_patch = (F.binary_cross_entropy_with_logits(plog, ptarget, reduction="none") * w).sum() / 2
        l_free = torch.zeros(())
        if free_states is not None:  # free-patches: free state vectors, also the pooling target
            plog = _state_logits(patches, free_states[0].expand(b2, -1),
                                 free_states[1].expand(b2, -1), scale)
            l_free = (F.binary_cross_entropy_with_logits(plog, ptarget, reduction="none") * w).sum() / 2
        # the class token should agree with the strongest patch evidence (top-k mean of
        # the patch logits, not back-propagated): a state read-out that pools local damage
        k = max(1, plog.shape[1] // 16)
        pooled = plog.detach().topk(k, dim=1).values.mean(dim=1)
        l_pool = F.binary_cross_entropy_with_logits(ilog, torch.sigmoid(pooled))
        loss = (config.w_contrastive * l_con + config.w_image * l_img + config.w_rank * l_rank
                + config.w_patch * l_patch + config.w_pool * l_pool)
        if free_states is not None:
            loss = loss + config.w_patch_free * l_free
        if deep_states is not None:  # the same term on every earlier block, averaged
            l_deep = torch.zeros(())
            for i in range(bb.num_layers - 1):
                dlog = _state_logits(bb.project_tokens(feats.taps[i + 1][:, 1:]),
                                     deep_states[i, 0].expand(b2, -1),
                                     deep_states[i, 1].expand(b2, -1), scale)
                l_deep = l_deep + (F.binary_cross_entropy_with_logits(
                    dlog, ptarget, reduction="none") * w).sum() / 2
            loss = loss + config.w_patch_deep * l_deep / (bb.num_layers - 1)

        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if tq:
            bar.set_postfix(con=f"{l_con.item():.2f}", img=f"{l_img.item():.2f}",
                            patch=f"{l_patch.item():.2f}")
        if step % 100 == 0 or step == config.steps - 1:
            log(f"step {step}: loss {loss.item():.3f} (contrastive {l_con.item():.3f}, image "
                f"{l_img.item():.3f}, rank {l_rank.item():.3f}, pool {l_pool.item():.3f}, patch {l_patch.item():.3f}) scale {scale.item():.1f} "
                f"[{time.time() - t0:.0f}s]")
        if eval_every and step and step % eval_every == 0:
            text.export()
            if on_eval is not None:
                on_eval(step, bb)
            log(f"  eval@{step} ensemble: {_fmt(evaluate(bb))}")
            log(f"  eval@{step} pair:     {_fmt(evaluate(bb, prompts=PAIR_PROMPTS))}")
    text.export()
    model.requires_grad_(False)
    log(f"trained {config.steps} steps in {time.time() - t0:.0f}s")
    return bb


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm
