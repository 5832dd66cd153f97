"""Tests of methods.losses: focal, dice, hinge with margins, orthogonality regulariser."""

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
