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
on CUDA, their PyTorch code elsewhere, each one opaque node to ``torch.compile``. Each
sublayer's write-back X_{l+1} = H_res X_l + H_post^T y_l is deferred (:class:`Pending`) and done
by the op that starts the next sublayer, in the same pass as that sublayer's mapping
(``llmkit::mhc_boundary``); :func:`finish` writes back the last one. The equation-literal
version (RMSNorm, einsums, autograd through every Sinkhorn iteration) lives in
tests/mhc_oracle.py, the oracle the ops are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from llmkit.model import mhc_ops
from llmkit.model.config import ModelConfig
from llmkit.model.lora import LoRALinear


class Pending(NamedTuple):
    """The residual stream between two mHC sublayers: X_l and the sublayer's output y_l with its
    H_post and H_res, not yet written back. The next sublayer's mapping op (or :func:`finish`)
    applies X_{l+1} = H_res X_l + H_post^T y_l (Eq. 3)."""

    x: torch.Tensor  # [B, T, n, C]
    y: torch.Tensor  # [B, T, C]
    h_post: torch.Tensor  # [B, T, n]
    h_res: torch.Tensor  # [B, T, n, n]

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(X [M, n, C], y [M, C], H_post [M, n], H_res [M, n, n]) with the tokens flattened
        (M = B T), as the ops take them."""
        n, c = self.x.shape[-2:]
        return self.x.reshape(-1, n, c), self.y.reshape(-1, c), self.h_post.reshape(-1, n), self.h_res.reshape(-1, n, n)


class Entry(NamedTuple):
    """What :class:`MHCMapping` gives a sublayer: its stream X, its input u = H_pre X and its
    mappings H_pre, H_post, H_res (fp32; fp64 for an fp64 model)."""

    x: torch.Tensor  # [B, T, n, C]
    u: torch.Tensor  # [B, T, C]
    h_pre: torch.Tensor  # [B, T, n]
    h_post: torch.Tensor  # [B, T, n]
    h_res: torch.Tensor  # [B, T, n, n]


def finish(stream: torch.Tensor | Pending, use_triton: bool) -> torch.Tensor:
    """The stream [B, T, n, C] with any pending write-back applied (after the last sublayer);
    ``use_triton``: :attr:`MHCConfig.use_triton <llmkit.model.config.MHCConfig.use_triton>`."""
    if not isinstance(stream, Pending):
        return stream
    return mhc_ops.mhc_apply(*stream.flat(), use_triton, mhc_ops.SOURCE_HASH).view(stream.x.shape)


def recompute_first_mapping() -> tuple[AbstractContextManager, AbstractContextManager]:
    """Selective activation checkpointing for one block (``torch.utils.checkpoint``'s
    ``context_fn``; :attr:`MHCConfig.recompute_stream <llmkit.model.config.MHCConfig>`): the block's
    first mapping op (its attention sublayer's ``mhc_enter`` or ``mhc_boundary``) is recomputed in
    backward, every other op's output is kept where backward needs it. The stream that op makes,
    X of the attention sublayer, is then not kept: backward remakes it from the block's input
    (the previous block's pending write-back), which the checkpoint keeps. The mHC paper's
    recomputation (store the block input, recompute the rest), one block at a time."""
    mapping_ops = (torch.ops.llmkit.mhc_enter.default, torch.ops.llmkit.mhc_boundary.default)
    calls = 0

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        nonlocal calls
        if op in mapping_ops:
            calls += 1
            if calls % 2 == 1:  # the attention sublayer's, not the MLP's
                return CheckpointPolicy.MUST_RECOMPUTE
        return CheckpointPolicy.PREFER_SAVE

    return create_selective_checkpoint_contexts(policy)


MAPPING_ALPHAS = ("alpha_pre", "alpha_post", "alpha_res")


def reshape_scalar_alphas(tensors: dict[str, torch.Tensor]) -> None:
    """In place, the mappings' alphas of ``tensors`` (weights or gradients by parameter name, any
    prefix) that are 0-d reshaped to [1]: llmkit wrote them 0-d before FSDP, which refuses scalar
    parameters, had them made [1]."""
    for key, value in tensors.items():
        if key.rpartition(".")[2] in MAPPING_ALPHAS and isinstance(value, torch.Tensor) and value.ndim == 0:
            tensors[key] = value.reshape(1)


class MHCMapping(nn.Module):
    """Computes a sublayer's H_pre [..., n], H_post [..., n], H_res [..., n, n] and input H_pre X
    from its stream X [..., n, C] (an :class:`Entry`).

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
        # [1], not 0-d: FSDP refuses scalar parameters
        self.alpha_pre = nn.Parameter(torch.full((1,), self.cfg.alpha_init))
        self.alpha_post = nn.Parameter(torch.full((1,), self.cfg.alpha_init))
        self.alpha_res = nn.Parameter(torch.full((1,), self.cfg.alpha_init))
        self.b_pre = nn.Parameter(torch.empty(n))
        self.b_post = nn.Parameter(torch.empty(n))
        self.b_res = nn.Parameter(torch.empty(n, n))
        self.reset_biases()

    @torch.no_grad()
    def reset_biases(self) -> None:
        """The starting biases (docs/math.md, "init"): b_pre = logit(1/n), so that H_pre = sigmoid
        averages the n streams; b_post = logit(1/(2n)) (H_post = 2 sigmoid = 1/n, ``split``) or 0
        (H_post = 1, ``copy``); b_res = +res_bias on the diagonal and -res_bias off it, so that H_res
        starts near the identity."""
        n = self.n
        self.b_pre.fill_(math.log((1 / n) / (1 - 1 / n)) if n > 1 else 0.0)
        post = 1 / (2 * n)
        self.b_post.fill_(math.log(post / (1 - post)) if self.cfg.post_init == "split" else 0.0)
        eye = torch.eye(n, dtype=torch.bool)
        self.b_res.copy_(torch.where(eye, self.cfg.res_bias, -self.cfg.res_bias))

    def alpha_and_bias(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """([alpha_pre, alpha_post, alpha_res], [b_pre, b_post, b_res]): the parameters themselves, as
        the ops take them (packing them would cost two kernel launches per sublayer)."""
        return [self.alpha_pre, self.alpha_post, self.alpha_res], [self.b_pre, self.b_post, self.b_res]

    def forward(self, stream: torch.Tensor | Pending) -> Entry:
        """The sublayer's :class:`Entry` from its stream: X itself, or the previous sublayer's
        :class:`Pending` output, whose write-back the same op applies first (``mhc_boundary``)."""
        cfg = self.cfg
        alpha, bias = self.alpha_and_bias()
        settings = (cfg.sinkhorn_iters, cfg.sinkhorn_clamp, cfg.sinkhorn_eps, self.norm_eps, cfg.use_triton,
                    mhc_ops.SOURCE_HASH)
        lora = isinstance(self.phi, LoRALinear) and self.phi.active
        if isinstance(stream, Pending) and not lora:
            *lead, n, c = stream.x.shape
            x, u, h_pre, h_post, h_res, _, _ = mhc_ops.mhc_boundary(*stream.flat(), self.phi.weight, alpha, bias,
                                                                     *settings)
        else:
            x = finish(stream, cfg.use_triton)
            *lead, n, c = x.shape
            flat = x.reshape(-1, n, c)
            # LoRA on phi (targets: [phi]) adds its term to x phi^T, before the norm's 1/rms
            update = self.phi.low_rank(flat.reshape(-1, n * c)) if lora else None
            u, h_pre, h_post, h_res, _, _ = mhc_ops.mhc_enter(flat, update, self.phi.weight, alpha, bias, *settings)
        return Entry(x.view(*lead, n, c), u.view(*lead, c), h_pre.view(*lead, n), h_post.view(*lead, n),
                     h_res.view(*lead, n, n))


class MHCResidual(nn.Module):
    """One mHC residual connection around a sublayer F: X -> H_res X + H_post^T F(H_pre X), its
    write-back left :class:`Pending` for the next sublayer's mapping (or :func:`finish`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.mapping = MHCMapping(config)

    def forward(
        self, stream: torch.Tensor | Pending, sublayer: Callable[[torch.Tensor], torch.Tensor]
    ) -> Pending:
        entry = self.mapping(stream)  # what forward hooks (MHCMonitor) read
        return Pending(entry.x, sublayer(entry.u), entry.h_post, entry.h_res)
