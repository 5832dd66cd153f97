"""Tests of methods.losses: focal (both variants), dice, hinge with margins, orthogonality."""

from __future__ import annotations

import math

import pytest
import torch

from methods import losses


def test_focal_matches_closed_form() -> None:
    p = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])          # [N, C]
    t = torch.tensor([0, 1, 1])
    probs = p.T.reshape(1, 2, 3, 1)                                     # [B, C, H, W]
    target = t.reshape(1, 3, 1)
    pt = torch.tensor([0.9, 0.7, 0.4])
    expected = (-(1 - pt) ** 2 * pt.log()).mean()
    got = losses.focal_loss(probs, target, smooth=0.0)
    assert torch.allclose(got, expected, atol=1e-6)
    # gamma = 0 is cross-entropy on probabilities
    assert torch.allclose(losses.focal_loss(probs, target, gamma=0.0, smooth=0.0),
                          (-pt.log()).mean(), atol=1e-6)


def test_focal_is_small_for_confident_correct_and_finite_for_zero_prob() -> None:
    mask = torch.zeros(2, 4, 4)
    mask[:, :2] = 1
    perfect = torch.stack([1 - mask, mask], dim=1)
    assert losses.focal_loss(perfect, mask) < 1e-6
    wrong = torch.stack([mask, 1 - mask], dim=1)
    v = losses.focal_loss(wrong, mask)
    assert torch.isfinite(v) and v > 1.0


def test_focal_alpha_weights() -> None:
    probs = torch.full((1, 2, 2, 2), 0.5)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    base = losses.focal_loss(probs, mask, smooth=0.0)
    weighted = losses.focal_loss(probs, mask, alpha=torch.tensor([1.0, 3.0]), smooth=0.0)
    assert torch.allclose(weighted, base * (3 + 3 * 1) / 4, atol=1e-6)


# -- the two focal variants, pinned per method ------------------------------------------------
#
# p = the probability given to the true class, C = 2 classes, smooth s = 1e-5.
#
# "smoothed" (AnomalyCLIP's and VAND's loss.py FocalLoss, gamma = 2): the one-hot target is
# clamped to [s, 1 - s] and p_t offset by s:
#     p_t = (1 - s) p + s (1 - p) + s,      loss = -(1 - p_t)^gamma * ln(p_t)
# "bce" (AF-CLIP's main.py focal_loss, gamma = 4):
#     loss = BCE(p_anomalous, y) * (1 - p_t)^gamma = -(1 - p)^gamma * ln(p)
#
# At p = 1e-12: smoothed p_t = 2e-5 - 1e-17 (+ 1e-12 (1 - s)), loss ~ -ln(2e-5) = 10.82 (the
# saturation); bce: -ln(1e-12) = 27.63.

SMOOTH = 1e-5
P_TRUE = [1e-12, 1e-3, 0.5]


def smoothed_by_hand(p: float, gamma: float) -> float:
    pt = (1 - SMOOTH) * p + SMOOTH * (1 - p) + SMOOTH
    return -((1 - pt) ** gamma) * math.log(pt)


def bce_by_hand(p: float, gamma: float) -> float:
    return -((1 - p) ** gamma) * math.log(p)


PINNED = {  # (variant, gamma, p) -> value, from the formulas above
    ("smoothed", 2.0, 1e-12): 10.819346,
    ("smoothed", 2.0, 1e-3): 6.873928,
    ("smoothed", 2.0, 0.5): 0.173275,
    ("bce", 4.0, 1e-12): 27.631021,
    ("bce", 4.0, 1e-3): 6.880166,
    ("bce", 4.0, 0.5): 0.043322,
}


def _two_class(p_true: float, target: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """probs [1, 2, 1, 1] (float64) giving the true class ``p_true``, the target [1, 1, 1], and
    the true-class probability as float64 stores it (1 - (1 - p) is not exactly p)."""
    p_anom = p_true if target == 1 else 1.0 - p_true
    probs = torch.tensor([1.0 - p_anom, p_anom], dtype=torch.float64).reshape(1, 2, 1, 1)
    stored = float(probs[0, target])
    return probs, torch.full((1, 1, 1), float(target), dtype=torch.float64), stored


@pytest.mark.parametrize("target", [1, 0])
@pytest.mark.parametrize("p", P_TRUE)
def test_focal_variants_match_hand_formulas(p: float, target: int) -> None:
    probs, y, stored = _two_class(p, target)
    # smoothed (the default of focal_loss, and segmentation_loss's)
    want = smoothed_by_hand(stored, 2.0)
    for got in (losses.focal_loss(probs, y, gamma=2.0),
                losses.focal_loss(probs, y, gamma=2.0, variant="smoothed"),
                losses.focal_loss_smoothed(probs, y, gamma=2.0)):
        assert float(got) == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(PINNED[("smoothed", 2.0, p)], rel=1e-5, abs=1e-6)
    # bce (AF-CLIP)
    want = bce_by_hand(stored, 4.0)
    for got in (losses.focal_loss_bce(probs[:, 1], y, gamma=4.0),
                losses.focal_loss(probs, y, gamma=4.0, variant="bce")):
        assert float(got) == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(PINNED[("bce", 4.0, p)], rel=1e-4, abs=1e-6)


def test_smoothed_focal_saturates_where_bce_keeps_growing() -> None:
    """The issue's numbers: at p_true = 1e-12 the smoothed loss is stuck at -ln(2e-5) with a
    vanishing gradient; the BCE focal is -ln(1e-12) and its gradient is -1/p."""
    p = torch.tensor([1e-12], dtype=torch.float64, requires_grad=True)
    y = torch.ones(1, dtype=torch.float64)
    sm = losses.focal_loss(torch.stack([1 - p, p], 1), y, gamma=4.0)
    assert sm.item() == pytest.approx(-math.log(2e-5), rel=1e-3)          # 10.82
    (g_sm,) = torch.autograd.grad(sm, p)
    bce = losses.focal_loss_bce(p, y, gamma=4.0)
    assert bce.item() == pytest.approx(27.631, abs=1e-3)
    (g_bce,) = torch.autograd.grad(bce, p)
    assert abs(float(g_sm)) < 1e-3 * abs(float(g_bce))
    assert float(g_bce) == pytest.approx(-1e12, rel=1e-6)


def test_bce_focal_soft_targets_and_alpha() -> None:
    p = torch.tensor([0.2, 0.7], dtype=torch.float64)
    y = torch.tensor([0.5, 0.5], dtype=torch.float64)
    # y = 0.5: BCE = -(ln p + ln(1 - p)) / 2, p_t = 1/2 whatever p is
    want = (-(p.log() + (1 - p).log()) / 2 * 0.5 ** 4).mean()
    assert torch.allclose(losses.focal_loss_bce(p, y), want)
    y01 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    base = torch.tensor([bce_by_hand(0.2, 4.0), bce_by_hand(0.3, 4.0)], dtype=torch.float64)
    assert torch.allclose(losses.focal_loss_bce(p, y01), base.mean())
    weighted = losses.focal_loss_bce(p, y01, alpha=0.25)
    assert float(weighted) == pytest.approx((0.25 * base[0] + 0.75 * base[1]).item() / 2)
    with pytest.raises(ValueError, match="variant"):
        losses.focal_loss(torch.stack([1 - p, p], 1), y01, variant="plain")
    with pytest.raises(ValueError, match="binary"):
        losses.focal_loss(torch.rand(2, 3), torch.zeros(2), variant="bce")


METHOD_FOCALS = [  # method, its released code's focal variant, gamma
    ("anomalyclip", "smoothed", 2.0),
    ("vand", "smoothed", 2.0),
    ("tokenclip", "smoothed", 2.0),
    ("tokenclip_van", "smoothed", 2.0),
    ("mpa", "smoothed", 2.0),
    ("mpama", "smoothed", 2.0),
    ("afclip", "bce", 4.0),
    ("afclip_plus", "bce", 4.0),
]


@pytest.mark.parametrize("name,variant,gamma", METHOD_FOCALS)
def test_each_method_declares_its_released_focal(name: str, variant: str, gamma: float) -> None:
    from bench.registry import METHODS

    cls = METHODS.get(name)
    assert losses.FOCAL_VARIANTS[name] == variant
    assert float(cls.default_hparams["focal_gamma"]) == gamma
    if "focal_variant" in cls.default_hparams:
        assert cls.default_hparams["focal_variant"] == variant


@pytest.mark.parametrize("p", P_TRUE)
def test_each_methods_loss_path_uses_its_focal(p: float, tiny_backbone) -> None:
    """Through the code each method trains with: AnomalyCLIP's segmentation_loss (also
    TokenCLIP's and MPA's) and VAND.loss minus their Dice terms are the smoothed focal;
    AFCLIP.focal is the BCE focal."""
    from methods.afclip import AFCLIP
    from methods.vand import VAND

    probs, y, stored = _two_class(p, 1)
    y2 = y.reshape(1, 1, 1)
    dice_a = losses.dice_loss(probs[:, 1], y2)
    dice_n = losses.dice_loss(probs[:, 0], 1 - y2)
    smoothed = smoothed_by_hand(stored, 2.0)
    seg = losses.segmentation_loss(probs, y2, gamma=2.0)
    assert float(seg - dice_a - dice_n) == pytest.approx(smoothed, rel=1e-9)
    vand = VAND(tiny_backbone)
    assert float(vand.loss([probs], y2) - dice_a) == pytest.approx(smoothed, rel=1e-9)
    af = AFCLIP(tiny_backbone)
    assert float(af.focal(probs[:, 1], y2)) == pytest.approx(bce_by_hand(stored, 4.0), rel=1e-12)
    old = AFCLIP(tiny_backbone, focal_variant="smoothed")
    assert float(old.focal(probs[:, 1], y2)) == pytest.approx(smoothed_by_hand(stored, 4.0),
                                                             rel=1e-9)


def test_dice_loss_values() -> None:
    y = torch.zeros(2, 8, 8)
    y[:, :4] = 1
    assert losses.dice_loss(y, y, smooth=0.0) == pytest.approx(0.0, abs=1e-7)
    assert losses.dice_loss(1 - y, y, smooth=0.0) == pytest.approx(1.0, abs=1e-7)
    half = torch.full_like(y, 0.5)
    # 2 * 0.5*32 / (32 + 32) = 0.5
    assert losses.dice_loss(half, y, smooth=0.0) == pytest.approx(0.5, abs=1e-6)
    # smoothing keeps an empty prediction of an empty mask at zero loss
    assert losses.dice_loss(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)) == pytest.approx(0.0)


def test_segmentation_loss_is_focal_plus_two_dice() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 6, 6, generator=g)
    probs = logits.softmax(1)
    mask = (torch.rand(3, 6, 6, generator=g) > 0.7).float()
    expected = (losses.focal_loss(probs, mask) + losses.dice_loss(probs[:, 1], mask)
                + losses.dice_loss(probs[:, 0], 1 - mask))
    assert torch.allclose(losses.segmentation_loss(probs, mask), expected)


def test_losses_backprop() -> None:
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    mask = (torch.rand(2, 4, 4) > 0.5).float()
    losses.segmentation_loss(logits.softmax(1), mask).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert not math.isnan(float(logits.grad.abs().sum()))


def test_hinge_loss_margins() -> None:
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    scores = torch.tensor([[0.2, 0.7, 0.9, 0.1]])
    # normal: mean(max(0.2-0.5,0), max(0.7-0.5,0)) = 0.1; anomalous: mean(0, 0.4) = 0.2
    assert losses.hinge_loss(scores, mask) == pytest.approx(0.3, abs=1e-6)
    # other margins
    assert losses.hinge_loss(scores, mask, delta_n=0.1, delta_a=0.95) == pytest.approx(
        (0.1 + 0.6) / 2 + (0.05 + 0.85) / 2, abs=1e-6)
    # separated beyond the margins -> zero; a set that is empty contributes nothing
    assert losses.hinge_loss(torch.tensor([[0.1, 0.4, 0.6, 0.9]]), mask) == 0
    assert losses.hinge_loss(torch.tensor([[0.7, 0.9]]), torch.zeros(1, 2)) == pytest.approx(0.3)
    assert losses.hinge_loss(torch.tensor([[0.2]]), torch.ones(1, 1)) == pytest.approx(0.3)


def test_hinge_loss_gradient_only_on_violations() -> None:
    scores = torch.tensor([[0.2, 0.7, 0.9, 0.1]], requires_grad=True)
    losses.hinge_loss(scores, torch.tensor([[0.0, 0.0, 1.0, 1.0]])).backward()
    assert torch.allclose(scores.grad, torch.tensor([[0.0, 0.5, 0.0, -0.5]]))


def test_orthogonality_loss_zero_for_orthogonal_inputs() -> None:
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    ortho = q[:4] * torch.tensor([[2.0], [0.5], [3.0], [1.0]])   # orthogonal, any norms
    assert losses.orthogonality_loss(ortho) == pytest.approx(0.0, abs=1e-10)
    assert losses.orthogonality_loss(torch.stack([ortho, ortho[[1, 0, 3, 2]]])) == pytest.approx(0.0, abs=1e-10)
    assert losses.orthogonality_loss(ortho, reduction="mean") == pytest.approx(0.0, abs=1e-10)


def test_orthogonality_loss_values() -> None:
    same = torch.ones(3, 8)               # all cosines 1: 6 off-diagonal entries of 1
    assert losses.orthogonality_loss(same) == pytest.approx(6.0)
    assert losses.orthogonality_loss(same, reduction="mean") == pytest.approx(1.0)
    two = torch.tensor([[1.0, 0.0], [1.0, 1.0]])   # cos 45 deg: 2 * 0.5
    assert losses.orthogonality_loss(two) == pytest.approx(1.0, abs=1e-6)
    x = torch.randn(2, 3, 8, requires_grad=True)
    losses.orthogonality_loss(x).backward()
    assert torch.isfinite(x.grad).all()
