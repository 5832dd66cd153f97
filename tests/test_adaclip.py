"""AdaCLIP (Cao et al., ECCV 2024): hybrid prompts, insertion layers, HSF, loss, training, state.

Every expected value is computed here by hand from the paper's / released code's rules,
with the backbone's own primitives (``embed_patches``, ``blocks``, ``encode_text_embeddings``)
rather than the method's code paths.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench.registry import METHODS, create_method
from methods.adaclip import (
    ADACLIP_ANOMALOUS_STATES,
    ADACLIP_NORMAL_STATES,
    ADACLIP_TEMPLATES,
    AdaCLIP,
    hsf_paper,
    hsf_released,
    kmeans,
)
from methods.base import _toy_batches, check_method
from methods.common import gaussian_blur


@pytest.fixture(scope="module")
def batch():
    return _toy_batches(64, n_batches=1, batch_size=2)[0]


def _vit(num_layers: int, text_layers: int, width: int, text_width: int, embed_dim: int):
    """A stand-in with a real backbone's geometry (the constructor reads nothing else)."""
    return SimpleNamespace(num_layers=num_layers, text_layers=text_layers, width=width,
                           text_width=text_width, embed_dim=embed_dim, device=torch.device("cpu"))


# -- contract and settings ---------------------------------------------------------------

def test_check_method(tiny_backbone) -> None:
    check_method(AdaCLIP, tiny_backbone)


def test_registered_with_paper_settings() -> None:
    assert METHODS.get("adaclip") is AdaCLIP and AdaCLIP.trains and AdaCLIP.is_seeded()
    assert AdaCLIP.description().startswith("AdaCLIP:")
    hp = AdaCLIP.default_hparams
    assert (hp["epochs"], hp["lr"], tuple(hp["betas"]), hp["batch_size"]) == (5, 0.01, (0.5, 0.999), 1)
    assert (hp["prompt_length"], hp["prompt_depth"], hp["prompt_type"], hp["prompt_branch"]) == \
        (5, 4, "SD", "VL")
    assert hp["feature_layers"] == [6, 12, 18, 24] and hp["logit_scale"] == 100.0
    assert (hp["hsf"], hp["hsf_clusters"], hp["hsf_alpha"], hp["sigma"]) == ("paper", 20, 0.2, 4.0)
    assert (hp["cls_weight"], hp["seg_weight"], hp["focal_gamma"]) == (1.0, 1.0, 2.0)
    assert hp["mosaic_rate"] == 0.2 and hp["mosaic_datasets"] == ["mvtec"]
    assert AdaCLIP.released_inputs == {"class_words": "folder", "pos_embed_resize": "bicubic"}  # released resize_pos_embed: bicubic, no antialias
    assert "cao2024adaclip" in AdaCLIP.bibtex


def test_prompt_text() -> None:
    assert len(ADACLIP_TEMPLATES) == 4 and len(ADACLIP_NORMAL_STATES) == 7
    assert len(ADACLIP_ANOMALOUS_STATES) == 5
    s = AdaCLIP.sentences("metal-nut")
    assert len(s) == 48 and "a bad photo of a metal nut." in s[:28]
    assert "a cropped photo of the metal nut with damage." in s[28:]
    assert "a low resolution photo of the flawless metal nut." in s[:28]


# -- prompt shapes, counts and insertion layers ------------------------------------------

def test_prompt_counts_on_vit_l14() -> None:
    """ViT-L/14@336: L = 5 tokens, visual blocks 1-4 (4 sets of 1024-d tokens), text blocks
    2-4 (3 sets of 768-d tokens), taps 6/12/18/24; parameter count by hand."""
    m = AdaCLIP(_vit(24, 12, 1024, 768, 768))
    assert (m.visual_depth, m.text_depth, m.layers) == (4, 4, [6, 12, 18, 24])
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["visual_static"] == (4, 5, 1024) and shapes["text_static"] == (3, 5, 768)
    assert sum(k.startswith("visual_generator.token.") and k.endswith("weight") for k in shapes) == 5
    assert shapes["visual_generator.token.0.weight"] == (1024, 768)     # Linear(D=768 -> W)
    assert shapes["text_generator.token.4.weight"] == (768, 768)
    assert [shapes[f"patch_proj.{i}.weight"] for i in range(4)] == [(768, 1024)] * 4
    assert shapes["cls_proj.weight"] == (768, 768)
    expected = (4 * 5 * 1024 + 3 * 5 * 768                 # static prompts
                + 5 * (768 * 1024 + 1024) + 5 * (768 * 768 + 768)   # generators
                + 4 * (1024 * 768 + 768) + (768 * 768 + 768))       # projections
    assert m.learnable_parameters() == expected


def test_prompt_depth_mapping_and_ablations() -> None:
    vit_b = AdaCLIP(_vit(12, 12, 768, 512, 512))
    assert (vit_b.visual_depth, vit_b.text_depth, vit_b.layers) == (2, 4, [3, 6, 9, 12])
    tiny = AdaCLIP(_vit(4, 4, 128, 128, 64))
    assert (tiny.visual_depth, tiny.text_depth) == (1, 2)    # text depth kept >= 2
    static = AdaCLIP(_vit(24, 12, 1024, 768, 768), prompt_type="S").state_dict()
    assert "visual_static" in static and not any("generator" in k for k in static)
    dynamic = AdaCLIP(_vit(24, 12, 1024, 768, 768), prompt_type="D").state_dict()
    assert "visual_static" not in dynamic and "text_static" not in dynamic
    visual_only = AdaCLIP(_vit(24, 12, 1024, 768, 768), prompt_branch="V")
    assert visual_only.text_depth == 0 and "text_static" not in visual_only.state_dict()
    with pytest.raises(ValueError):
        AdaCLIP(_vit(24, 12, 1024, 768, 768), hsf="mean")


def test_dynamic_prompts_depend_on_the_image(tiny_backbone) -> None:
    torch.manual_seed(0)
    m = AdaCLIP(tiny_backbone)
    x = torch.randn(2, 3, 64, 64)
    f_i = tiny_backbone.encode_image_uncached(x).global_embedding      # frozen, un-prompted
    vis = m.head.visual_prompts(f_i)
    txt = m.head.text_prompts(f_i)
    assert len(vis) == 1 and vis[0].shape == (2, 5, 128)
    assert len(txt) == 1 and txt[0].shape == (2, 5, 128)
    assert not torch.allclose(vis[0][0], vis[0][1]) and not torch.allclose(txt[0][0], txt[0][1])
    # hybrid = static + Linear_t(F_I), one Linear per prompt token
    gen = m.head.visual_generator.token
    by_hand = torch.stack([f_i @ gen[t].weight.T + gen[t].bias for t in range(5)], dim=1)
    torch.testing.assert_close(vis[0], m.head.visual_static[0] + by_hand)
    # the generators read the frozen pass, so the same image gives the same prompts
    torch.testing.assert_close(m.frozen_embedding(x), f_i)
    # static prompts alone are the same for every image
    s = AdaCLIP(tiny_backbone, prompt_type="S")
    p = s.head.visual_prompts(f_i)[0]
    torch.testing.assert_close(p[0], p[1])


def test_visual_prompt_insertion(tiny_backbone) -> None:
    """Prompts appended after the class and patch tokens before block 1, replaced before
    blocks 2..J, kept (and processed) after J; patch taps without the prompt tokens."""
    bb = tiny_backbone
    torch.manual_seed(1)
    m = AdaCLIP(bb, prompt_depth=12)                 # 12 of 24 -> visual blocks 1-2 of 4
    assert m.visual_depth == 2
    x = torch.randn(2, 3, 64, 64)
    prompts = [torch.randn(2, 5, bb.width), torch.randn(2, 5, bb.width)]
    glob, taps = m.encode_image_prompted(x, prompts)
    with torch.no_grad():
        t = bb.embed_patches(x)                                     # [2, 65, W]
        y1 = bb.blocks[0](torch.cat([t, prompts[0]], dim=1))        # [2, 70, W]
        y2 = bb.blocks[1](torch.cat([y1[:, :65], prompts[1]], dim=1))
        y3 = bb.blocks[2](y2)                                       # prompts kept after J
        y4 = bb.blocks[3](y3)
        ref_glob = bb.model.visual.ln_post(y4[:, 0]) @ bb.model.visual.proj
    for layer, y in zip((1, 2, 3, 4), (y1, y2, y3, y4), strict=True):
        torch.testing.assert_close(taps[layer], y[:, 1:65])
    torch.testing.assert_close(glob, ref_glob)
    # without prompts it is the plain frozen tower
    plain_glob, plain = m.encode_image_prompted(x, [])
    ref = bb.encode_image_uncached(x, [1, 2, 3, 4])
    torch.testing.assert_close(plain[4], ref.taps[4][:, 1:])
    torch.testing.assert_close(plain_glob, ref.global_embedding)


def test_text_prompt_insertion(tiny_backbone) -> None:
    """Each image's 48 sentences go through the text tower with that image's hybrid tokens
    at positions 1..L before text blocks 2..J; normalise, average per state, normalise."""
    bb = tiny_backbone
    torch.manual_seed(2)
    m = AdaCLIP(bb, prompt_depth=12)                 # text blocks 2-4 of 4 -> 3 sets
    assert m.text_depth == 4
    prompts = [torch.randn(2, 5, bb.text_width) * 0.1 for _ in range(3)]
    got = m.text_features(["toy a", "toy-b"], prompts)
    assert got.shape == (2, 2, bb.embed_dim)
    for b, name in enumerate(["toy a", "toy b"]):
        sentences = ([t.format(s.format(name)) for t in ADACLIP_TEMPLATES for s in ADACLIP_NORMAL_STATES]
                     + [t.format(s.format(name)) for t in ADACLIP_TEMPLATES
                        for s in ADACLIP_ANOMALOUS_STATES])
        tokens = bb.tokenize(sentences)
        with torch.no_grad():
            deep = [p[b].unsqueeze(0).expand(48, -1, -1) for p in prompts]
            raw = bb.encode_text_embeddings(bb.token_embedding(tokens), tokens, deep, deep_start=1)
        e = F.normalize(raw, dim=-1)
        ref = F.normalize(torch.stack([e[:28].mean(0), e[28:].mean(0)]), dim=-1)
        torch.testing.assert_close(got[b], ref, atol=1e-5, rtol=1e-4)


# -- hybrid semantic fusion --------------------------------------------------------------

def _two_groups() -> tuple[list[torch.Tensor], torch.Tensor]:
    a = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [1.0, 0.0, 0.1]])
    b = torch.tensor([[0.0, 1.0, 0.0], [0.1, 0.9, 0.0], [0.0, 1.0, 0.1]])
    layer1 = torch.cat([a, b]).unsqueeze(0)                  # [1, 6, 3]
    layer2 = torch.cat([a * 0.5, b * 2.0]).unsqueeze(0)
    anomaly = torch.tensor([[0.1, 0.2, 0.3, 0.9, 0.8, 0.7]])
    return [layer1, layer2], anomaly


def test_kmeans_finds_separated_groups_deterministically() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30, 4, generator=g) * 0.05 + 3, torch.randn(20, 4, generator=g) * 0.05 - 3])
    labels = kmeans(x, 2, seed=0)
    assert len(set(labels[:30].tolist())) == 1 and len(set(labels[30:].tolist())) == 1
    assert labels[0] != labels[30]
    assert torch.equal(labels, kmeans(x, 2, seed=0))
    assert kmeans(x[:3], 20).max() <= 2                      # never more clusters than points


def test_hsf_paper_is_the_most_anomalous_cluster_centroid() -> None:
    tokens, anomaly = _two_groups()
    got = hsf_paper(tokens, anomaly, k=2)
    avg = (tokens[0] + tokens[1])[0] / 2
    torch.testing.assert_close(got[0], F.normalize(avg[3:].mean(0), dim=0))


def test_hsf_released_is_the_mean_of_cluster_centres() -> None:
    tokens, anomaly = _two_groups()
    got = hsf_released(tokens, anomaly, k=2, topk_factor=2)   # the 4 most anomalous: 3, 4, 5, 2
    group = torch.cat([tokens[0][0, 3:], tokens[1][0, 3:]]).mean(0)
    single = torch.cat([tokens[0][0, 2:3], tokens[1][0, 2:3]]).mean(0)
    torch.testing.assert_close(got[0], F.normalize((group + single) / 2, dim=0))


def test_hsf_fusion_in_the_image_score(tiny_backbone, batch) -> None:
    """score = softmax(100 cos(norm(0.2 F_P + 0.8 F_img), T))[anomalous]."""
    torch.manual_seed(3)
    m = AdaCLIP(tiny_backbone, hsf="off")
    x = batch["image"]
    with torch.no_grad():
        logits, probs_off = m.forward(x, batch["prompt_name"])
        f_i = m.frozen_embedding(x)
        text = m.text_features(batch["prompt_name"], m.head.text_prompts(f_i))
        glob, taps = m.encode_image_prompted(x, m.head.visual_prompts(f_i))
        img = F.normalize(m.head.cls_proj(glob), dim=-1)
        torch.testing.assert_close(probs_off, (100 * torch.einsum("bd,bkd->bk", img, text)).softmax(-1))
        m.hparams["hsf"] = "paper"
        _, probs = m.forward(x, batch["prompt_name"])
        patches = [F.normalize(fc(taps[ly]), dim=-1) for fc, ly in zip(m.head.patch_proj, m.layers,
                                                                         strict=True)]
        anomaly = torch.stack(logits).mean(0).softmax(-1)[..., 1]
        fp = hsf_paper(patches, anomaly, 20)
        fused = F.normalize(0.2 * fp + 0.8 * img, dim=-1)
        torch.testing.assert_close(probs, (100 * torch.einsum("bd,bkd->bk", fused, text)).softmax(-1))


# -- loss ---------------------------------------------------------------------------------

def _focal_by_hand(p: torch.Tensor, y: torch.Tensor, gamma: float = 2.0, s: float = 1e-5) -> torch.Tensor:
    """Label-smoothed focal of the released loss.py, for two classes: p [M, 2], y [M] in {0, 1}."""
    t = torch.stack([1 - y, y], dim=1).float().clamp(s, 1 - s)
    pt = (t * p).sum(1) + s
    return (-(1 - pt) ** gamma * pt.log()).mean()


def _dice_by_hand(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - mean over rows of (2 Σ p y + 1) / (Σ p + Σ y + 1); p, y [rows, ...]."""
    p, y = p.reshape(p.shape[0], -1), y.reshape(y.shape[0], -1)
    return 1 - ((2 * (p * y).sum(1) + 1) / (p.sum(1) + y.sum(1) + 1)).mean()


@pytest.mark.parametrize("per_row", [False, True])
def test_loss_composition(tiny_backbone, per_row: bool) -> None:
    m = AdaCLIP(tiny_backbone, cls_weight=1.0, seg_weight=1.0, dice_per_row=per_row)
    g = torch.Generator().manual_seed(4)
    logits = [torch.randn(2, 64, 2, generator=g) * 3 for _ in range(4)]
    probs = torch.randn(2, 2, generator=g).softmax(-1)
    mask = torch.zeros(2, 64, 64)
    mask[1, 10:30, 20:40] = 1.0
    label = torch.tensor([0, 1])
    got = m.loss(logits, probs, mask, label)
    expected = _focal_by_hand(probs, label)
    for lg in logits:
        grid = lg.transpose(1, 2).reshape(2, 2, 8, 8)
        p = F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=True).softmax(1)
        flat = p.permute(0, 2, 3, 1).reshape(-1, 2)
        pa, pn, t = p[:, 1], p[:, 0], mask
        if per_row:   # the released batch-1 squeeze: Dice over the 64 rows of each image
            pa, pn, t = pa.reshape(-1, 64), pn.reshape(-1, 64), mask.reshape(-1, 64)
        expected = expected + _focal_by_hand(flat, mask.reshape(-1)) + _dice_by_hand(pa, t) \
            + _dice_by_hand(pn, 1 - t)
    torch.testing.assert_close(got, expected)
    # weights
    m.hparams.update(cls_weight=0.0, seg_weight=2.0)
    torch.testing.assert_close(m.loss(logits, probs, mask, label), 2 * (expected - _focal_by_hand(probs, label)))


def test_predict_map_and_score(tiny_backbone, batch) -> None:
    """Map: layers' upsampled logits averaged, softmax, (P_a + 1 - P_n) / 2, Gaussian σ = 4."""
    torch.manual_seed(5)
    m = AdaCLIP(tiny_backbone)
    pred = m.predict(batch)
    with torch.no_grad():
        logits, probs = m.forward(batch["image"], batch["prompt_name"])
    up = [F.interpolate(lg.transpose(1, 2).reshape(2, 2, 8, 8), size=(64, 64), mode="bilinear",
                        align_corners=True) for lg in logits]
    p = (sum(up) / 4).softmax(1)
    torch.testing.assert_close(pred.anomaly_maps, gaussian_blur(p[:, 1], 4.0))
    torch.testing.assert_close(pred.image_scores, probs[:, 1])


# -- training, state, cache ---------------------------------------------------------------

def test_training_updates_every_learnable_tensor_only(tiny_backbone, batch) -> None:
    torch.manual_seed(6)
    m = AdaCLIP(tiny_backbone)
    before = m.state_dict()
    frozen = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    opt_cls = torch.optim.AdamW
    seen = {}

    class Spy(opt_cls):
        def __init__(self, params, **kw):
            seen.update(kw)
            super().__init__(params, **kw)

    torch.optim.AdamW = Spy
    try:
        m.fit([batch], epochs=1, seed=0)
    finally:
        torch.optim.AdamW = opt_cls
    assert seen == {"lr": 0.01, "betas": (0.5, 0.999), "weight_decay": 0.01}
    after = m.state_dict()
    assert set(after) == set(before)
    assert all(not torch.equal(before[k], after[k]) for k in before), \
        [k for k in before if torch.equal(before[k], after[k])]
    assert all(torch.equal(v, tiny_backbone.state_dict()[k]) for k, v in frozen.items())
    assert len(m.losses) == 1


def test_mosaic_only_on_mvtec(tiny_backbone, batch) -> None:
    seen: list[torch.Tensor] = []
    for dataset in ("colondb", "mvtec"):
        m = AdaCLIP(tiny_backbone, mosaic_rate=1.0)
        m.training_loss = lambda b, m=m: (seen.append(b["image"]), m.head.cls_proj.bias.sum() * 0)[1]
        b = {**batch, "dataset": [dataset] * 2}
        m.fit([b], epochs=1, seed=0)
    assert torch.equal(seen[0], batch["image"])            # ColonDB: never mosaicked
    assert not torch.equal(seen[1], batch["image"])        # MVTec AD: rate 1 -> mosaics


def test_state_dict_round_trip(tiny_backbone, batch) -> None:
    torch.manual_seed(7)
    a = AdaCLIP(tiny_backbone)
    a.fit([batch], epochs=1, seed=0)
    torch.manual_seed(8)
    b = create_method("adaclip", tiny_backbone)
    assert not torch.equal(a.predict(batch).anomaly_maps, b.predict(batch).anomaly_maps)
    b.load_state_dict(a.state_dict())
    pa, pb = a.predict(batch), b.predict(batch)
    assert torch.equal(pa.anomaly_maps, pb.anomaly_maps) and torch.equal(pa.image_scores, pb.image_scores)


def test_prompted_pass_never_uses_the_feature_cache(tiny_backbone, batch) -> None:
    """Only the un-prompted pass feeding the generators may be served by the runner's cache."""
    bb = tiny_backbone
    calls: list[set[int]] = []

    class SpyCache:
        def encode(self, backbone, images, layers):
            calls.append(set(layers))
            return backbone.encode_image_uncached(images, sorted(layers))

    torch.manual_seed(9)
    m = AdaCLIP(bb)
    ref = m.predict(batch)
    bb.feature_cache = SpyCache()
    try:
        got = m.predict(batch)
    finally:
        bb.feature_cache = None
    assert calls == [set()]
    torch.testing.assert_close(got.anomaly_maps, ref.anomaly_maps)
