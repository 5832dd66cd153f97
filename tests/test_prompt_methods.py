"""Paper details of the prompt-learning family: coop, anomalyclip, tokenclip(_van), mpa, mpama.

``check_method`` for every registered method runs in tests/test_backbone_data.py; here we
pin prompts, layers, loss compositions, the OT assignment, the router and state round trips.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import methods.tokenclip as tokenclip_mod
from bench.backbone import encode_image_vv
from bench.registry import create_method
from methods.anomalyclip import AnomalyCLIP
from methods.base import _toy_batches
from methods.losses import hinge_loss, orthogonality_loss, segmentation_loss
from methods.mpa import MPA, MPAMA, MoEProjection
from methods.prompt_learning import (
    DeepTextPrompts,
    PromptTemplate,
    avg_pool_tokens,
    dpam_features,
    encode_text,
    scale_layer,
    scale_layers,
    two_class_logits,
)
from methods.tokenclip import TokenCLIP, sparsify_assignment

NAMES = ["coop", "anomalyclip", "tokenclip", "tokenclip_van", "mpa", "mpama"]


@pytest.fixture(scope="module")
def batch():
    return _toy_batches(64, n_batches=1, batch_size=4)[0]


# -- shared pieces -------------------------------------------------------------------------

def test_layer_mapping_rule() -> None:
    assert scale_layers([6, 12, 18, 24], 24) == [6, 12, 18, 24]
    assert scale_layers([6, 12, 18, 24], 12) == [3, 6, 9, 12]
    assert scale_layers([6, 12, 18, 24], 4) == [1, 2, 3, 4]
    assert scale_layer(6, 4) == 1 and scale_layer(24, 4) == 4 and scale_layer(0, 4) == 0
    assert scale_layer(9, 12, 12) == 9 and scale_layer(9, 4, 12) == 3


def test_deep_prompt_counts_on_vit_l() -> None:
    deep = DeepTextPrompts(depth=9, length=4, width=768)
    assert len(deep()) == 8 and all(t.shape == (4, 768) for t in deep())   # blocks 2..9
    assert deep.start == 1
    assert len(DeepTextPrompts(1, 4, 8)()) == 0


def test_prompt_template_and_text_encoder(tiny_backbone) -> None:
    bb = tiny_backbone
    t = PromptTemplate(bb, ["object.", "damaged object."], 12)
    assert t.texts == ["X X X X X X X X X X X X object.", "X X X X X X X X X X X X damaged object."]
    ctx = torch.randn(2, 12, bb.text_width) * 0.02
    emb = t.embed(ctx)
    assert emb.shape[:2] == t.tokens.shape and t.tokens.shape[0] == 2
    # the truncated encoder equals the backbone's full-context one, with deep prompts too
    full = bb.tokenize(t.texts)
    femb = bb.token_embedding(full).clone()
    femb[:, 1:13] = ctx
    deep = [torch.randn(4, bb.text_width) * 0.02 for _ in range(2)]
    torch.testing.assert_close(encode_text(bb, emb, t.tokens, deep, 1),
                               bb.encode_text_embeddings(femb, full, deep, 1), atol=1e-4, rtol=1e-4)


def test_dpam_is_the_vv_path(tiny_backbone) -> None:
    bb = tiny_backbone
    x = torch.randn(2, 3, 64, 64)
    glob, patches = dpam_features(bb, x, start=1, layers=[4])
    ref = encode_image_vv(bb, x, start=1, layers=[4])
    torch.testing.assert_close(patches[4], bb.project_tokens(ref.vv_taps[4][:, 1:]))
    torch.testing.assert_close(glob, ref.global_embedding)     # ln_post + proj (no issue-#14 bug)
    plain = bb.encode_image(x, layers=[4])
    assert not torch.allclose(patches[4], bb.project_tokens(plain.taps[4][:, 1:]))


def test_avg_pool_tokens_levels() -> None:
    x = torch.arange(16.0).reshape(1, 16, 1)
    assert torch.equal(avg_pool_tokens(x, (4, 4), 1), x)
    out3 = avg_pool_tokens(x, (4, 4), 3).reshape(4, 4)
    assert out3[1, 1] == pytest.approx(x.reshape(4, 4)[0:3, 0:3].mean())
    assert out3[0, 0] == pytest.approx(x.reshape(4, 4)[0:2, 0:2].mean())       # border: inside only
    out2 = avg_pool_tokens(x, (4, 4), 2).reshape(4, 4)
    assert out2[0, 0] == pytest.approx(x.reshape(4, 4)[0:2, 0:2].mean())       # extends bottom/right


# -- anomalyclip -------------------------------------------------------------------------------

def test_anomalyclip_prompts_and_layers(tiny_backbone) -> None:
    m = create_method("anomalyclip", tiny_backbone)
    hp = AnomalyCLIP.default_hparams
    assert (hp["n_ctx"], hp["deep_depth"], hp["deep_length"], hp["dpam_start"]) == (12, 9, 4, 6)
    assert hp["feature_layers"] == [24] and hp["local_weight"] == 4.0 and hp["epochs"] == 15
    assert hp["lr"] == 1e-3 and hp["betas"] == [0.5, 0.999] and hp["sigma"] == 4.0
    assert m.template.texts[0].endswith(" object.") and m.template.texts[1].endswith(" damaged object.")
    assert m.head.ctx_normal.shape == m.head.ctx_anomalous.shape == (12, tiny_backbone.text_width)
    assert len(m.head.deep()) == 2          # depth 9 of 12 -> 3 of the tiny 4 text blocks
    # DPAM from block 6 of 24 -> 1 of 4: it starts at the first tap, as 6 is the first of
    # [6, 12, 18, 24] in the paper; features 24 -> 4
    assert m._visual_layers() == (1, [4])
    multi = create_method("anomalyclip", tiny_backbone, feature_layers=[6, 12, 18, 24])
    assert multi._visual_layers() == (1, [1, 2, 3, 4])
    _, patches = multi.image_features(torch.randn(1, 3, 64, 64))
    assert sorted(patches) == [1, 2, 3, 4]


def test_anomalyclip_loss_composition(tiny_backbone, batch) -> None:
    torch.manual_seed(0)
    m = create_method("anomalyclip", tiny_backbone)
    text = m.text_features()
    glob, patches = m.image_features(batch["image"])
    ce = F.cross_entropy(two_class_logits(glob, text, 0.07), batch["label"])
    maps = m._maps(patches, text, (64, 64))
    local = sum(segmentation_loss(p, batch["mask"]) for p in maps)
    torch.testing.assert_close(m.training_loss(batch), ce + 4.0 * local)


# -- coop -------------------------------------------------------------------------------------

def test_coop_prompts_use_class_names(tiny_backbone, batch) -> None:
    m = create_method("coop", tiny_backbone)
    assert m.head.ctx.shape == (16, tiny_backbone.text_width)      # one unified context
    text = m._batch_text(batch)
    assert text.shape == (4, 2, tiny_backbone.embed_dim)
    t = m._templates["toy a"]
    assert t.texts == [" ".join(["X"] * 16) + " normal toy a.", " ".join(["X"] * 16) + " anomalous toy a."]
    assert m._visual_layers() == (0, [4])                          # no DPAM, last block
    assert set(dict(m.head.named_parameters())) == {"ctx"}


# -- tokenclip --------------------------------------------------------------------------------

def test_tokenclip_defaults_pin_the_paper() -> None:
    hp = TokenCLIP.default_hparams
    assert (hp["n_subspaces"], hp["ot_eps"], hp["ot_iters"], hp["top_k"], hp["threshold"]) == (3, 0.01, 100, 2, 0.2)
    assert (hp["weight_hinge"], hp["weight_reg"]) == (5.0, 100.0)
    assert (hp["weight_global"], hp["weight_base"], hp["weight_dynamic"]) == (1.0, 1.0, 1.0)
    assert (hp["lr"], hp["epochs"], hp["batch_size"]) == (1e-3, 30, 8)


def test_tokenclip_shapes(tiny_backbone) -> None:
    m = create_method("tokenclip", tiny_backbone, n_subspaces=4)
    W, D = tiny_backbone.text_width, tiny_backbone.embed_dim
    assert len(m.template) == 4                                   # local n/a, global n/a
    assert m.head.contexts().shape == (4, 12, W)
    assert m.head.bridge[0].in_features == 2 * W                  # channel concatenation
    local, glob, sub = m.text_features()
    assert local.shape == glob.shape == (2, D) and sub.shape == (2, 4, D)
    assert len(m.head.heads) == 4 and isinstance(m.head.heads[0], torch.nn.Linear)


def test_sparsify_assignment_topk_and_threshold() -> None:
    plan = torch.tensor([[[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.7, 0.1], [0.25, 0.25, 0.25, 0.25]]])
    A = sparsify_assignment(plan / 3, top_k=2, threshold=0.2)
    assert ((A > 0).sum(-1) <= 2).all()
    torch.testing.assert_close(A.sum(-1), torch.ones(1, 3))
    torch.testing.assert_close(A[0, 0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(A[0, 1], torch.tensor([0.0, 0.0, 1.0, 0.0]))   # 0.1 < threshold
    assert (A[0, 2] > 0).sum() == 2


def test_tokenclip_ot_plan_marginals_and_sparsity(tiny_backbone, monkeypatch) -> None:
    m = create_method("tokenclip", tiny_backbone)
    seen = {}
    real = tokenclip_mod.sinkhorn

    def spy(cost, a, b, eps, n_iter):
        seen.update(a=a, b=b, eps=eps, n_iter=n_iter)
        seen["plan"] = real(cost, a, b, eps, n_iter)
        return seen["plan"]

    monkeypatch.setattr(tokenclip_mod, "sinkhorn", spy)
    torch.manual_seed(0)
    _, _, sub = m.text_features()
    patches = torch.randn(2, 64, tiny_backbone.embed_dim)
    A = m.assign(patches, sub)
    N, K = 64, 3
    assert seen["eps"] == 0.01 and seen["n_iter"] == 100
    torch.testing.assert_close(seen["a"], torch.full((2, N), 1 / N))
    torch.testing.assert_close(seen["b"], torch.full((2, K), 1 / K))
    torch.testing.assert_close(seen["plan"].sum(-1), seen["a"], atol=1e-6, rtol=0)
    torch.testing.assert_close(seen["plan"].sum(-2), seen["b"], atol=2e-2 / K, rtol=0)
    assert A.shape == (2, N, K) and ((A > 0).sum(-1) <= 2).all() and ((A > 0).sum(-1) >= 1).all()
    torch.testing.assert_close(A.sum(-1), torch.ones(2, N))
    kept = A[A > 0]
    assert (kept >= 0.2 - 1e-6).all()


def test_tokenclip_van_uses_no_ot(tiny_backbone, monkeypatch) -> None:
    m = create_method("tokenclip_van", tiny_backbone)
    monkeypatch.setattr(tokenclip_mod, "sinkhorn", lambda *a, **k: pytest.fail("OT used"))
    _, _, sub = m.text_features()
    patches = torch.randn(1, 16, tiny_backbone.embed_dim)
    A = m.assign(patches, sub)
    assert ((A > 0).sum(-1) <= 2).all()
    # the highest-cosine subspace always gets the largest weight
    cos = torch.einsum("bnd,ckd->bnck", F.normalize(patches, dim=-1), F.normalize(sub, dim=-1)).mean(2)
    assert torch.equal(A.argmax(-1), cos.argmax(-1))


def test_tokenclip_loss_composition(tiny_backbone, batch) -> None:
    m = create_method("tokenclip", tiny_backbone)
    torch.manual_seed(0)
    terms = m.loss_terms(batch)
    assert set(terms) == {"global", "reg", "base", "dynamic", "hinge"}
    expected = terms["global"] + 100 * terms["reg"] + terms["base"] + terms["dynamic"] + 5 * terms["hinge"]
    torch.testing.assert_close(m.training_loss(batch), expected)
    out = m._forward(batch["image"])
    torch.testing.assert_close(terms["reg"], orthogonality_loss(out["subspaces"]))
    torch.testing.assert_close(terms["hinge"], hinge_loss(out["dynamic"][:, 1], batch["mask"]))


def test_tokenclip_inference_fuses_maps(tiny_backbone, batch) -> None:
    m = create_method("tokenclip", tiny_backbone, sigma=0.0)
    with torch.no_grad():
        out = m._forward(batch["image"])
        p = m.predict(batch)
    fused = 0.5 * out["base"][:, 1] + 0.5 * out["dynamic"][:, 1]
    torch.testing.assert_close(p.anomaly_maps, fused)
    score = 0.5 * out["global_logits"].softmax(-1)[:, 1] + 0.5 * fused.flatten(1).amax(1)
    torch.testing.assert_close(p.image_scores, score)


# -- mpa / mpama ------------------------------------------------------------------------------

def test_mpa_prompt_structure(tiny_backbone) -> None:
    m = create_method("mpa", tiny_backbone)
    W = tiny_backbone.text_width
    assert MPA.default_hparams["levels"] == [1, 2, 3, 4]
    assert (MPA.default_hparams["n_ctx"], MPA.default_hparams["n_shared"]) == (12, 2)
    assert (MPA.default_hparams["hinge_weight"], MPA.default_hparams["hinge_delta_a"],
            MPA.default_hparams["hinge_delta_n"]) == (5.0, 0.5, 0.5)
    assert (MPA.default_hparams["lr"], MPA.default_hparams["epochs"]) == (1e-3, 30)
    assert len(m.template) == 10                                  # 4 levels x 2 + global x 2
    local = m.head.local_contexts()
    assert local.shape == (4, 2, 12, W)
    # the first 2 tokens are shared across levels, the rest differ
    assert torch.equal(local[0, :, :2], local[3, :, :2])
    assert not torch.equal(local[0, :, 2:], local[1, :, 2:])
    assert m.head.bridge[0].in_features == 2 * W
    lt, gt = m.text_features()
    assert lt.shape == (4, 2, tiny_backbone.embed_dim) and gt.shape == (2, tiny_backbone.embed_dim)


def test_mpa_loss_composition_and_inference(tiny_backbone, batch) -> None:
    m = create_method("mpa", tiny_backbone, sigma=0.0)
    torch.manual_seed(0)
    local, gtext = m.text_features()
    glob, tokens = m.level_tokens(batch["image"])
    assert len(tokens) == 4
    maps = m.level_maps(tokens, local, (64, 64))
    ce = F.cross_entropy(two_class_logits(glob, gtext, 0.07), batch["label"])
    seg = sum(segmentation_loss(p, batch["mask"]) for p in maps)
    hinge = sum(hinge_loss(p[:, 1], batch["mask"]) for p in maps)
    torch.testing.assert_close(m.training_loss(batch), ce + seg + 5 * hinge)
    with torch.no_grad():
        pred = m.predict(batch)
    amap = torch.stack([p[:, 1] for p in maps]).mean(0)
    torch.testing.assert_close(pred.anomaly_maps, amap.detach())
    score = 0.5 * two_class_logits(glob, gtext, 0.07).softmax(-1)[:, 1] + 0.5 * amap.flatten(1).amax(1)
    torch.testing.assert_close(pred.image_scores, score.detach())


def test_moe_router_topk_and_experts() -> None:
    torch.manual_seed(0)
    proj = torch.randn(16, 8)
    moe = MoEProjection(proj, n_experts=5, top_k=2)
    assert moe.learnable.shape == (3, 16, 8)                      # 1 frozen + 3 learnable + 1 zero
    e = moe.experts()
    assert torch.equal(e[0], proj) and torch.equal(e[1], proj) and torch.equal(e[3], proj)
    assert torch.equal(e[4], torch.zeros_like(proj))
    assert not moe.frozen.requires_grad and moe.learnable.requires_grad
    x = torch.randn(2, 10, 16)
    g = moe.gates(x)
    assert ((g > 0).sum(-1) == 2).all()
    probs = moe.router(x).softmax(-1)
    torch.testing.assert_close(g.sum(-1), probs.topk(2, -1).values.sum(-1))
    # all experts start as the original projection: output = (gates of non-zero experts) * x @ proj
    out = moe(x)
    torch.testing.assert_close(out, (g[..., :4].sum(-1, keepdim=True)) * (x @ proj), atol=1e-5, rtol=1e-5)
    assert MPAMA.default_hparams["n_experts"] == 5 and MPAMA.default_hparams["router_top_k"] == 2
    assert MPAMA.default_hparams["lr"] == 1e-6 and MPAMA.default_hparams["epochs"] == 10
    four = MoEProjection(proj, n_experts=4, top_k=2)              # VisA setting
    assert four.learnable.shape[0] == 2


def test_mpama_starts_from_mpa_and_freezes_text(tiny_backbone) -> None:
    batches = _toy_batches(64, n_batches=1, batch_size=4)
    torch.manual_seed(0)
    mpa = create_method("mpa", tiny_backbone)
    mpa.fit(batches, epochs=1)
    torch.manual_seed(1)
    mpama = create_method("mpama", tiny_backbone, epochs=1, lr=1e-3)
    assert MPAMA.requires == "mpa"
    mpama.init_from(mpa.state_dict())
    for k, v in mpa.state_dict().items():
        assert torch.equal(mpama.head.mpa.state_dict()[k], v)
    before = {k: v.clone() for k, v in mpama.state_dict().items()}
    mpama.fit(batches, epochs=1)
    after = mpama.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("mpa."))
    assert not torch.equal(after["moe.learnable"], before["moe.learnable"])
    assert torch.equal(after["moe.frozen"], before["moe.frozen"])
    assert mpama.learnable_parameters() == sum(
        p.numel() for p in mpama.head.moe.parameters() if p.requires_grad)
    # state round trip
    fresh = create_method("mpama", tiny_backbone)
    fresh.load_state_dict(after)
    b = batches[0]
    torch.testing.assert_close(fresh.predict(b).anomaly_maps, mpama.predict(b).anomaly_maps)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_and_training_changes_state(name: str, tiny_backbone) -> None:
    batches = _toy_batches(64, n_batches=1, batch_size=4)
    torch.manual_seed(0)
    m = create_method(name, tiny_backbone, epochs=1)
    if m.requires:
        dep = create_method(m.requires, tiny_backbone, epochs=1)
        m.init_from(dep.state_dict())
    before = m.state_dict()
    m.fit(batches, epochs=1)
    after = m.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{name}: fit changed nothing"
    assert all(torch.isfinite(torch.tensor(m.losses)))
    other = create_method(name, tiny_backbone)
    other.load_state_dict(after)
    assert other.state_dict().keys() == after.keys()
    p1, p2 = m.predict(batches[0]), other.predict(batches[0])
    torch.testing.assert_close(p1.anomaly_maps, p2.anomaly_maps)
    torch.testing.assert_close(p1.image_scores, p2.image_scores)
