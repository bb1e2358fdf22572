"""The mHC residual's operations as ``torch.library`` custom ops (mHC paper, arXiv 2512.24880).

One runtime path on every device: :class:`llmkit.model.mhc.MHCMapping` calls these ops, each a
single opaque node to ``torch.compile`` (``register_fake`` gives it shapes, ``register_autograd``
a backward made of ops), so a compiled block holds a handful of mHC nodes instead of the ~140
small kernels per sublayer that the 20 Sinkhorn iterations and the H math become when the
compiler traces them:

================================  ================================================================
op                                computes (tokens flattened: M = B T, streams X [M, n, C])
================================  ================================================================
``llmkit::mhc_enter``             from X: x phi^T and sum(x^2) of x = vec X (Eq. 7's projection),
                                  H_pre, H_post, H_res (Eq. 7-9, Sinkhorn included) and the
                                  sublayer's input u = H_pre X (Eq. 3)
``llmkit::mhc_boundary``          X = H_res' X' + H_post'^T y', the previous sublayer's pending
                                  write-back (Eq. 3), then ``mhc_enter``'s work on that X
``llmkit::mhc_apply``             the last sublayer's write-back H_res X + H_post^T y
================================  ================================================================

Why a boundary op: autograd sums the gradients of a tensor that several ops read. With one op
per step (projection, pre-aggregation, write-back) every stream X_l fed three ops, so backward
wrote dL/dX_l three times and then summed them. Here the write-back of sublayer l is deferred to
the op that starts sublayer l + 1 (llmkit.model.mhc.Pending), so X_{l+1} is made and read by one
op, whose backward forms dL/dX_{l+1} in one pass (the projection's, the pre-aggregation's and the
next write-back's terms) and writes dL/dX_l once. docs/performance.md counts the bytes.

On CUDA (bf16/fp16/fp32 streams) each step is one Triton kernel (llmkit/model/mhc_triton.py),
which reads each stream tensor once (for decode's few tokens the whole forward of ``mhc_enter``
or ``mhc_boundary`` is one kernel); elsewhere, on fp64 and with ``mhc.implementation: torch`` the
ops run the PyTorch code below. ``TRITON_INTERPRET=1`` runs the Triton kernels on CPU tensors
(the tests do). Either way the H coefficients and all mapping math are fp32 (fp64 for fp64
streams; for bf16 and fp16 streams the kernels' projection takes phi rounded to the stream's dtype,
with an fp32 accumulator, where the PyTorch code takes it in fp32), and the backward keeps only X,
y and O(n^2) floats per token: Sinkhorn's iterations are recomputed, not stored.
"""

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from llmkit.model.sinkhorn import sinkhorn_knopp, sinkhorn_knopp_backward

TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _source_hash() -> int:
    """A hash of the ops' code: this module, the Triton kernels and Sinkhorn's."""
    digest = hashlib.sha256()
    for name in ("mhc_ops.py", "mhc_triton.py", "sinkhorn.py"):
        digest.update((Path(__file__).parent / name).read_bytes())
    return int.from_bytes(digest.digest()[:7], "big")  # fits the schema's int (int64)


SOURCE_HASH: int = _source_hash()
"""What llmkit's model code passes as the forward ops' ``source_hash``, which they ignore: a
constant of every graph torch.compile traces through them, so part of its cache keys. AOTAutograd's
cache (on by default) keys a graph by the ops it calls, not by what a custom op's autograd formula
or kernels do: without this, a cache warmed by another version of these ops replays that
version's backward (gradients silently wrong, or a shape assertion) in the next process."""


def accumulate_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32, or fp64 when any input is fp64: the dtype of the mapping math and the H coefficients."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def triton_kernels(t: Tensor, use_triton: bool) -> ModuleType | None:
    """llmkit.model.mhc_triton when the ops should run Triton kernels on ``t``'s device and dtype, else None."""
    if not use_triton or t.dtype not in TRITON_DTYPES or t.numel() == 0:  # no tokens: nothing to launch
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


def entry_kernel(x: Tensor, use_triton: bool) -> ModuleType | None:
    """llmkit.model.mhc_triton when a sublayer's entry from X [M, n, C] (write-back, projection,
    coefficients, H_pre X) runs as its one kernel, ``entry_forward``: on the Triton path with at most
    ``ENTRY_ONE_KERNEL_TOKENS`` tokens (decode); else None."""
    kernels = triton_kernels(x, use_triton)
    return kernels if kernels is not None and x.shape[0] <= kernels.ENTRY_ONE_KERNEL_TOKENS else None


def no_autocast(t: Tensor) -> torch.autocast:
    """The ops' PyTorch code runs outside autocast: it picks its own dtypes (fp32 math), and
    autocast still applies inside a custom op's implementation."""
    return torch.autocast(t.device.type, enabled=False)


# --- the steps, each one Triton kernel or its PyTorch code ------------------------------------

def project(x: Tensor, phi: Tensor, use_triton: bool) -> tuple[Tensor, Tensor]:
    """(x phi^T, sum_k x_k^2) for x [M, nC], phi [P, nC], accumulated in fp32, as S partial sums
    over nC, [S, M, P] and [S, M] (the Triton kernel splits nC at decode shapes; the PyTorch code
    gives one): :func:`coefficients` sums them."""
    if (kernels := triton_kernels(x, use_triton)) is not None:
        return kernels.project_forward(x, phi)
    with no_autocast(x):
        xf = x.to(accumulate_dtype(x))
        return (xf @ phi.to(xf.dtype).T)[None], torch.linalg.vecdot(xf, xf)[None]


def mapping_logits(
    proj: Tensor, sumsq: Tensor, alpha: Tensor, bias: Tensor, n: int, width: int, norm_eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(H~ [M, P], d = x' phi [M, P], 1/rms(x) [M, 1]): Eq. 7's alpha * (x' phi) + b with
    x' = x / rms(x), the norm's divide applied after the projection (x' phi = (x phi) / rms(x))."""
    dtype = accumulate_dtype(proj)
    rms_inv = torch.rsqrt(sumsq.to(dtype)[:, None] / width + norm_eps)
    d = proj.to(dtype) * rms_inv
    return alpha_per_column(alpha, n, dtype) * d + bias.to(dtype), d, rms_inv


def packed(alpha: Sequence[Tensor], bias: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(alpha_pre, alpha_post, alpha_res) as one [3] tensor and (b_pre, b_post, b_res) as one
    [2n + n^2] (vec b_res): the mapping parameters as the PyTorch code takes them. The ops take
    the parameters themselves, so on the Triton path nothing packs them (two launches fewer per
    sublayer)."""
    return torch.stack([a.reshape(()) for a in alpha]), torch.cat([b.flatten() for b in bias])


def alpha_per_column(alpha: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """(alpha_pre, alpha_post, alpha_res) [3] repeated over the logits' columns: [2n + n^2]. Device
    ops only (no host tensor, no sync), so the PyTorch code can run inside a captured CUDA graph."""
    a = alpha.to(dtype)
    return torch.cat((a[0].expand(n), a[1].expand(n), a[2].expand(n * n)))


def coefficients(
    proj: Tensor, sumsq: Tensor, alpha: Sequence[Tensor], bias: Sequence[Tensor], n: int, width: int, iters: int,
    clamp: float, eps: float, norm_eps: float, use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(H_pre [M, n], H_post [M, n], H_res [M, n, n]) in fp32: H_pre = sigmoid(H~_pre),
    H_post = 2 sigmoid(H~_post), H_res = Sinkhorn(H~_res) (Eq. 8-9) from :func:`mapping_logits`,
    then the projection (proj [M, P], sumsq [M]) they came from: :func:`project`'s S partials
    [S, M, P] and [S, M], summed; alpha = (alpha_pre, alpha_post, alpha_res), bias = (b_pre,
    b_post, b_res)."""
    if (kernels := triton_kernels(proj, use_triton)) is not None:
        return kernels.coefficients_forward(proj, sumsq, alpha, bias, n, width, iters, clamp, eps, norm_eps)
    proj, sumsq = (proj[0], sumsq[0]) if len(proj) == 1 else (proj.sum(0), sumsq.sum(0))
    with no_autocast(proj):
        logits, _, _ = mapping_logits(proj, sumsq, *packed(alpha, bias), n, width, norm_eps)
        h_res = sinkhorn_knopp(logits[:, 2 * n:].reshape(-1, n, n), iters, clamp, eps)
        return torch.sigmoid(logits[:, :n]), 2 * torch.sigmoid(logits[:, n:2 * n]), h_res, proj, sumsq


def coefficients_backward(
    grad_pre: Tensor, grad_post: Tensor, grad_res: Tensor, proj: Tensor, sumsq: Tensor, alpha: Sequence[Tensor],
    bias: Sequence[Tensor], n: int, width: int, iters: int, clamp: float, eps: float, norm_eps: float,
    use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dproj, dL/dsumsq, the six parameters' gradients side by side [3 + P] in proj's dtype
    (:func:`split_alpha_bias` takes them apart)), recomputing the forward (Sinkhorn included)."""
    if (kernels := triton_kernels(proj, use_triton)) is not None:
        return kernels.coefficients_backward(grad_pre, grad_post, grad_res, proj, sumsq, alpha, bias, n, width, iters,
                                             clamp, eps, norm_eps)
    with no_autocast(proj):
        alpha, bias = packed(alpha, bias)
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
        return grad_d * rms_inv, grad_sumsq.squeeze(-1), torch.cat((grad_alpha, grad_logits.sum(0)))


def pre(x: Tensor, h_pre: Tensor, use_triton: bool) -> Tensor:
    """H_pre X = sum_m H_pre[m] X[m]: [M, C] in X's dtype from X [M, n, C] and H_pre [M, n], fp32 math."""
    if (kernels := triton_kernels(x, use_triton)) is not None:
        return kernels.pre_forward(x, h_pre.float())
    with no_autocast(x):
        dtype = accumulate_dtype(x, h_pre)
        return torch.bmm(h_pre.to(dtype)[:, None, :], x.to(dtype)).squeeze(1).to(x.dtype)


def apply(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, use_triton: bool) -> Tensor:
    """X'[i] = sum_m H_res[i, m] X[m] + H_post[i] y: [M, n, C] in X's dtype (y may differ: a bf16
    sublayer output on an fp32 stream), computed in fp32."""
    if (kernels := triton_kernels(x, use_triton)) is not None:
        return kernels.apply_forward(x, y, h_post.float(), h_res.float())
    with no_autocast(x):
        dtype = accumulate_dtype(x, h_res)
        # bmm, then H_post^T y added in place: baddbmm with the [M, n, C] outer product as its input took
        # 4x as long on a CPU (docs/performance.md, "The ops' PyTorch code")
        out = torch.bmm(h_res.to(dtype), x.to(dtype))
        return out.addcmul_(h_post.to(dtype)[:, :, None], y.to(dtype)[:, None, :]).to(x.dtype)


def apply_project(
    x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, phi: Tensor, use_triton: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(X', proj, sumsq): :func:`apply`'s X' [M, n, C], then :func:`project` of it (partials), the write-back
    of one sublayer and the projection of the next (on CUDA, one kernel where it pays:
    ``mhc_triton.apply_project``)."""
    if (kernels := triton_kernels(x, use_triton)) is not None:
        return kernels.apply_project(x, y, h_post.float(), h_res.float(), phi)
    out = apply(x, y, h_post, h_res, use_triton)
    m, n, c = out.shape
    return out, *project(out.reshape(m, n * c), phi, use_triton)


def enter(
    x: Tensor, proj_update: Tensor | None, phi: Tensor, alpha: Sequence[Tensor], bias: Sequence[Tensor], iters: int,
    clamp: float, eps: float, norm_eps: float, use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(u, H_pre, H_post, H_res, proj, sumsq) of one sublayer from its stream X [M, n, C]."""
    if (kernels := entry_kernel(x, use_triton)) is not None:
        _, *results = kernels.entry_forward(x, None, proj_update, phi, alpha, bias, iters, clamp, eps, norm_eps)
        return tuple(results)
    m, n, c = x.shape
    proj, sumsq = project(x.reshape(m, n * c), phi, use_triton)
    if proj_update is not None:
        proj[0] += proj_update.to(proj.dtype)  # into the first partial: the op's own buffer
    return entered(x, proj, sumsq, alpha, bias, iters, clamp, eps, norm_eps, use_triton)


def entered(
    x: Tensor, proj: Tensor, sumsq: Tensor, alpha: Sequence[Tensor], bias: Sequence[Tensor], iters: int, clamp: float,
    eps: float, norm_eps: float, use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`enter`'s results from the stream X [M, n, C] and its projection's partials (proj
    [S, M, P], sumsq [S, M]: :func:`project`)."""
    m, n, c = x.shape
    h_pre, h_post, h_res, proj, sumsq = coefficients(proj, sumsq, alpha, bias, n, n * c, iters, clamp, eps, norm_eps,
                                                     use_triton)
    return pre(x, h_pre, use_triton), h_pre, h_post, h_res, proj, sumsq


def _empty(t: Tensor) -> Tensor:
    """A contiguous empty tensor of ``t``'s shape and dtype: the ops' results are contiguous whatever
    their inputs' strides (``empty_like`` would copy a transposed input's)."""
    return t.new_empty(t.shape)


def _entered_like(x: Tensor, phi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Empty (u, H_pre, H_post, H_res, proj, sumsq) for X [M, n, C]: the ops' fake results."""
    m, n, c = x.shape
    dtype = accumulate_dtype(x)
    h = [x.new_empty(m, n, dtype=dtype), x.new_empty(m, n, dtype=dtype), x.new_empty(m, n, n, dtype=dtype)]
    return x.new_empty(m, c), *h, x.new_empty(m, phi.shape[0], dtype=dtype), x.new_empty(m, dtype=dtype)


# --- mhc_enter: a sublayer's mapping and input from its stream ------------------------------------

@torch.library.custom_op("llmkit::mhc_enter", mutates_args=())
def mhc_enter(
    x: Tensor, proj_update: Tensor | None, phi: Tensor, alpha: list[Tensor], bias: list[Tensor], iters: int,
    clamp: float, eps: float, norm_eps: float, use_triton: bool, source_hash: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(u = H_pre X [M, C], H_pre, H_post, H_res, proj, sumsq) from X [M, n, C], phi [P, nC],
    alpha = [alpha_pre, alpha_post, alpha_res] and bias = [b_pre [n], b_post [n], b_res [n, n]]
    (Eq. 3, 7-9), the parameters themselves. ``proj_update`` [M, P], if given, is added to x phi^T
    (a LoRA adapter's term on phi). proj (x phi^T, updated) and sumsq (sum x^2) are returned for
    the backward only: they carry no gradient. ``source_hash``: :data:`SOURCE_HASH`, for the
    compile caches; unused."""
    return enter(x, proj_update, phi, alpha, bias, iters, clamp, eps, norm_eps, use_triton)


@mhc_enter.register_fake
def _(x, proj_update, phi, alpha, bias, iters, clamp, eps, norm_eps, use_triton, source_hash):
    return _entered_like(x, phi)


def enter_backward(
    grad_x: Tensor | None, grad_u: Tensor, grad_pre: Tensor, grad_post: Tensor, grad_res: Tensor, x: Tensor,
    phi: Tensor, alpha: Sequence[Tensor], bias: Sequence[Tensor], proj: Tensor, sumsq: Tensor, h_pre: Tensor,
    iters: int, clamp: float, eps: float, norm_eps: float, use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dL/dX, dL/dproj, dL/dphi, the mapping parameters' gradients [3 + P]) of :func:`enter`, with dL/dX
    also summing ``grad_x`` (X's gradient from its other reader), all in one pass over X:

        dL/dH_pre = <g_u, X[m]> + grad_pre  ->  (dproj, dsumsq) by the coefficients' backward
        dL/dX     = grad_x + H_pre[m] g_u + dproj phi + 2 x dsumsq,   dL/dphi = dproj^T x
    """
    m, n, c = x.shape
    coefficient_args = (n, n * c, iters, clamp, eps, norm_eps, use_triton)
    if (kernels := triton_kernels(x, use_triton)) is not None:
        grad_h_pre = kernels.pre_backward(grad_u, x, grad_pre)
        grad_proj, grad_sumsq, grad_alpha_bias = coefficients_backward(
            grad_h_pre, grad_post, grad_res, proj, sumsq, alpha, bias, *coefficient_args)
        grad_x, grad_phi = kernels.project_backward(
            grad_proj, grad_sumsq, x.reshape(m, n * c), phi, None if grad_x is None else grad_x.reshape(m, n * c),
            (grad_u, h_pre))
        return grad_x.view(m, n, c), grad_proj, grad_phi.to(phi.dtype), grad_alpha_bias
    with no_autocast(x):
        dtype = accumulate_dtype(x, proj)
        xf, g_u = x.to(dtype), grad_u.to(dtype)
        grad_h_pre = torch.bmm(xf, g_u[:, :, None]).squeeze(-1) + grad_pre.to(dtype)
        grad_proj, grad_sumsq, grad_alpha_bias = coefficients_backward(
            grad_h_pre, grad_post, grad_res, proj, sumsq, alpha, bias, *coefficient_args)
        flat = xf.reshape(m, n * c)
        # each term accumulated in place into one new tensor (a third of the time of summing new
        # temporaries on a CPU): grad_x + H_pre[m] g_u, + 2 x dsumsq, + dproj phi
        outer = (h_pre.to(dtype)[:, :, None], g_u[:, None, :])
        total = torch.mul(*outer) if grad_x is None else torch.addcmul(grad_x.to(dtype), *outer)
        total = total.view(m, n * c).addcmul_(flat, grad_sumsq[:, None], value=2).addmm_(grad_proj, phi.to(dtype))
        return total.view(m, n, c).to(x.dtype), grad_proj, (grad_proj.T @ flat).to(phi.dtype), grad_alpha_bias


@torch.library.custom_op("llmkit::mhc_enter_backward", mutates_args=())
def mhc_enter_backward(
    grad_x: Tensor | None, grad_u: Tensor, grad_pre: Tensor, grad_post: Tensor, grad_res: Tensor, x: Tensor,
    phi: Tensor, alpha: list[Tensor], bias: list[Tensor], proj: Tensor, sumsq: Tensor, h_pre: Tensor, iters: int,
    clamp: float, eps: float, norm_eps: float, use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`mhc_enter`'s backward, :func:`enter_backward`."""
    return enter_backward(grad_x, grad_u, grad_pre, grad_post, grad_res, x, phi, alpha, bias, proj, sumsq, h_pre,
                          iters, clamp, eps, norm_eps, use_triton)


@mhc_enter_backward.register_fake
def _(grad_x, grad_u, grad_pre, grad_post, grad_res, x, phi, alpha, bias, proj, sumsq, h_pre, iters, clamp, eps,
      norm_eps, use_triton):
    return _empty(x), _empty(proj), _empty(phi), proj.new_empty(3 + proj.shape[1])


def split_alpha_bias(
    grad_alpha_bias: Tensor, alpha: Sequence[Tensor], bias: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """The gradients of alpha = [alpha_pre, alpha_post, alpha_res] and bias = [b_pre, b_post, b_res],
    each in its parameter's shape and dtype, from the backward ops' one [3 + P] output (one
    reduction fills it): views where the dtypes agree, no kernel."""
    grads, start = [], 0
    for param in (*alpha, *bias):
        grads.append(grad_alpha_bias[start:start + param.numel()].view(param.shape).to(param.dtype))
        start += param.numel()
    return grads[:3], grads[3:]


def _save_mapping(ctx, *tensors: Tensor, alpha: Sequence[Tensor], bias: Sequence[Tensor]) -> None:
    """save_for_backward(*tensors, the six mapping parameters); :func:`_saved_mapping` reads them back."""
    ctx.save_for_backward(*tensors, *alpha, *bias)


def _saved_mapping(ctx) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(the tensors :func:`_save_mapping` saved, alpha, bias)."""
    *tensors, a_pre, a_post, a_res, b_pre, b_post, b_res = ctx.saved_tensors
    return tensors, [a_pre, a_post, a_res], [b_pre, b_post, b_res]


def _enter_setup(ctx, inputs: tuple, output: tuple) -> None:
    x, proj_update, phi, alpha, bias, *ctx.attrs, _ = inputs  # the settings, without source_hash
    _, h_pre, _, _, proj, sumsq = output
    ctx.mark_non_differentiable(proj, sumsq)
    ctx.has_update = proj_update is not None
    _save_mapping(ctx, x, phi, proj, sumsq, h_pre, alpha=alpha, bias=bias)


def _enter_grad(ctx, grad_u, grad_pre, grad_post, grad_res, _grad_proj, _grad_sumsq) -> tuple:
    (x, phi, proj, sumsq, h_pre), alpha, bias = _saved_mapping(ctx)
    grad_x, grad_proj, grad_phi, grad_alpha_bias = mhc_enter_backward(
        None, grad_u, grad_pre, grad_post, grad_res, x, phi, alpha, bias, proj, sumsq, h_pre, *ctx.attrs)
    return grad_x, grad_proj if ctx.has_update else None, grad_phi, *split_alpha_bias(grad_alpha_bias, alpha, bias), \
        *([None] * (len(ctx.attrs) + 1))


mhc_enter.register_autograd(_enter_grad, setup_context=_enter_setup)


# --- mhc_boundary: the previous sublayer's write-back, then mhc_enter ----------------------------

@torch.library.custom_op("llmkit::mhc_boundary", mutates_args=())
def mhc_boundary(
    x_prev: Tensor, y_prev: Tensor, h_post_prev: Tensor, h_res_prev: Tensor, phi: Tensor, alpha: list[Tensor],
    bias: list[Tensor], iters: int, clamp: float, eps: float, norm_eps: float, use_triton: bool,
    source_hash: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(X, u, H_pre, H_post, H_res, proj, sumsq): X = H_res' X' + H_post'^T y' [M, n, C] from the
    previous sublayer's stream X' = ``x_prev``, output y' and coefficients (Eq. 3), then
    :func:`mhc_enter` on X. X is read by nothing else, so its gradient is never summed."""
    if (kernels := entry_kernel(x_prev, use_triton)) is not None:
        return kernels.entry_forward(x_prev, (y_prev, h_post_prev.float(), h_res_prev.float()), None, phi, alpha, bias,
                                     iters, clamp, eps, norm_eps)
    x, proj, sumsq = apply_project(x_prev, y_prev, h_post_prev, h_res_prev, phi, use_triton)
    return x, *entered(x, proj, sumsq, alpha, bias, iters, clamp, eps, norm_eps, use_triton)


@mhc_boundary.register_fake
def _(x_prev, y_prev, h_post_prev, h_res_prev, phi, alpha, bias, iters, clamp, eps, norm_eps, use_triton,
      source_hash):
    return _empty(x_prev), *_entered_like(x_prev, phi)


@torch.library.custom_op("llmkit::mhc_boundary_backward", mutates_args=())
def mhc_boundary_backward(
    grad_x: Tensor, grad_u: Tensor, grad_pre: Tensor, grad_post: Tensor, grad_res: Tensor, x_prev: Tensor,
    y_prev: Tensor, h_post_prev: Tensor, h_res_prev: Tensor, x: Tensor, phi: Tensor, alpha: list[Tensor],
    bias: list[Tensor], proj: Tensor, sumsq: Tensor, h_pre: Tensor, iters: int, clamp: float, eps: float,
    norm_eps: float, use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dL/dX', dL/dy', dL/dH_post', dL/dH_res', dL/dphi, the mapping parameters' gradients [3 + P]) of
    :func:`mhc_boundary`:
    :func:`enter_backward`'s dL/dX, ``grad_x`` (X's gradient from the next sublayer) included, then
    :func:`apply_backward` of the write-back X = H_res' X' + H_post'^T y'."""
    grad_x, _, grad_phi, grad_alpha_bias = enter_backward(grad_x, grad_u, grad_pre, grad_post, grad_res, x, phi, alpha,
                                                          bias, proj, sumsq, h_pre, iters, clamp, eps, norm_eps,
                                                          use_triton)
    return *apply_backward(grad_x, x_prev, y_prev, h_post_prev, h_res_prev, use_triton), grad_phi, grad_alpha_bias


@mhc_boundary_backward.register_fake
def _(grad_x, grad_u, grad_pre, grad_post, grad_res, x_prev, y_prev, h_post_prev, h_res_prev, x, phi, alpha, bias,
      proj, sumsq, h_pre, iters, clamp, eps, norm_eps, use_triton):
    return (_empty(x_prev), _empty(y_prev), _empty(h_post_prev), _empty(h_res_prev), _empty(phi),
            proj.new_empty(3 + proj.shape[1]))


def _boundary_setup(ctx, inputs: tuple, output: tuple) -> None:
    x_prev, y_prev, h_post_prev, h_res_prev, phi, alpha, bias, *ctx.attrs, _ = inputs  # without source_hash
    x, _, h_pre, _, _, proj, sumsq = output
    ctx.mark_non_differentiable(proj, sumsq)
    _save_mapping(ctx, x_prev, y_prev, h_post_prev, h_res_prev, x, phi, proj, sumsq, h_pre, alpha=alpha, bias=bias)


def _boundary_grad(ctx, grad_x, grad_u, grad_pre, grad_post, grad_res, _grad_proj, _grad_sumsq) -> tuple:
    (*stream, x, phi, proj, sumsq, h_pre), alpha, bias = _saved_mapping(ctx)
    *grads, grad_phi, grad_alpha_bias = mhc_boundary_backward(grad_x, grad_u, grad_pre, grad_post, grad_res, *stream,
                                                              x, phi, alpha, bias, proj, sumsq, h_pre, *ctx.attrs)
    return *grads, grad_phi, *split_alpha_bias(grad_alpha_bias, alpha, bias), *([None] * (len(ctx.attrs) + 1))


mhc_boundary.register_autograd(_boundary_grad, setup_context=_boundary_setup)


# --- H_res X + H_post^T y (Eq. 3's next stream) -----------------------------------------------

@torch.library.custom_op("llmkit::mhc_apply", mutates_args=())
def mhc_apply(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, use_triton: bool, source_hash: int) -> Tensor:
    """The last sublayer's write-back, :func:`apply` (the others' is inside :func:`mhc_boundary`);
    ``source_hash`` as :func:`mhc_enter`'s."""
    return apply(x, y, h_post, h_res, use_triton)


@mhc_apply.register_fake
def _(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, use_triton: bool, source_hash: int) -> Tensor:
    return _empty(x)


def apply_backward(
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


@torch.library.custom_op("llmkit::mhc_apply_backward", mutates_args=())
def mhc_apply_backward(
    grad: Tensor, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, use_triton: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`mhc_apply`'s backward, :func:`apply_backward`."""
    return apply_backward(grad, x, y, h_post, h_res, use_triton)


@mhc_apply_backward.register_fake
def _(grad, x, y, h_post, h_res, use_triton) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _empty(x), _empty(y), _empty(h_post), _empty(h_res)


def _apply_setup(ctx, inputs: tuple, output: Tensor) -> None:
    x, y, h_post, h_res, ctx.use_triton, _ = inputs
    ctx.save_for_backward(x, y, h_post, h_res)


def _apply_grad(ctx, grad: Tensor) -> tuple:
    return *mhc_apply_backward(grad, *ctx.saved_tensors, ctx.use_triton), None, None


mhc_apply.register_autograd(_apply_grad, setup_context=_apply_setup)


OPS = (mhc_enter, mhc_enter_backward, mhc_boundary, mhc_boundary_backward, mhc_apply, mhc_apply_backward)


def allow_inductor_fallbacks() -> None:
    """Name the ops in inductor's ``FALLBACK_ALLOW_LIST``, so that its lowering calls them without
    first describing each new op (a no-op where inductor has no such list).

    An op inductor has no lowering for takes its "implicit fallback" path, which logs the op's
    arguments at INFO: torch up to 2.11 formats that line whether or not INFO is on (later versions
    when it is, TORCH_LOGS=inductor), and an IR node's text holds its inputs' texts in full. The
    stream X of sublayer l + 1 comes out of sublayer l's op and its inputs out of sublayer l - 1's,
    several from each, so the text of a late op's arguments grows exponentially with depth: a
    whole-model graph (the compiled decode step) of the 120m n = 4 model, 24 chained sublayers,
    never finished lowering on an H200 (torch 2.11, still in ``IRNode.__str__`` after 100 s); 4
    layers with TORCH_LOGS=inductor took 82 s and logged 890 MB on a CPU. Called by
    :meth:`~llmkit.model.transformer.Transformer.compile_blocks` and the compiled decode step;
    call it before compiling a whole model yourself.
    """
    try:
        from torch._inductor.lowering import FALLBACK_ALLOW_LIST
    except ImportError:
        return
    for op in OPS:
        FALLBACK_ALLOW_LIST.add(op._qualname)
