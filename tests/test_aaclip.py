"""AA-CLIP (``methods/aaclip.py``): the paper's two stages, pinned against hand computations.

Pins: the layers where residual adapters sit (first 3 of 12 text blocks, first 6 of 24 visual
blocks, mapped proportionally) and the adapter formula; the stage-1 V-V features; the text
read-out; which parameters each stage trains (text adapters frozen in stage 2, visual ones
untouched by stage 1) with which optimiser settings; the disentanglement loss and both
stages' loss compositions and weights; the released inference rule (patch-grid blur, the
per-category fusion); the re-batching, the augmentation, the class words; that the adapted
visual pass never uses the runner's frozen-feature cache; state-dict round trips.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.aaclip import (
    AACLIP,
    ANOMALOUS_STATES,
    NORMAL_STATES,
    RELEASED_NAMES,
    TEMPLATES,
    AACLIPAugment,
    disentangle_loss,
    grid_blur,
    rebatch,
    residual_adapt,
)
from methods.base import _toy_batches, check_method

FAST = {"epochs": 1, "text_epochs": 1}


def _fake_backbone(visual: int, text: int, width: int = 8, text_width: int = 8, embed: int = 4):
    return SimpleNamespace(num_layers=visual, text_layers=text, width=width, text_width=text_width,
                           embed_dim=embed, device=torch.device("cpu"))


def _leaky(x):
    return torch.where(x > 0, x, 0.01 * x)


def _adapter_by_hand(x, w, lam):
    a = _leaky(x @ w.T)
    a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True)
    return lam * a + (1 - lam) * x


def _focal_by_hand(probs, mask, gamma=2.0, smooth=1e-5):
    """AnomalyCLIP/VAND/AA-CLIP's label-smoothed FocalLoss (Hsuxu's), written out."""
    y = (mask > 0.5).long()
    p = probs.permute(0, 2, 3, 1).reshape(-1, 2)
    onehot = F.one_hot(y.reshape(-1), 2).float().clamp(smooth, 1 - smooth)
    pt = (onehot * p).sum(-1) + smooth
    return (-(1 - pt) ** gamma * pt.log()).mean()


def _dice_by_hand(pred, target):
    p, t = pred.reshape(pred.shape[0], -1), target.reshape(target.shape[0], -1)
    return 1 - ((2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def _seg_by_hand(feats, text, mask, size):
    B, N, _ = feats.shape
    g = int(math.isqrt(N))
    logits = 100.0 * torch.einsum("bnd,bkd->bkn", feats, text).reshape(B, 2, g, g)
    probs = F.interpolate(logits, size=size, mode="bilinear", align_corners=True).softmax(1)
    m = (mask > 0.5).float()
    return _focal_by_hand(probs, m) + _dice_by_hand(probs[:, 1], m) + _dice_by_hand(probs[:, 0], 1 - m)


# -- contract --------------------------------------------------------------------------------

def test_check_method(tiny_backbone):
    check_method(AACLIP, tiny_backbone, **FAST)


def test_paper_hyperparameters():
    hp = AACLIP.default_hparams
    assert (hp["text_layers"], hp["image_layers"]) == (3, 6)                 # K_T, K_I
    assert hp["text_adapt_weight"] == hp["image_adapt_weight"] == 0.1       # λ
    assert hp["dis_weight"] == 0.1                                          # γ
    assert hp["feature_layers"] == [6, 12, 18, 24] and hp["surgery_start"] == 6
    assert (hp["text_epochs"], hp["text_lr"], hp["text_batch_size"]) == (5, 1e-5, 16)
    assert (hp["epochs"], hp["lr"], hp["batch_size"]) == (20, 5e-4, 2)
    assert hp["betas"] == [0.5, 0.999] and hp["lr_milestones"] == [16000, 32000]
    assert hp["lr_gamma"] == 0.5 and hp["logit_scale"] == 100.0 and hp["proj_relu"] is False
    assert not hp["released_stage1_loss"] and not hp["released_vv_batch_axis"]
    assert AACLIP.released_inputs == {"pos_embed_resize": "open_clip", "class_words": "readable"}
    assert AACLIP.requires is None and AACLIP.trains
    assert AACLIP.description().startswith("AA-CLIP")


def test_adapter_layers_and_parameter_count_on_vit_l():
    m = AACLIP(_fake_backbone(24, 12, width=1024, text_width=768, embed=768))
    assert (m.n_text, m.n_image, m.levels, m.surgery_start) == (3, 6, [6, 12, 18, 24], 6)
    assert len(m.head.text_adapters) == 3 and len(m.head.image_adapters) == 6
    # 3·768² + 768² (text read-out) + 6·1024² + 4·1024·768 (projectors) + 1024·768 (det)
    assert m.learnable_parameters() == 3 * 768**2 + 768**2 + 6 * 1024**2 + 5 * 1024 * 768
    assert all(lin.bias is None for lin in m.head.modules() if isinstance(lin, torch.nn.Linear))
    b = AACLIP(_fake_backbone(12, 12))             # ViT-B/16: 12 visual blocks
    assert (b.n_text, b.n_image, b.levels, b.surgery_start) == (3, 3, [3, 6, 9, 12], 3)


def test_layers_on_the_tiny_backbone(tiny_backbone):
    m = AACLIP(tiny_backbone)
    assert (tiny_backbone.num_layers, tiny_backbone.text_layers) == (4, 4)
    assert (m.n_text, m.n_image, m.levels, m.surgery_start) == (1, 1, [1, 2, 3, 4], 1)


# -- building blocks ---------------------------------------------------------------------------

def test_residual_adapter_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    lin = torch.nn.Linear(8, 8, bias=False)
    out = residual_adapt(x, lin, 0.1)
    assert torch.allclose(out, _adapter_by_hand(x, lin.weight, 0.1), atol=1e-6)
    # the adapter branch has each token's norm: with λ = 1 the norms are kept exactly
    assert torch.allclose(residual_adapt(x, lin, 1.0).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_disentangle_loss_by_hand():
    t = torch.tensor([[[1.0, 0.0], [0.6, 0.8]],       # <T_N, T_A> = 0.6
                      [[0.0, 1.0], [0.0, -1.0]]])     # -1.0
    assert disentangle_loss(t).item() == pytest.approx(((0.6 - 1.0) / 2) ** 2)
    assert disentangle_loss(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])).item() == 0.0


def test_grid_blur_is_korniAs_reflect_gaussian():
    from scipy.ndimage import gaussian_filter

    torch.manual_seed(0)
    maps = torch.randn(2, 8, 8, dtype=torch.float64)
    for size, sigma in ((7, 1.0), (9, 1.5)):
        r = size // 2                       # scipy's 'mirror' is torch's 'reflect'
        want = np.stack([gaussian_filter(m.numpy(), sigma, mode="mirror", truncate=r / sigma)
                         for m in maps])
        assert np.allclose(grid_blur(maps, size, sigma).numpy(), want, atol=1e-10)


def test_rebatch_keeps_order_and_sizes():
    batches = [{"image": torch.arange(n).float()[:, None] + s, "index": list(range(s, s + n))}
               for s, n in ((0, 2), (2, 2), (4, 2), (6, 2), (8, 2), (10, 1))]
    out = list(rebatch(iter(batches), 4))
    assert [len(b["index"]) for b in out] == [4, 4, 3]
    assert sum((b["index"] for b in out), []) == list(range(11))
    assert torch.equal(torch.cat([b["image"] for b in out])[:, 0], torch.arange(11).float())
    assert [len(b["index"]) for b in rebatch(iter(batches), 16)] == [11]


def test_augmentation_moves_image_and_mask_together_and_is_seeded():
    S = 32
    mask = torch.zeros(4, S, S)
    mask[:, 4:12, 18:30] = 1
    img = (1.0 + 2.0 * mask)[:, None].repeat(1, 3, 1, 1)      # normalised values 1 and 3
    batch = {"image": img, "mask": mask, "label": torch.ones(4)}
    out = AACLIPAugment((0.5,) * 3, (0.25,) * 3, seed=3)(batch, color=False)
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out["image"][:, 0] == 3.0, out["mask"] == 1.0)
    assert set(out["image"].unique().tolist()) <= {0.0, 1.0, 3.0}   # no colour jitter in stage 1
    again = AACLIPAugment((0.5,) * 3, (0.25,) * 3, seed=3)(batch, color=False)
    assert torch.equal(out["image"], again["image"])
    moved = [not torch.equal(out["mask"][i], mask[i]) for i in range(4)]
    assert any(moved)
    jit = AACLIPAugment((0.5,) * 3, (0.25,) * 3, seed=3)(batch, color=True)
    assert not set(jit["image"].unique().tolist()) <= {0.0, 1.0, 3.0}


# -- text side -----------------------------------------------------------------------------------

def test_prompts_are_the_released_ensemble(tiny_backbone):
    normal, anomalous = AACLIP(tiny_backbone).prompts("bottle")
    assert normal == ["bottle.", "a photo of bottle.", "a bottle.", "a photo of a bottle.",
                      "the bottle.", "a photo of the bottle."]
    assert len(anomalous) == len(ANOMALOUS_STATES) * len(TEMPLATES) == 10
    assert "a photo of a bottle with defect." in anomalous and "a broken bottle." in anomalous
    assert len(NORMAL_STATES) == 3


def test_adapted_text_tower_by_hand(tiny_backbone):
    torch.manual_seed(1)
    m = AACLIP(tiny_backbone)
    tokens = tiny_backbone.tokenize(["a photo of a bottle.", "a broken bottle."])
    mm = tiny_backbone.model
    with torch.no_grad():
        x = mm.token_embedding(tokens) + mm.positional_embedding          # full 77 tokens
        for i, blk in enumerate(mm.transformer.resblocks, start=1):
            x = blk(x, attn_mask=mm.attn_mask)
            if i == 1:                                                    # K_T = 3 of 12 -> 1 of 4
                x = _adapter_by_hand(x, m.head.text_adapters[0].weight, 0.1)
        pooled = mm.ln_final(x)[torch.arange(2), tokens.argmax(-1)]
        want = _leaky(pooled @ m.head.text_proj.weight.T)                 # replaces text_projection
        got = m.encode_text(tokens)
        plain = m.encode_text(tokens, adapted=False)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(plain, tiny_backbone.encode_text(["a photo of a bottle.", "a broken bottle."],
                                                           normalize=False), atol=1e-5)


def test_anchors_are_normalised_state_means(tiny_backbone):
    m = AACLIP(tiny_backbone)
    normal, anomalous = m.prompts("cup")
    with torch.no_grad():
        f = F.normalize(m.encode_text(tiny_backbone.tokenize(normal + anomalous)), dim=-1)
        want = torch.stack([F.normalize(f[:6].mean(0), dim=-1), F.normalize(f[6:].mean(0), dim=-1)])
        got = m.anchors(["cup", "cup"], adapted=True)
    assert got.shape == (2, 2, tiny_backbone.embed_dim)
    assert torch.allclose(got[0], want, atol=1e-6) and torch.allclose(got[1], want, atol=1e-6)
    # before stage 1 the (frozen) anchors are CLIP's own text features, as the released code
    # uses them without a text-adapter checkpoint
    clip = F.normalize(tiny_backbone.encode_text(normal + anomalous, normalize=True), dim=-1)
    plain = torch.stack([F.normalize(clip[:6].mean(0), dim=-1), F.normalize(clip[6:].mean(0), dim=-1)])
    assert torch.allclose(m.frozen_anchors(["cup"])[0], plain, atol=1e-5)


def test_released_class_names(tiny_backbone):
    batch = {"prompt_name": ["metal nut", "printed circuit board", "colon", "cup"],
             "dataset": ["mvtec", "visa", "kvasir", "demo_target"],
             "category": ["metal_nut", "pcb1", "colon", "cup"]}
    assert AACLIP(tiny_backbone).class_words(batch) == batch["prompt_name"]
    assert AACLIP(tiny_backbone, class_names="released").class_words(batch) == [
        "metal nut which has four notched edges", "dual ultrasonic distance sensor pcb module",
        "colon endoscopy image", "cup"]
    assert len([k for k in RELEASED_NAMES if k[0] == "mvtec"]) == 15
    assert len([k for k in RELEASED_NAMES if k[0] == "visa"]) == 12
    with pytest.raises(ValueError):
        AACLIP(tiny_backbone, class_names="folder")


# -- visual side ----------------------------------------------------------------------------------

def _vv_by_hand(blk, h):
    """V-V self-attention of an open_clip block on normalised tokens h [B, L, W], written out."""
    attn = blk.attn
    B, L, W = h.shape
    H = attn.num_heads
    v = (h @ attn.in_proj_weight[2 * W:].T + attn.in_proj_bias[2 * W:]).reshape(B, L, H, W // H)
    v = v.transpose(1, 2)
    a = ((v @ v.transpose(-1, -2)) / math.sqrt(W // H)).softmax(-1) @ v
    return attn.out_proj(a.transpose(1, 2).reshape(B, L, W))


def test_stage1_features_by_hand(tiny_backbone):
    m = AACLIP(tiny_backbone)
    images = _toy_batches(64, n_batches=1, batch_size=3)[0]["image"]
    bb = tiny_backbone
    with torch.no_grad():
        x = bb.embed_patches(images)
        taps = []
        for blk in bb.blocks:                  # surgery from block 6 of 24 -> block 1 of 4
            x = x + _vv_by_hand(blk, blk.ln_1(x))
            x = x + blk.mlp(blk.ln_2(x))
            taps.append(x)
        glob = F.normalize(bb.encode_image_uncached(images).global_embedding, dim=-1)
        want = [F.normalize(bb.project_tokens(t[:, 1:]), dim=-1) + glob[:, None] for t in taps]
    got = m.stage1_features(images)
    assert len(got) == 4
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-5)
    # the suite attends over tokens: an image's features do not depend on its batch
    alone = m.stage1_features(images[:1])
    assert torch.allclose(alone[-1][0], got[-1][0], atol=1e-5)
    # the released LND bug attends over the batch instead
    bug = AACLIP(bb, released_vv_batch_axis=True)
    assert not torch.allclose(bug.stage1_features(images)[-1][0],
                              bug.stage1_features(images[:1])[-1][0], atol=1e-4)


def test_adapted_visual_pass_by_hand(tiny_backbone):
    torch.manual_seed(2)
    m = AACLIP(tiny_backbone)
    images = _toy_batches(64, n_batches=1, batch_size=2)[0]["image"]
    bb = tiny_backbone
    vis = bb.model.visual
    with torch.no_grad():
        x = bb.embed_patches(images)
        taps = []
        for i, blk in enumerate(bb.blocks, start=1):
            x = blk(x)
            if i == 1:                                       # K_I = 6 of 24 -> 1 of 4
                x = _adapter_by_hand(x, m.head.image_adapters[0].weight, 0.1)
            taps.append(x[:, 1:])                            # levels 6/12/18/24 -> 1/2/3/4
        want = [F.normalize(vis.ln_post(t) @ m.head.seg_proj[j].weight.T, dim=-1)
                for j, t in enumerate(taps)]
        det = F.normalize(vis.ln_post(taps[-1]) @ m.head.det_proj.weight.T, dim=-1).mean(1)
        seg, got_det = m.adapted_features(images)
    for g, w in zip(seg, want, strict=True):
        assert torch.allclose(g, w, atol=1e-5)
    assert torch.allclose(got_det, det, atol=1e-6)


class _NoCache:
    def __getattr__(self, name):
        raise AssertionError(f"the frozen-feature cache was used ({name})")


def test_no_feature_cache_and_backbone_untouched(tiny_backbone):
    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    batches = _toy_batches(64, n_batches=2, batch_size=4)
    tiny_backbone.feature_cache = _NoCache()
    try:
        m = AACLIP(tiny_backbone, **FAST)
        m.fit(batches, seed=0)
        m.predict(batches[0])
    finally:
        tiny_backbone.feature_cache = None
    for k, v in tiny_backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- losses ------------------------------------------------------------------------------------------

def test_stage1_loss_composition(tiny_backbone):
    torch.manual_seed(3)
    batch = _toy_batches(64, n_batches=1, batch_size=4)[0]
    m = AACLIP(tiny_backbone)
    total, parts = m.stage1_loss(batch)
    text = m.anchors(batch["prompt_name"], adapted=True).detach()
    feats = m.stage1_features(batch["image"])
    segs = [_seg_by_hand(f, text, batch["mask"], (64, 64)) for f in feats]
    dis = ((text[:, 0] * text[:, 1]).sum(-1).mean()) ** 2
    assert parts["dis"].item() == pytest.approx(dis.item(), rel=1e-5)
    assert total.item() == pytest.approx((sum(segs) + 0.1 * dis).item(), rel=1e-5)
    # the released train.py overwrites `loss` in its level loop: only the last level counts
    rel = AACLIP(tiny_backbone, released_stage1_loss=True)
    rel.load_state_dict(m.state_dict())
    assert rel.stage1_loss(batch)[0].item() == pytest.approx((segs[-1] + 0.1 * dis).item(), rel=1e-5)
    # gradients reach the text side only
    total.backward()
    assert all(p.grad is not None for _, p in m.head.stage_parameters("text"))
    assert all(p.grad is None for _, p in m.head.stage_parameters("image"))


def test_stage2_loss_composition(tiny_backbone):
    torch.manual_seed(4)
    batch = _toy_batches(64, n_batches=1, batch_size=4)[0]
    m = AACLIP(tiny_backbone)
    total, parts = m.stage2_loss(batch)
    text = m.frozen_anchors(batch["prompt_name"])
    seg, det = m.adapted_features(batch["image"])
    cls = F.cross_entropy(torch.einsum("bd,bkd->bk", det, text), batch["label"].long())
    want = cls + sum(_seg_by_hand(f, text, batch["mask"], (64, 64)) for f in seg)
    assert parts["cls"].item() == pytest.approx(cls.item(), rel=1e-5)
    assert total.item() == pytest.approx(want.item(), rel=1e-5)
    total.backward()
    assert all(p.grad is not None for _, p in m.head.stage_parameters("image"))
    assert all(p.grad is None for _, p in m.head.stage_parameters("text"))


# -- which parameters train when ---------------------------------------------------------------------

def test_stages_train_their_own_parameters(tiny_backbone, monkeypatch):
    batches = _toy_batches(64, n_batches=2, batch_size=4)
    seen = []
    adam, sched = torch.optim.Adam, torch.optim.lr_scheduler.MultiStepLR

    def spy_adam(params, **kw):
        params = list(params)
        seen.append(("adam", {id(p) for p in params}, kw))
        return adam(params, **kw)

    def spy_sched(opt, **kw):
        seen.append(("sched", None, kw))
        return sched(opt, **kw)

    monkeypatch.setattr(torch.optim, "Adam", spy_adam)
    monkeypatch.setattr(torch.optim.lr_scheduler, "MultiStepLR", spy_sched)
    torch.manual_seed(5)
    m = AACLIP(tiny_backbone, augment=False)
    text_ids = {id(p) for _, p in m.head.stage_parameters("text")}
    image_ids = {id(p) for _, p in m.head.stage_parameters("image")}
    assert text_ids | image_ids == {id(p) for p in m.head.parameters()} and not text_ids & image_ids
    init = m.state_dict()
    m.fit_text(batches, epochs=1)
    after1 = m.state_dict()
    assert after1["text_trained"].item() == 1.0
    for name, _ in m.head.stage_parameters("image"):
        assert torch.equal(after1[name], init[name]), name           # stage 1 leaves vision alone
    assert all(not torch.equal(after1[n], init[n]) for n, _ in m.head.stage_parameters("text"))
    m.fit_image(batches, epochs=1)
    after2 = m.state_dict()
    for name, _ in m.head.stage_parameters("text"):
        assert torch.equal(after2[name], after1[name]), name         # text frozen in stage 2
    assert all(not torch.equal(after2[n], after1[n]) for n, _ in m.head.stage_parameters("image"))
    assert all(p.requires_grad for p in m.head.parameters())
    (_, ids1, kw1), (_, ids2, kw2), (_, _, kws) = seen
    assert ids1 == text_ids and kw1 == {"lr": 1e-5, "betas": (0.5, 0.999)}
    assert ids2 == image_ids and kw2 == {"lr": 5e-4, "betas": (0.5, 0.999)}
    assert kws == {"milestones": [16000, 32000], "gamma": 0.5}
    # stage 1 in batches of 16 (here: all 8 toy images at once), stage 2 in batches of 2
    assert len(m.losses["text"]) == 1 and len(m.losses["image"]) == 4


def test_fit_runs_both_stages_with_their_epochs(tiny_backbone):
    batches = _toy_batches(64, n_batches=1, batch_size=4)
    m = AACLIP(tiny_backbone, text_epochs=2, epochs=1)
    m.fit(batches, seed=0)
    assert len(m.losses["text"]) == 2 and len(m.losses["image"]) == 2
    skip = AACLIP(tiny_backbone, text_epochs=0)
    skip.fit(batches, epochs=1, seed=0)
    assert skip.head.text_trained.item() == 0.0 and not skip.losses["text"]


# -- inference ----------------------------------------------------------------------------------------

def test_predict_by_hand(tiny_backbone):
    torch.manual_seed(6)
    m = AACLIP(tiny_backbone)
    batch = _toy_batches(64, n_batches=1, batch_size=2)[0]
    batch["domain"] = ["industrial", "medical"]
    pred = m.predict(batch)
    text = m.frozen_anchors(batch["prompt_name"])
    with torch.no_grad():
        seg, det = m.adapted_features(batch["image"])
    assert torch.allclose(pred.image_scores, ((det * text[:, 1]).sum(-1) + 1) / 2, atol=1e-6)
    from scipy.ndimage import gaussian_filter

    for b, (k, sigma) in enumerate(((7, 1.0), (9, 1.5))):
        want = torch.zeros(64, 64)
        for f in seg:
            c = 100.0 * (f[b] @ text[b].T)                           # [64, 2]
            grid = ((c[:, 1] + 1 - c[:, 0]) / 2).reshape(8, 8)
            blurred = torch.from_numpy(gaussian_filter(grid.double().numpy(), sigma, mode="mirror",
                                                       truncate=(k // 2) / sigma)).float()
            want += F.interpolate(blurred[None, None], size=(64, 64), mode="bilinear",
                                  align_corners=True)[0, 0]
        assert torch.allclose(pred.anomaly_maps[b], want, atol=1e-3)


def test_finalize_category_is_the_released_fusion():
    scores = np.array([0.6, 0.7, 0.65])
    maps = np.array([[[0.0, 2.0]], [[1.0, 4.0]], [[3.0, 1.0]]])     # min 0, max 4
    fused, norm = AACLIP.finalize_category(scores, maps, domain="industrial")
    pmax = np.array([2.0, 4.0, 3.0]) / 4.0
    s = (scores - 0.6) / 0.1
    assert np.allclose(fused, 0.5 * pmax + 0.5 * s) and np.allclose(norm, maps / 4.0)
    fused_med, _ = AACLIP.finalize_category(scores, maps, domain="medical")
    assert np.allclose(fused_med, pmax)


# -- state --------------------------------------------------------------------------------------------

def test_state_dict_round_trip_restores_anchors(tiny_backbone):
    batches = _toy_batches(64, n_batches=2, batch_size=4)
    torch.manual_seed(7)
    m = AACLIP(tiny_backbone, **FAST)
    fresh = AACLIP(tiny_backbone, **FAST)
    p_fresh = fresh.predict(batches[0])                 # fills its anchor cache (CLIP's own text)
    m.fit(batches, seed=0)
    state = m.state_dict()
    assert set(state) == {"text_trained", "text_adapters.0.weight", "text_proj.weight",
                          "image_adapters.0.weight", "det_proj.weight",
                          *(f"seg_proj.{i}.weight" for i in range(4))}
    fresh.load_state_dict(state)
    p1, p2 = m.predict(batches[0]), fresh.predict(batches[0])
    assert torch.equal(p1.image_scores, p2.image_scores) and torch.equal(p1.anomaly_maps, p2.anomaly_maps)
    assert not torch.allclose(p_fresh.anomaly_maps, p2.anomaly_maps)
