"""FAPrompt (methods/faprompt.py): CAP prompts, DAP prior, losses and inference rule.

The expected values are recomputed here step by step from the backbone's own pieces
(full-context text encoding, the V-V path, explicit loops), not read back from the method.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from bench.registry import create_method
from methods.base import _toy_batches, check_method
from methods.faprompt import FAPrompt, FAPromptHead
from methods.losses import segmentation_loss
from methods.prompt_learning import dpam_features

T = 0.07


@pytest.fixture(scope="module")
def method(tiny_backbone):
    torch.manual_seed(0)
    return create_method("faprompt", tiny_backbone)


@pytest.fixture(scope="module")
def batch():
    return _toy_batches(64, n_batches=1, batch_size=4)[0]


def hand_outputs(m: FAPrompt, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two-pass forward of the released train.py/test.py, one image at a time."""
    bb = m.backbone
    B = images.shape[0]
    glob, patches = dpam_features(bb, images, start=1, layers=[4])     # DPAM 6 -> 1, layer 24 -> 4
    v, g = F.normalize(patches[4], dim=-1), F.normalize(glob, dim=-1)
    tn, ta = m.static_text()
    t1 = F.normalize(torch.stack([tn, ta.mean(0)]), dim=-1)
    out: dict[str, list] = {k: [] for k in ("p1", "p2", "glog", "prior", "idx")}
    for b in range(B):
        p1 = (v[b] @ t1.T / T).softmax(-1)                                   # [N, 2]
        idx = torch.argsort(p1[:, 1], descending=True)[:10]
        prior = m.head.prior(v[b, idx].reshape(1, -1))[0]                    # ψ(concat of 10 tokens)
        ctx = torch.cat([m.head.ctx_normal.expand(10, -1, -1), m.head.ctx_abnormal + prior], dim=1)
        dap = m._encode(m.abnormal_template, ctx).mean(0)
        t2 = F.normalize(torch.stack([tn, dap]), dim=-1)
        out["p1"].append(p1)
        out["p2"].append((v[b] @ t2.T / T).softmax(-1))
        out["glog"].append(g[b] @ t2.T / T)
        out["prior"].append(prior)
        out["idx"].append(idx)
    res = {k: torch.stack(x) for k, x in out.items()}

    def up(p: torch.Tensor) -> torch.Tensor:
        return F.interpolate(p.transpose(1, 2).reshape(B, 2, 8, 8), size=(64, 64), mode="bilinear",
                             align_corners=False)

    res["map1"], res["map2"] = up(res["p1"]), up(res["p2"])
    res["score"] = 0.5 * (res["glog"].softmax(-1)[:, 1]
                          + (2 * res["p1"][..., 1].amax(1) + res["p2"][..., 1].amax(1)) / 3)
    res["abnormal_static"] = ta
    return res


def test_check_method(tiny_backbone) -> None:
    check_method(FAPrompt, tiny_backbone)


def test_defaults_pin_the_released_settings() -> None:
    hp = FAPrompt.default_hparams
    assert (hp["n_normal_ctx"], hp["n_abnormal_ctx"], hp["n_abnormal_prompts"]) == (5, 2, 10)
    assert (hp["prior_top_k"], hp["prior_reduction"]) == (10, 16)
    assert (hp["deep_depth"], hp["deep_length"], hp["dpam_start"], hp["feature_layers"]) == (9, 4, 6, [24])
    assert (hp["epochs"], hp["lr"], hp["betas"], hp["batch_size"]) == (15, 1e-3, [0.5, 0.999], 8)
    assert (hp["weight_static_map"], hp["weight_dap_map"], hp["weight_global"], hp["weight_image"],
            hp["weight_orthogonal"], hp["weight_prior"]) == (1.0, 0.5, 1.0, 1.0, 0.1, 1.0)
    assert (hp["temperature"], hp["sigma"]) == (0.07, 10.0)
    assert not hp["released_sigmoid_bug"] and not hp["released_prior_tokens_bug"]
    assert FAPrompt.released_inputs == {"pos_embed_resize": "bilinear"}


def test_prompt_shapes_counts_and_composition(method, tiny_backbone) -> None:
    W, D = tiny_backbone.text_width, tiny_backbone.embed_dim
    h = method.head
    assert method.normal_template.texts == ["X X X X X object."]
    assert method.abnormal_template.texts == ["X X X X X X X damaged object."]
    assert h.ctx_normal.shape == (5, W) and h.ctx_abnormal.shape == (10, 2, W)
    ctx = h.abnormal_contexts()
    assert ctx.shape == (10, 7, W)
    for k in range(10):                       # compound: shared normal tokens, then its own two
        assert torch.equal(ctx[k, :5], h.ctx_normal) and torch.equal(ctx[k, 5:], h.ctx_abnormal[k])
    prior = torch.randn(3, W)
    ctx_p = h.abnormal_contexts(prior)
    assert ctx_p.shape == (3, 10, 7, W)
    torch.testing.assert_close(ctx_p[2, 4, :5], h.ctx_normal)             # prior not on shared part
    torch.testing.assert_close(ctx_p[2, 4, 5:], h.ctx_abnormal[4] + prior[2])
    # deep tokens: depth 9 of 12 text blocks -> 3 of the tiny 4: blocks 2-3, 4 tokens each
    assert len(h.deep()) == 2 and all(t.shape == (4, W) for t in h.deep()) and h.deep.start == 1
    # ψ: Linear(M·D -> M·D/16) -> ReLU -> Linear(-> W)
    assert (h.prior.linear1.in_features, h.prior.linear1.out_features) == (10 * D, 10 * D // 16)
    assert (h.prior.linear2.in_features, h.prior.linear2.out_features) == (10 * D // 16, W)
    assert isinstance(h.prior.relu, torch.nn.ReLU)
    assert method._visual_layers() == (1, [4])                 # DPAM 6 -> 1, features 24 -> 4


def test_parameter_count_on_vit_l() -> None:
    head = FAPromptHead(768, 768, n_normal=5, n_abnormal=2, n_prompts=10, deep_depth=9,
                        deep_length=4, top_k=10, reduction=16)
    expected = (5 * 768 + 10 * 2 * 768 + 8 * 4 * 768          # contexts, 8 deep sets of 4
                + 7680 * 480 + 480 + 480 * 768 + 768)          # ψ: 7680 -> 480 -> 768
    assert sum(p.numel() for p in head.parameters()) == expected == 4_100_064


def test_text_inserts_contexts_and_deep_tokens(method, tiny_backbone) -> None:
    bb = tiny_backbone
    h = method.head
    deep = [t.detach() for t in h.deep()]
    with torch.no_grad():
        normal, abnormal = method.static_text()
        full = bb.tokenize(["X X X X X object."])
        emb = bb.token_embedding(full).clone()
        emb[:, 1:6] = h.ctx_normal                              # positions 1..5 after [SOS]
        ref_n = bb.encode_text_embeddings(emb, full, deep, 1)[0]
        full = bb.tokenize(["X X X X X X X damaged object."]).repeat(10, 1)
        emb = bb.token_embedding(full).clone()
        emb[:, 1:6] = h.ctx_normal
        emb[:, 6:8] = h.ctx_abnormal
        ref_a = bb.encode_text_embeddings(emb, full, deep, 1)
        moved = bb.encode_text_embeddings(emb, full, deep, 2)     # deep tokens one block later
    torch.testing.assert_close(normal, ref_n, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(abnormal, ref_a, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(abnormal, moved, atol=1e-4)


def test_prior_is_data_dependent(method, batch) -> None:
    images = batch["image"][:2]
    with torch.no_grad():
        out = method.outputs(images)
        ref = hand_outputs(method, images)
    torch.testing.assert_close(out["prior_index"], ref["idx"])
    torch.testing.assert_close(out["prior"], ref["prior"], atol=1e-5, rtol=1e-4)
    assert out["prior"].shape == (2, method.backbone.text_width)
    assert not torch.allclose(out["prior"][0], out["prior"][1], atol=1e-4)   # two images, two priors
    # the priors change the abnormality text per image, not the normal text
    torch.testing.assert_close(out["patch_probs_dap"], ref["p2"], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        dap = method.dap_abnormal_text(out["prior"])
        normal, abnormal = method.static_text()
    assert not torch.allclose(dap[0], dap[1], atol=1e-5)
    assert not torch.allclose(dap[0], abnormal, atol=1e-5)
    torch.testing.assert_close(method.dap_abnormal_text(torch.zeros_like(out["prior"]))[1], abnormal)


def test_loss_composition_and_weights(method, batch) -> None:
    label, mask = batch["label"], batch["mask"]
    with torch.no_grad():
        ref = hand_outputs(method, batch["image"])
        total = method.training_loss(batch)
        terms = method.loss_terms(batch)
    seg1, seg2 = segmentation_loss(ref["map1"], mask), segmentation_loss(ref["map2"], mask)
    ce = F.cross_entropy(ref["glog"], label)
    s, y = ref["score"], label.double()
    bce = -(y * s.double().log() + (1 - y) * (1 - s.double()).log())
    focal = ((1 - torch.exp(-bce)) ** 2 * bce).mean().float()
    a = F.normalize(ref["abnormal_static"], dim=-1)
    orth = sum(abs(float(a[k] @ a[j])) for k in range(10) for j in range(k + 1, 10))
    prior = sum(float(ref["prior"][i].pow(2).mean()) for i in range(4) if label[i] == 0)
    for key, val in {"static_map": seg1, "dap_map": seg2, "global": ce, "image": focal,
                     "orthogonal": orth, "prior": prior}.items():
        assert float(terms[key]) == pytest.approx(float(val), rel=1e-4, abs=1e-6), key
    hand = seg1 + 0.5 * seg2 + ce + focal + 0.1 * orth + prior
    assert float(total) == pytest.approx(float(hand), rel=1e-4)


def test_released_sigmoid_switch(tiny_backbone, batch) -> None:
    torch.manual_seed(0)
    m = create_method("faprompt", tiny_backbone, released_sigmoid_bug=True)
    with torch.no_grad():
        term = m.loss_terms(batch)["image"]
        s = hand_outputs(m, batch["image"])["score"].double()
    y = batch["label"].double()
    sig = torch.sigmoid(s)                         # the released BCE-with-logits on a probability
    bce = -(y * sig.log() + (1 - y) * (1 - sig).log())
    expected = ((1 - torch.exp(-bce)) ** 2 * bce).mean()
    assert float(term) == pytest.approx(float(expected), rel=1e-4)
    normal = batch["label"] == 0          # what the bug does: a normal image's BCE >= log 2
    assert bool(normal.any()) and float(bce[normal].min()) >= math.log(2) - 1e-6


def test_released_prior_tokens_switch(tiny_backbone, batch) -> None:
    torch.manual_seed(0)
    m = create_method("faprompt", tiny_backbone, released_prior_tokens_bug=True)
    images = batch["image"][:2]
    with torch.no_grad():
        out = m.outputs(images)
        _, patches = dpam_features(tiny_backbone, images, start=1, layers=[4])
        v = F.normalize(patches[4], dim=-1)
        expected = m.head.prior(v[:, :10].reshape(2, -1))      # grid positions 0..9, any image
        fixed = hand_outputs(m, images)
    assert torch.equal(out["prior_index"], torch.arange(10).expand(2, -1))
    torch.testing.assert_close(out["prior"], expected, atol=1e-5, rtol=1e-4)
    assert not torch.equal(fixed["idx"], out["prior_index"])   # the top 10 are other patches


def test_inference_rule(method, batch) -> None:
    with torch.no_grad():
        pred = method.predict(batch)
        ref = hand_outputs(method, batch["image"])
    raw = (ref["map1"][:, 1] + 1 - ref["map1"][:, 0] + ref["map2"][:, 1] + 1 - ref["map2"][:, 0]) / 4
    smooth = np.stack([ndimage.gaussian_filter(r.double().numpy(), sigma=10.0) for r in raw])
    np.testing.assert_allclose(pred.anomaly_maps.numpy(), smooth, atol=1e-5)
    torch.testing.assert_close(pred.image_scores, ref["score"], atol=1e-5, rtol=1e-4)


def test_what_trains(method, batch, tiny_backbone) -> None:
    method.head.zero_grad()
    method.training_loss(batch).backward()
    grads = {n: p.grad for n, p in method.head.named_parameters()}
    assert set(grads) == {"ctx_normal", "ctx_abnormal", "deep.tokens.0", "deep.tokens.1",
                          "prior.linear1.weight", "prior.linear1.bias", "prior.linear2.weight",
                          "prior.linear2.bias"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    # the abnormality prompts share the normal tokens: L_oc alone moves them
    method.head.zero_grad()
    method.loss_terms(batch)["orthogonal"].backward()
    assert method.head.ctx_normal.grad.abs().sum() > 0
    assert method.head.prior.linear1.weight.grad is None          # static prompts only
    method.head.zero_grad()


def test_state_dict_round_trip(method, tiny_backbone, batch) -> None:
    sd = method.state_dict()
    torch.manual_seed(1)
    other = create_method("faprompt", tiny_backbone)
    assert not torch.equal(other.state_dict()["ctx_abnormal"], sd["ctx_abnormal"])
    other.load_state_dict(sd)
    a, b = method.predict(batch), other.predict(batch)
    assert torch.equal(a.image_scores, b.image_scores) and torch.equal(a.anomaly_maps, b.anomaly_maps)


def test_too_few_patches_for_the_prior(tiny_backbone) -> None:
    m = create_method("faprompt", tiny_backbone, prior_top_k=65)     # 8 x 8 = 64 patches
    with pytest.raises(ValueError, match="prior_top_k"):
        m.predict(_toy_batches(64, n_batches=1, batch_size=1)[0])
