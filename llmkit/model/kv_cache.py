"""Key/value cache for incremental decoding (the sampler of SDFT and TTT-Discover).

Attention keys and values of every layer, pre-allocated for a fixed batch and length:
[n_layers, B, H_kv, S, D]. Only attention needs a cache: the mHC mappings, norms and MLPs
act on each token alone, so the residual streams of past tokens are never read again.
The buffers are module buffers with fixed shapes and addresses, so a compiled decode step
(torch.compile / CUDA graphs) can write into them in place.
"""

from __future__ import annotations

import torch
from torch import nn

from llmkit.model.config import ModelConfig


class KVCache(nn.Module):
    """Pre-allocated keys and values for ``batch_size`` rows of up to ``max_len`` tokens."""

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [B, H_kv, S, D] of layer i's keys and values (writes go into the cache)."""
        return self.k[i], self.v[i]
