"""The LLaMA-style building blocks: RMSNorm, rotary embeddings, attention and SwiGLU.

Projection names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) follow the
LLaMA family's, so that LoRA can target them by suffix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.model.attention_backends import attend, resolve_backend
from llmkit.model.config import ModelConfig


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 if it is in a lower precision (bf16/fp16/fp32 -> fp32; fp64 stays fp64), the
    dtype for norms, rotary angles and the mHC mapping math."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, computed in (at least) fp32 and cast back.

    With ``affine=False`` there is no gain g (used by the mHC mapping, whose linear map
    absorbs any per-channel gain).
    """

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * upcast(self.weight)
        return y.type_as(x)


def rope_cache(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim/2] for RoPE with base theta (RoFormer Eq. 34)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head of x [B, H, T, D] by the angles for its positions:
    cos/sin are [T, D/2] (positions shared by the batch) or [B, T, D/2] (per row)."""
    x1, x2 = upcast(x).chunk(2, dim=-1)
    cos, sin = (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with RoPE and optional grouped-query heads, computed by the
    kernel ``config.attention_backend`` names (llmkit.model.attention_backends)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)

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
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
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
    """down(silu(gate(x)) * up(x)) (Shazeer 2020, as in LLaMA)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
