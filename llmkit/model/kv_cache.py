"""Key/value cache for incremental decoding (the sampler of SDFT and TTT-Discover).

What attention keeps of every past token, for every layer, pre-allocated for a fixed batch and
length; the shapes come from the config (:func:`cache_shapes`):

- ``attention: mha``: keys ``k_i`` and values ``v_i`` of layer i, each [B, H_kv, S, D];
- ``attention: mla``: the latent ``latent_i`` c^KV [B, S, d_c] (after its RMSNorm) and the RoPE
  key ``k_rope_i`` k^R [B, S, d_h^R] shared by all heads, d_c + d_h^R numbers per token per layer
  (DeepSeek-V2, arXiv 2405.04434, Sec. 2.1.4; llmkit.model.mla).

Only attention needs a cache: the mHC mappings, norms and MLPs act on each token alone, so the
residual streams of past tokens are never read again. The buffers are module buffers with fixed
shapes and addresses, so a compiled decode step (torch.compile / CUDA graphs) can write into them
in place.
"""

from __future__ import annotations

import torch
from torch import nn

from llmkit.model.config import ModelConfig


def cache_shapes(config: ModelConfig, batch_size: int, max_len: int) -> dict[str, tuple[int, ...]]:
    """The two buffers a cache for ``config`` holds per layer, by name, with their shapes (module
    docstring): k/v [B, H_kv, S, D], or MLA's latent [B, S, d_c] and k_rope [B, S, d_h^R]."""
    if config.attention == "mla":
        return {"latent": (batch_size, max_len, config.mla.kv_lora_rank),
                "k_rope": (batch_size, max_len, config.mla.qk_rope_head_dim)}
    shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
    return {"k": shape, "v": shape}


class KVCache(nn.Module):
    """Pre-allocated per-layer attention state for ``batch_size`` rows of up to ``max_len`` tokens:
    for each layer i, two buffers ``{name}_{i}`` shaped by :func:`cache_shapes`, the sequence axis
    second to last.

    Each layer's buffers are tensors of their own, not views of one [n_layers, ...] tensor: a
    compiled decode step writes a view of a graph input as a scatter into a new copy of the whole
    input, copied back at its end, so one stacked buffer cost every step several reads and writes
    of every layer's cache (docs/performance.md, "Decode"); a buffer of its own is written in place.
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        shapes = cache_shapes(config, batch_size, max_len)
        self.names = tuple(shapes)
        for i in range(config.n_layers):
            for name, shape in shapes.items():
                self.register_buffer(f"{name}_{i}", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def fits(self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device,
             dtype: torch.dtype) -> bool:
        """Whether this cache has the buffers ``KVCache(config, batch_size, max_len, device, dtype)``
        would make (so it can be zeroed and reused instead)."""
        shapes = cache_shapes(config, batch_size, max_len)
        wanted = [(torch.Size(shapes[name]), dtype, device) for _ in range(config.n_layers) for name in self.names]
        return tuple(shapes) == self.names and [(b.shape, b.dtype, b.device) for b in self.buffers()] == wanted

    @property
    def max_len(self) -> int:
        return getattr(self, f"{self.names[0]}_0").size(-2)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's two buffers (writes go into the cache): keys and values [B, H_kv, S, D], or
        MLA's latent [B, S, d_c] and RoPE key [B, S, d_h^R]; what the attention's ``kv_cache`` takes."""
        first, second = (getattr(self, f"{name}_{i}") for name in self.names)
        return first, second
