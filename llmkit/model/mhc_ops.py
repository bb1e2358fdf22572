"""The mHC residual's operations as ``torch.library`` custom ops (mHC paper, arXiv 2512.24880).

One runtime path on every device: :class:`llmkit.model.mhc.MHCResidual` calls these four ops,
each a single opaque node to ``torch.compile`` (``register_fake`` gives it shapes,
``register_autograd`` a backward that is itself one op), so a compiled block holds a handful of
mHC nodes instead of the ~140 small kernels per sublayer that the 20 Sinkhorn iterations and
the H math become when the compiler traces them:

================================  ================================================================
op                                computes (tokens flattened: M = B T, streams X [M, n, C])
================================  ================================================================
``llmkit::mhc_project``           x phi^T and sum(x^2) of x = vec X [M, nC] (Eq. 7's projection)
``llmkit::mhc_coefficients``      H_pre, H_post, H_res from them (Eq. 7-9, Sinkhorn included)
``llmkit::mhc_pre``               H_pre X, the sublayer's input [M, C] (Eq. 3)
``llmkit::mhc_apply``             H_res X + H_post^T y, the next stream (Eq. 3)
================================  ================================================================

On CUDA (bf16/fp16/fp32 streams) each op and its backward is one Triton kernel
(llmkit/model/mhc_triton.py), which reads each stream tensor once; elsewhere, on fp64 and with
``mhc.implementation: torch`` the ops run the PyTorch code below. ``TRITON_INTERPRET=1`` runs the
Triton kernels on CPU tensors (the tests do). Either way the H coefficients and all mapping math
are fp32 (fp64 for fp64 streams), and the backward keeps only X, y and O(n^2) floats per token:
Sinkhorn's iterations are recomputed, not stored.
"""

import os
import warnings
from types import ModuleType

import torch
from torch import Tensor

from llmkit.model.sinkhorn import sinkhorn_knopp, sinkhorn_knopp_backward

TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def accumulate_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32, or fp64 when any input is fp64: the dtype of the mapping math and the H coefficients."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def triton_kernels(t: Tensor, use_triton: bool) -> ModuleType | None:
    """llmkit.model.mhc_triton when the ops should run Triton kernels on ``t``'s device and dtype, else None."""
    if not use_triton or t.dtype not in TRITON_DTYPES:
        return None
    if not (t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        return None
    try:
        from llmkit.model import mhc_triton
    except ImportError:
        warnings.warn("triton is not installed: mHC runs its PyTorch code on this GPU (slower); "
                      "pip install triton", stacklevel=3)
        return None
    return mhc_triton


def no_autocast(t: Tensor) -> torch.autocast:
    """The ops' PyTorch code runs outside autocast: it picks its own dtypes (fp32 math), and
    autocast still applies inside a custom op's implementation."""
    return torch.autocast(t.device.type, enabled=False)


# --- x phi^T and sum(x^2) -----------------------------------------------------------------------

@torch.library.custom_op("llmkit::mhc_project", mutates_args=())
def mhc_project(x: Tensor, phi: Tensor, use_triton: bool) -> tuple[Tensor, Tensor]:
    """(x phi^T [M, P], sum_k x_k^2 [M]) for x [M, nC], phi [P, nC], accumulated in fp32."""
    if (kernels := triton_kernels(x, use_triton)) is not None:
        return kernels.project_forward(x, phi)
    with no_autocast(x):
        xf = x.to(accumulate_dtype(x))
        return xf @ phi.to(xf.dtype).T, xf.square().sum(-1)


@mhc_project.register_fake
def _(x: Tensor, phi: Tensor, use_triton: bool) -> tuple[Tensor, Tensor]:
    dtype = accumulate_dtype(x)
    return x.new_empty(x.shape[0], phi.shape[0], dtype=dtype), x.new_empty(x.shape[0], dtype=dtype)


@torch.library.custom_op("llmkit::mhc_project_backward", mutates_args=())
def mhc_project_backward(
    grad_proj: Tensor, grad_sumsq: Tensor, x: Tensor, phi: Tensor, use_triton: bool
) -> tuple[Tensor, Tensor]:
    """(dL/dx = g phi + 2 x g_sumsq, dL/dphi = g^T x) in x's and phi's dtypes."""
    if (kernels := triton_kernels(x, use_triton)) is not None:
        return kernels.project_backward(grad_proj, grad_sumsq, x, phi)
    with no_autocast(x):
        xf = x.to(accumulate_dtype(x, grad_proj))
        grad_x = grad_proj.to(xf.dtype) @ phi.to(xf.dtype) + 2 * xf * grad_sumsq.to(xf.dtype)[:, None]
        return grad_x.to(x.dtype), (grad_proj.to(xf.dtype).T @ xf).to(phi.dtype)


@mhc_project_backward.register_fake
def _(grad_proj: Tensor, grad_sumsq: Tensor, x: Tensor, phi: Tensor, use_triton: bool) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(phi)


def _project_setup(ctx, inputs: tuple, output: tuple) -> None:
    x, phi, ctx.use_triton = inputs
    ctx.save_for_backward(x, phi)


def _project_grad(ctx, grad_proj: Tensor, grad_sumsq: Tensor) -> tuple:
    x, phi = ctx.saved_tensors
    return *mhc_project_backward(grad_proj, grad_sumsq, x, phi, ctx.use_triton), None


mhc_project.register_autograd(_project_grad, setup_context=_project_setup)


# --- H_pre, H_post, H_res (Eq. 7-9) -----------------------------------------------------------

def mapping_logits(
    proj: Tensor, sumsq: Tensor, alpha: Tensor, bias: Tensor, n: int, width: int, norm_eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(H~ [M, P], d = x' phi [M, P], 1/rms(x) [M, 1]): Eq. 7-8's alpha * (x' phi) + b with
    x' = x / rms(x), the norm's divide applied after the projection (x' phi = (x phi) / rms(x))."""
    dtype = accumulate_dtype(proj)
    rms_inv = torch.rsqrt(sumsq.to(dtype)[:, None] / width + norm_eps)
    d = proj.to(dtype) * rms_inv
    return alpha_per_column(alpha, n, dtype) * d + bias.to(dtype), d, rms_inv


def alpha_per_column(alpha: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """(alpha_pre, alpha_post, alpha_res) [3] repeated over the logits' columns: [2n + n^2]."""
    return alpha.to(dtype).repeat_interleave(torch.tensor([n, n, n * n], device=alpha.device))


@torch.library.custom_op("llmkit::mhc_coefficients", mutates_args=())
def mhc_coefficients(
    proj: Tensor, sumsq: Tensor, alpha: Tensor, bias: Tensor, n: int, width: int, iters: int, clamp: float,
    eps: float, norm_eps: float, use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(H_pre [M, n], H_post [M, n], H_res [M, n, n]) in fp32: H_pre = sigmoid(H~_pre),
    H_post = 2 sigmoid(H~_post), H_res = Sinkhorn(H~_res) (Eq. 8-9) from :func:`mapping_logits`."""
    if (kernels := triton_kernels(proj, use_triton)) is not None:
        return kernels.coefficients_forward(proj, sumsq, alpha.float(), bias.float(), n, width, iters, clamp, eps,
                                            norm_eps)
    with no_autocast(proj):
        logits, _, _ = mapping_logits(proj, sumsq, alpha, bias, n, width, norm_eps)
        h_res = sinkhorn_knopp(logits[:, 2 * n:].reshape(-1, n, n), iters, clamp, eps)
        return torch.sigmoid(logits[:, :n]), 2 * torch.sigmoid(logits[:, n:2 * n]), h_res


@mhc_coefficients.register_fake
def _(proj, sumsq, alpha, bias, n, width, iters, clamp, eps, norm_eps, use_triton) -> tuple[Tensor, Tensor, Tensor]:
    m, dtype = proj.shape[0], accumulate_dtype(proj)
    return proj.new_empty(m, n, dtype=dtype), proj.new_empty(m, n, dtype=dtype), proj.new_empty(m, n, n, dtype=dtype)


@torch.library.custom_op("llmkit::mhc_coefficients_backward", mutates_args=())
def mhc_coefficients_backward(
    grad_pre: Tensor, grad_post: Tensor, grad_res: Tensor, proj: Tensor, sumsq: Tensor, alpha: Tensor, bias: Tensor,
    n: int, width: int, iters: int, clamp: float, eps: float, norm_eps: float, use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dL/dproj, dL/dsumsq, dL/dalpha, dL/dbias), recomputing the forward (Sinkhorn included)."""
    if (kernels := triton_kernels(proj, use_triton)) is not None:
        grads = kernels.coefficients_backward(grad_pre, grad_post, grad_res, proj, sumsq, alpha.float(), bias.float(),
                                              n, width, iters, clamp, eps, norm_eps)
        return grads[0], grads[1], grads[2].to(alpha.dtype), grads[3].to(bias.dtype)
    with no_autocast(proj):
        logits, d, rms_inv = mapping_logits(proj, sumsq, alpha, bias, n, width, norm_eps)
        s_pre, s_post = torch.sigmoid(logits[:, :n]), torch.sigmoid(logits[:, n:2 * n])
        grad_logits = torch.cat((
            grad_pre.to(d.dtype) * s_pre * (1 - s_pre),
            2 * grad_post.to(d.dtype) * s_post * (1 - s_post),
            sinkhorn_knopp_backward(grad_res, logits[:, 2 * n:].reshape(-1, n, n), iters, clamp, eps).flatten(1),
        ), dim=-1)
        by_alpha = (grad_logits * d).split((n, n, n * n), dim=-1)
        grad_alpha = torch.stack([g.sum() for g in by_alpha])
        grad_d = grad_logits * alpha_per_column(alpha, n, d.dtype)
        grad_rms_inv = (grad_d * proj.to(d.dtype)).sum(-1, keepdim=True)
        grad_sumsq = grad_rms_inv * -0.5 * rms_inv.pow(3) / width  # d rsqrt(s / K + eps) / ds
        return grad_d * rms_inv, grad_sumsq.squeeze(-1), grad_alpha.to(alpha.dtype), grad_logits.sum(0).to(bias.dtype)


@mhc_coefficients_backward.register_fake
def _(grad_pre, grad_post, grad_res, proj, sumsq, alpha, bias, n, width, iters, clamp, eps, norm_eps, use_triton):
    return torch.empty_like(proj), torch.empty_like(sumsq), torch.empty_like(alpha), torch.empty_like(bias)


def _coefficients_setup(ctx, inputs: tuple, output: tuple) -> None:
    proj, sumsq, alpha, bias, *ctx.attrs = inputs
    ctx.save_for_backward(proj, sumsq, alpha, bias)


def _coefficients_grad(ctx, grad_pre: Tensor, grad_post: Tensor, grad_res: Tensor) -> tuple:
    grads = mhc_coefficients_backward(grad_pre, grad_post, grad_res, *ctx.saved_tensors, *ctx.attrs)
    return *grads, *([None] * len(ctx.attrs))


mhc_coefficients.register_autograd(_coefficients_grad, setup_context=_coefficients_setup)


# --- H_pre X (Eq. 3's sublayer input) ---------------------------------------------------------

@torch.library.custom_op("llmkit::mhc_pre", mutates_args=())
def mhc_pre(x: Tensor, h_pre: Tensor, use_triton: bool) -> Tensor:
    """H_pre X = sum_m H_pre[m] X[m]: [M, C] in X's dtype from X [M, n, C] and H_pre [M, n]."""
    if (kernels := triton_kernels(x, use_triton)) is not None:
        return kernels.pre_forward(x, h_pre.float())
    with no_autocast(x):
        dtype = accumulate_dtype(x, h_pre)
        return torch.bmm(h_pre.to(dtype)[:, None, :], x.to(dtype)).squeeze(1).to(x.dtype)


@mhc_pre.register_fake
def _(x: Tensor, h_pre: Tensor, use_triton: bool) -> Tensor:
    return x.new_empty(x.shape[0], x.shape[2])


@torch.library.custom_op("llmkit::mhc_pre_backward", mutates_args=())
def mhc_pre_backward(grad: Tensor, x: Tensor, h_pre: Tensor, use_triton: bool) -> tuple[Tensor, Tensor]:
    """(dL/dX = H_pre[m] g, dL/dH_pre[m] = <g, X[m]>) for g = dL/d(H_pre X)."""
    if (kernels := triton_kernels(x, use_triton)) is not None:
        grad_x, grad_h = kernels.pre_backward(grad, x, h_pre.float())
        return grad_x, grad_h.to(h_pre.dtype)
    with no_autocast(x):
        dtype = accumulate_dtype(x, h_pre)
        g = grad.to(dtype)
        grad_x = h_pre.to(dtype)[:, :, None] * g[:, None, :]
        return grad_x.to(x.dtype), torch.bmm(x.to(dtype), g[:, :, None]).squeeze(-1).to(h_pre.dtype)


@mhc_pre_backward.register_fake
def _(grad: Tensor, x: Tensor, h_pre: Tensor, use_triton: bool) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(h_pre)


def _pre_setup(ctx, inputs: tuple, output: Tensor) -> None:
    x, h_pre, ctx.use_triton = inputs
    ctx.save_for_backward(x, h_pre)


def _pre_grad(ctx, grad: Tensor) -> tuple:
    return *mhc_pre_backward(grad, *ctx.saved_tensors, ctx.use_triton), None


mhc_pre.register_autograd(_pre_grad, setup_context=_pre_setup)


# --- H_res X + H_post^T y (Eq. 3's next stream) -----------------------------------------------

@torch.library.custom_op("llmkit::mhc_apply", mutates_args=())
def mhc_apply(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, use_triton: bool) -> Tensor:
    """X'[i] = sum_m H_res[i, m] X[m] + H_post[i] y: [M, n, C] in X's dtype (y may differ: a bf16
    sublayer output on an fp32 stream), computed in fp32."""
    if (kernels := triton_kernels(x, use_triton)) is not None:
        return kernels.apply_forward(x, y, h_post.float(), h_res.float())
    with no_autocast(x):
        dtype = accumulate_dtype(x, h_res)
        post = h_post.to(dtype)[:, :, None] * y.to(dtype)[:, None, :]
        return torch.baddbmm(post, h_res.to(dtype), x.to(dtype)).to(x.dtype)


@mhc_apply.register_fake
def _(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, use_triton: bool) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("llmkit::mhc_apply_backward", mutates_args=())
def mhc_apply_backward(
    grad: Tensor, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, use_triton: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dL/dX = H_res^T G, dL/dy = H_post^T G, dL/dH_post[i] = <G[i], y>, dL/dH_res[i, m] = <G[i], X[m]>)."""
    if (kernels := triton_kernels(x, use_triton)) is not None:
        grads = kernels.apply_backward(grad, x, y, h_post.float(), h_res.float())
        return grads[0], grads[1], grads[2].to(h_post.dtype), grads[3].to(h_res.dtype)
    with no_autocast(x):
        dtype = accumulate_dtype(x, h_res)
        g, xf = grad.to(dtype), x.to(dtype)
        grad_x = torch.bmm(h_res.to(dtype).transpose(1, 2), g)
        grad_y = torch.bmm(h_post.to(dtype)[:, None, :], g).squeeze(1)
        grad_h_post = torch.bmm(g, y.to(dtype)[:, :, None]).squeeze(-1)
        grad_h_res = torch.bmm(g, xf.transpose(1, 2))
        return grad_x.to(x.dtype), grad_y.to(y.dtype), grad_h_post.to(h_post.dtype), grad_h_res.to(h_res.dtype)


@mhc_apply_backward.register_fake
def _(grad, x, y, h_post, h_res, use_triton) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(h_post), torch.empty_like(h_res)


def _apply_setup(ctx, inputs: tuple, output: Tensor) -> None:
    x, y, h_post, h_res, ctx.use_triton = inputs
    ctx.save_for_backward(x, y, h_post, h_res)


def _apply_grad(ctx, grad: Tensor) -> tuple:
    return *mhc_apply_backward(grad, *ctx.saved_tensors, ctx.use_triton), None


mhc_apply.register_autograd(_apply_grad, setup_context=_apply_setup)
