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

from llmkit.model import mhc_ops, transformer
from llmkit.model.layers import upcast
from llmkit.model.mhc import Entry, MHCMapping, MHCResidual, Pending
from llmkit.model.sinkhorn import sinkhorn_knopp


def literal_apply(stream: torch.Tensor | Pending) -> torch.Tensor:
    """Eq. 3's write-back X' = H_res X + H_post^T y of a pending stream, with fp32 H applied outside
    autocast (a plain stream is returned as it is)."""
    if not isinstance(stream, Pending):
        return stream
    x, y, h_post, h_res = stream
    with torch.autocast(x.device.type, enabled=False):
        dtype = torch.promote_types(x.dtype, h_res.dtype)
        mixed = torch.einsum("...nm,...mc->...nc", h_res.to(dtype), x.to(dtype))
        return (mixed + h_post.to(dtype)[..., None] * y.to(dtype)[..., None, :]).to(x.dtype)


def literal_coefficients(
    x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, norm_eps: float, iters: int,
    clamp: float, eps: float, update: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H_pre, H_post, H_res) for X [..., n, C] by Eq. 7-9 as written, from phi [2n + n^2, nC],
    alpha = (alpha_pre, alpha_post, alpha_res) and b = (b_pre, b_post, vec b_res). ``update``, if
    given, is a term of x phi^T (a LoRA adapter's), normalised with it."""
    *lead, n, c = x.shape
    x_flat = upcast(x.reshape(*lead, n * c))
    rms_inv = torch.rsqrt(x_flat.square().mean(-1, keepdim=True) + norm_eps)
    d = (x_flat * rms_inv) @ phi.to(x_flat.dtype).T
    if update is not None:
        d = d + update * rms_inv
    d_pre, d_post, d_res = d.split((n, n, n * n), dim=-1)
    h_pre = torch.sigmoid(alpha[0] * d_pre + bias[:n])
    h_post = 2 * torch.sigmoid(alpha[1] * d_post + bias[n:2 * n])
    logits = alpha[2] * d_res.reshape(*lead, n, n) + bias[2 * n:].reshape(n, n)
    return h_pre, h_post, sinkhorn_knopp(logits, iters, clamp, eps)


def op_params(alpha: torch.Tensor, bias: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """alpha [3] and bias [2n + n^2] as the ops take the six mapping parameters: views of them,
    [alpha_pre, alpha_post, alpha_res] and [b_pre, b_post, vec b_res] (gradients reach the packed tensors)."""
    n = round(((1 + bias.numel()) ** 0.5) - 1)  # P = 2n + n^2 = (n + 1)^2 - 1
    return list(alpha.unbind()), list(bias.split((n, n, n * n)))


def literal_mapping(mapping: MHCMapping, stream: torch.Tensor | Pending) -> Entry:
    """The sublayer's stream (any pending write-back applied), input H_pre X and mappings."""
    x = literal_apply(stream)
    cfg = mapping.cfg
    alpha, bias = mhc_ops.packed(*mapping.alpha_and_bias())
    h_pre, h_post, h_res = literal_coefficients(x, mapping.phi.weight, alpha, bias, mapping.norm_eps,
                                                cfg.sinkhorn_iters, cfg.sinkhorn_clamp, cfg.sinkhorn_eps)
    with torch.autocast(x.device.type, enabled=False):
        dtype = torch.promote_types(x.dtype, h_pre.dtype)
        u = torch.einsum("...n,...nc->...c", h_pre.to(dtype), x.to(dtype)).to(x.dtype)
    return Entry(x, u, h_pre, h_post, h_res)


def literal_residual(
    residual: MHCResidual, stream: torch.Tensor | Pending, sublayer: Callable[[torch.Tensor], torch.Tensor]
) -> Pending:
    """Eq. 3 around one sublayer: X' = H_res X + H_post^T F(H_pre X), left pending as the model does."""
    entry = literal_mapping(residual.mapping, stream)
    return Pending(entry.x, sublayer(entry.u), entry.h_post, entry.h_res)


@contextmanager
def literal_mhc() -> Iterator[None]:
    """Run every MHCResidual, MHCMapping and the final write-back by the oracle while the context is open."""
    saved = MHCResidual.forward, MHCMapping.forward, transformer.finish
    MHCResidual.forward, MHCMapping.forward = literal_residual, literal_mapping
    transformer.finish = lambda stream, use_triton: literal_apply(stream)
    try:
        yield
    finally:
        MHCResidual.forward, MHCMapping.forward, transformer.finish = saved


def loss_and_grads(model: torch.nn.Module, idx: torch.Tensor, vocab: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits (fp64) and every parameter's gradient (fp64) of next-token cross-entropy on idx."""
    model.zero_grad()
    logits = model(idx[:, :-1])
    F.cross_entropy(logits.reshape(-1, vocab).to(torch.float64), idx[:, 1:].reshape(-1)).backward()
    return logits.detach().double(), [p.grad.detach().double() for p in model.parameters()]
