"""Triton kernels for manifold-constrained hyper-connections (mHC, arXiv 2512.24880).

One launch per step of the mHC residual (see :mod:`llmkit.model.mhc_ops` for the math and the
PyTorch implementations these kernels replace), and one cuBLAS matmul (dL/dphi). Per token, the
stream is X [n, C] and x = vec X has width K = n C; P = 2n + n^2 mapping logits.

- :func:`project_forward` / :func:`project_backward`: Eq. 7's projection, proj = x phi^T, and
  sumsq = sum_k x_k^2 (the RMSNorm statistic, applied after the projection), from one read of x;
  backward, dL/dx from one read of x and dL/dphi = g^T x by a matmul (:func:`_grad_phi`).
- :func:`coefficients_forward` / :func:`coefficients_backward`: Eq. 7-9 from (proj, sumsq):
  l = alpha * proj * rsqrt(sumsq / K + norm_eps) + bias, H_pre = sigmoid(l_pre) (Eq. 8),
  H_post = 2 sigmoid(l_post) (Eq. 8), H_res = Sinkhorn-Knopp(l_res) (Eq. 9).
- :func:`pre_forward` / :func:`pre_backward`: the sublayer's input H_pre X (Eq. 3); the backward
  gives dL/dH_pre only, plus H_pre's gradient from elsewhere (:func:`project_backward` adds the
  pre-aggregation's share of dL/dX).
- :func:`apply_forward` / :func:`apply_backward`: Eq. 3's update X' = H_res X + H_post^T y.
- :func:`apply_project_forward`: a write-back and the next sublayer's projection in one kernel,
  so the stream between them is not read back; behind APPLY_PROJECT_FUSED, off: no clear gain on
  an H200 (docs/performance.md, which also says why its backward counterpart was removed).
- :func:`entry_forward`: for decode's few tokens, a sublayer's whole entry (write-back,
  projection, coefficients and H_pre X) in one kernel, one token per program, in place of four.

All coefficient math is fp32. The stream may be bf16, fp16 or fp32 (fp64 is not supported:
route it to PyTorch). Every kernel is deterministic: cross-program sums go through fp32
partials, reduced with torch or by the kernel that reads them (the projection's K splits, summed
by the coefficients forward), never atomics.

Dots: on a GPU the forward projection keeps bf16/fp16 operands (tensor cores, fp32
accumulation); with an fp32 stream its operands follow ``torch.get_float32_matmul_precision()``
as torch's own matmuls do: full fp32 ("ieee", CUDA-core FMAs) at "highest", the default, and
tf32 at "high" or "medium"; :data:`FP32_DOT_PRECISION` overrides that for these kernels. The
backward's g phi is, for a bf16 stream, tensor-core dots of g's three bf16 parts (each product
exact in fp32), else fp32 FMAs; its g^T x is a matmul as exact as an fp32 one.

Triton's interpreter (TRITON_INTERPRET=1, fixed when this module is imported) differs from a GPU
in two ways handled here: ``tl.dot`` on bf16 operands returns garbage (triton issue 11584), so
interpreted kernels upcast both dot operands to fp32; and fp32 -> bf16 casts truncate instead of
rounding to nearest even, so there torch rounds phi for the dot (:func:`_dot_weight`); bf16
outputs stored by the interpreter are truncated (within a bf16 ulp of a GPU's).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmkit.model.config import MAX_STREAMS

INTERPRETED: bool = (bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs")  # triton >= 3.4
                     else os.environ.get("TRITON_INTERPRET") == "1")
"""Whether triton.jit decorated these kernels for its CPU interpreter (decided at import)."""

_STREAM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Block sizes for an H100/H200 at M = 16k tokens, C = 768..1024, n = 4 (module-level so that tests
# can shrink them to exercise multi-program paths on tiny shapes, and bench/mhc_kernel_variants.py
# can time the alternatives). Measured on an H200 at C = 768 (docs/performance.md has the table):
# COEFF_BLOCK_ELEMENTS 256 and STREAM_BLOCK_C 1024 are the fastest variants tried, and the project
# tiles below (2026-12-04, bf16 stream, 16k tokens; their variants' times in the comments).
# Every kernel compiles for sm_90 without spilling (bench/mhc_triton_compile.py).
PROJECT_BLOCK_M = 64  # tokens per tile in project_forward (>= 16 for tl.dot); 32 took 1.6x as long
PROJECT_BLOCK_K = 64  # columns of x per tile in project_forward (>= 16 for tl.dot): 0.049 ms, 32 took 0.071
PROJECT_BWD_BLOCK_M = 64  # tokens per program in project_backward's grad_x kernel
PROJECT_BWD_BLOCK_K = 64  # columns of x per program there: 128 registers per thread at 4 warps on sm_90
PROJECT_BWD_WARPS = 4
PROJECT_BWD_DOT = True  # bf16 streams: the grad_proj phi term as tensor-core dots of grad_proj's three bf16
# parts (_add_grad_proj_phi_dot), not P rank-one fp32 FMA updates: 0.198 ms with its dot matmul at
# these tiles, 0.298 as FMAs at their best (16 x 128); 16 x 128 dots 0.264, 32 x 128 0.241, 128 x 64 0.216
PROJECT_FWD_PROGRAMS = 256  # project_forward splits K when fewer token blocks than this (decode)
COEFF_BWD_PROGRAMS = 1024  # coefficients_backward's programs at most (each with its iterates' scratch)
COEFF_BLOCK_ELEMENTS = 256  # tokens per coefficient program = this / padded n^2 (capped at 128): 16 at n = 4;
# on an H200 the backward took 0.19 ms at 256 and 0.30 at 512 (16k tokens), the forward 0.020 and 0.030
COEFF_SPLIT_ELEMENTS = 2048  # with projection partials, tokens per forward program <= this / (partials per load n^2)
COEFF_MAX_BLOCK_S = 128  # partials the coefficient forward reads per load (all 96 of decode's at C = 768)
STREAM_BLOCK_M = 1  # tokens per program in the pre/apply kernels (their tiles: [stream, token, channel])
STREAM_BLOCK_C = 1024  # channels per program (or per loop step) there: at C = 768, one token per program, the
# apply backward took 0.20 ms at 1024, 0.26 at 512 (the apply forward 0.060 and 0.094) on an H200
APPLY_PROJECT_FUSED = False  # apply_project fuses the write-back and the next projection: off, no clear gain on an
# H200 (2026-12-04, 120m n = 4, bare loop, seq 1024 x 16): 63.1 ms/step with it, 64.9 without in one process,
# 62.5 and 59.6 in another
APPLY_PROJECT_BLOCK_M = 32  # tokens per program in apply_project_forward (>= 16 for tl.dot)
APPLY_PROJECT_BLOCK_C = 32  # channels per step there: 128 registers per thread at 8 warps on sm_90 (bf16)
APPLY_PROJECT_WARPS = 8
ENTRY_ONE_KERNEL_TOKENS = 128  # at most this many tokens (decode: batch size), a sublayer's entry is one kernel
# (entry_forward) instead of three or four; not yet timed on a GPU (docs/performance.md)
ENTRY_TILE_ELEMENTS = 8192  # phi tile [P padded, n padded, channels] per loop step there: 64 channels at n = 4,
# 8 at n = 8 (a wider tile spills on sm_90)
NUM_WARPS = 4
FP32_DOT_PRECISION: str | None = None
"""tl.dot's input_precision for fp32 operands (an fp32 stream's forward projection): "ieee", "tf32" or
"tf32x3"; None follows torch's float32 matmul precision. On a GPU "ieee" runs on CUDA cores, the
others on tensor cores (tf32x3: three tf32 products, about fp32's accuracy)."""


def _check_stream_dtype(t: Tensor, name: str) -> None:
    assert t.dtype in _STREAM_DTYPES, (
        f"mhc_triton: {name} has dtype {t.dtype}; the Triton kernels take bf16, fp16 or fp32 "
        "(route fp64 to the PyTorch implementation)"
    )


def _dot_weight(phi: Tensor, x: Tensor) -> Tensor:
    """phi as the projection kernels take it. Their dot sees phi rounded to x's dtype; on a GPU the
    kernels round it (to nearest even). The interpreter truncates fp32 -> bf16 casts instead, so
    there torch rounds phi beforehand and the kernels' cast is exact."""
    return phi.to(x.dtype) if INTERPRETED else phi


def _fp32_dot_precision() -> str:
    """tl.dot's input_precision for fp32 operands: FP32_DOT_PRECISION if set, else what
    torch.get_float32_matmul_precision() asks."""
    if FP32_DOT_PRECISION is not None:
        return FP32_DOT_PRECISION
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launch arithmetic on the host (``triton.cdiv`` costs about 3 us a call
    from Python: it goes through Triton's constexpr-function wrapper)."""
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as ``triton.next_power_of_2`` without its wrapper."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _split(length: int, block: int, parts: int) -> tuple[int, int]:
    """(S, span): ``length`` cut into S ranges of ``span`` (a multiple of ``block``; the last may be
    shorter), S as close to ``parts`` as whole blocks allow, at least 1: how the projection kernels
    spread one dimension over programs when the other gives too few."""
    blocks = _cdiv(length, block)
    span = _cdiv(blocks, min(blocks, max(1, parts))) * block
    return _cdiv(length, span), span


def _padded_streams(n: int) -> int:
    assert 1 <= n <= MAX_STREAMS, f"mhc_triton: n_streams must be in 1..{MAX_STREAMS} (ModelConfig checks it), got {n}"
    return _next_power_of_2(n)


# ----------------------------------------------------------------------------------------------
# Projection (Eq. 7): proj = x phi^T, sumsq = sum x^2
# ----------------------------------------------------------------------------------------------


@triton.jit
def _project_fwd_kernel(
    x_ptr,
    phi_ptr,
    proj_ptr,
    sumsq_ptr,
    M,
    K,
    P,
    cols_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), S): a block of tokens per program, looping over its split's
    cols_per_split columns of K (all of K when S = 1); x read once. Writes split s's sums at
    proj_ptr + s M P and sumsq_ptr + s M."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    split = tl.program_id(1)
    ps = tl.arange(0, BLOCK_P)
    p_ok = ps < P
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    k_start = split * cols_per_split
    for k0 in range(k_start, tl.minimum(k_start + cols_per_split, K), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        phi = tl.load(phi_ptr + ps[:, None] * K + ks[None, :], mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        phi = phi.to(x_ptr.dtype.element_ty)  # the dot runs in x's precision
        x32 = x.to(tl.float32)
        sumsq += tl.sum(x32 * x32, axis=1)
        if DOT_FP32:
            acc = tl.dot(x32, tl.trans(phi.to(tl.float32)), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, tl.trans(phi), acc)
    proj_ptr += split.to(tl.int64) * M * P
    sumsq_ptr += split.to(tl.int64) * M
    tl.store(proj_ptr + rows[:, None] * P + ps[None, :], acc, mask=row_ok[:, None] & p_ok[None, :])
    tl.store(sumsq_ptr + rows, sumsq, mask=row_ok)


def project_forward(x: Tensor, phi: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] (bf16, fp16 or fp32), phi [P, K]. Returns proj = x phi^T and sumsq = sum x^2 as S
    partial sums over K, [S, M, P] and [S, M], fp32, from one read of x.

    phi is rounded to x's dtype for the dot (as autocast would), accumulated in fp32. With few
    tokens (decode: M = batch) the token blocks alone would leave the GPU idle, one program
    looping over all of K, so K is split until there are about PROJECT_FWD_PROGRAMS programs
    (S = 1 at training shapes). :func:`coefficients_forward` sums the partials as it reads them
    (deterministic), so they cost no launch of their own.
    """
    _check_stream_dtype(x, "x")
    _check_stream_dtype(phi, "phi")
    x, phi = x.contiguous(), phi.contiguous()
    M, K = x.shape
    P = phi.shape[0]
    assert phi.shape[1] == K, f"mhc_triton: phi {tuple(phi.shape)} does not match x {tuple(x.shape)}"
    row_blocks = _cdiv(M, PROJECT_BLOCK_M)
    splits, cols_per_split = _split(K, PROJECT_BLOCK_K, PROJECT_FWD_PROGRAMS // row_blocks)
    proj = torch.empty(splits, M, P, device=x.device, dtype=torch.float32)
    sumsq = torch.empty(splits, M, device=x.device, dtype=torch.float32)
    _project_fwd_kernel[(row_blocks, splits)](
        x,
        _dot_weight(phi, x),
        proj,
        sumsq,
        M,
        K,
        P,
        cols_per_split,
        BLOCK_M=PROJECT_BLOCK_M,
        BLOCK_K=PROJECT_BLOCK_K,
        BLOCK_P=max(16, _next_power_of_2(P)),
        DOT_FP32=INTERPRETED or x.dtype == torch.float32,
        DOT_PRECISION=_fp32_dot_precision(),
        num_warps=8,
        num_stages=3,
    )
    return proj, sumsq


@triton.jit
def _bf16_parts(x):
    """fp32 ``x`` as three bf16 tensors that sum to it, 8 significant bits each (fp32's 24; near
    underflow, fewer): each part times a bf16 value is exact in fp32."""
    first = x.to(tl.bfloat16)
    rest = x - first.to(tl.float32)
    second = rest.to(tl.bfloat16)
    return first, second, (rest - second.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _store_grad_proj_parts(grad_proj_ptr, parts_ptr, rows, row_ok, M, P, BLOCK_P: tl.constexpr):
    """grad_proj's rows ``rows`` (int64) as their :func:`_bf16_parts`, transposed for
    :func:`_grad_phi`: parts [3P, M], row part * P + p."""
    ps = tl.arange(0, BLOCK_P)
    rows_ps_ok = row_ok[:, None] & (ps < P)[None, :]
    grad_proj = tl.load(grad_proj_ptr + rows[:, None] * P + ps[None, :], mask=rows_ps_ok, other=0.0)
    parts = parts_ptr + rows[:, None] + ps.to(tl.int64)[None, :] * M
    first, second, third = _bf16_parts(grad_proj)
    tl.store(parts, first, mask=rows_ps_ok)
    tl.store(parts + P * M, second, mask=rows_ps_ok)
    tl.store(parts + 2 * P * M, third, mask=rows_ps_ok)


@triton.jit
def _add_grad_proj_phi(acc, grad_proj_rows, row_ok, phi_cols, col_ok, K, P, STREAM_DTYPE: tl.constexpr):
    """acc [rows, cols] + grad_proj[rows, :] phi[:, cols], as P rank-one updates in fp32 FMAs (fp16 and
    fp32 streams; a bf16 stream's is :func:`_add_grad_proj_phi_dot`, faster on an H200). ``grad_proj_rows``
    points at each row's grad_proj, ``phi_cols`` at phi's first row in each column; phi is rounded to
    the stream's dtype first, as the forward's dot saw it: this differentiates that function."""
    for p in range(P):
        g = tl.load(grad_proj_rows + p, mask=row_ok, other=0.0).to(tl.float32)
        w = tl.load(phi_cols + p * K, mask=col_ok, other=0.0).to(STREAM_DTYPE).to(tl.float32)
        acc += g[:, None] * w[None, :]
    return acc


@triton.jit
def _add_grad_proj_phi_dot(acc, grad_proj_rows, row_ok, phi_cols, col_ok, K, P, BLOCK_P: tl.constexpr,
                           DOT_FP32: tl.constexpr):
    """:func:`_add_grad_proj_phi` on tensor cores, for a bf16 stream: phi rounded to bf16 (as the
    forward's dot saw it) and the fp32 grad_proj as its :func:`_bf16_parts`, one dot per part:
    every product is exact in the fp32 accumulator, so the sum matches the FMA version's but for
    the order of its additions. ``grad_proj_rows`` points at each row's grad_proj."""
    ps = tl.arange(0, BLOCK_P)
    p_ok = ps < P
    grad_proj = tl.load(grad_proj_rows[:, None] + ps[None, :], mask=row_ok[:, None] & p_ok[None, :], other=0.0)
    w = tl.load(phi_cols[None, :] + ps[:, None] * K, mask=p_ok[:, None] & col_ok[None, :], other=0.0)
    w = w.to(tl.bfloat16)
    first, second, third = _bf16_parts(grad_proj)
    acc = _dot_exact(first, w, acc, DOT_FP32)
    acc = _dot_exact(second, w, acc, DOT_FP32)
    return _dot_exact(third, w, acc, DOT_FP32)


@triton.jit
def _dot_exact(a, b, acc, DOT_FP32: tl.constexpr):
    """acc + a b for bf16 ``a``, ``b`` with fp32 accumulation; DOT_FP32 upcasts the operands first
    (the interpreter's bf16 dot is wrong; bf16 products are exact in fp32 either way)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _project_bwd_kernel(
    grad_proj_ptr,
    grad_sumsq_ptr,
    x_ptr,
    phi_ptr,
    grad_x_ptr,
    grad_in_ptr,
    grad_u_ptr,
    h_pre_ptr,
    grad_proj_parts_ptr,
    M,
    K,
    P,
    C,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_GRAD_IN: tl.constexpr,
    HAS_PRE: tl.constexpr,
    SPLIT_GRAD_PROJ: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K)): one tile of grad_x = grad_proj phi + 2 x grad_sumsq
    per program, no loop over tokens. The P-term is P rank-one updates in fp32 FMAs
    (:func:`_add_grad_proj_phi`; Triton's fp32 dot took over 200 registers per thread at tiles
    this size, counted unspecialized) or, with USE_DOT (bf16 x only), three bf16 tensor-core dots
    (:func:`_add_grad_proj_phi_dot`). With HAS_GRAD_IN grad_x also adds grad_in [M, K];
    with HAS_PRE the pre-aggregation's term H_pre[m] g_u[c] for column k = m C + c (g_u [M, C],
    H_pre [M, N]). With SPLIT_GRAD_PROJ the first program of each token block also writes its
    tokens' grad_proj as three bf16 parts that sum to it, transposed for :func:`_grad_phi`'s
    matmul: grad_proj_parts [3P, M], row part * P + p."""
    first = tl.program_id(0).to(tl.int64) * BLOCK_M  # the tile's pointers: 64-bit bases, 32-bit offsets
    local = tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = local < M - first
    k_ok = ks < K
    tile_ok = row_ok[:, None] & k_ok[None, :]
    offsets = local[:, None] * K + ks[None, :]
    x = tl.load(x_ptr + first * K + offsets, mask=tile_ok, other=0.0).to(tl.float32)
    gs = tl.load(grad_sumsq_ptr + first + local, mask=row_ok, other=0.0).to(tl.float32)
    grad_x = 2.0 * x * gs[:, None]
    grad_proj_rows = grad_proj_ptr + first * P + local * P
    if SPLIT_GRAD_PROJ:
        if tl.program_id(1) == 0:
            _store_grad_proj_parts(grad_proj_ptr, grad_proj_parts_ptr, first + local, row_ok, M, P, BLOCK_P)
    if USE_DOT:
        grad_x = _add_grad_proj_phi_dot(grad_x, grad_proj_rows, row_ok, phi_ptr + ks, k_ok, K, P,
                                        BLOCK_P, DOT_FP32)
    else:
        grad_x = _add_grad_proj_phi(grad_x, grad_proj_rows, row_ok, phi_ptr + ks, k_ok, K, P,
                                    x_ptr.dtype.element_ty)
    if HAS_GRAD_IN:
        grad_x += tl.load(grad_in_ptr + first * K + offsets, mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_PRE:
        streams = ks // C
        g_u = tl.load(grad_u_ptr + first * C + local[:, None] * C + (ks - streams * C)[None, :], mask=tile_ok,
                      other=0.0)
        h = tl.load(h_pre_ptr + first * N + local[:, None] * N + streams[None, :], mask=tile_ok, other=0.0)
        grad_x += h * g_u.to(tl.float32)
    tl.store(grad_x_ptr + first * K + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=tile_ok)


def project_backward(
    grad_proj: Tensor,
    grad_sumsq: Tensor,
    x: Tensor,
    phi: Tensor,
    grad_in: Tensor | None = None,
    pre: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Backward of :func:`project_forward`. Returns grad_x = grad_proj phi + 2 x grad_sumsq [M, K] in
    x.dtype (fp32 math) and grad_phi = grad_proj^T x [P, K] in phi.dtype. grad_x also sums, in the
    same pass, ``grad_in`` [M, K] (x's gradient from elsewhere) and, for ``pre`` = (g_u [M, C],
    H_pre [M, n]), the pre-aggregation's H_pre[m] g_u (x = vec X, K = n C).

    grad_x is one read of x and one write, a tile per program; grad_phi, a reduction over all
    tokens, is a matmul that reads x once more: for a bf16 x from the kernel's bf16 parts of
    grad_proj (:func:`_grad_phi`), for an fp16 x (whose range could not hold the parts) or an
    fp32 one in fp32, at torch's float32 matmul precision. (A kernel doing both, each program
    looping over a range of tokens and writing grad_phi partials, ran at 337 GB/s on an H200: the
    loop's iterations could not overlap.) Deterministic.
    """
    _check_stream_dtype(x, "x")
    _check_stream_dtype(phi, "phi")
    grad_proj, grad_sumsq = grad_proj.contiguous(), grad_sumsq.contiguous()
    x, phi = x.contiguous(), phi.contiguous()
    M, K = x.shape
    P = phi.shape[0]
    grad_u, h_pre = (pre[0].contiguous(), pre[1].float().contiguous()) if pre is not None else (x, x)
    n = h_pre.shape[1] if pre is not None else 1
    if pre is not None and (grad_u.shape[0] != M or n * grad_u.shape[1] != K):
        raise ValueError(f"pre: g_u {tuple(grad_u.shape)} and H_pre {tuple(h_pre.shape)} do not match x {(M, K)}")
    grad_in = grad_in.contiguous() if grad_in is not None else None
    grad_x = torch.empty_like(x)
    split = x.dtype == torch.bfloat16
    parts = torch.empty(3 * P, M, device=x.device, dtype=torch.bfloat16) if split else grad_x
    grid = (_cdiv(M, PROJECT_BWD_BLOCK_M), _cdiv(K, PROJECT_BWD_BLOCK_K))
    _project_bwd_kernel[grid](
        grad_proj,
        grad_sumsq,
        x,
        _dot_weight(phi, x),
        grad_x,
        x if grad_in is None else grad_in,  # placeholders are never read
        grad_u,
        h_pre,
        parts,  # a placeholder without the split, never written
        M,
        K,
        P,
        K // n,
        n,
        BLOCK_M=PROJECT_BWD_BLOCK_M,
        BLOCK_K=PROJECT_BWD_BLOCK_K,
        BLOCK_P=max(16, _next_power_of_2(P)),  # >= 16 for tl.dot
        HAS_GRAD_IN=grad_in is not None,
        HAS_PRE=pre is not None,
        SPLIT_GRAD_PROJ=split,
        USE_DOT=split and PROJECT_BWD_DOT,
        DOT_FP32=INTERPRETED,
        num_warps=PROJECT_BWD_WARPS,
    )
    grad_phi = _grad_phi(parts, x) if split else grad_proj.T @ x.float()
    return grad_x, grad_phi.to(phi.dtype)


def _grad_phi(parts: Tensor, x: Tensor) -> Tensor:
    """grad_proj^T x [P, K] in fp32 for a bf16 x [M, K], by one matmul (cuBLAS on a GPU) that reads x
    once, from ``parts`` [3P, M]: the fp32 grad_proj written exactly (but for values near underflow)
    as three bf16 parts, transposed, which the projection's kernel wrote. x, read as stored,
    multiplies all three in one [3P, M] x [M, K] matmul with fp32 accumulation (``torch.mm``'s
    out_dtype, CUDA; elsewhere the same products in fp32), and the three partial results are
    summed: grad_phi is as exact as an fp32 matmul's, where grad_proj rounded to bf16 alone (what
    autocast's matmul backward would take) keeps 8 of its 24 bits. P is small (24 at n = 4): the
    extra rows cost no traffic.
    """
    products = torch.mm(parts, x, out_dtype=torch.float32) if x.is_cuda else parts.float() @ x.float()
    return products.view(3, -1, x.shape[1]).sum(dim=0)


# ----------------------------------------------------------------------------------------------
# Coefficients (Eq. 7-9): logits, sigmoids and Sinkhorn-Knopp, per token in registers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _token_lanes(pid, M, N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr):
    """Program ``pid``'s tokens [T] and stream lanes [NP] (padded to a power of two) with their
    masks: tok_ok [T], j_ok [NP], vec_ok [T, NP] (H_pre, H_post), mat_ok [T, NP, NP] (H_res)."""
    toks = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < M
    j = tl.arange(0, NP)
    j_ok = j < N
    vec_ok = tok_ok[:, None] & j_ok[None, :]
    return toks, tok_ok, j, j_ok, vec_ok, vec_ok[:, None, :] & j_ok[None, :, None]


@triton.jit
def _load_mapping_parameters(alpha_pre_ptr, alpha_post_ptr, alpha_res_ptr, b_pre_ptr, b_post_ptr, b_res_ptr, j, j_ok,
                             N: tl.constexpr):
    """(alpha_pre, alpha_post, alpha_res, b_pre [NP], b_post [NP], b_res [NP, NP]) in fp32, each from
    its own parameter (lanes j from :func:`_token_lanes`; padded ones hold zeros)."""
    return (tl.load(alpha_pre_ptr).to(tl.float32), tl.load(alpha_post_ptr).to(tl.float32),
            tl.load(alpha_res_ptr).to(tl.float32),
            tl.load(b_pre_ptr + j, mask=j_ok, other=0.0).to(tl.float32),
            tl.load(b_post_ptr + j, mask=j_ok, other=0.0).to(tl.float32),
            tl.load(b_res_ptr + j[:, None] * N + j[None, :], mask=j_ok[:, None] & j_ok[None, :],
                    other=0.0).to(tl.float32))


@triton.jit
def _projection_offsets(toks, j, N: tl.constexpr, P: tl.constexpr):
    """Where a block of tokens' columns of proj [M, P] lie (lanes from :func:`_token_lanes`): the
    offsets of pre, post [T, NP] and res [T, NP, NP] (vec H~_res, row-major)."""
    row = toks[:, None] * P
    return row + j[None, :], row + N + j[None, :], row[:, :, None] + (2 * N + j[:, None] * N + j[None, :])[None, :, :]


@triton.jit
def _load_projection(proj_ptr, sumsq_ptr, toks, tok_ok, j, vec_ok, mat_ok, N: tl.constexpr, P: tl.constexpr):
    """x phi^T and sum x^2 of a block of tokens from proj [M, P] and sumsq [M] (lanes and masks from
    :func:`_token_lanes`): (pre, post [T, NP], res [T, NP, NP], sumsq [T]), zeros on padded lanes."""
    pre, post, res = _projection_offsets(toks, j, N, P)
    return (tl.load(proj_ptr + pre, mask=vec_ok, other=0.0), tl.load(proj_ptr + post, mask=vec_ok, other=0.0),
            tl.load(proj_ptr + res, mask=mat_ok, other=0.0), tl.load(sumsq_ptr + toks, mask=tok_ok, other=0.0))


@triton.jit
def _load_projection_sums(proj_ptr, sumsq_ptr, splits, M, toks, tok_ok, j, vec_ok, mat_ok, N: tl.constexpr,
                          P: tl.constexpr, BLOCK_S: tl.constexpr):
    """:func:`_load_projection`'s tiles summed over the ``splits`` K-split partials of
    :func:`project_forward` (proj [splits, M, P], sumsq [splits, M]), BLOCK_S partials per load."""
    if BLOCK_S == 1:
        return _load_projection(proj_ptr, sumsq_ptr, toks, tok_ok, j, vec_ok, mat_ok, N, P)
    s = tl.arange(0, BLOCK_S)
    pre_offsets, post_offsets, res_offsets = _projection_offsets(toks, j, N, P)
    pre = tl.zeros(vec_ok.shape, dtype=tl.float32)
    post = tl.zeros(vec_ok.shape, dtype=tl.float32)
    res = tl.zeros(mat_ok.shape, dtype=tl.float32)
    sumsq = tl.zeros(tok_ok.shape, dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s_ok = s0 + s < splits
        split = (s0 + s).to(tl.int64)  # [S]
        vec = s_ok[:, None, None] & vec_ok[None, :, :]
        pre += tl.sum(tl.load(proj_ptr + split[:, None, None] * M * P + pre_offsets[None], mask=vec, other=0.0),
                      axis=0)
        post += tl.sum(tl.load(proj_ptr + split[:, None, None] * M * P + post_offsets[None], mask=vec, other=0.0),
                       axis=0)
        res += tl.sum(tl.load(proj_ptr + split[:, None, None, None] * M * P + res_offsets[None],
                              mask=s_ok[:, None, None, None] & mat_ok[None, :, :, :], other=0.0), axis=0)
        sumsq += tl.sum(tl.load(sumsq_ptr + split[:, None] * M + toks[None, :], mask=s_ok[:, None] & tok_ok[None, :],
                                other=0.0), axis=0)
    return pre, post, res, sumsq


@triton.jit
def _logits(proj_pre, proj_post, proj_res, sumsq, alpha_pre, alpha_post, alpha_res, bias_pre, bias_post, bias_res,
            vec_ok, mat_ok, width, norm_eps):
    """Eq. 7 for a block of tokens: rms_inv [T] and the logits l = alpha * proj * rms_inv + bias
    (pre, post [T, NP], res [T, NP, NP]; parameters from :func:`_load_mapping_parameters`), zeros
    on padded lanes."""
    rms_inv = tl.rsqrt(sumsq / width + norm_eps)
    r2 = rms_inv[:, None]
    l_pre = tl.where(vec_ok, alpha_pre * (proj_pre * r2) + bias_pre[None, :], 0.0)
    l_post = tl.where(vec_ok, alpha_post * (proj_post * r2) + bias_post[None, :], 0.0)
    l_res = tl.where(mat_ok, alpha_res * (proj_res * r2[:, :, None]) + bias_res[None, :, :], 0.0)
    return rms_inv, l_pre, l_post, l_res


@triton.jit
def _load_logits(
    proj_ptr,
    sumsq_ptr,
    alpha_pre,
    alpha_post,
    alpha_res,
    bias_pre,
    bias_post,
    bias_res,
    toks,
    tok_ok,
    j,
    vec_ok,
    mat_ok,
    width,
    norm_eps,
    N: tl.constexpr,
    P: tl.constexpr,
):
    """Eq. 7 for a block of tokens from proj [M, P] and sumsq [M]: returns rms_inv [T], the
    projections (pre, post [T, NP], res [T, NP, NP]) and the logits in the same shapes
    (:func:`_load_projection`, :func:`_logits`)."""
    proj_pre, proj_post, proj_res, sumsq = _load_projection(proj_ptr, sumsq_ptr, toks, tok_ok, j, vec_ok, mat_ok, N, P)
    rms_inv, l_pre, l_post, l_res = _logits(proj_pre, proj_post, proj_res, sumsq, alpha_pre, alpha_post, alpha_res,
                                            bias_pre, bias_post, bias_res, vec_ok, mat_ok, width, norm_eps)
    return rms_inv, proj_pre, proj_post, proj_res, l_pre, l_post, l_res


@triton.jit
def _normalize_columns(m, ok, eps):
    """T_c: M[:, i, j] / (sum_i M[:, i, j] + eps); ok [NP] marks the real columns (padded ones
    divide by 1, so eps = 0 cannot produce 0/0). Returns the result and the denominators [T, NP]."""
    denom = tl.where(ok[None, :], tl.sum(m, axis=1) + eps, 1.0)
    return m / denom[:, None, :], denom


@triton.jit
def _normalize_rows(m, ok, eps):
    """T_r: M[:, i, j] / (sum_j M[:, i, j] + eps), as :func:`_normalize_columns` over rows."""
    denom = tl.where(ok[None, :], tl.sum(m, axis=2) + eps, 1.0)
    return m / denom[:, :, None], denom


@triton.jit
def _sinkhorn_m0(l_res, mat_ok, clamp):
    """Eq. 9's starting point M0 = exp(clamp(l, -clamp, clamp)), zero on padded lanes."""
    return tl.where(mat_ok, tl.exp(tl.minimum(tl.maximum(l_res, -clamp), clamp)), 0.0)


@triton.jit
def _sinkhorn_iterate(m, steps, ok, eps):
    """`steps` Sinkhorn-Knopp iterations M <- T_r(T_c(M)) (Eq. 9)."""
    for _ in range(steps):
        m, _cd = _normalize_columns(m, ok, eps)
        m, _rd = _normalize_rows(m, ok, eps)
    return m


@triton.jit
def _store_coefficients(l_pre, l_post, l_res, pre_ptr, post_ptr, res_ptr, toks, j, j_ok, vec_ok, mat_ok, iters, clamp,
                        eps, N: tl.constexpr):
    """Eq. 8-9 from a block of tokens' logits (:func:`_logits`): stores H_pre = sigmoid(l_pre),
    H_post = 2 sigmoid(l_post) [M, n] and H_res = Sinkhorn-Knopp(l_res) [M, n, n] at their rows
    (lanes and masks from :func:`_token_lanes`) and returns H_pre [T, NP]."""
    h_res = _sinkhorn_iterate(_sinkhorn_m0(l_res, mat_ok, clamp), iters, j_ok, eps)
    h_pre = tl.sigmoid(l_pre)
    vec_offsets = toks[:, None] * N + j[None, :]
    tl.store(pre_ptr + vec_offsets, h_pre, mask=vec_ok)
    tl.store(post_ptr + vec_offsets, 2.0 * tl.sigmoid(l_post), mask=vec_ok)
    tl.store(res_ptr + toks[:, None, None] * (N * N) + j[None, :, None] * N + j[None, None, :], h_res, mask=mat_ok)
    return h_pre


@triton.jit
def _coeff_fwd_kernel(
    proj_ptr,
    sumsq_ptr,
    alpha_pre_ptr,
    alpha_post_ptr,
    alpha_res_ptr,
    b_pre_ptr,
    b_post_ptr,
    b_res_ptr,
    pre_ptr,
    post_ptr,
    res_ptr,
    proj_sum_ptr,
    sumsq_sum_ptr,
    splits,
    M,
    width,
    iters,
    clamp,
    eps,
    norm_eps,
    N: tl.constexpr,
    NP: tl.constexpr,
    P: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_T),): a block of tokens per program, each token's n x n in registers.
    With BLOCK_S > 1 it sums the projection's ``splits`` partials and writes the sums (proj_sum
    [M, P], sumsq_sum [M]) for the backward."""
    toks, tok_ok, j, j_ok, vec_ok, mat_ok = _token_lanes(tl.program_id(0), M, N, NP, BLOCK_T)
    alpha_pre, alpha_post, alpha_res, bias_pre, bias_post, bias_res = _load_mapping_parameters(
        alpha_pre_ptr, alpha_post_ptr, alpha_res_ptr, b_pre_ptr, b_post_ptr, b_res_ptr, j, j_ok, N)
    proj_pre, proj_post, proj_res, sumsq = _load_projection_sums(proj_ptr, sumsq_ptr, splits, M, toks, tok_ok, j,
                                                                 vec_ok, mat_ok, N, P, BLOCK_S)
    _r, l_pre, l_post, l_res = _logits(proj_pre, proj_post, proj_res, sumsq, alpha_pre, alpha_post, alpha_res,
                                       bias_pre, bias_post, bias_res, vec_ok, mat_ok, width, norm_eps)
    _store_coefficients(l_pre, l_post, l_res, pre_ptr, post_ptr, res_ptr, toks, j, j_ok, vec_ok, mat_ok, iters, clamp,
                        eps, N)
    if BLOCK_S > 1:
        pre_offsets, post_offsets, res_offsets = _projection_offsets(toks, j, N, P)
        tl.store(proj_sum_ptr + pre_offsets, proj_pre, mask=vec_ok)
        tl.store(proj_sum_ptr + post_offsets, proj_post, mask=vec_ok)
        tl.store(proj_sum_ptr + res_offsets, proj_res, mask=mat_ok)
        tl.store(sumsq_sum_ptr + toks, sumsq, mask=tok_ok)


def _coeff_launch_shape(M: int, n: int, splits: int = 1) -> tuple[int, int, int, int]:
    """(padded n, partials per load, tokens per program, programs) for the coefficient kernels;
    with the projection in ``splits`` partials (decode), fewer tokens per program, as each loads
    its tokens' partials a block at a time (:data:`COEFF_SPLIT_ELEMENTS`). Partials per load is 1
    only for an unsplit projection (the kernels read BLOCK_S == 1 as "nothing to sum"), so at
    least 2 whenever there are partials, whatever :data:`COEFF_MAX_BLOCK_S` says."""
    n_pad = _padded_streams(n)
    block_s = 1 if splits == 1 else max(2, min(_next_power_of_2(splits), COEFF_MAX_BLOCK_S))
    per_token = n_pad * n_pad
    block_t = max(1, min(128, COEFF_BLOCK_ELEMENTS // per_token, COEFF_SPLIT_ELEMENTS // (block_s * per_token)))
    return n_pad, block_s, block_t, _cdiv(M, block_t)


def _mapping_parameters(alpha: Sequence[Tensor], bias: Sequence[Tensor], n: int) -> list[Tensor]:
    """The six parameters as the coefficient kernels take them, each its own pointer (so nothing
    packs them: no kernel launch): alpha_pre, alpha_post, alpha_res (one element each), b_pre [n],
    b_post [n], b_res [n, n] (row-major), any float dtype (the kernels read them as fp32)."""
    shapes = [1, 1, 1, n, n, n * n]
    tensors = [*alpha, *bias]
    if [t.numel() for t in tensors] != shapes:
        raise ValueError(f"mhc_triton: alpha and bias have {[t.numel() for t in tensors]} elements, "
                         f"expected {shapes} (alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)")
    return [t.contiguous() for t in tensors]


def coefficients_forward(
    proj: Tensor,
    sumsq: Tensor,
    alpha: Sequence[Tensor],
    bias: Sequence[Tensor],
    n: int,
    width: int,
    iters: int,
    clamp: float,
    eps: float,
    norm_eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Eq. 7-9 from the projection's S partials, proj [S, M, P] and sumsq [S, M] fp32
    (:func:`project_forward`): returns H_pre [M, n], H_post [M, n] and H_res [M, n, n] in fp32,
    and the partials' sums proj [M, P] and sumsq [M] (the backward's inputs; views of the one
    partial when S = 1). alpha = (alpha_pre, alpha_post, alpha_res), bias = (b_pre, b_post,
    b_res) (:func:`_mapping_parameters`); width = K."""
    proj, sumsq = proj.contiguous(), sumsq.contiguous()
    S, M, P = proj.shape
    assert P == 2 * n + n * n, f"mhc_triton: proj has {P} columns, expected 2n + n^2 = {2 * n + n * n}"
    n_pad, block_s, block_t, programs = _coeff_launch_shape(M, n, S)
    h_pre = torch.empty(M, n, device=proj.device, dtype=torch.float32)
    h_post = torch.empty(M, n, device=proj.device, dtype=torch.float32)
    h_res = torch.empty(M, n, n, device=proj.device, dtype=torch.float32)
    proj_sum, sumsq_sum = (proj[0], sumsq[0]) if S == 1 else (proj.new_empty(M, P), sumsq.new_empty(M))
    _coeff_fwd_kernel[(programs,)](
        proj,
        sumsq,
        *_mapping_parameters(alpha, bias, n),
        h_pre,
        h_post,
        h_res,
        proj_sum,
        sumsq_sum,
        S,
        M,
        width,
        iters,
        clamp,
        eps,
        norm_eps,
        N=n,
        NP=n_pad,
        P=P,
        BLOCK_T=block_t,
        BLOCK_S=block_s,
        num_warps=NUM_WARPS,
    )
    return h_pre, h_post, h_res, proj_sum, sumsq_sum


@triton.jit
def _coeff_bwd_kernel(
    grad_pre_ptr,
    grad_post_ptr,
    grad_res_ptr,
    proj_ptr,
    sumsq_ptr,
    alpha_pre_ptr,
    alpha_post_ptr,
    alpha_res_ptr,
    b_pre_ptr,
    b_post_ptr,
    b_res_ptr,
    grad_proj_ptr,
    grad_sumsq_ptr,
    partial_ptr,
    iterates_ptr,
    M,
    width,
    iters,
    clamp,
    eps,
    norm_eps,
    N: tl.constexpr,
    NP: tl.constexpr,
    P: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Grid (G,): program g takes token blocks g, g + G, ... of BLOCK_T tokens; writes grad_proj and
    grad_sumsq per token and row g of the partials [G, 3 + P]: its share of grad_alpha [3], then of
    grad_bias [P] (summed by the caller). Its Sinkhorn iterates go to its own slot of iterates_ptr
    [G, BLOCK_T, iters, NP, NP]."""
    pid = tl.program_id(0)
    j = tl.arange(0, NP)
    j_ok = j < N
    res_cols = 2 * N + j[:, None] * N + j[None, :]
    # this program's iterate slots: token, iteration, then the n x n matrix (padded to NP x NP)
    square = j[:, None] * NP + j[None, :]
    slots = (iterates_ptr + pid.to(tl.int64) * BLOCK_T * iters * NP * NP
             + tl.arange(0, BLOCK_T)[:, None, None] * (iters * NP * NP) + square[None, :, :])
    sum_alpha_pre = 0.0
    sum_alpha_post = 0.0
    sum_alpha_res = 0.0
    sum_bias_pre = tl.zeros((NP,), dtype=tl.float32)
    sum_bias_post = tl.zeros((NP,), dtype=tl.float32)
    sum_bias_res = tl.zeros((NP, NP), dtype=tl.float32)
    for block in range(pid, tl.cdiv(M, BLOCK_T), tl.num_programs(0)):
        toks, tok_ok, j, j_ok, vec_ok, mat_ok = _token_lanes(block, M, N, NP, BLOCK_T)
        parameters = _load_mapping_parameters(alpha_pre_ptr, alpha_post_ptr, alpha_res_ptr, b_pre_ptr, b_post_ptr,
                                              b_res_ptr, j, j_ok, N)
        alpha_pre, alpha_post, alpha_res = parameters[0], parameters[1], parameters[2]
        rms_inv, proj_pre, proj_post, proj_res, l_pre, l_post, l_res = _load_logits(
            proj_ptr, sumsq_ptr, *parameters, toks, tok_ok, j, vec_ok, mat_ok, width, norm_eps, N, P
        )
        vec_offsets = toks[:, None] * N + j[None, :]
        mat_offsets = toks[:, None, None] * (N * N) + j[None, :, None] * N + j[None, None, :]

        # Sigmoids (Eq. 8): d sigmoid = s (1 - s).
        s_pre = tl.sigmoid(l_pre)
        g_pre = tl.load(grad_pre_ptr + vec_offsets, mask=vec_ok, other=0.0).to(tl.float32)
        dl_pre = tl.where(vec_ok, g_pre * s_pre * (1.0 - s_pre), 0.0)
        s_post = tl.sigmoid(l_post)
        g_post = tl.load(grad_post_ptr + vec_offsets, mask=vec_ok, other=0.0).to(tl.float32)
        dl_post = tl.where(vec_ok, 2.0 * g_post * s_post * (1.0 - s_post), 0.0)

        # Sinkhorn-Knopp (Eq. 9) in reverse. Iteration t maps M_t -> A = T_c(M_t) -> M_{t+1} = T_r(A).
        # The forward is recomputed once, each M_t stored in the program's slots; then for
        # t = iters-1 .. 0, from M_t reloaded (A and the denominators recomputed from it):
        #   g_A = (g - sum_j(g * M_{t+1})) / rowdenom,   g <- (g_A - sum_i(g_A * A)) / coldenom.
        # Padded lanes (stream index >= n) hold M = 0 and divide by 1; their gradient never reaches
        # a real lane (it only meets zeros of M), and is reset to zero after each step so that it
        # cannot grow into inf (inf * 0 = nan would).
        m0 = _sinkhorn_m0(l_res, mat_ok, clamp)
        m_t = m0
        for t in range(iters):
            tl.store(slots + t * NP * NP, m_t)
            m_t = _sinkhorn_iterate(m_t, 1, j_ok, eps)
        tl.debug_barrier()  # every thread's stores are visible to the loads below, whatever their layout
        g = tl.load(grad_res_ptr + mat_offsets, mask=mat_ok, other=0.0).to(tl.float32)
        for step in range(iters):
            m_t = tl.load(slots + (iters - 1 - step) * NP * NP)
            a, col_denom = _normalize_columns(m_t, j_ok, eps)
            m_next, row_denom = _normalize_rows(a, j_ok, eps)
            g_a = (g - tl.sum(g * m_next, axis=2)[:, :, None]) / row_denom[:, :, None]
            g = (g_a - tl.sum(g_a * a, axis=1)[:, None, :]) / col_denom[:, None, :]
            g = tl.where(mat_ok, g, 0.0)
        tl.debug_barrier()  # the next block's stores come after every load of this one
        # exp, then clamp: the gradient passes on [-clamp, clamp] inclusive, as torch.clamp's does.
        inside = (l_res >= -clamp) & (l_res <= clamp)
        dl_res = tl.where(mat_ok & inside, g * m0, 0.0)

        # Eq. 7: l = alpha * proj * rms_inv + bias, rms_inv = (sumsq / K + norm_eps)^(-1/2).
        r2 = rms_inv[:, None]
        r3 = rms_inv[:, None, None]
        tl.store(grad_proj_ptr + toks[:, None] * P + j[None, :], dl_pre * alpha_pre * r2, mask=vec_ok)
        tl.store(grad_proj_ptr + toks[:, None] * P + N + j[None, :], dl_post * alpha_post * r2, mask=vec_ok)
        tl.store(grad_proj_ptr + toks[:, None, None] * P + res_cols[None, :, :], dl_res * alpha_res * r3,
                 mask=mat_ok)
        grad_rms_inv = (
            alpha_pre * tl.sum(dl_pre * proj_pre, axis=1)
            + alpha_post * tl.sum(dl_post * proj_post, axis=1)
            + alpha_res * tl.sum(tl.sum(dl_res * proj_res, axis=2), axis=1)
        )
        grad_sumsq = grad_rms_inv * (-0.5 / width) * rms_inv * rms_inv * rms_inv
        tl.store(grad_sumsq_ptr + toks, grad_sumsq, mask=tok_ok)

        # This program's partials: d l / d alpha = proj * rms_inv, d l / d bias = 1.
        sum_alpha_pre += tl.sum(tl.sum(dl_pre * proj_pre * r2, axis=1), axis=0)
        sum_alpha_post += tl.sum(tl.sum(dl_post * proj_post * r2, axis=1), axis=0)
        sum_alpha_res += tl.sum(tl.sum(tl.sum(dl_res * proj_res * r3, axis=2), axis=1), axis=0)
        sum_bias_pre += tl.sum(dl_pre, axis=0)
        sum_bias_post += tl.sum(dl_post, axis=0)
        sum_bias_res += tl.sum(dl_res, axis=0)
    alpha_row = partial_ptr + pid * (3 + P)
    tl.store(alpha_row, sum_alpha_pre)
    tl.store(alpha_row + 1, sum_alpha_post)
    tl.store(alpha_row + 2, sum_alpha_res)
    bias_row = alpha_row + 3
    tl.store(bias_row + j, sum_bias_pre, mask=j_ok)
    tl.store(bias_row + N + j, sum_bias_post, mask=j_ok)
    tl.store(bias_row + res_cols, sum_bias_res, mask=j_ok[:, None] & j_ok[None, :])


def coefficients_backward(
    grad_pre: Tensor,
    grad_post: Tensor,
    grad_res: Tensor,
    proj: Tensor,
    sumsq: Tensor,
    alpha: Sequence[Tensor],
    bias: Sequence[Tensor],
    n: int,
    width: int,
    iters: int,
    clamp: float,
    eps: float,
    norm_eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact gradient of :func:`coefficients_forward`: returns grad_proj [M, P], grad_sumsq [M] and
    (dL/dalpha_pre, dL/dalpha_post, dL/dalpha_res, dL/db_pre, dL/db_post, dL/db_res) side by
    side [3 + P], all fp32 (the incoming gradients may be any float dtype).

    One kernel recomputes the forward and runs the Sinkhorn iterations backwards: 2 iters
    iterations per token. Triton cannot index register arrays, so each program stores its
    tokens' iterates M_t in a scratch slot of its own (iters n_pad^2 fp32 per token, written and
    read once, mostly from L2) and takes its token blocks in turn, so the scratch is at most
    COEFF_BWD_PROGRAMS slots whatever M (21 MB at n = 4). Recomputing each M_t from M0 instead,
    as this kernel first did, took 210 iterations per token at iters = 20: 0.19 ms per call on an
    H200 at 16k tokens. grad_alpha and grad_bias come from per-program partials, summed by one
    torch reduction (deterministic).
    """
    tensors = (grad_pre, grad_post, grad_res, proj, sumsq)
    grad_pre, grad_post, grad_res, proj, sumsq = (t.contiguous() for t in tensors)
    M, P = proj.shape
    assert P == 2 * n + n * n, f"mhc_triton: proj has {P} columns, expected 2n + n^2 = {2 * n + n * n}"
    n_pad, _, block_t, blocks = _coeff_launch_shape(M, n)
    programs = min(blocks, COEFF_BWD_PROGRAMS)
    grad_proj = torch.empty(M, P, device=proj.device, dtype=torch.float32)
    grad_sumsq = torch.empty(M, device=proj.device, dtype=torch.float32)
    partials = torch.empty(programs, 3 + P, device=proj.device, dtype=torch.float32)
    iterates = torch.empty(programs, block_t, max(iters, 1), n_pad, n_pad, device=proj.device, dtype=torch.float32)
    _coeff_bwd_kernel[(programs,)](
        grad_pre,
        grad_post,
        grad_res,
        proj,
        sumsq,
        *_mapping_parameters(alpha, bias, n),
        grad_proj,
        grad_sumsq,
        partials,
        iterates,
        M,
        width,
        iters,
        clamp,
        eps,
        norm_eps,
        N=n,
        NP=n_pad,
        P=P,
        BLOCK_T=block_t,
        num_warps=NUM_WARPS,
    )
    return grad_proj, grad_sumsq, partials.sum(dim=0)


# ----------------------------------------------------------------------------------------------
# Stream ops (Eq. 3): H_pre X and X' = H_res X + H_post^T y
# ----------------------------------------------------------------------------------------------


def _stream_blocks(C: int) -> tuple[int, int]:
    """(tokens, channels) per program, or per loop step, in the pre/apply kernels."""
    return STREAM_BLOCK_M, min(STREAM_BLOCK_C, _next_power_of_2(C))


@triton.jit
def _token_block(M, BLOCK_M: tl.constexpr):
    """This program's first token (int64: the tile base of every tensor) and its tokens' offsets
    from it with their mask [BLOCK_M] (int32: offsets within a tile stay small)."""
    first = tl.program_id(0).to(tl.int64) * BLOCK_M
    t = tl.arange(0, BLOCK_M)
    return first, t, first + t < M


@triton.jit
def _pre_fwd_kernel(x_ptr, h_pre_ptr, out_ptr, M, C, N: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M), cdiv(C, BLOCK_C)): out[t, c] = sum_m H_pre[t, m] X[t, m, c] for a
    block of tokens' channel block."""
    first, t, t_ok = _token_block(M, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = t_ok[:, None] & (cols < C)[None, :]
    x_ptr += first * N * C
    h_pre_ptr += first * N
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for m in tl.static_range(N):
        h = tl.load(h_pre_ptr + t * N + m, mask=t_ok, other=0.0).to(tl.float32)
        x_m = tl.load(x_ptr + (t[:, None] * N + m) * C + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += h[:, None] * x_m
    tl.store(out_ptr + first * C + t[:, None] * C + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


def pre_forward(x: Tensor, h_pre: Tensor) -> Tensor:
    """H_pre X (Eq. 3): x [M, n, C], h_pre [M, n] fp32 -> [M, C] in x.dtype, fp32 math, one read of x."""
    _check_stream_dtype(x, "x")
    x, h_pre = x.contiguous(), h_pre.contiguous()
    M, n, C = x.shape
    _padded_streams(n)
    out = torch.empty(M, C, device=x.device, dtype=x.dtype)
    block_m, block_c = _stream_blocks(C)
    _pre_fwd_kernel[(_cdiv(M, block_m), _cdiv(C, block_c))](x, h_pre, out, M, C, N=n, BLOCK_M=block_m,
                                                             BLOCK_C=block_c, num_warps=NUM_WARPS)
    return out


@triton.jit
def _pre_bwd_kernel(
    grad_out_ptr,
    x_ptr,
    grad_h_in_ptr,
    grad_h_ptr,
    M,
    C,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_GRAD_IN: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M),): a block of tokens per program, looping over C:
    grad_h[t, m] = sum_c g[t, c] X[t, m, c] (+ grad_h_in[t, m] when HAS_GRAD_IN). Tiles are
    [stream, token, channel], so a token's sums over C stay within the threads that hold it."""
    first, t, t_ok = _token_block(M, BLOCK_M)
    rows = tl.arange(0, NP)
    h_ok = (rows < N)[:, None] & t_ok[None, :]  # [stream, token]
    h_offsets = t[None, :] * N + rows[:, None]
    grad_out_ptr += first * C
    x_ptr += first * N * C
    acc = tl.zeros((NP, BLOCK_M), dtype=tl.float32)
    if HAS_GRAD_IN:
        acc += tl.load(grad_h_in_ptr + first * N + h_offsets, mask=h_ok, other=0.0).to(tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        tc_ok = t_ok[:, None] & (cols < C)[None, :]  # [token, channel]
        g = tl.load(grad_out_ptr + t[:, None] * C + cols[None, :], mask=tc_ok, other=0.0).to(tl.float32)
        offsets = h_offsets[:, :, None] * C + cols[None, None, :]
        x = tl.load(x_ptr + offsets, mask=h_ok[:, :, None] & tc_ok[None, :, :], other=0.0).to(tl.float32)
        acc += tl.sum(x * g[None, :, :], axis=2)
    tl.store(grad_h_ptr + first * N + h_offsets, acc, mask=h_ok)


def pre_backward(grad_out: Tensor, x: Tensor, grad_h_in: Tensor | None = None) -> Tensor:
    """dL/dH_pre [M, n] fp32 of :func:`pre_forward`, <g, X[m]>, one read of x, plus ``grad_h_in``
    [M, n] (H_pre's gradient from elsewhere: the op's output H_pre) when given, in the same kernel.
    Its other term, dL/dX = H_pre[m] g, :func:`project_backward` adds in its own pass over x (``pre``)."""
    _check_stream_dtype(x, "x")
    grad_out, x = grad_out.contiguous(), x.contiguous()
    M, n, C = x.shape
    grad_h = torch.empty(M, n, device=x.device, dtype=torch.float32)
    block_m, block_c = _stream_blocks(C)
    _pre_bwd_kernel[(_cdiv(M, block_m),)](
        grad_out, x, grad_h if grad_h_in is None else grad_h_in.contiguous(), grad_h, M, C, N=n,
        NP=_padded_streams(n), BLOCK_M=block_m, BLOCK_C=block_c, HAS_GRAD_IN=grad_h_in is not None,
        num_warps=NUM_WARPS
    )
    return grad_h


@triton.jit
def _apply_fwd_kernel(
    x_ptr,
    y_ptr,
    h_post_ptr,
    h_res_ptr,
    out_ptr,
    M,
    C,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(C, BLOCK_C)): X'[t, i, c] = sum_m H_res[t, i, m] X[t, m, c] +
    H_post[t, i] y[t, c] for a block of tokens' channel block; reads each X[m] block and y once.
    Tiles are [stream, token, channel]."""
    first, t, t_ok = _token_block(M, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tc_ok = t_ok[:, None] & (cols < C)[None, :]  # [token, channel]
    rows = tl.arange(0, NP)
    h_ok = (rows < N)[:, None] & t_ok[None, :]  # [stream, token]
    x_ptr += first * N * C
    h_post_ptr += first * N
    h_res_ptr += first * N * N
    y = tl.load(y_ptr + first * C + t[:, None] * C + cols[None, :], mask=tc_ok, other=0.0).to(tl.float32)
    h_post = tl.load(h_post_ptr + t[None, :] * N + rows[:, None], mask=h_ok, other=0.0).to(tl.float32)
    acc = h_post[:, :, None] * y[None, :, :]
    for m in tl.static_range(N):
        h_col = tl.load(h_res_ptr + t[None, :] * N * N + rows[:, None] * N + m, mask=h_ok, other=0.0).to(tl.float32)
        x_m = tl.load(x_ptr + (t[:, None] * N + m) * C + cols[None, :], mask=tc_ok, other=0.0).to(tl.float32)
        acc += h_col[:, :, None] * x_m[None, :, :]
    offsets = (t[None, :, None] * N + rows[:, None, None]) * C + cols[None, None, :]
    tl.store(out_ptr + first * N * C + offsets, acc.to(out_ptr.dtype.element_ty),
             mask=h_ok[:, :, None] & tc_ok[None, :, :])


def apply_forward(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """X' = H_res X + H_post^T y (Eq. 3): x [M, n, C], y [M, C] (its dtype may differ from x's),
    h_post [M, n], h_res [M, n, n] fp32 -> X' [M, n, C] in x.dtype, fp32 math, one pass."""
    _check_stream_dtype(x, "x")
    _check_stream_dtype(y, "y")
    x, y, h_post, h_res = x.contiguous(), y.contiguous(), h_post.contiguous(), h_res.contiguous()
    M, n, C = x.shape
    n_pad = _padded_streams(n)
    out = torch.empty_like(x)
    block_m, block_c = _stream_blocks(C)
    _apply_fwd_kernel[(_cdiv(M, block_m), _cdiv(C, block_c))](
        x, y, h_post, h_res, out, M, C, N=n, NP=n_pad, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=NUM_WARPS
    )
    return out


@triton.jit
def _apply_project_fwd_kernel(
    x_ptr,
    y_ptr,
    h_post_ptr,
    h_res_ptr,
    phi_ptr,
    out_ptr,
    proj_ptr,
    sumsq_ptr,
    M,
    C,
    P,
    N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M),): for a block of tokens, channel block by channel block, each output
    stream's tile X'[i] = sum_m H_res[i, m] X[m] + H_post[i] y (Eq. 3) is stored and, as stored,
    fed to X''s projection (Eq. 7): proj += X'[i] phi[:, i C + c]^T and sumsq += X'[i]^2. X' is
    written once and never read back. The X[m] tiles are reloaded for each i (from L1)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    ps = tl.arange(0, BLOCK_P)
    p_ok = ps < P
    K = N * C
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        ok = row_ok[:, None] & c_ok[None, :]
        y = tl.load(y_ptr + rows64[:, None] * C + cs[None, :], mask=ok, other=0.0).to(tl.float32)
        for i in tl.static_range(N):
            h_post = tl.load(h_post_ptr + rows64 * N + i, mask=row_ok, other=0.0)
            out = h_post[:, None] * y
            for m in tl.static_range(N):
                h = tl.load(h_res_ptr + rows64 * (N * N) + i * N + m, mask=row_ok, other=0.0)
                x_m = tl.load(x_ptr + rows64[:, None] * K + m * C + cs[None, :], mask=ok, other=0.0)
                out += h[:, None] * x_m.to(tl.float32)
            stored = out.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows64[:, None] * K + i * C + cs[None, :], stored, mask=ok)
            x32 = stored.to(tl.float32)
            sumsq += tl.sum(x32 * x32, axis=1)
            phi = tl.load(phi_ptr + ps[:, None] * K + i * C + cs[None, :], mask=p_ok[:, None] & c_ok[None, :],
                          other=0.0).to(out_ptr.dtype.element_ty)  # the dot runs in the stream's precision
            if DOT_FP32:
                acc = tl.dot(x32, tl.trans(phi.to(tl.float32)), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(stored, tl.trans(phi), acc)
    tl.store(proj_ptr + rows64[:, None] * P + ps[None, :], acc, mask=row_ok[:, None] & p_ok[None, :])
    tl.store(sumsq_ptr + rows64, sumsq, mask=row_ok)


def apply_project_forward(
    x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, phi: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(X', proj, sumsq): :func:`apply_forward`'s X' [M, n, C] and :func:`project_forward` of it
    (x' phi^T [1, M, P] and sum x'^2 [1, M], fp32: one partial) in one kernel that never reads X' back: 4 C fewer
    bytes per token than the two, and one launch. One program per APPLY_PROJECT_BLOCK_M tokens with
    no split of K, so for training shapes; decode's few tokens take the two kernels."""
    for t, name in ((x, "x"), (y, "y"), (phi, "phi")):
        _check_stream_dtype(t, name)
    x, y, h_post, h_res, phi = (t.contiguous() for t in (x, y, h_post, h_res, phi))
    M, n, C = x.shape
    P = phi.shape[0]
    assert phi.shape[1] == n * C, f"mhc_triton: phi {tuple(phi.shape)} does not match x {tuple(x.shape)}"
    _padded_streams(n)
    out = torch.empty_like(x)
    proj = torch.empty(1, M, P, device=x.device, dtype=torch.float32)
    sumsq = torch.empty(1, M, device=x.device, dtype=torch.float32)
    _apply_project_fwd_kernel[(_cdiv(M, APPLY_PROJECT_BLOCK_M),)](
        x,
        y,
        h_post,
        h_res,
        _dot_weight(phi, x),
        out,
        proj,
        sumsq,
        M,
        C,
        P,
        N=n,
        BLOCK_M=APPLY_PROJECT_BLOCK_M,
        BLOCK_C=APPLY_PROJECT_BLOCK_C,
        BLOCK_P=max(16, _next_power_of_2(P)),
        DOT_FP32=INTERPRETED or x.dtype == torch.float32,
        DOT_PRECISION=_fp32_dot_precision(),
        num_warps=APPLY_PROJECT_WARPS,
    )
    return out, proj, sumsq


def apply_project(
    x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, phi: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(X', proj, sumsq) as :func:`apply_forward` then :func:`project_forward` of X' give them; with
    APPLY_PROJECT_FUSED, by :func:`apply_project_forward` where the projection would not split K
    (training shapes: enough token blocks to fill the GPU). bench/mhc_kernel_variants.py times both."""
    if APPLY_PROJECT_FUSED and _cdiv(x.shape[0], PROJECT_BLOCK_M) >= PROJECT_FWD_PROGRAMS:
        return apply_project_forward(x, y, h_post, h_res, phi)
    out = apply_forward(x, y, h_post, h_res)
    M, n, C = out.shape
    return out, *project_forward(out.view(M, n * C), phi)


# ----------------------------------------------------------------------------------------------
# A sublayer's entry for few tokens (decode): write-back, projection, coefficients and H_pre X in
# one kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _entry_kernel(
    x_ptr,
    y_ptr,
    h_post_prev_ptr,
    h_res_prev_ptr,
    phi_ptr,
    update_ptr,
    alpha_pre_ptr,
    alpha_post_ptr,
    alpha_res_ptr,
    b_pre_ptr,
    b_post_ptr,
    b_res_ptr,
    stream_ptr,
    u_ptr,
    pre_ptr,
    post_ptr,
    res_ptr,
    proj_ptr,
    sumsq_ptr,
    M,
    C,
    iters,
    clamp,
    eps,
    norm_eps,
    N: tl.constexpr,
    NP: tl.constexpr,
    P: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WRITE_BACK: tl.constexpr,
    HAS_UPDATE: tl.constexpr,
):
    """Grid (M,): one token per program, its stream X [n, C] in [stream, channel] tiles.

    1. Channel block by channel block: with WRITE_BACK, X = H_res' X' + H_post'^T y' (Eq. 3) from
       the previous sublayer's x_ptr, y_ptr and coefficients, stored to stream_ptr; else X read
       from x_ptr. X as stored feeds proj += phi[:, i C + c] X[i, c] (fp32 products of phi rounded
       to the stream's dtype) and sumsq += X^2 (Eq. 7's projection).
    2. proj (+ update_ptr's row with HAS_UPDATE) and sumsq stored, then read back in the
       coefficient kernels' layout: Eq. 7-9 (logits, sigmoids, Sinkhorn) as :func:`_coeff_fwd_kernel`.
    3. u = H_pre X (Eq. 3) from X read back (from L2: this program wrote it).
    """
    token = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, NP)
    row_ok = rows < N
    ps = tl.arange(0, BLOCK_P)
    K = N * C
    stream_in = x_ptr + token * K
    stream = stream_ptr + token * K if WRITE_BACK else stream_in
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    sumsq = tl.zeros((NP,), dtype=tl.float32)
    if WRITE_BACK:
        h_post = tl.load(h_post_prev_ptr + token * N + rows, mask=row_ok, other=0.0).to(tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cs < C)[None, :]  # [stream, channel]
        offsets = rows[:, None] * C + cs[None, :]
        if WRITE_BACK:
            y = tl.load(y_ptr + token * C + cs, mask=cs < C, other=0.0).to(tl.float32)
            out = h_post[:, None] * y[None, :]
            for m in tl.static_range(N):
                h_col = tl.load(h_res_prev_ptr + token * N * N + rows * N + m, mask=row_ok, other=0.0)
                x_m = tl.load(stream_in + m * C + cs, mask=cs < C, other=0.0).to(tl.float32)
                out += h_col.to(tl.float32)[:, None] * x_m[None, :]
            stored = out.to(stream_ptr.dtype.element_ty)
            tl.store(stream + offsets, stored, mask=ok)
        else:
            stored = tl.load(stream + offsets, mask=ok, other=0.0)
        x32 = stored.to(tl.float32)
        sumsq += tl.sum(x32 * x32, axis=1)
        phi = tl.load(phi_ptr + ps[:, None, None] * K + offsets[None, :, :], mask=(ps < P)[:, None, None] & ok[None],
                      other=0.0)
        phi = phi.to(stream.dtype.element_ty).to(tl.float32)  # the stream's precision, as the projection's dot
        acc += tl.sum(tl.sum(phi * x32[None, :, :], axis=2), axis=1)
    if HAS_UPDATE:
        acc += tl.load(update_ptr + token * P + ps, mask=ps < P, other=0.0).to(tl.float32)
    tl.store(proj_ptr + token * P + ps, acc, mask=ps < P)
    tl.store(sumsq_ptr + token, tl.sum(sumsq, axis=0))
    tl.debug_barrier()  # step 2 reads proj and step 3 X in other threads' layout: make the stores visible

    toks, tok_ok, j, j_ok, vec_ok, mat_ok = _token_lanes(tl.program_id(0), M, N, NP, 1)
    alpha_pre, alpha_post, alpha_res, bias_pre, bias_post, bias_res = _load_mapping_parameters(
        alpha_pre_ptr, alpha_post_ptr, alpha_res_ptr, b_pre_ptr, b_post_ptr, b_res_ptr, j, j_ok, N)
    _r, _pre, _post, _res, l_pre, l_post, l_res = _load_logits(
        proj_ptr, sumsq_ptr, alpha_pre, alpha_post, alpha_res, bias_pre, bias_post, bias_res, toks, tok_ok, j, vec_ok,
        mat_ok, K, norm_eps, N, P)
    h_pre = _store_coefficients(l_pre, l_post, l_res, pre_ptr, post_ptr, res_ptr, toks, j, j_ok, vec_ok, mat_ok, iters,
                                clamp, eps, N)

    weights = tl.sum(tl.where(vec_ok, h_pre, 0.0), axis=0)  # H_pre [NP], by stream
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cs < C)[None, :]
        x = tl.load(stream + rows[:, None] * C + cs[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(u_ptr + token * C + cs, tl.sum(weights[:, None] * x, axis=0).to(u_ptr.dtype.element_ty),
                 mask=cs < C)


def entry_forward(
    x: Tensor,
    write_back: tuple[Tensor, Tensor, Tensor] | None,
    proj_update: Tensor | None,
    phi: Tensor,
    alpha: Sequence[Tensor],
    bias: Sequence[Tensor],
    iters: int,
    clamp: float,
    eps: float,
    norm_eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(X [M, n, C], u = H_pre X [M, C], H_pre, H_post, H_res, proj [M, P], sumsq [M]) of one
    sublayer in one kernel, one token per program: what :func:`apply_project` (or
    :func:`project_forward`), :func:`coefficients_forward` and :func:`pre_forward` give in three
    or four launches. For decode's few tokens (at most :data:`ENTRY_ONE_KERNEL_TOKENS`), where
    each of those kernels is a few microseconds of latency on a mostly idle GPU.

    ``write_back`` = (y', H_post', H_res'): X = H_res' x + H_post'^T y' first, x being the previous
    sublayer's stream X'; None: X = x. ``proj_update`` [M, P] is added to x phi^T (a LoRA
    adapter's term). proj and sumsq are sums in one order over nC (the split projection's
    partials sum in another: fp32 rounding apart, the same values); the projection's products
    are fp32 FMAs of phi rounded to the stream's dtype, for fp32 streams too (where the dot
    follows torch's matmul precision)."""
    _check_stream_dtype(x, "x")
    _check_stream_dtype(phi, "phi")
    M, n, C = x.shape
    P = phi.shape[0]
    assert phi.shape[1] == n * C, f"mhc_triton: phi {tuple(phi.shape)} does not match x {tuple(x.shape)}"
    assert P == 2 * n + n * n, f"mhc_triton: phi has {P} rows, expected 2n + n^2 = {2 * n + n * n}"
    x, phi = x.contiguous(), phi.contiguous()
    if write_back is not None:
        _check_stream_dtype(write_back[0], "y")
        y, h_post_prev, h_res_prev = (t.contiguous() for t in write_back)
        stream = torch.empty_like(x)
    else:
        y = h_post_prev = h_res_prev = x  # placeholders, never read
        stream = x  # X is the input: the kernel writes no stream
    update = proj_update.contiguous() if proj_update is not None else x
    u = torch.empty(M, C, device=x.device, dtype=x.dtype)
    h_pre = torch.empty(M, n, device=x.device, dtype=torch.float32)
    h_post = torch.empty(M, n, device=x.device, dtype=torch.float32)
    h_res = torch.empty(M, n, n, device=x.device, dtype=torch.float32)
    proj = torch.empty(M, P, device=x.device, dtype=torch.float32)
    sumsq = torch.empty(M, device=x.device, dtype=torch.float32)
    n_pad, block_p = _padded_streams(n), _next_power_of_2(P)
    _entry_kernel[(M,)](
        x,
        y,
        h_post_prev,
        h_res_prev,
        _dot_weight(phi, x),
        update,
        *_mapping_parameters(alpha, bias, n),
        stream,
        u,
        h_pre,
        h_post,
        h_res,
        proj,
        sumsq,
        M,
        C,
        iters,
        clamp,
        eps,
        norm_eps,
        N=n,
        NP=n_pad,
        P=P,
        BLOCK_P=block_p,
        BLOCK_C=max(1, min(ENTRY_TILE_ELEMENTS // (block_p * n_pad), _next_power_of_2(C))),
        WRITE_BACK=write_back is not None,
        HAS_UPDATE=proj_update is not None,
        num_warps=NUM_WARPS,
    )
    return stream, u, h_pre, h_post, h_res, proj, sumsq


@triton.jit
def _apply_bwd_kernel(
    grad_out_ptr,
    x_ptr,
    y_ptr,
    h_post_ptr,
    h_res_ptr,
    grad_x_ptr,
    grad_y_ptr,
    grad_h_post_ptr,
    grad_h_res_ptr,
    M,
    C,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M),): a block of tokens per program, looping over C; reads grad_out, X
    and y once. grad_x[m] = sum_i H_res[i, m] g[i], grad_y = sum_i H_post[i] g[i],
    grad_h_post[i] = sum_c g[i] y, grad_h_res[i, m] = sum_c g[i] X[m], per token. The g tile
    [stream, token, BLOCK_C] stays in registers and each X[m] is used as it is loaded: no
    accumulator for dX; a token's sums over C stay within the threads that hold it."""
    first, t, t_ok = _token_block(M, BLOCK_M)
    rows = tl.arange(0, NP)
    h_ok = (rows < N)[:, None] & t_ok[None, :]  # [stream, token]
    h_offsets = t[None, :] * N + rows[:, None]
    grad_out_ptr += first * N * C
    x_ptr += first * N * C
    y_ptr += first * C
    grad_x_ptr += first * N * C
    grad_y_ptr += first * C
    h_res_ptr += first * N * N
    h_post = tl.load(h_post_ptr + first * N + h_offsets, mask=h_ok, other=0.0).to(tl.float32)
    acc_post = tl.zeros((NP, BLOCK_M), dtype=tl.float32)
    acc_res = tl.zeros((NP, BLOCK_M, NP), dtype=tl.float32)  # [i, token, m]
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        tc_ok = t_ok[:, None] & (cols < C)[None, :]  # [token, channel]
        g = tl.load(grad_out_ptr + h_offsets[:, :, None] * C + cols[None, None, :],
                    mask=h_ok[:, :, None] & tc_ok[None, :, :], other=0.0).to(tl.float32)  # [i, token, c]
        y = tl.load(y_ptr + t[:, None] * C + cols[None, :], mask=tc_ok, other=0.0).to(tl.float32)
        acc_post += tl.sum(g * y[None, :, :], axis=2)
        grad_y = tl.sum(h_post[:, :, None] * g, axis=0)
        tl.store(grad_y_ptr + t[:, None] * C + cols[None, :], grad_y.to(grad_y_ptr.dtype.element_ty), mask=tc_ok)
        for m in tl.static_range(N):
            h_col = tl.load(h_res_ptr + t[None, :] * N * N + rows[:, None] * N + m, mask=h_ok,
                            other=0.0).to(tl.float32)  # [i, token]
            stream_m = (t[:, None] * N + m) * C + cols[None, :]
            x_m = tl.load(x_ptr + stream_m, mask=tc_ok, other=0.0).to(tl.float32)
            grad_x_m = tl.sum(h_col[:, :, None] * g, axis=0)
            tl.store(grad_x_ptr + stream_m, grad_x_m.to(grad_x_ptr.dtype.element_ty), mask=tc_ok)
            acc_res += tl.where(rows[None, None, :] == m, tl.sum(g * x_m[None, :, :], axis=2)[:, :, None], 0.0)
    tl.store(grad_h_post_ptr + first * N + h_offsets, acc_post, mask=h_ok)
    mat_offsets = t[None, :, None] * N * N + rows[:, None, None] * N + rows[None, None, :]
    tl.store(grad_h_res_ptr + first * N * N + mat_offsets, acc_res, mask=h_ok[:, :, None] & (rows < N)[None, None, :])


def apply_backward(
    grad_out: Tensor, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`apply_forward`: grad_x [M, n, C] in x.dtype, grad_y [M, C] in y.dtype,
    grad_h_post [M, n] and grad_h_res [M, n, n] in fp32; one pass over grad_out, x and y."""
    _check_stream_dtype(x, "x")
    _check_stream_dtype(y, "y")
    grad_out, x, y = grad_out.contiguous(), x.contiguous(), y.contiguous()
    h_post, h_res = h_post.contiguous(), h_res.contiguous()
    M, n, C = x.shape
    n_pad = _padded_streams(n)
    grad_x = torch.empty_like(x)
    grad_y = torch.empty_like(y)
    grad_h_post = torch.empty(M, n, device=x.device, dtype=torch.float32)
    grad_h_res = torch.empty(M, n, n, device=x.device, dtype=torch.float32)
    block_m, block_c = _stream_blocks(C)
    _apply_bwd_kernel[(_cdiv(M, block_m),)](
        grad_out,
        x,
        y,
        h_post,
        h_res,
        grad_x,
        grad_y,
        grad_h_post,
        grad_h_res,
        M,
        C,
        N=n,
        NP=n_pad,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        num_warps=NUM_WARPS,
    )
    return grad_x, grad_y, grad_h_post, grad_h_res
