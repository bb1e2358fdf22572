"""Manifold-constrained hyper-connections (mHC, arXiv 2512.24880), the reference path.

The residual stream is X in R^{n x C} per token, stored as [B, T, n, C]. Around a sublayer F
(attention or MLP) mHC computes (paper Eq. 3):

    X_{l+1} = H_res X_l + H_post^T F(H_pre X_l)

with per-token mappings (Eq. 7-8) from the flattened, RMS-normalised stream x' = RMSNorm(vec X):

    H~_pre  = alpha_pre  * (x' phi_pre)       + b_pre      H_pre  = sigmoid(H~_pre)
    H~_post = alpha_post * (x' phi_post)      + b_post     H_post = 2 sigmoid(H~_post)
    H~_res  = alpha_res  * mat(x' phi_res)    + b_res      H_res  = SinkhornKnopp(H~_res)

H_res is projected onto the doubly-stochastic matrices (Eq. 9), which preserves the mean of
the streams. All mapping math runs in fp32, whatever the autocast dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from llmkit.model.config import ModelConfig
from llmkit.model.layers import RMSNorm


def sinkhorn_knopp(logits: torch.Tensor, iters: int, clamp: float, eps: float) -> torch.Tensor:
    """Eq. 9: M0 = exp(clamp(H~)); M_t = T_r(T_c(M_{t-1})); returns M_{t_max} in fp32.

    logits: [..., n, n]. T_c divides each column by its sum, T_r each row; the result's rows
    sum to 1 exactly (up to eps) and its columns to 1 within the iteration's convergence.
    """
    m = logits.float().clamp(-clamp, clamp).exp()
    for _ in range(iters):
        m = m / (m.sum(dim=-2, keepdim=True) + eps)  # T_c: columns sum to 1
        m = m / (m.sum(dim=-1, keepdim=True) + eps)  # T_r: rows sum to 1
    return m


class MHCMapping(nn.Module):
    """Computes (H_pre [B,T,n], H_post [B,T,n], H_res [B,T,n,n]) from the stream X [B,T,n,C].

    phi_pre, phi_post and phi_res are one fused ``nn.Linear(nC, 2n + n^2)`` (``phi``). The
    static biases start at the handoff's values (§6): b_pre = logit(1/n); b_post =
    logit(1/(2n)) (post_init "handoff") or 0 ("hc"); b_res = +res_bias on the diagonal and
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
        self.b_post.fill_(math.log(post / (1 - post)) if self.cfg.post_init == "handoff" else 0.0)
        eye = torch.eye(n, dtype=torch.bool)
        self.b_res.copy_(torch.where(eye, self.cfg.res_bias, -self.cfg.res_bias))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, n, C = x.shape
        x_norm = self.norm(x.reshape(B, T, n * C))
        d = self.phi(x_norm).float()
        d_pre, d_post, d_res = d.split((n, n, n * n), dim=-1)
        h_pre = torch.sigmoid(self.alpha_pre * d_pre + self.b_pre)
        h_post = 2 * torch.sigmoid(self.alpha_post * d_post + self.b_post)
        h_res_logits = self.alpha_res * d_res.view(B, T, n, n) + self.b_res
        h_res = sinkhorn_knopp(
            h_res_logits, self.cfg.sinkhorn_iters, self.cfg.sinkhorn_clamp, self.cfg.sinkhorn_eps
        )
        return h_pre, h_post, h_res


class MHCResidual(nn.Module):
    """One mHC residual connection around a sublayer F: X -> H_res X + H_post^T F(H_pre X)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.mapping = MHCMapping(config)

    def forward(
        self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        h_pre, h_post, h_res = self.mapping(x)
        y = sublayer(torch.einsum("btn,btnc->btc", h_pre.to(x.dtype), x))
        mixed = torch.einsum("btnm,btmc->btnc", h_res.to(x.dtype), x)
        return mixed + h_post.to(y.dtype).unsqueeze(-1) * y.unsqueeze(-2)
