"""The mHC residual exactly as the paper writes it (arXiv 2512.24880, Eq. 3 and 7-9): the oracle
the custom ops (llmkit/model/mhc_ops.py) and their Triton kernels are tested against.

RMSNorm of the flattened stream, then the projection; sigmoid, 2 sigmoid and Sinkhorn with
autograd through every iteration; einsums for H_pre X and H_res X + H_post^T y. All mapping math
in fp32 (fp64 for fp64 models), as the module does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from llmkit.model.layers import upcast
from llmkit.model.mhc import MHCMapping, MHCResidual
from llmkit.model.sinkhorn import sinkhorn_knopp


def literal_mapping(mapping: MHCMapping, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H_pre, H_post, H_res) for X [..., n, C] by Eq. 7-9 as written."""
    *lead, n, c = x.shape
    x_flat = upcast(x.reshape(*lead, n * c))
    x_norm = x_flat * torch.rsqrt(x_flat.square().mean(-1, keepdim=True) + mapping.norm_eps)
    d = x_norm @ mapping.phi.weight.to(x_flat.dtype).T
    d_pre, d_post, d_res = d.split((n, n, n * n), dim=-1)
    h_pre = torch.sigmoid(mapping.alpha_pre * d_pre + mapping.b_pre)
    h_post = 2 * torch.sigmoid(mapping.alpha_post * d_post + mapping.b_post)
    logits = mapping.alpha_res * d_res.reshape(*lead, n, n) + mapping.b_res
    cfg = mapping.cfg
    return h_pre, h_post, sinkhorn_knopp(logits, cfg.sinkhorn_iters, cfg.sinkhorn_clamp, cfg.sinkhorn_eps)


def literal_residual(
    residual: MHCResidual, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Eq. 3: X' = H_res X + H_post^T F(H_pre X), with fp32 H applied to the stream outside autocast."""
    h_pre, h_post, h_res = literal_mapping(residual.mapping, x)
    with torch.autocast(x.device.type, enabled=False):
        dtype = torch.promote_types(x.dtype, h_pre.dtype)
        x_pre = torch.einsum("...n,...nc->...c", h_pre.to(dtype), x.to(dtype)).to(x.dtype)
    y = sublayer(x_pre)
    with torch.autocast(x.device.type, enabled=False):
        mixed = torch.einsum("...nm,...mc->...nc", h_res.to(dtype), x.to(dtype))
        return (mixed + h_post.to(dtype)[..., None] * y.to(dtype)[..., None, :]).to(x.dtype)


@contextmanager
def literal_mhc() -> Iterator[None]:
    """Run every MHCResidual (and MHCMapping) in the block by the oracle while the context is open."""
    residual_forward, mapping_forward = MHCResidual.forward, MHCMapping.forward
    MHCResidual.forward, MHCMapping.forward = literal_residual, literal_mapping
    try:
        yield
    finally:
        MHCResidual.forward, MHCMapping.forward = residual_forward, mapping_forward


def loss_and_grads(model: torch.nn.Module, idx: torch.Tensor, vocab: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits (fp64) and every parameter's gradient (fp64) of next-token cross-entropy on idx."""
    model.zero_grad()
    logits = model(idx[:, :-1])
    F.cross_entropy(logits.reshape(-1, vocab).to(torch.float64), idx[:, 1:].reshape(-1)).backward()
    return logits.detach().double(), [p.grad.detach().double() for p in model.parameters()]
