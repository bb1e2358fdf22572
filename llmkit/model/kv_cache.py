"""Key/value cache for incremental decoding (the sampler of SDFT and TTT-Discover).

What attention keeps of every past token, for every layer, pre-allocated for a fixed batch and
length; the shapes come from the config (:func:`cache_shapes`):

- ``attention: mha``: keys ``k`` and values ``v``, each [n_layers, B, H_kv, S, D];
- ``attention: mla``: the latent ``latent`` c^KV [n_layers, B, S, d_c] (after its RMSNorm) and
  the RoPE key ``k_rope`` k^R [n_layers, B, S, d_h^R] shared by all heads, d_c + d_h^R numbers
  per token per layer (DeepSeek-V2, arXiv 2405.04434, Sec. 2.1.4; llmkit.model.mla).

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
    """The two buffers a cache for ``config`` holds, by name, with their shapes (module docstring):
    k/v [L, B, H_kv, S, D], or MLA's latent [L, B, S, d_c] and k_rope [L, B, S, d_h^R]."""
    if config.attention == "mla":
        return {"latent": (config.n_layers, batch_size, max_len, config.mla.kv_lora_rank),
                "k_rope": (config.n_layers, batch_size, max_len, config.mla.qk_rope_head_dim)}
    shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
    return {"k": shape, "v": shape}


class KVCache(nn.Module):
    """Pre-allocated per-layer attention state for ``batch_size`` rows of up to ``max_len`` tokens:
    two buffers shaped by :func:`cache_shapes`, the sequence axis second to last."""

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        shapes = cache_shapes(config, batch_size, max_len)
        self.names = tuple(shapes)
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @property
    def max_len(self) -> int:
        return getattr(self, self.names[0]).size(-2)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's two views (writes go into the cache): keys and values [B, H_kv, S, D], or
        MLA's latent [B, S, d_c] and RoPE key [B, S, d_h^R]; what the attention's ``kv_cache`` takes."""
        first, second = (getattr(self, name) for name in self.names)
        return first[i], second[i]
