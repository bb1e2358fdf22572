"""Manifold-constrained hyper-connections (mHC, arXiv 2512.24880).

The residual stream is X in R^{n x C} per token, stored as [B, T, n, C]. Around a sublayer F
(attention or MLP) mHC computes (paper Eq. 3):

    X_{l+1} = H_res X_l + H_post^T F(H_pre X_l)

with per-token mappings (Eq. 7-8) from the flattened, RMS-normalised stream x' = RMSNorm(vec X):

    H~_pre  = alpha_pre  * (x' phi_pre)       + b_pre      H_pre  = sigmoid(H~_pre)
    H~_post = alpha_post * (x' phi_post)      + b_post     H_post = 2 sigmoid(H~_post)
    H~_res  = alpha_res  * mat(x' phi_res)    + b_res      H_res  = SinkhornKnopp(H~_res)

H_res is projected onto the doubly-stochastic matrices (Eq. 9), which preserves the mean of
the streams. All mapping math runs in fp32 (fp64 in an fp64 model), whatever the autocast dtype.

Two implementations of the same math, chosen by ``MHCConfig.implementation``:

- ``reference``: RMSNorm, then the projection; einsums for H_pre X and H_res X; Sinkhorn with
  autograd through its unrolled loop. Short and obviously Eq. 3-9.
- ``fused`` (default): the norm's divide applied after the projection; Sinkhorn with a
  recomputing backward that keeps no per-iteration activations; inside a compiled block
  (``Transformer.compile_blocks``), H_pre X and H_res X + H_post^T y as multiply-adds that the
  compiler fuses into one pass each (eager code keeps the einsums, fewer kernel launches).
  Equal to ``reference`` within float rounding (tests/test_mhc_fused.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from llmkit.model.config import ModelConfig
from llmkit.model.layers import RMSNorm, upcast
from llmkit.model.sinkhorn import sinkhorn_knopp, sinkhorn_knopp_recompute


class MHCMapping(nn.Module):
    """Computes (H_pre [B,T,n], H_post [B,T,n], H_res [B,T,n,n]) from the stream X [B,T,n,C].

    phi_pre, phi_post and phi_res are one fused ``nn.Linear(nC, 2n + n^2)`` (``phi``). The
    static biases start at b_pre = logit(1/n) (H_pre averages the streams); b_post =
    logit(1/(2n)) (post_init "split") or 0 ("copy"); b_res = +res_bias on the diagonal and
    -res_bias off it, so H_res starts near the identity. alpha_* start at alpha_init.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n, c = config.n_streams, config.d_model
        self.n = n
        self.cfg = config.mhc
        self.norm = RMSNorm(n * c, eps=config.norm_eps, affine=False)
        self.phi = nn.Linear(n * c, 2 * n + n * n, bias=False)
        self.alpha_pre = nn.Parameter(torch.tensor(self.cfg.alpha_init))
        self.alpha_post = nn.Parameter(torch.tensor(self.cfg.alpha_init))
        self.alpha_res = nn.Parameter(torch.tensor(self.cfg.alpha_init))
        self.b_pre = nn.Parameter(torch.empty(n))
        self.b_post = nn.Parameter(torch.empty(n))
        self.b_res = nn.Parameter(torch.empty(n, n))
        self.reset_biases()

    @torch.no_grad()
    def reset_biases(self) -> None:
        n = self.n
        self.b_pre.fill_(math.log((1 / n) / (1 - 1 / n)) if n > 1 else 0.0)
        post = 1 / (2 * n)
        self.b_post.fill_(math.log(post / (1 - post)) if self.cfg.post_init == "split" else 0.0)
        eye = torch.eye(n, dtype=torch.bool)
        self.b_res.copy_(torch.where(eye, self.cfg.res_bias, -self.cfg.res_bias))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, n, C = x.shape
        x_flat = x.reshape(B, T, n * C)
        if self.cfg.implementation == "reference":
            d = upcast(self.phi(self.norm(x_flat)))
        else:
            # x' phi = (x phi) / rms(x): the norm's divide moves after the small matmul, so no
            # normalised nC-wide copy of the stream is written. vector_norm accumulates in fp32
            # without materialising (or saving) an fp32 copy of a bf16 stream.
            accumulate = torch.promote_types(x.dtype, torch.float32)
            norm = torch.linalg.vector_norm(x_flat, dim=-1, keepdim=True, dtype=accumulate)
            rms_inv = torch.rsqrt(norm.square() / (n * C) + self.norm.eps)
            d = upcast(self.phi(x_flat)) * rms_inv
        d_pre, d_post, d_res = d.split((n, n, n * n), dim=-1)
        h_pre = torch.sigmoid(self.alpha_pre * d_pre + self.b_pre)
        h_post = 2 * torch.sigmoid(self.alpha_post * d_post + self.b_post)
        h_res_logits = self.alpha_res * d_res.view(B, T, n, n) + self.b_res
        sinkhorn = sinkhorn_knopp if self.cfg.implementation == "reference" else sinkhorn_knopp_recompute
        h_res = sinkhorn(h_res_logits, self.cfg.sinkhorn_iters, self.cfg.sinkhorn_clamp, self.cfg.sinkhorn_eps)
        return h_pre, h_post, h_res


def pre_aggregate(h_pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """H_pre X = sum_m H_pre[m] X[m]: the sublayer's input [B, T, C] from the streams [B, T, n, C].

    Written as n multiply-adds over [B, T, C] (not an einsum) so that torch.compile fuses it,
    with the sublayer's norm, into one pass over the stream.
    """
    out = h_pre[..., 0, None] * x[..., 0, :]
    for m in range(1, x.size(-2)):
        out = out + h_pre[..., m, None] * x[..., m, :]
    return out.to(x.dtype)


def apply_mixing(h_res: torch.Tensor, h_post: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """X_{l+1}[i] = sum_m H_res[i, m] X[m] + H_post[i] y (Eq. 3): post-distribution, residual
    mixing and merge in one expression, which torch.compile turns into one pass that reads the
    stream and y and writes the new stream (the mHC paper's fused "apply")."""
    streams = []
    for i in range(x.size(-2)):
        acc = h_post[..., i, None] * y
        for m in range(x.size(-2)):
            acc = acc + h_res[..., i, m, None] * x[..., m, :]
        streams.append(acc.to(x.dtype))
    return torch.stack(streams, dim=-2)


class MHCResidual(nn.Module):
    """One mHC residual connection around a sublayer F: X -> H_res X + H_post^T F(H_pre X)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.mapping = MHCMapping(config)

    def forward(
        self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        h_pre, h_post, h_res = self.mapping(x)
        if self.mapping.cfg.implementation == "fused" and torch.compiler.is_compiling():
            return apply_mixing(h_res, h_post, x, sublayer(pre_aggregate(h_pre, x)))
        # Eager (and the reference path): two einsums are fewer launches and, on CPU, faster
        # than the multiply-adds, which only pay off once the compiler fuses them. Autocast would
        # run them in bf16; the stream keeps its own dtype (ModelConfig.bf16_residual) instead.
        with torch.autocast(x.device.type, enabled=False):
            x_pre = torch.einsum("btn,btnc->btc", h_pre.to(x.dtype), x)
        y = sublayer(x_pre)
        with torch.autocast(x.device.type, enabled=False):
            mixed = torch.einsum("btnm,btmc->btnc", h_res.to(x.dtype), x)
        return mixed + (h_post.unsqueeze(-1) * y.unsqueeze(-2)).to(x.dtype)
