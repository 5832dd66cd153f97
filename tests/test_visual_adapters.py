"""The visual-adapter family: vand, afclip, afclip_plus (issue 8), and the mosaic augmentation.

Pins: the tapped layers (and their proportional mapping), the aggregation weights (sum to
one, r = 1 is the identity; the released zero-padded variant), the adapter's parameter count,
the loss compositions (AF-CLIP: the released BCE focal, the 0.5-cell rule of its grid targets,
the ``released_grad_bug`` switch), and that AF-CLIP+'s memory bank is drawn with the job's
seed from normal training images only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.afclip import (
    AFCLIP,
    AFCLIPPlus,
    AttentionAdapter,
    aggregate,
    aggregation_kernel,
    gaussian_blur,
    grid_targets,
    patch_alignment_loss,
    released_target_overwrite,
)
from methods.augment import Mosaic
from methods.base import _toy_batches
from methods.losses import dice_loss, focal_loss, focal_loss_bce
from methods.vand import VAND, scale_layers

# -- tapped layers ---------------------------------------------------------------------------


def test_layers_map_proportionally_from_24_blocks():
    paper = [6, 12, 18, 24]
    assert scale_layers(paper, 24) == paper
    assert scale_layers(paper, 12) == [3, 6, 9, 12]
    assert scale_layers(paper, 4) == [1, 2, 3, 4]
    assert scale_layers(paper, 32) == [8, 16, 24, 32]
    assert scale_layers(paper, 2) == [1, 2]          # duplicates dropped, order kept
    assert scale_layers([1], 24) == [1] and scale_layers([1], 4) == [1]  # never block 0


def test_methods_tap_the_mapped_blocks(tiny_backbone, monkeypatch):
    assert tiny_backbone.num_layers == 4
    tapped = []
    original = type(tiny_backbone).encode_image

    def spy(self, images, layers=()):
        tapped.append(list(layers))
        return original(self, images, layers)

    monkeypatch.setattr(type(tiny_backbone), "encode_image", spy)
    batch = _toy_batches(tiny_backbone.image_size, n_batches=1, batch_size=2)[0]
    for cls in (VAND, AFCLIP):
        m = cls(tiny_backbone)
        assert m.layers == [1, 2, 3, 4]
        tapped.clear()
        m.predict(batch)
        assert tapped == [[1, 2, 3, 4]]


# -- aggregation -------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [3, 5])
def test_aggregation_weights_sum_to_one_everywhere(r):
    h = w = 6
    N = h * w
    # one-hot features: the aggregated feature of patch i is the row of weights it uses
    eye = torch.eye(N, dtype=torch.float64)
    tokens = torch.cat([torch.zeros(1, 1, N, dtype=torch.float64), eye[None]], dim=1)
    weights = aggregate(tokens, (h, w), r, sigma=4.0)[0, 1:]        # [N, N]
    assert torch.allclose(weights.sum(dim=1), torch.ones(N, dtype=torch.float64))
    assert (weights >= 0).all()
    # an interior patch uses exactly the normalised Gaussian window, centre included
    k = aggregation_kernel(r, 4.0)
    k = k / k.sum()
    c = (h // 2) * w + w // 2
    grid_row = weights[c].reshape(h, w)
    y0, x0 = h // 2 - r // 2, w // 2 - r // 2
    assert torch.allclose(grid_row[y0:y0 + r, x0:x0 + r], k)
    assert grid_row.sum() == pytest.approx(1.0)
    assert weights[c, c] == pytest.approx(k.max().item())     # the centre weighs most
    # only neighbours within the window contribute
    assert (grid_row > 0).sum() == r * r


def test_aggregation_r1_is_identity_and_class_token_is_kept():
    torch.manual_seed(0)
    tokens = torch.randn(2, 1 + 16, 8)
    assert aggregate(tokens, (4, 4), 1) is tokens
    out = aggregate(tokens, (4, 4), 3)
    assert torch.equal(out[:, 0], tokens[:, 0])
    const = torch.full((1, 17, 3), 2.5)
    assert torch.allclose(aggregate(const, (4, 4), 5), const)  # weights sum to one
    with pytest.raises(ValueError):
        aggregation_kernel(2, 4.0)
    with pytest.raises(ValueError, match="border"):
        aggregate(tokens, (4, 4), 3, border="reflect")


@pytest.mark.parametrize("r", [3, 5])
def test_aggregation_zero_pad_is_the_released_fixed_kernel(r):
    """``border="zero_pad"``: the released ``aggerate_neighbor`` — unfold over a zero-padded
    grid, weights normalised over the whole window — restated here; it differs from the
    suite's renormalised borders by a scale per token, invisible after a LayerNorm."""
    torch.manual_seed(0)
    h = w = 6
    tokens = torch.randn(2, 1 + h * w, 5, dtype=torch.float64)
    k = aggregation_kernel(r, 4.0)
    k = (k / k.sum()).reshape(1, r * r, 1)
    x = tokens[:, 1:].reshape(2, h, w, 5).permute(0, 3, 1, 2)
    x = F.unfold(x, kernel_size=r, padding=r // 2)                      # [B, C*r*r, N]
    x = x.permute(0, 2, 1).reshape(-1, 5, r * r).permute(0, 2, 1)       # [B*N, r*r, C]
    want = torch.cat([tokens[:, :1], (x * k).sum(1).reshape(2, h * w, 5)], dim=1)
    got = aggregate(tokens, (h, w), r, 4.0, border="zero_pad")
    assert torch.allclose(got, want, atol=1e-12)
    inner = aggregate(tokens, (h, w), r, 4.0)
    interior = [(i * w + j) + 1 for i in range(r // 2, h - r // 2) for j in range(r // 2, w - r // 2)]
    assert torch.allclose(got[:, interior], inner[:, interior], atol=1e-12)
    assert not torch.allclose(got[:, 1], inner[:, 1])                  # a corner shrinks
    # ... by a positive scale per token, which the adapter's LayerNorm and cosines remove
    ratio = got[:, 1:] / inner[:, 1:]
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio)) and (ratio > 0).all()
    adapter = AttentionAdapter(5, 2, 4).double()
    with torch.no_grad():
        assert torch.allclose(adapter(got), adapter(inner), atol=1e-4)
    assert torch.allclose(F.normalize(got, dim=-1), F.normalize(inner, dim=-1), atol=1e-12)


# -- adapter -------------------------------------------------------------------------------------


@pytest.mark.parametrize("width,heads,head_dim", [(1024, 8, 64), (128, 8, 64), (64, 2, 16)])
def test_adapter_parameter_count_formula(width, heads, head_dim):
    adapter = AttentionAdapter(width, heads, head_dim)
    n = sum(p.numel() for p in adapter.parameters())
    assert n == AttentionAdapter.parameter_count(width, heads, head_dim)
    assert n == 4 * width * heads * head_dim + 3 * width
    if (width, heads, head_dim) == (1024, 8, 64):
        assert n == 2_100_224  # ViT-L/14: the released adapter


def test_learnable_parameters_of_the_family(tiny_backbone):
    bb = tiny_backbone
    af = AFCLIP(bb)
    assert af.learnable_parameters() == (AttentionAdapter.parameter_count(bb.width, 8, 64)
                                         + 12 * bb.text_width)
    vand = VAND(bb)
    assert vand.learnable_parameters() == 4 * (bb.width * bb.embed_dim + bb.embed_dim)


def test_adapter_attends_over_all_tokens():
    torch.manual_seed(0)
    adapter = AttentionAdapter(16, 2, 8)
    x = torch.randn(1, 5, 16)
    y = adapter(x)
    x2 = x.clone()
    x2[0, 4] += torch.randn(16)  # (a constant shift would vanish in the LayerNorm)
    assert not torch.allclose(adapter(x2)[0, 0], y[0, 0])   # CLS sees the patches


# -- losses ---------------------------------------------------------------------------------------


def _pal_bruteforce(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 14 literally, pairs within each image, pooled over the batch."""
    z = F.normalize(z, dim=-1)
    na, same = [], []
    for zi, mi in zip(z, mask, strict=True):
        sim = zi @ zi.T
        lab = mi > 0.5
        diff = lab[:, None] != lab[None, :]
        na.append(sim[diff])
        same.append(sim[~diff])
    na, same = torch.cat(na), torch.cat(same)
    if na.numel() == 0:
        return torch.zeros(())
    return F.relu(na.mean() - same.mean())


def test_patch_alignment_loss_is_eq14():
    torch.manual_seed(0)
    z = torch.randn(3, 20, 8, dtype=torch.float64)
    mask = torch.zeros(3, 20, dtype=torch.float64)
    mask[0, :5] = 1
    mask[2, 7:9] = 1
    # pull anomalous features towards the normal ones so the hinge is active
    z2 = z.clone()
    z2[mask > 0] = z[mask == 0][: int(mask.sum())] * 0.9
    for feats in (z, z2):
        got = patch_alignment_loss([feats, feats * 2], mask)
        assert torch.allclose(got, _pal_bruteforce(feats, mask))
    assert patch_alignment_loss([z], torch.zeros(3, 20)) == 0   # no N-A pair
    assert patch_alignment_loss([z], torch.ones(3, 20)) == 0


def test_patch_alignment_loss_leaves_half_cells_out():
    """Cells of 0.5 are in no pair, as in the released code: with labels 0 -> -1, 0.5, 1 its
    pair mask is the outer product, N-A pairs where it is -1 and same-kind pairs where it is 1."""
    torch.manual_seed(0)
    mask = torch.zeros(2, 12, dtype=torch.float64)
    mask[0, :3] = 1
    mask[0, 3:5] = 0.5
    mask[1, 6] = 0.5
    v = torch.randn(8, dtype=torch.float64)
    noise = torch.randn(2, 12, 8, dtype=torch.float64)
    # anomalous features closer to the common direction than normal ones: the hinge is active;
    # the 0.5 cells point away, so counting them anywhere would move both means
    scale = torch.where(mask == 1, 0.1, 1.0)[..., None]
    z = torch.where((mask == 0.5)[..., None], -v, v + scale * noise)
    zs = [z, z + 0.3 * torch.randn_like(z)]
    labels = torch.where(mask == 0, -torch.ones_like(mask), mask)
    pair = labels[:, :, None] * labels[:, None, :]
    want = 0
    for feats in zs:
        zn = F.normalize(feats, dim=-1)
        sim = zn @ zn.transpose(1, 2)
        want = want + F.relu(sim[pair == -1].mean() - sim[pair == 1].mean())
    got = patch_alignment_loss(zs, mask)
    assert got > 1e-3
    assert torch.allclose(got, want / 2)
    assert not torch.allclose(got, patch_alignment_loss(zs, (mask > 0.5).double()))


def test_grid_targets_keep_half_at_a_mid_patch_edge():
    """The released rule: bilinear to the grid, < 0.5 -> 0, > 0.5 -> 1, exactly 0.5 kept."""
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 12:] = 1          # an edge in the middle of grid column 1 (pixels 8..15)
    mask[:, 40:, :] = 1          # an edge on a patch border (row 5 starts at pixel 40)
    gt = grid_targets(mask, (8, 8))
    bilinear = F.interpolate(mask[:, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    assert bilinear[0, 1] == 0.5                            # pixels 11 and 12, weights 1/2
    assert gt[0, 0, 1] == 0.5 and gt[0, 4, 1] == 0.5        # kept (the suite used to zero it)
    assert (gt[0, :5, 0] == 0).all() and (gt[0, :5, 2:] == 1).all() and (gt[0, 5:] == 1).all()
    assert set(gt.unique().tolist()) == {0.0, 0.5, 1.0}
    assert torch.equal(gt, torch.where(bilinear < 0.5, 0.0, torch.where(bilinear > 0.5, 1.0,
                                                                         bilinear))[None])
    odd = torch.rand(1, 64, 64)
    g = grid_targets(odd, (8, 8))
    b = F.interpolate(odd[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(g, torch.where(b < 0.5, 0.0, torch.where(b > 0.5, 1.0, b)))


def _bce_focal_by_hand(p: torch.Tensor, y: torch.Tensor, gamma: float = 4.0) -> torch.Tensor:
    """AF-CLIP's main.py focal_loss: BCE(p, y) (1 - p_t)^gamma, p_t = p y + (1 - p)(1 - y)."""
    bce = -(y * p.clamp_min(1e-44).log().clamp_min(-100)
            + (1 - y) * (1 - p).clamp_min(1e-44).log().clamp_min(-100))
    p_t = p * y + (1 - p) * (1 - y)
    return (bce * (1 - p_t) ** gamma).mean()


def test_afclip_loss_composition(tiny_backbone):
    torch.manual_seed(0)
    batch = _toy_batches(tiny_backbone.image_size, n_batches=1, batch_size=4)[0]
    batch["mask"][1, :, :] = 0
    batch["mask"][1, 20:44, 12:36] = 1       # edges at mid-patch (pixel 4 of 8): 0.5 cells
    m = AFCLIP(tiny_backbone)
    parts = m.losses(batch)
    assert torch.allclose(parts["total"], parts["cls"] + parts["seg"] + parts["pal"])
    # recompute every term from the model's own outputs
    with torch.no_grad():
        p_cls, p_map, _, z, grid = m.zero_shot(batch["image"])
        gt = F.interpolate(batch["mask"][:, None], size=grid, mode="bilinear")[:, 0]
        gt = torch.where(gt < 0.5, 0.0, torch.where(gt > 0.5, 1.0, gt))   # 0.5 kept
        assert (gt == 0.5).sum() > 0
        cls = _bce_focal_by_hand(p_cls, batch["label"].float())
        seg = _bce_focal_by_hand(p_map, gt) + (p_map - gt).abs().mean()
        pal = patch_alignment_loss([t[:, 1:] for t in z], gt.flatten(1))
    assert torch.allclose(parts["cls"], cls) and torch.allclose(parts["seg"], seg)
    assert torch.allclose(parts["pal"], pal)
    # the weights of Eq. 15
    m2 = AFCLIP(tiny_backbone, lambda1=0.5, lambda2=3.0)
    m2.head.load_state_dict(m.head.state_dict())
    p2 = m2.losses(batch)
    assert torch.allclose(p2["total"], p2["cls"] + 0.5 * p2["seg"] + 3.0 * p2["pal"])
    # the label-smoothed focal of AnomalyCLIP stays available (the suite's former loss)
    m3 = AFCLIP(tiny_backbone, focal_variant="smoothed")
    m3.head.load_state_dict(m.head.state_dict())
    with torch.no_grad():
        want = focal_loss(torch.stack([1 - p_cls, p_cls], 1), batch["label"].float(), gamma=4.0)
        assert torch.allclose(m3.losses(batch)["cls"], want)
    with pytest.raises(ValueError, match="focal_variant"):
        AFCLIP(tiny_backbone, focal_variant="plain")
    # every learnable tensor receives a gradient (adapter and prompts)
    m.head.zero_grad()
    parts["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.head.parameters())


def test_released_target_overwrite_gives_the_released_focal_gradient():
    """The mechanism of the released bug on the focal alone: the value is unchanged, backward
    differentiates BCE and p*y with y' = -1 at y = 0 while (1 - y), (1 - p_t)^gamma and the
    BCE value keep the forward y:
        dL/dp = [ w (p - y') / (p (1 - p)) - ce * gamma (1 - p_t)^(gamma-1) (y' - (1 - y)) ] / n
    """
    torch.manual_seed(0)
    p = torch.rand(3, 4, 4, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_()
    y = (torch.rand(3, 4, 4, dtype=torch.float64) > 0.6).double()
    y[0, 0, 0] = 0.5
    clean = focal_loss_bce(p, y.clone())
    (g_clean,) = torch.autograd.grad(clean, p)
    target = y.clone()
    loss = focal_loss_bce(p, target)
    released_target_overwrite(target)
    assert torch.equal(target, torch.where(y == 0, -1.0, y))       # the released new_gts
    assert loss.item() == clean.item()
    (g_bug,) = torch.autograd.grad(loss, p)
    pd = p.detach()
    y2 = torch.where(y == 0, -1.0, y)
    ce = -(y * pd.log() + (1 - y) * (1 - pd).log())
    p_t = pd * y + (1 - pd) * (1 - y)
    w = (1 - p_t) ** 4
    want = (w * (pd - y2) / (pd * (1 - pd)) - ce * 4 * (1 - p_t) ** 3 * (y2 - (1 - y))) / p.numel()
    assert torch.allclose(g_bug, want, atol=1e-12)
    assert torch.allclose(g_clean[y != 0], g_bug[y != 0])            # anomalous and 0.5 cells
    assert not torch.allclose(g_clean[y == 0], g_bug[y == 0])


def test_afclip_released_grad_bug_switch(tiny_backbone):
    """Same loss values either way; on, the released gradient (target -1 at normal cells)."""
    torch.manual_seed(0)
    batch = _toy_batches(tiny_backbone.image_size, n_batches=1, batch_size=4)[0]
    grads, values = {}, {}
    for bug in (False, True):
        m = AFCLIP(tiny_backbone, released_grad_bug=bug)
        torch.manual_seed(1)
        m.head.load_state_dict(AFCLIP(tiny_backbone).head.state_dict())
        parts = m.losses(batch)
        values[bug] = {k: v.item() for k, v in parts.items()}
        parts["total"].backward()
        grads[bug] = torch.cat([p.grad.flatten() for p in m.head.parameters()])
    assert values[False] == values[True]
    assert not torch.allclose(grads[False], grads[True])
    r = torch.corrcoef(torch.stack([grads[False], grads[True]]))[0, 1]
    assert 0.5 < r < 0.99999


def test_vand_loss_is_focal_plus_dice_per_stage(tiny_backbone):
    torch.manual_seed(0)
    batch = _toy_batches(tiny_backbone.image_size, n_batches=1, batch_size=2)[0]
    m = VAND(tiny_backbone)
    probs, _ = m.stage_probs(batch["image"], m.batch_text(batch))
    assert len(probs) == 4 and probs[0].shape == (2, 2, 64, 64)
    gt = batch["mask"]
    want = sum(focal_loss(p, gt) + dice_loss(p[:, 1], gt) for p in probs)
    assert torch.allclose(m.loss(probs, gt), want)


# -- inference details ------------------------------------------------------------------------------


def test_gaussian_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    maps = rng.random((2, 20, 24)).astype(np.float64)
    for sigma in (1.0, 4.0):
        got = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
        want = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in maps])
        np.testing.assert_allclose(got, want, atol=1e-10)


def test_afclip_plus_memory_of_a_reference_scores_it_zero(tiny_backbone):
    torch.manual_seed(0)
    batch = _toy_batches(tiny_backbone.image_size, n_batches=1, batch_size=3)[0]
    m = AFCLIPPlus(tiny_backbone)
    with pytest.raises(RuntimeError, match="set_support"):
        m.predict(batch)
    support = {k: (v[:1] if hasattr(v, "shape") else v[:1]) for k, v in batch.items()}
    m.set_support(support)
    assert len(m.memory) == 4 * 3 and m.memory[0].shape == (64, tiny_backbone.width)
    sets, grid = m.aggregated(batch["image"])
    A = m.memory_scores(sets)
    assert A.shape == (3, 64)
    assert A[0].abs().max() < 1e-5 and (A[1:] > 1e-4).any()
    # Eq. 18 with α = β = 0.1 on top of the zero-shot scores
    zs = AFCLIP(tiny_backbone)
    zs.head.load_state_dict(m.head.state_dict())
    with torch.no_grad():
        p_cls, p_map, *_ = zs.zero_shot(batch["image"])
    pred = m.predict(batch)
    assert torch.allclose(pred.image_scores, A.amax(1) + 0.1 * p_cls, atol=1e-6)
    want_map = zs.finish_map(A.reshape(-1, *grid) + 0.1 * p_map, (64, 64))
    assert torch.allclose(pred.anomaly_maps, want_map, atol=1e-6)


# -- the memory bank's references (runner + afclip_plus) -------------------------------------------


@pytest.fixture()
def target_copy(demo_data_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(demo_data_root, dst)
    return dst


def test_memory_bank_references_are_seeded_normal_train_images(tiny_backbone, tmp_path, target_copy):
    from bench.runner import Job, Runner, prepare_protocol
    from tests.conftest import write_protocol

    proto = prepare_protocol(str(write_protocol(tmp_path / "p.toml", methods='["afclip_plus"]',
                                                extra="[few_shot]\nafclip_plus = [1, 2]\n")))

    class Spy(AFCLIPPlus):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.support_paths: list[tuple[str, tuple[str, ...]]] = []
            self.banks: list[list[torch.Tensor]] = []
            self.evaluated: set[str] = set()

        def set_support(self, batch):
            self.support_paths.append((batch["category"][0], tuple(batch["path"])))
            assert set(batch["category"]) == {batch["category"][0]}
            assert batch["label"].eq(0).all()
            super().set_support(batch)
            self.banks.append([b.clone() for b in self.memory])

        def predict(self, batch):
            self.evaluated.update(batch["path"])
            return super().predict(batch)

    runner = Runner(proto, tmp_path / "R", target_copy, progress=False)
    target = runner.dataset("demo_target")
    man = target.manifest
    train_normal = man[(man["split"] == "train") & (man["label"] == 0)]

    def run(seed: int, shots: int) -> Spy:
        m = Spy(tiny_backbone)
        runner.evaluate(m, Job("afclip_plus", "demo_aux", seed, ("demo_target",), shots=shots),
                        target)
        return m

    a = run(0, 2)
    assert len(a.support_paths) == man["category"].nunique()
    for cat, paths in a.support_paths:
        assert len(paths) == 2
        allowed = set(train_normal[train_normal["category"] == cat]["image"])
        assert set(paths) <= allowed
    support = {p for _, ps in a.support_paths for p in ps}
    assert a.evaluated == set(man[man["split"] == "test"]["image"])
    assert not support & a.evaluated
    # the bank holds the features of exactly those references
    b = run(0, 2)
    assert b.support_paths == a.support_paths
    for x, y in zip(a.banks, b.banks, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))
    assert a.banks[0][0].shape[0] == 2 * tiny_backbone.grid_size ** 2
    # another seed draws other references somewhere
    others = [run(s, 1).support_paths for s in (1, 2, 3)]
    assert len({tuple(o) for o in others}) > 1


# -- mosaic augmentation --------------------------------------------------------------------------


def _batch(n: int = 4, S: int = 16, cats=("a", "a", "b", "b"), dataset: str = "mvtec"):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(n, 3, S, S, generator=g),
            "mask": (torch.rand(n, S, S, generator=g) > 0.7).float(),
            "label": torch.tensor([0, 1, 0, 1][:n]), "category": list(cats)[:n],
            "prompt_name": list(cats)[:n], "dataset": [dataset] * n, "domain": ["industrial"] * n}


def test_mosaic_is_seeded_and_composes_quadrants():
    b = _batch()
    out1 = Mosaic(1.0, seed=3)(b)
    out2 = Mosaic(1.0, seed=3)(b)
    assert torch.equal(out1["image"], out2["image"]) and torch.equal(out1["mask"], out2["mask"])
    assert not torch.equal(out1["image"], b["image"])           # every image replaced
    assert torch.equal(b["image"], _batch()["image"])           # input untouched
    m = Mosaic(1.0, seed=3)
    m(b)
    tiles = {c: [t[0] for t in pool] for c, pool in m.pool.items()}
    # each quadrant of an "a" image is one of the "a" tiles
    for i, cat in enumerate(b["category"]):
        for r in range(2):
            for c in range(2):
                q = out1["image"][i, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]
                assert any(torch.allclose(q, t) for t in tiles[cat])
    assert set(out1["mask"].unique().tolist()) <= {0.0, 1.0}
    assert Mosaic(1.0, seed=4)(b)["image"].ne(out1["image"]).any()


def test_mosaic_rate_and_exclusions():
    b = _batch()
    assert Mosaic(0.0, seed=0)(b) is b
    assert Mosaic(1.0, seed=0)(_batch(dataset="visa")) ["image"].equal(b["image"])
    n = sum(Mosaic(0.2, seed=s)(b)["image"].ne(b["image"]).flatten(1).any(1).sum().item()
            for s in range(50))
    assert 20 < n < 60                                        # ≈ 0.2 · 4 · 50 = 40
    with pytest.raises(ValueError):
        Mosaic(1.5)
