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
