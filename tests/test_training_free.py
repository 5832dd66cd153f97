"""The training-free methods (clip, winclip, anoclip, anoclip_plus) and their shared pieces."""

from __future__ import annotations

import pytest
import torch

from bench.backbone import (
    block_attention,
    compose_prompts,
    encode_image_vv,
    encode_prompts,
    encode_windows,
    ensemble_mean,
    window_indices,
)
from bench.registry import METHODS, create_method
from methods.anoclip import AnoCLIP, AnoCLIPPlus, fit_adapter, tta_loss
from methods.base import _toy_batches, check_method
from methods.prompts import (
    ANOCLIP_DOMAINS,
    ANOCLIP_STATE_PAIRS,
    ANOMALIB_WINCLIP_TEMPLATES,
    WINCLIP_ANOMALOUS_STATES,
    WINCLIP_NORMAL_STATES,
    WINCLIP_TEMPLATES,
    domain_templates,
)
from methods.winclip import WinCLIP, harmonic_aggregation

NAMES = ("clip", "winclip", "anoclip", "anoclip_plus")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


# -- the plugin contract ------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_check_method(name, tiny_backbone):
    check_method(METHODS.get(name), tiny_backbone)


@pytest.mark.parametrize("name", NAMES)
def test_description_and_citation(name):
    cls = METHODS.get(name)
    assert not cls.trains
    assert cls.is_seeded() is (name == "anoclip_plus")
    assert cls.paper and cls.bibtex.startswith("@") and cls.description()


def test_paper_defaults():
    assert WinCLIP.default_hparams["scales"] == [2, 3] and WinCLIP.default_hparams["stride"] == 1
    assert WinCLIP.default_hparams["temperature"] == 0.07
    hp = AnoCLIPPlus.default_hparams
    assert (hp["tta_epochs"], hp["tta_lr"], hp["noise_mean"], hp["noise_std"]) == (5, 1e-3, 0.0, 0.05)
    for cls in (WinCLIP, AnoCLIP):
        assert cls.paper_backbone == {**cls.paper_backbone, "arch": "ViT-B-16-plus-240", "image_size": 240}


def test_hparams_are_overridable(tiny_backbone):
    m = create_method("winclip", tiny_backbone, scales=[2], temperature=0.01)
    assert [w.shape[1] for w in m.windows] == [4]
    with pytest.raises(TypeError, match="unknown hyperparameters"):
        create_method("anoclip", tiny_backbone, not_a_setting=1)


# -- prompts --------------------------------------------------------------------------------

def test_compose_prompts_slots_and_prefix_words():
    out = compose_prompts(["a photo of a {}."], ["", "damaged", "{} with flaw"], "metal nut")
    assert out == ["a photo of a metal nut.", "a photo of a damaged metal nut.",
                   "a photo of a metal nut with flaw."]


def test_winclip_prompt_counts():
    assert len(WINCLIP_TEMPLATES) == len(set(WINCLIP_TEMPLATES)) == 22
    assert (len(WINCLIP_NORMAL_STATES), len(WINCLIP_ANOMALOUS_STATES)) == (7, 4)
    assert len(compose_prompts(WINCLIP_TEMPLATES, WINCLIP_NORMAL_STATES, "x")) == 154
    assert len(compose_prompts(WINCLIP_TEMPLATES, WINCLIP_ANOMALOUS_STATES, "x")) == 88
    # anomalib's list: 21 entries, one of them twice, two of the paper's missing
    assert len(ANOMALIB_WINCLIP_TEMPLATES) == 21 and len(set(ANOMALIB_WINCLIP_TEMPLATES)) == 20
    assert set(WINCLIP_TEMPLATES) - set(ANOMALIB_WINCLIP_TEMPLATES) == {
        "a cropped photo of a {}.", "a jpeg corrupted photo of a {}."}


def test_anoclip_prompt_counts_and_pairing(tiny_backbone):
    assert len(ANOCLIP_STATE_PAIRS) == 7
    assert all(len(v) == 4 for v in ANOCLIP_DOMAINS.values())
    m = AnoCLIP(tiny_backbone)
    normal, anomalous = m.prompts("bottle", "industrial")
    assert len(normal) == len(anomalous) == 22 * 7 * 4 == 616
    assert normal[0] == "a cropped industrial photo of the normal bottle."
    assert anomalous[0] == "a cropped industrial photo of the abnormal bottle."
    assert "an industrial photo of a bottle with flaw." in anomalous
    assert "a manufacturing image of a bottle without flaw." in normal
    assert any("clinical image" in s for s in m.prompts("skin", "medical")[0])
    ts = m.text_set("bottle", "industrial")
    assert ts.prompts.shape == (2 * 616, tiny_backbone.embed_dim)
    assert torch.allclose(ts.prompts.norm(dim=-1), torch.ones(2 * 616), atol=1e-5)
    assert torch.allclose(ts.prototypes.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_domain_templates():
    out = domain_templates(["a photo of a {}.", "a dark photo of the {}."], ["industrial photo", "surface picture"])
    assert out == ["an industrial photo of a {}.", "a dark industrial photo of the {}.",
                   "a surface picture of a {}.", "a dark surface picture of the {}."]


def test_ensemble_mean_normalises_before_averaging():
    e = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(ensemble_mean(e), torch.tensor([2 ** -0.5, 2 ** -0.5]))
    raw = ensemble_mean(e, normalize_each=False)                  # anomalib's raw mean
    assert torch.allclose(raw, torch.tensor([10.0, 1.0]) / 101 ** 0.5)


def test_encode_prompts_matches_encode_text(tiny_backbone):
    texts = ["a photo of a bottle.", "a cropped industrial photo of the bottle with defect."]
    ours = encode_prompts(tiny_backbone, texts, cache=False)
    assert torch.allclose(ours, tiny_backbone.encode_text(texts), atol=1e-5)
    assert torch.equal(encode_prompts(tiny_backbone, texts), encode_prompts(tiny_backbone, texts))


# -- the value-value path ---------------------------------------------------------------------

def test_block_attention_qkv_reproduces_the_block(tiny_backbone, images):
    bb = tiny_backbone
    with torch.no_grad():
        x = bb.blocks[0].ln_1(bb.embed_patches(images))
        assert torch.allclose(block_attention(bb.blocks[0], x, "qkv"), bb.blocks[0].attention(x), atol=1e-5)


def test_vv_path_shape_and_difference(tiny_backbone, images):
    bb = tiny_backbone
    L = bb.num_layers
    with torch.no_grad():
        f = encode_image_vv(bb, images, start=1, layers=[L])
        plain = bb.encode_image(images, layers=[L])
    n = bb.grid_size ** 2
    assert f.vv_taps[L].shape == (2, 1 + n, bb.width) == f.taps[L].shape
    assert f.grid == (bb.grid_size, bb.grid_size)
    # original path untouched (one shared Q-K-V projection: equal up to float rounding)
    assert torch.allclose(f.taps[L], plain.taps[L], atol=1e-5)
    assert torch.allclose(f.global_embedding, plain.global_embedding, atol=1e-5)
    assert not torch.allclose(f.vv_taps[L], f.taps[L], atol=1e-3)     # V-V differs from Q-K-V
    assert f.vv_taps[L].isfinite().all()


def test_vv_path_recursion_without_ffn(tiny_backbone, images):
    """Eq. 7: Ṽ^l = Proj(Attn(V,V,V)) + Ṽ^{l-1}, started from the tokens entering ``start``."""
    bb = tiny_backbone
    L = bb.num_layers
    with torch.no_grad():
        f = encode_image_vv(bb, images, start=L, layers=[L])
        x_in = bb.encode_image(images, layers=[L - 1]).taps[L - 1]
        blk = bb.blocks[L - 1]
        expected = x_in + block_attention(blk, blk.ln_1(x_in), "vv")
    assert torch.allclose(f.vv_taps[L], expected, atol=1e-5)
    with pytest.raises(Exception, match="cannot tap"):
        encode_image_vv(bb, images, start=L, layers=[L - 1])


def test_vv_path_through_the_feature_cache(images):
    from bench.backbone import load_clip
    from bench.feature_cache import FeatureCache

    bb = load_clip("zsad-tiny", None, image_size=64, seed=0)
    L = bb.num_layers
    with torch.no_grad():
        ref = encode_image_vv(bb, images, start=2, layers=[L])
        bb.feature_cache = FeatureCache("test-vv")
        first = encode_image_vv(bb, images, start=2, layers=[L])
        second = encode_image_vv(bb, images, start=2, layers=[L], original=False)
    # per image: first call misses the vv and the plain path, the second hits the vv path
    assert (bb.feature_cache.misses, bb.feature_cache.hits) == (4, 2)
    assert torch.equal(first.vv_taps[L], second.vv_taps[L]) and second.taps == {}
    assert torch.allclose(first.vv_taps[L], ref.vv_taps[L], atol=1e-2, rtol=1e-2)  # fp16 storage
    assert torch.allclose(first.taps[L], ref.taps[L], atol=1e-2, rtol=1e-2)


def test_anoclip_map_differs_from_clip(tiny_backbone):
    batch = _toy_batches(64, n_batches=1)[0]
    a = create_method("anoclip", tiny_backbone, logit_scale=tiny_backbone.logit_scale.item()).predict(batch)
    c = create_method("clip", tiny_backbone).predict(batch)
    assert not torch.allclose(a.anomaly_maps, c.anomaly_maps, atol=1e-4)


# -- WinCLIP windows and harmonic aggregation -----------------------------------------------

def test_window_indices():
    w = window_indices((3, 4), 2)
    assert w.shape == (2 * 3, 4)
    assert w[0].tolist() == [0, 1, 4, 5] and w[-1].tolist() == [6, 7, 10, 11]
    assert window_indices((15, 15), 2).shape[0] == 196 and window_indices((15, 15), 3).shape[0] == 169
    with pytest.raises(ValueError):
        window_indices((2, 2), 3)


def test_whole_grid_window_is_the_image_embedding(tiny_backbone, images):
    bb = tiny_backbone
    with torch.no_grad():
        w = window_indices((bb.grid_size, bb.grid_size), bb.grid_size)
        emb = encode_windows(bb, bb.embed_patches(images), w)
        assert torch.allclose(emb[:, 0], bb.encode_image(images).global_embedding, atol=1e-5)


def test_harmonic_aggregation_hand_example():
    # 3x3 grid, four 2x2 windows (top-left, top-right, bottom-left, bottom-right)
    windows = window_indices((3, 3), 2)
    scores = torch.tensor([[1.0, 0.75, 0.5, 0.25]])
    out = harmonic_aggregation(scores, windows, (3, 3))[0]
    # corners see one window; edges two: e.g. top-middle 2 / (1/1 + 1/0.75) = 6/7;
    # centre all four: 4 / (1 + 4/3 + 2 + 4) = 0.48
    expected = torch.tensor([[1.0, 6 / 7, 0.75],
                             [2 / 3, 0.48, 0.375],
                             [0.5, 1 / 3, 0.25]])
    assert torch.allclose(out, expected, atol=1e-6)
    # a patch no window covers (stride 2 on a 3x3 grid with 1x1 windows) scores 0
    sparse = harmonic_aggregation(torch.ones(1, 4), window_indices((3, 3), 1, stride=2), (3, 3))
    assert sparse[0, 1, 1] == 0 and sparse[0, 0, 0] == 1


def test_winclip_fuses_image_and_window_scales(tiny_backbone, images):
    m = WinCLIP(tiny_backbone, scales=[2, 3, 99])          # 99 shrinks to the 8x8 grid
    assert [w.shape[1] for w in m.windows] == [4, 9, 64]
    text = torch.stack([m.text_features("toy a")] * 2)
    image_scores, fused = m.score_maps(images, text)
    assert fused.shape == (2, 8, 8) and ((fused > 0) & (fused < 1)).all()
    m1 = WinCLIP(tiny_backbone, scales=[8])                  # one window = the whole image
    s1, f1 = m1.score_maps(images, text)
    assert torch.allclose(f1, s1[:, None, None].expand(-1, 8, 8), atol=1e-5)


# -- AnoCLIP+ test-time adaptation -------------------------------------------------------------

def _tta_inputs(backbone, n: int = 2):
    m = AnoCLIPPlus(backbone)
    batch = _toy_batches(64, n_batches=1)[0]
    ts = m.batch_text(batch)[0]
    _, tokens, _ = m.features(batch["image"][:n])
    P = tokens[0]
    return P, ts.prompts.expand(n, -1, -1), ts.prototypes.expand(n, -1, -1)


def test_tta_reduces_its_own_loss(tiny_backbone):
    P, T, protos = _tta_inputs(tiny_backbone)
    torch.manual_seed(0)
    noise = torch.randn_like(P) * 0.05
    with torch.no_grad():
        before = tta_loss(P, P + noise, T, protos, T, 1.0)
    omega, losses = fit_adapter(P, T, protos, scale=1.0)
    assert len(losses) == 5 and not torch.equal(omega, T)
    with torch.no_grad():
        after = tta_loss(P, P + noise, T, protos, omega, 1.0)
    assert (after < before).all()
    omega, _ = fit_adapter(P, T, protos, scale=1.0, lr=1e-2, epochs=20)
    with torch.no_grad():
        assert (tta_loss(P, P + noise, T, protos, omega, 1.0) < before - 5e-5).all()


def test_tta_images_are_independent(tiny_backbone):
    P, T, protos = _tta_inputs(tiny_backbone)
    torch.manual_seed(3)
    both, _ = fit_adapter(P, T, protos, scale=1.0, noise_std=0.0)
    one, _ = fit_adapter(P[:1], T[:1], protos[:1], scale=1.0, noise_std=0.0)
    # batched vs single-image matmuls differ in summation order (~1e-5 after 5 Adam epochs)
    assert torch.allclose(both[:1], one, atol=1e-4)


def test_tta_refines_only_the_map(tiny_backbone):
    batch = _toy_batches(64, n_batches=1)[0]
    torch.manual_seed(0)
    plus = AnoCLIPPlus(tiny_backbone).predict(batch)
    base = AnoCLIP(tiny_backbone).predict(batch)
    assert torch.equal(plus.image_scores, base.image_scores)
    assert not torch.allclose(plus.anomaly_maps, base.anomaly_maps, atol=1e-7)
    torch.manual_seed(1)
    other_seed = AnoCLIPPlus(tiny_backbone).predict(batch)
    assert torch.equal(other_seed.image_scores, plus.image_scores)
    assert not torch.equal(other_seed.anomaly_maps, plus.anomaly_maps)


def test_tta_works_under_inference_mode(tiny_backbone):
    batch = _toy_batches(64, n_batches=1)[0]
    with torch.inference_mode():
        torch.manual_seed(0)
        p = AnoCLIPPlus(tiny_backbone).predict(batch)
    torch.manual_seed(0)
    q = AnoCLIPPlus(tiny_backbone).predict(batch)
    assert torch.allclose(p.anomaly_maps, q.anomaly_maps)
