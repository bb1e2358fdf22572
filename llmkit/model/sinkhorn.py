"""Sinkhorn-Knopp projection onto the doubly-stochastic matrices (mHC paper Eq. 9).

    M_0 = exp(clamp(H~, -c, c));   M_t = T_r(T_c(M_{t-1}));   H_res = M_{t_max}

T_c divides each column by its sum (plus eps), T_r each row. Both functions compute in fp32
(fp64 for fp64 input) whatever the input dtype. They are the PyTorch code of the mHC ops'
coefficient step (``coefficients`` and ``coefficients_backward`` in llmkit/model/mhc_ops.py),
whose backward recomputes the iterations instead of keeping them, as the mHC paper's kernel
does on chip:

- :func:`sinkhorn_knopp`: the forward, plain tensor ops (autograd through it keeps every
  iteration's tensors, which is why the op does not use it for training).
- :func:`sinkhorn_knopp_backward`: dL/dH~ from dL/dH_res and the logits, written out by hand from

      y = x / (s + eps), s = 1^T x  (sum along one axis)   =>   dL/dx = (g - 1^T (g * y)) / (s + eps)

  for g = dL/dy, applied in reverse through the recomputed iterations, then through exp and clamp.

Both move the matrix dimensions in front ([n, n, ...]) while they iterate: each sum then adds n
contiguous token vectors, which is ~3x faster on a CPU than summing n-long rows and columns.
"""

from __future__ import annotations

import torch

from llmkit.model.layers import upcast


def sinkhorn_knopp(logits: torch.Tensor, iters: int, clamp: float, eps: float) -> torch.Tensor:
    """Eq. 9: M0 = exp(clamp(H~)); M_t = T_r(T_c(M_{t-1})); returns M_{t_max} in fp32 (fp64 for fp64 logits).

    logits: [..., n, n]. The result's rows sum to 1 exactly (up to eps) and its columns to 1
    within the iteration's convergence.
    """
    m = _matrix_first(upcast(logits)).clamp(-clamp, clamp).exp()
    for _ in range(iters):
        m = m / (m.sum(dim=0, keepdim=True) + eps)  # T_c: columns sum to 1
        m = m / (m.sum(dim=1, keepdim=True) + eps)  # T_r: rows sum to 1
    return _matrix_last(m)


def _matrix_first(t: torch.Tensor) -> torch.Tensor:
    """[..., n, n] -> [n, n, ...] (contiguous)."""
    return t.movedim((-2, -1), (0, 1)).contiguous()


def _matrix_last(t: torch.Tensor) -> torch.Tensor:
    """[n, n, ...] -> [..., n, n] (contiguous)."""
    return t.movedim((0, 1), (-2, -1)).contiguous()


def sinkhorn_knopp_backward(
    grad: torch.Tensor, logits: torch.Tensor, iters: int, clamp: float, eps: float
) -> torch.Tensor:
    """dL/dlogits of :func:`sinkhorn_knopp` for grad = dL/dH_res, in fp32 (fp64 for fp64 logits)."""
    x = _matrix_first(upcast(logits))
    m0 = x.clamp(-clamp, clamp).exp()
    steps: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # each normalisation's output, denominator, axis
    m = m0
    for _ in range(iters):
        for dim in (0, 1):  # T_c then T_r
            denom = m.sum(dim=dim, keepdim=True) + eps
            m = m / denom
            steps.append((m, denom, dim))
    g = _matrix_first(grad.to(x.dtype))
    for y, denom, dim in reversed(steps):
        g = (g - (g * y).sum(dim=dim, keepdim=True)) / denom
    inside = (x >= -clamp) & (x <= clamp)  # clamp passes the gradient on [-c, c], as torch.clamp does
    return _matrix_last(torch.where(inside, g * m0, torch.zeros_like(g)))
