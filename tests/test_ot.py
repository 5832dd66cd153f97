"""Tests of methods.ot.sinkhorn against POT, its marginals, autograd, and a benchmark."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from methods.ot import sinkhorn, uniform_marginals


def _problem(B: int, N: int, K: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(B, N, K, generator=g, dtype=dtype)
    a = torch.rand(B, N, generator=g, dtype=dtype) + 0.1
    b = torch.rand(B, K, generator=g, dtype=dtype) + 0.1
    return cost, a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5])
def test_same_plan_as_pot_sinkhorn_log(eps: float) -> None:
    cost, a, b = _problem(3, 30, 4)
    plan = sinkhorn(cost, a, b, eps, n_iter=2000)
    for i in range(cost.shape[0]):
        ref = ot.sinkhorn(a[i].numpy(), b[i].numpy(), cost[i].numpy(), eps,
                          method="sinkhorn_log", numItermax=5000, stopThr=1e-14)
        np.testing.assert_allclose(plan[i].numpy(), ref, atol=1e-5, rtol=0)


def test_same_iterates_as_pot_for_a_fixed_iteration_count() -> None:
    """stopThr=0 makes POT run exactly numItermax iterations: identical plans, not just the limit."""
    cost, a, b = _problem(2, 20, 3, seed=1)
    for n_iter in (1, 7, 50):
        plan = sinkhorn(cost, a, b, 0.01, n_iter=n_iter)
        for i in range(2):
            ref = ot.sinkhorn(a[i].numpy(), b[i].numpy(), cost[i].numpy(), 0.01,
                              method="sinkhorn_log", numItermax=n_iter, stopThr=0.0)
            np.testing.assert_allclose(plan[i].numpy(), ref, atol=1e-10, rtol=1e-7)


def test_marginals_of_the_plan_tokenclip_setting() -> None:
    """Uniform marginals, cosine-distance costs, eps = 0.01, 100 iterations (TokenCLIP §4)."""
    g = torch.Generator().manual_seed(0)
    B, N, K = 4, 64, 3
    v = torch.nn.functional.normalize(torch.randn(B, N, 16, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(B, K, 16, generator=g), dim=-1)
    cost = 1 - v @ t.transpose(1, 2)
    a, b = uniform_marginals(B, N, K)
    plan = sinkhorn(cost, a, b, 0.01, n_iter=100)
    assert plan.shape == (B, N, K) and plan.dtype == torch.float32
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(2), a, atol=1e-6, rtol=0)     # exact after a row update
    torch.testing.assert_close(plan.sum(1), b, atol=1e-2 / K, rtol=0)  # columns: within 1 %
    plan = sinkhorn(cost, a, b, 0.01, n_iter=1000)
    torch.testing.assert_close(plan.sum(1), b, atol=1e-5, rtol=0)     # ... and converging
    torch.testing.assert_close(plan.sum((1, 2)), torch.ones(B), atol=1e-5, rtol=0)


def test_unbatched_and_small_eps_stable() -> None:
    cost, a, b = _problem(1, 10, 5, dtype=torch.float32)
    plan = sinkhorn(cost[0], a[0], b[0], 1e-4, n_iter=200)
    assert plan.shape == (10, 5) and torch.isfinite(plan).all()
    with pytest.raises(ValueError):
        sinkhorn(cost, a, b, 0.0)
    with pytest.raises(ValueError):
        sinkhorn(cost, a[:, :3], b, 0.1)


def test_autograd_flows_to_cost() -> None:
    cost, a, b = _problem(2, 12, 3, dtype=torch.float32)
    cost.requires_grad_(True)
    plan = sinkhorn(cost, a, b, 0.1, n_iter=30)
    (plan * torch.randn_like(plan)).sum().backward()
    assert cost.grad is not None and torch.isfinite(cost.grad).all() and cost.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda c: sinkhorn(c, a.double(), b.double(), 0.5, 10),
                                    (cost.detach().double().requires_grad_(True),))


def _pot_loop(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, n_iter: int):
    return np.stack([ot.sinkhorn(a[i].numpy(), b[i].numpy(), cost[i].numpy(), eps,
                                 method="sinkhorn_log", numItermax=n_iter, stopThr=0.0)
                     for i in range(cost.shape[0])])


@pytest.mark.parametrize("impl", ["torch_batched", "pot_loop"])
def test_benchmark_sinkhorn(benchmark, impl: str) -> None:
    """8 images x 1369 tokens (518 px ViT-L/14) x 3 subspaces, eps 0.01, 100 iterations."""
    B, N, K = 8, 1369, 3
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(B, N, K, generator=g, dtype=torch.float64)
    a, b = uniform_marginals(B, N, K, dtype=torch.float64)
    if impl == "torch_batched":
        out = benchmark(lambda: sinkhorn(cost, a, b, 0.01, 100))
        ref = _pot_loop(cost, a, b, 0.01, 100)
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-10)
    else:
        benchmark(lambda: _pot_loop(cost, a, b, 0.01, 100))
