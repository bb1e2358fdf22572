"""Sinkhorn-Knopp projection onto the doubly-stochastic matrices (mHC paper Eq. 9).

    M_0 = exp(clamp(H~, -c, c));   M_t = T_r(T_c(M_{t-1}));   H_res = M_{t_max}

T_c divides each column by its sum (plus eps), T_r each row. Two implementations of exactly
that math, both in fp32 (fp64 for fp64 input) whatever the input dtype:

- :func:`sinkhorn_knopp`, the reference: plain tensor ops, so autograd keeps every iteration's
  intermediates (2 t_max tensors [..., n, n] per call: ~3 KB per token per sublayer at n = 4,
  t_max = 20).
- :func:`sinkhorn_knopp_recompute`, an ``autograd.Function`` that saves only the input logits
  and re-runs the iterations inside its backward (the mHC paper's kernel does the same on-chip),
  so a training step keeps nothing per iteration. Its backward is written out by hand from

      y = x / (s + eps), s = 1^T x  (sum along one axis)   =>   dL/dx = (g - 1^T (g * y)) / (s + eps)

  for g = dL/dy, applied in reverse through the iterations, then through exp and clamp.
"""

from __future__ import annotations

import torch

from llmkit.model.layers import upcast


def sinkhorn_knopp(logits: torch.Tensor, iters: int, clamp: float, eps: float) -> torch.Tensor:
    """Eq. 9: M0 = exp(clamp(H~)); M_t = T_r(T_c(M_{t-1})); returns M_{t_max} in fp32 (fp64 for fp64 logits).

    logits: [..., n, n]. The result's rows sum to 1 exactly (up to eps) and its columns to 1
    within the iteration's convergence.
    """
    m = upcast(logits).clamp(-clamp, clamp).exp()
    for _ in range(iters):
        m = m / (m.sum(dim=-2, keepdim=True) + eps)  # T_c: columns sum to 1
        m = m / (m.sum(dim=-1, keepdim=True) + eps)  # T_r: rows sum to 1
    return m


def _normalize_backward(grad: torch.Tensor, y: torch.Tensor, denom: torch.Tensor, dim: int) -> torch.Tensor:
    """dL/dx for y = x / denom with denom = sum_dim(x) + eps (see the module docstring)."""
    return (grad - (grad * y).sum(dim=dim, keepdim=True)) / denom


class SinkhornKnopp(torch.autograd.Function):
    """Eq. 9 with a recomputing backward: saves the logits only (see the module docstring)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, clamp: float, eps: float) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.iters, ctx.clamp, ctx.eps = iters, clamp, eps
        return sinkhorn_knopp(logits, iters, clamp, eps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (logits,) = ctx.saved_tensors
        x = upcast(logits)
        m0 = x.clamp(-ctx.clamp, ctx.clamp).exp()
        # Recompute the forward, keeping each normalisation's output and denominator.
        steps: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        m = m0
        for _ in range(ctx.iters):
            for dim in (-2, -1):  # T_c then T_r
                denom = m.sum(dim=dim, keepdim=True) + ctx.eps
                m = m / denom
                steps.append((m, denom, dim))
        g = upcast(grad)
        for y, denom, dim in reversed(steps):
            g = _normalize_backward(g, y, denom, dim)
        inside = (x >= -ctx.clamp) & (x <= ctx.clamp)  # clamp passes the gradient on [-c, c], as torch.clamp does
        grad_logits = torch.where(inside, g * m0, torch.zeros_like(g))
        return grad_logits.to(logits.dtype), None, None, None


def sinkhorn_knopp_recompute(logits: torch.Tensor, iters: int, clamp: float, eps: float) -> torch.Tensor:
    """:func:`sinkhorn_knopp` whose backward recomputes the iterations instead of storing them."""
    return SinkhornKnopp.apply(logits, iters, clamp, eps)
