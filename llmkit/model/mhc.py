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

The operations run as ``torch.library`` custom ops (llmkit/model/mhc_ops.py): Triton kernels
on CUDA, their PyTorch code elsewhere, each one opaque node to ``torch.compile``. The
equation-literal version (RMSNorm, einsums, autograd through every Sinkhorn iteration) lives in
tests/mhc_oracle.py, the oracle the ops are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from llmkit.model import mhc_ops
from llmkit.model.config import ModelConfig
from llmkit.model.lora import LoRALinear


class MHCMapping(nn.Module):
    """Computes (H_pre [..., n], H_post [..., n], H_res [..., n, n]) from the stream X [..., n, C].

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
        self.norm_eps = config.norm_eps
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

    @property
    def use_triton(self) -> bool:
        return self.cfg.implementation == "auto"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        *lead, n, c = x.shape
        flat = x.reshape(-1, n * c)
        proj, sumsq = mhc_ops.mhc_project(flat, self.phi.weight, self.use_triton)
        if isinstance(self.phi, LoRALinear) and (update := self.phi.low_rank(flat)) is not None:
            proj = proj + update.to(proj.dtype)  # LoRA on phi (targets: [phi]) adds to x phi^T, before the 1/rms
        alpha = torch.stack((self.alpha_pre, self.alpha_post, self.alpha_res))
        bias = torch.cat((self.b_pre, self.b_post, self.b_res.flatten()))
        h_pre, h_post, h_res = mhc_ops.mhc_coefficients(
            proj, sumsq, alpha, bias, n, n * c, self.cfg.sinkhorn_iters, self.cfg.sinkhorn_clamp,
            self.cfg.sinkhorn_eps, self.norm_eps, self.use_triton)
        return h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n)


class MHCResidual(nn.Module):
    """One mHC residual connection around a sublayer F: X -> H_res X + H_post^T F(H_pre X)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.mapping = MHCMapping(config)

    def forward(
        self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        *lead, n, c = x.shape
        h_pre, h_post, h_res = self.mapping(x)  # [B, T, ...]: what forward hooks (MHCMonitor) read
        streams, use_triton = x.reshape(-1, n, c), self.mapping.use_triton
        y = sublayer(mhc_ops.mhc_pre(streams, h_pre.reshape(-1, n), use_triton).view(*lead, c))
        mixed = mhc_ops.mhc_apply(streams, y.reshape(-1, c), h_post.reshape(-1, n), h_res.reshape(-1, n, n), use_triton)
        return mixed.view(x.shape)
