"""Batched entropic optimal transport (Sinkhorn–Knopp in the log domain).

TokenCLIP (Zhou et al. 2025, §3.2, Eqs. 6–7) transports the patch tokens of each image to
K textual subspaces by entropic OT (Cuturi 2013) solved with Sinkhorn–Knopp iterations.
:func:`sinkhorn` solves B such problems at once, on any device, in the log domain (stable
for small ``eps`` such as TokenCLIP's 0.01 where ``exp(-C/eps)`` underflows), with plain
differentiable torch operations (autograd flows through the iterations to ``cost``).

The iteration is the one of POT's ``ot.sinkhorn(a, b, M, reg, method="sinkhorn_log")``
(Flamary et al. 2021), step for step: with ``Mk = -M / eps`` and ``u = v = 0``,

    v <- log b - logsumexp_i(Mk + u[:, None])
    u <- log a - logsumexp_j(Mk + v[None, :])

and the plan is ``exp(u[:, None] + Mk + v[None, :])``. After the last (row) update the
plan's row sums equal ``a`` exactly; its column sums converge to ``b``. POT stops early when
the marginal error drops below ``stopThr``; this function always runs ``n_iter`` iterations
(fixed cost, no host synchronisation — what a training loop on a GPU wants).
"""

from __future__ import annotations

import torch


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def sinkhorn(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float,
             n_iter: int = 100) -> torch.Tensor:
    """Entropic OT plans of a batch of problems.

    ``cost`` [B, N, K], marginals ``a`` [B, N] and ``b`` [B, K] (non-negative, each summing to
    the same mass per batch element), regularisation ``eps`` > 0, ``n_iter`` Sinkhorn
    iterations. Returns the plan [B, N, K] minimising ``<T, C> - eps H(T)`` subject to
    ``T 1 = a`` and ``T^T 1 = b`` (approximately, after ``n_iter`` iterations) — per batch
    element the plan POT's ``ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log")`` returns.
    Unbatched inputs ([N, K], [N], [K]) are accepted and return [N, K].
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    squeeze = cost.dim() == 2
    if squeeze:
        cost, a, b = cost[None], a[None], b[None]
    if cost.dim() != 3 or a.shape != cost.shape[:2] or b.shape != (cost.shape[0], cost.shape[2]):
        raise ValueError(f"shapes: cost {tuple(cost.shape)} must be [B,N,K] with a [B,N], b [B,K]; "
                         f"got a {tuple(a.shape)}, b {tuple(b.shape)}")
    dtype = torch.promote_types(cost.dtype, torch.float32)
    mk = -cost.to(dtype) / eps
    log_a = _safe_log(a.to(dtype))
    log_b = _safe_log(b.to(dtype))
    u = torch.zeros_like(log_a)
    v = torch.zeros_like(log_b)
    for _ in range(n_iter):
        v = log_b - torch.logsumexp(mk + u[:, :, None], dim=1)
        u = log_a - torch.logsumexp(mk + v[:, None, :], dim=2)
    plan = torch.exp(u[:, :, None] + mk + v[:, None, :])
    return plan[0] if squeeze else plan


def uniform_marginals(batch: int, n: int, k: int, *, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform marginals ``a = 1/N`` [B, N] and ``b = 1/K`` [B, K] (TokenCLIP's choice, as PLOT)."""
    a = torch.full((batch, n), 1.0 / n, device=device, dtype=dtype)
    b = torch.full((batch, k), 1.0 / k, device=device, dtype=dtype)
    return a, b
