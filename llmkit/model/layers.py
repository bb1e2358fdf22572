"""The LLaMA-style building blocks: RMSNorm, rotary embeddings, attention and SwiGLU.

Projection names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) follow the
LLaMA family's, so that LoRA can target them by suffix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.model.attention_backends import attend, resolve_backend
from llmkit.model.config import ModelConfig, RopeScaling


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 if it is in a lower precision (bf16/fp16/fp32 -> fp32; fp64 stays fp64), the
    dtype for norms, rotary angles and the mHC mapping math."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, computed in (at least) fp32 and cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * upcast(self.weight)).type_as(x)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """The inverse frequencies theta^(-2i/D), i < D/2, of RoPE (RoFormer Eq. 15), optionally scaled.

    ``linear`` divides them all by the factor. ``llama3`` (Llama 3.1) divides only the low
    frequencies: with L the original context, a frequency whose wavelength 2 pi / f exceeds
    L / low_freq_factor is divided by the factor, one below L / high_freq_factor is kept, and
    between them f' = (1 - s) f / factor + s f with s = (L / wavelength - low) / (high - low).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    wavelength = 2 * math.pi / inv_freq
    context = scaling.original_max_seq_len
    smooth = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelength > context / scaling.low_freq_factor, inv_freq / scaling.factor, blended)
    return torch.where(wavelength < context / scaling.high_freq_factor, inv_freq, scaled)


def rope_cache(
    seq_len: int, head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim/2] for RoPE with base theta (RoFormer Eq. 34)."""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), rope_frequencies(head_dim, theta, scaling))
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head of x [B, H, T, D] by the angles for its positions:
    cos/sin are [T, D/2] (positions shared by the batch) or [B, T, D/2] (per row)."""
    x1, x2 = upcast(x).chunk(2, dim=-1)
    cos, sin = (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with RoPE and optional grouped-query heads, computed by the
    kernel ``config.attention_backend`` names (llmkit.model.attention_backends).

    ``config.attention_bias`` adds biases to the q/k/v projections (Qwen2); ``config.qk_norm``
    RMS-normalises each head of q and k before RoPE, with a gain per head channel (Qwen3)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.d_model, q_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_dim, config.d_model, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention over x [B, T, C].

        Without ``mask`` the plain causal mask applies (training). With ``mask`` [B, 1, T, S]
        (True = may attend) queries attend to S keys: the T new ones, or, with ``kv_cache``
        (k, v buffers [B, H_kv, S, D]), every cache slot after this call has written the new
        keys and values at slots ``cache_pos`` [T].
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k_cache.index_copy_(2, cache_pos, k.to(k_cache.dtype))
            v_cache.index_copy_(2, cache_pos, v.to(v_cache.dtype))
            k, v = k_cache.to(q.dtype), v_cache.to(q.dtype)
        y = attend(q, k, v, mask, resolve_backend(self.config.attention_backend, q.device.type, q.dtype))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020, as in LLaMA), of width ``d_ff`` (default: the config's)."""

    def __init__(self, config: ModelConfig, d_ff: int | None = None) -> None:
        super().__init__()
        d_ff = d_ff or config.d_ff
        self.gate_proj = nn.Linear(config.d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
