"""Dense to mHC: an n-stream model that computes exactly what a one-stream model computes.

With phi = 0 the mHC mappings (Eq. 7-8) are constants: H_pre = sigmoid(b_pre), H_post =
2 sigmoid(b_post), H_res = SinkhornKnopp(b_res). Choose

    b_pre = logit(1/n)     so  H_pre = 1/n per stream: H_pre X = mean(X), the sublayer's input;
    b_post = 0             so  H_post = 1: every stream receives all of y;
    b_res symmetric        (+res_bias on the diagonal, -res_bias off it): Sinkhorn makes every
                           row and column sum to 1, so H_res preserves the mean of the streams;
    stream_emb             with zero mean over the streams.

Then mean(X_0) = e (the token embedding) and, by induction, mean(X_{l+1}) = mean(H_res X_l) +
mean(H_post) y_l = mean(X_l) + y_l with y_l = F(mean(X_l)): the mean of the streams follows the
dense residual x_{l+1} = x_l + F(x_l) exactly, and the read-out 1/n 1^T X is that mean. The
streams themselves differ (by the stream embedding, mixed by H_res), so training can make them
diverge: a zero stream embedding would keep them identical, a symmetric point gradient descent
never leaves. See docs/interop.md.
"""

from __future__ import annotations

import dataclasses

import torch

from llmkit.errors import LLMKitError
from llmkit.model.config import ModelConfig
from llmkit.model.mhc import MHCMapping


def upcycle_state(
    config: ModelConfig, state: dict[str, torch.Tensor], n_streams: int, seed: int = 0
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and state dict of the ``n_streams`` mHC model equal to the one-stream model
    (``config``, ``state``) at initialisation (module docstring). The dense tensors are shared,
    not copied; the new ones take the dtype of the token embedding."""
    if config.n_streams != 1:
        raise LLMKitError(
            f"upcycling starts from a dense model (n_streams 1); this one has n_streams {config.n_streams}"
        )
    if n_streams < 2:
        raise LLMKitError(f"upcycling needs n_streams >= 2, got {n_streams}")
    mhc = dataclasses.replace(config.mhc, post_init="copy")
    upcycled = dataclasses.replace(config, n_streams=n_streams, mhc=mhc)
    dtype = state["tok_emb.weight"].dtype
    mapping = MHCMapping(upcycled)  # its own b_pre = logit(1/n), b_post = 0 (copy), symmetric b_res
    with torch.no_grad():
        mapping.phi.weight.zero_()
    template = {name: tensor.to(dtype) for name, tensor in mapping.state_dict().items()}
    new = dict(state)
    for layer in range(config.n_layers):
        for residual in ("attn_res", "mlp_res"):
            new |= {f"blocks.{layer}.{residual}.mapping.{name}": tensor.clone() for name, tensor in template.items()}
    generator = torch.Generator().manual_seed(seed)
    stream_emb = torch.randn(n_streams, config.d_model, generator=generator) * config.init_std
    new["stream_emb"] = (stream_emb - stream_emb.mean(dim=0)).to(dtype)
    return upcycled, new
