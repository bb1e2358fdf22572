"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv 2405.04434, Sec. 2.1, Eq. 9-19), for
``attention: mla``.

For a token t with hidden state h_t and heads i = 1..n_h (the report's notation):

    c_t^KV = W^DKV h_t                        (9)   the latent, d_c = ``kv_lora_rank`` numbers
    k_t^C  = W^UK c_t^KV                      (10)  per-head keys without position
    v_t^C  = W^UV c_t^KV                      (11)  per-head values
    c_t^Q  = W^DQ h_t,  q_t^C = W^UQ c_t^Q    (12-13)  (``q_lora_rank`` None: q_t^C = W^Q h_t)
    q_t^R  = RoPE(W^QR c_t^Q)                 (14)  per-head RoPE queries
    k_t^R  = RoPE(W^KR h_t)                   (15)  ONE RoPE key per token, shared by all heads
    q_t,i  = [q_t,i^C; q_t,i^R],  k_t,i = [k_t,i^C; k_t^R]                (16-17)
    o_t,i  = sum_j<=t Softmax_j(q_t,i . k_j,i / sqrt(d_h + d_h^R)) v_j,i^C  (18)
    u_t    = W^O [o_t,1; ...; o_t,n_h]        (19)

with d_h = ``qk_nope_head_dim``, d_h^R = ``qk_rope_head_dim`` and the value head ``v_head_dim``.

Layers, named as in DeepSeek's implementation so LoRA can target them by their last name:

=======================  ==============================================================
``q_proj``               h -> n_h (d_h + d_h^R): W^Q and W^QR (``q_lora_rank`` None)
``q_a_proj``             h -> d'_c: W^DQ (with ``q_lora_rank``), then ``q_a_layernorm``
``q_b_proj``             d'_c -> n_h (d_h + d_h^R): W^UQ and W^QR
``kv_a_proj_with_mqa``   h -> d_c + d_h^R: W^DKV and W^KR in one matmul
``kv_a_layernorm``       RMSNorm of c^KV (the report's extra norm after the compressed latents)
``kv_b_proj``            d_c -> n_h (d_h + d_v): W^UK and W^UV, each head's key then value rows
``o_proj``               n_h d_v -> h: W^O
=======================  ==============================================================

The KV cache holds c^KV (after its norm) and k^R, d_c + d_h^R numbers per token per layer
(llmkit.model.kv_cache). A cached decode step uses the absorbed form of Sec. 2.1.2: W^UK is
folded into the query and W^UV applied after attention, so the step attends over the cached
latents directly, as multi-query attention with key d_c + d_h^R and value d_c
(:meth:`MultiHeadLatentAttention.absorbed_attention`). See docs/attention.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.model.attention_backends import attend, resolve_backend
from llmkit.model.config import ModelConfig
from llmkit.model.layers import RMSNorm, apply_rope, upcast
from llmkit.model.lora import LoRALinear

EQUAL_HEAD_DIM_BACKENDS = ("flash", "cudnn", "flash_attn")
"""The kernels given a value head as wide as the query/key head (zero-padded): SDPA's flash kernel
refuses unequal widths (on CPU and CUDA), FlashAttention-2 does too; cuDNN's support is not
verified here. ``math`` and ``efficient`` take the value head as it is."""


def attend_unequal_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, backend: str
) -> torch.Tensor:
    """:func:`~llmkit.model.attention_backends.attend` of q, k [B, H, T|S, D_qk] and v [B, H, S, D_v]
    with D_v != D_qk (Eq. 18: q.k over d_h + d_h^R, values of d_v), for every backend: a kernel in
    :data:`EQUAL_HEAD_DIM_BACKENDS` gets every head zero-padded to D = max(D_qk, D_v), the query
    scaled by sqrt(D / D_qk) so the kernel's 1/sqrt(D) is still 1/sqrt(D_qk), and the output is cut
    back to D_v. Zero channels add nothing to q.k and give zero output channels, so it is exact."""
    d_qk, d_v = q.size(-1), v.size(-1)
    if backend not in EQUAL_HEAD_DIM_BACKENDS or d_qk == d_v:
        return attend(q, k, v, mask, backend)
    d = max(d_qk, d_v)
    if d_qk < d:
        q, k = F.pad(q * math.sqrt(d / d_qk), (0, d - d_qk)), F.pad(k, (0, d - d_qk))
    return attend(q, k, F.pad(v, (0, d - d_v)), mask, backend)[..., :d_v]


def dense_weight(linear: nn.Linear) -> torch.Tensor:
    """The matrix ``linear`` applies: its weight, plus scale * B A if it is an active, unmerged
    :class:`~llmkit.model.lora.LoRALinear` (the absorbed decode, Sec. 2.1.2, reads W^UK and W^UV
    as matrices; LoRA dropout, a training-time noise, is not applied)."""
    if isinstance(linear, LoRALinear) and linear.active:
        return linear.weight + linear.scale * (linear.lora_B @ linear.lora_A)
    return linear.weight


class MultiHeadLatentAttention(nn.Module):
    """Causal multi-head latent attention (DeepSeek-V2 Eq. 9-19; see the module docstring), with
    the calling convention of :class:`~llmkit.model.layers.CausalSelfAttention`.

    ``n_kv_heads``, ``attention_bias``, ``qk_norm`` and ``head_dim`` of :class:`ModelConfig` are
    those of ``attention: mha``: MLA has one shared RoPE key and a latent instead of key/value
    heads, and its sizes are ``config.mla``'s. Setting the first three is an error (ModelConfig
    says so); ``head_dim`` is unused. ``absorb`` (default True) chooses the absorbed form for
    cached one-token decode steps; False recomputes every cached token's keys and values from
    its latent (same outputs).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        mla = config.mla
        self.config = config
        self.n_heads = config.n_heads
        self.kv_lora_rank = mla.kv_lora_rank
        self.q_lora_rank = mla.q_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5
        self.absorb = True
        q_dim = self.n_heads * (self.nope_dim + self.rope_dim)
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.d_model, q_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.d_model, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, q_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.d_model, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, config.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal MLA over x [B, T, C] (Eq. 9-19); cos/sin [T, d_h^R/2] or [B, T, d_h^R/2].

        Without ``mask`` the plain causal mask applies (training). With ``mask`` [B, 1, T, S]
        (True = may attend) queries attend to S keys: the T new ones, or, with ``kv_cache``
        (latent [B, S, d_c] and RoPE key [B, S, d_h^R] buffers), every cache slot after this call
        has written the new tokens' c^KV and k^R at slots ``cache_pos`` [T].
        """
        B, T, _ = x.shape
        q = self.queries(x).view(B, T, self.n_heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)  # Eq. 14
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # Eq. 9
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin).squeeze(1)  # Eq. 15: [B, T, d_h^R]
        if kv_cache is not None:
            cached_latent, cached_rope = kv_cache
            cached_latent.index_copy_(1, cache_pos, latent.to(cached_latent.dtype))
            cached_rope.index_copy_(1, cache_pos, k_rope.to(cached_rope.dtype))
            latent, k_rope = cached_latent.to(q.dtype), cached_rope.to(q.dtype)
            if self.absorb and T == 1 and mask is not None:
                return self.absorbed_attention(q_nope, q_rope, latent, k_rope, mask)
        return self.attention(q_nope, q_rope, latent, k_rope, mask)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """[q^C; q^R] of every head before RoPE, [B, T, n_h (d_h + d_h^R)]: Eq. 12-14 through the
        query latent c^Q (normalised, as DeepSeek's q_a_layernorm), or one full-rank projection."""
        if self.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def attention(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Eq. 10-11 and 16-19 as written: every key token's per-head k^C and v^C from its latent
        [B, S, d_c], the shared k^R [B, S, d_h^R] appended to every head's key, then the attention
        kernel ``config.attention_backend`` names; q_nope, q_rope [B, n_h, T, .]. Returns u [B, T, C]."""
        B, H, T, _ = q_nope.shape
        S = latent.size(1)
        kv = self.kv_b_proj(latent).view(B, S, H, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, H, S, self.rope_dim)], dim=-1)
        backend = resolve_backend(self.config.attention_backend, q.device.type, q.dtype)
        y = attend_unequal_heads(q, k, v, mask, backend)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def absorbed_attention(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Eq. 16-19 with W^UK and W^UV absorbed (Sec. 2.1.2): q_i^C . (W^UK_i c_j) = (W^UK_i^T q_i^C) . c_j
        and sum_j p_j W^UV_i c_j = W^UV_i sum_j p_j c_j, so the heads attend over the cached latents
        [B, S, d_c] and RoPE keys [B, S, d_h^R] themselves (one key/value "head" for all: multi-query
        attention with key d_c + d_h^R and value d_c), and no key or value is ever expanded per head.
        ``mask`` [B, 1, T, S] is required. Returns u [B, T, C]."""
        B, H, T, _ = q_nope.shape
        S, c = latent.shape[1:]
        w_uk, w_uv = dense_weight(self.kv_b_proj).view(H, self.nope_dim + self.v_dim, c).split(
            [self.nope_dim, self.v_dim], dim=1
        )
        q_latent = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk)
        scores = (q_latent.reshape(B, H * T, c) @ latent.transpose(1, 2)
                  + q_rope.reshape(B, H * T, self.rope_dim) @ k_rope.transpose(1, 2))
        scores = upcast(scores.view(B, H, T, S)) * self.scale
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(latent.dtype)
        context = (probs.view(B, H * T, S) @ latent).view(B, H, T, c)
        y = torch.einsum("bhtc,hvc->bthv", context, w_uv)
        return self.o_proj(y.reshape(B, T, H * self.v_dim))
