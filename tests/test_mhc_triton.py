"""The mHC Triton kernels (llmkit/model/mhc_triton.py) on CPU under the Triton interpreter,
against an equation-literal fp64 oracle written here from the mHC math (arXiv 2512.24880,
Eq. 3 and 7-9): RMS-normalised x, then the projection, sigmoids and an unrolled Sinkhorn with
torch.clamp / exp, differentiated by torch.autograd.

Tolerances: fp32 inputs 1e-5 (relative and absolute, on values of order one); bf16 inputs are
compared with the oracle run in fp64 on the same bf16-rounded values (phi included, which the
projection's dot sees in x's dtype), 1e-5 for outputs kept in fp32 and 1e-2 of the output's
scale for outputs stored in bf16 (8 significant bits: a GPU's rounding costs up to 2^-9, the
interpreter's truncating fp32 -> bf16 cast up to 2^-8 relative).

The interpreter is chosen when mhc_triton is imported, so the module fixture imports it with
TRITON_INTERPRET=1 and restores the environment at once (other tests, and the subprocesses they
start, must not inherit the variable); see :func:`interpreted_import`. Tiny shapes keep the
interpreter fast; the `small_blocks` variants shrink the kernels' block sizes so that tails,
K loops, several programs and programs that take several token blocks are all exercised.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.mhc_oracle import op_params  # imports no Triton module

ITERS, CLAMP, EPS, NORM_EPS = 20, 15.0, 1e-8, 1e-5
MODULE = "llmkit.model.mhc_triton"
ROOT = Path(__file__).resolve().parents[1]


def _triton_python_module(name: str) -> bool:
    """triton's Python modules; its compiled extension (triton._C) is shared, never re-imported."""
    top, _, rest = name.partition(".")
    return top == "triton" and not (rest == "_C" or rest.startswith("_C."))


@contextlib.contextmanager
def interpreted_import() -> Iterator[ModuleType]:
    """Imports mhc_triton with TRITON_INTERPRET=1 against a private copy of triton's Python modules.

    triton.jit picks the interpreter when a function is decorated, triton's own library functions
    (tl.sum, tl.zeros, tl.sigmoid) included, and torch (torch._dynamo, torch.compile) imports triton
    long before this module runs. So triton's Python modules are imported afresh for mhc_triton and,
    at teardown, the session's own triton modules are put back and the interpreted mhc_triton is
    dropped, so that later imports (GPU tests, compiled kernels) see what they would have seen.
    """
    saved = {name: module for name, module in sys.modules.items() if _triton_python_module(name)}
    previous = os.environ.get("TRITON_INTERPRET")
    try:
        for name in saved:
            del sys.modules[name]
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            module = importlib.import_module(MODULE)
            # The private triton keeps interpreting when it imports more of itself lazily (at launch);
            # setting the knob also writes the variable, restored below.
            module.triton.knobs.runtime.interpret = True
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
        if "triton._C" in sys.modules:
            module.triton._C = sys.modules["triton._C"]
        yield module
    finally:
        for name in [name for name in sys.modules if _triton_python_module(name) or name == MODULE]:
            del sys.modules[name]
        sys.modules.update(saved)
        package = sys.modules["llmkit.model"]
        if "mhc_triton" in vars(package):
            delattr(package, "mhc_triton")


@pytest.fixture(scope="module")
def mt() -> Iterator[ModuleType]:
    """The kernels, interpreted. A compiled mhc_triton that another test imported (gpu_check's byte
    count records its launches) is set aside while these tests run, then put back."""
    pytest.importorskip("triton")
    existing = sys.modules.get(MODULE)
    if existing is not None and existing.INTERPRETED:
        yield existing
        return
    package = importlib.import_module("llmkit.model")
    if existing is not None:
        del sys.modules[MODULE]
    try:
        with interpreted_import() as module:
            assert module.INTERPRETED
            yield module
    finally:
        if existing is not None:
            sys.modules[MODULE] = existing
            package.mhc_triton = existing


@pytest.fixture(params=["default_blocks", "small_blocks"])
def blocks(request, mt, monkeypatch) -> str:
    """The kernels' own block sizes, or small ones: several programs per kernel, K loops, C and token tails."""
    if request.param == "small_blocks":
        monkeypatch.setattr(mt, "PROJECT_BLOCK_M", 16)
        monkeypatch.setattr(mt, "PROJECT_BWD_BLOCK_M", 16)
        monkeypatch.setattr(mt, "PROJECT_BLOCK_K", 32)
        monkeypatch.setattr(mt, "PROJECT_BWD_BLOCK_K", 32)  # K = 160: 5 column blocks, the last one short
        monkeypatch.setattr(mt, "COEFF_BLOCK_ELEMENTS", 64)  # 4 tokens per block at n = 3, 4
        monkeypatch.setattr(mt, "COEFF_BWD_PROGRAMS", 3)  # each backward program takes several blocks
        monkeypatch.setattr(mt, "STREAM_BLOCK_C", 16)
        monkeypatch.setattr(mt, "STREAM_BLOCK_M", 2)  # several tokens per stream program, the last block short
    return request.param


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float, atol: float | None = None) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol if atol is None else atol)


def bf16_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """An output stored in bf16: within 1e-2 relative of the fp64 truth (of its scale)."""
    assert actual.dtype == torch.bfloat16
    close(actual, expected, 1e-2, 1e-2 * expected.abs().max().item())


# --- the fp64 oracle ------------------------------------------------------------------------------


def sinkhorn(logits: torch.Tensor) -> torch.Tensor:
    m = torch.clamp(logits, -CLAMP, CLAMP).exp()
    for _ in range(ITERS):
        m = m / (m.sum(dim=-2, keepdim=True) + EPS)  # columns
        m = m / (m.sum(dim=-1, keepdim=True) + EPS)  # rows
    return m


def coefficients_from_d(d: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, n: int):
    alpha_vec = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])
    logits = alpha_vec * d + bias
    h_pre = torch.sigmoid(logits[:, :n])
    h_post = 2 * torch.sigmoid(logits[:, n : 2 * n])
    return h_pre, h_post, sinkhorn(logits[:, 2 * n :].reshape(-1, n, n))


def coefficients_oracle(proj, sumsq, alpha, bias, n: int, width: int):
    """Eq. 7-9 from the projection of the raw stream and its sum of squares."""
    rms_inv = torch.rsqrt(sumsq / width + NORM_EPS)
    return coefficients_from_d(proj * rms_inv[:, None], alpha, bias, n)


def mapping_oracle(x, phi, alpha, bias, n: int):
    """Eq. 7-9 literally: x' = RMSNorm(x), then x' phi^T."""
    x_norm = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + NORM_EPS)
    return coefficients_from_d(x_norm @ phi.T, alpha, bias, n)


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().double().requires_grad_() for t in tensors]


def grads_of(outputs, weights, inputs) -> list[torch.Tensor]:
    loss = sum((o * w.double()).sum() for o, w in zip(outputs, weights, strict=True))
    return list(torch.autograd.grad(loss, inputs))


# --- inputs ---------------------------------------------------------------------------------------


def mapping_inputs(m: int, n: int, c: int, dtype: torch.dtype, peaked: bool = False, seed: int = 0):
    """x [M, nC], phi [P, nC] (fp32), alpha [3], bias [P]; ``peaked``: H_res logits past both clamps."""
    g = torch.Generator().manual_seed(seed)
    p = 2 * n + n * n
    x = torch.randn(m, n * c, generator=g).to(dtype)
    phi = (torch.randn(p, n * c, generator=g) / (n * c) ** 0.5).to(torch.float32)
    alpha = torch.tensor([0.7, -0.4, 1.3])
    bias = torch.randn(p, generator=g)
    if peaked:
        bias[2 * n :] = 12.0 * torch.randn(n * n, generator=g)
        bias[2 * n] = 40.0  # above +clamp for every token
        if n > 1:
            bias[2 * n + 1] = -40.0  # below -clamp for every token
    return x, phi, alpha, bias


def output_weights(m: int, n: int, seed: int = 1) -> list[torch.Tensor]:
    """Upstream gradients for (H_pre, H_post, H_res)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, n, generator=g), torch.randn(m, n, generator=g), torch.randn(m, n, n, generator=g)]


# --- projection ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_project_forward_and_backward(mt, blocks, dtype):
    m, n, c = 40, 4, 40  # K = 160: a K tail at BLOCK_K 128 (and 32); rows tails at BLOCK_M 64 (and 16)
    x, phi, _, _ = mapping_inputs(m, n, c, dtype)
    proj, sumsq = mt.project_forward(x, phi)  # K-split partials: a split per 32 columns with the small blocks
    assert proj.dtype == sumsq.dtype == torch.float32 and proj.shape[1:] == (m, 2 * n + n * n)
    proj, sumsq = proj.sum(0), sumsq.sum(0)

    # The dot runs in x's precision: the oracle takes phi rounded to x's dtype, exactly as the kernel.
    x64, phi64 = leaves(x, phi.to(dtype))
    proj_ref, sumsq_ref = x64 @ phi64.T, x64.square().sum(-1)
    close(proj, proj_ref, 1e-5)
    close(sumsq, sumsq_ref, 1e-5)

    g = torch.Generator().manual_seed(2)
    grad_proj, grad_sumsq = torch.randn(m, proj.shape[1], generator=g), torch.randn(m, generator=g)
    grad_x, grad_phi = mt.project_backward(grad_proj, grad_sumsq, x, phi)
    assert grad_x.dtype == dtype and grad_phi.dtype == torch.float32
    grad_x_ref, grad_phi_ref = grads_of([proj_ref, sumsq_ref], [grad_proj, grad_sumsq], [x64, phi64])
    if dtype == torch.bfloat16:
        bf16_close(grad_x, grad_x_ref)
    else:
        close(grad_x, grad_x_ref, 1e-5)
    close(grad_phi, grad_phi_ref, 1e-5)


def launches(mt, monkeypatch, names: tuple[str, ...]) -> list[tuple[str, tuple]]:
    """(kernel name, grid) of each launch of mt's kernels ``names`` from now on; they still run."""
    launched = []

    class Recorded:
        def __init__(self, name: str) -> None:
            self.name, self.kernel = name, getattr(mt, name)

        def __getitem__(self, grid: tuple):
            launched.append((self.name, grid))
            return self.kernel[grid]

    for name in names:
        monkeypatch.setattr(mt, name, Recorded(name))
    return launched


@pytest.mark.parametrize("programs, splits", [(1, 1), (2, 2), (3, 3), (256, 5)])
def test_project_forward_splits_k_when_there_are_few_tokens(mt, monkeypatch, programs, splits):
    """Decode (M = batch): one block of tokens would leave a single program looping over all of K,
    so K is split into up to PROJECT_FWD_PROGRAMS / (token blocks) parts (here K = 160, five tiles
    of 32: splits of 5, 3 and 2 tiles, or 2, 2 and 1), each its own fp32 partial; they sum to
    the oracle's values."""
    launched = launches(mt, monkeypatch, ("_project_fwd_kernel",))
    monkeypatch.setattr(mt, "PROJECT_FWD_PROGRAMS", programs)
    monkeypatch.setattr(mt, "PROJECT_BLOCK_K", 32)
    x, phi, _, _ = mapping_inputs(3, 4, 40, torch.float32)  # three tokens: one block of 64
    proj, sumsq = mt.project_forward(x, phi)
    assert launched == [("_project_fwd_kernel", (1, splits))]
    assert proj.shape == (splits, 3, 24) and sumsq.shape == (splits, 3)
    x64, phi64 = x.double(), phi.double()
    close(proj.sum(0), x64 @ phi64.T, 1e-5)
    close(sumsq.sum(0), x64.square().sum(-1), 1e-5)


def test_project_rejects_fp64(mt):
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(AssertionError, match="fp64"):
        mt.project_forward(x, torch.randn(6, 8))


# --- coefficients (Eq. 7-9) ----------------------------------------------------------------------


def projected(x: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (proj, sumsq) of the raw stream, computed in fp64 and rounded once."""
    x64 = x.double()
    return (x64 @ phi.double().T).float(), x64.square().sum(-1).float()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_coefficients_forward(mt, n):
    m, c = 9, 8
    x, phi, alpha, bias = mapping_inputs(m, n, c, torch.float32, peaked=True)
    proj, sumsq = projected(x, phi)
    h_pre, h_post, h_res, proj_out, sumsq_out = mt.coefficients_forward(
        proj[None], sumsq[None], *op_params(alpha, bias), n, n * c, ITERS, CLAMP, EPS, NORM_EPS)
    expected = coefficients_oracle(*leaves(proj, sumsq, alpha, bias), n, n * c)
    for actual, ref in zip((h_pre, h_post, h_res), expected, strict=True):
        assert actual.dtype == torch.float32 and actual.shape == ref.shape
        close(actual, ref, 1e-5)
    close(h_res.sum(-1), torch.ones(m, n), 1e-5)  # rows of a Sinkhorn iterate sum to 1
    assert torch.equal(proj_out, proj) and torch.equal(sumsq_out, sumsq)  # one partial: itself


@pytest.mark.parametrize(("splits", "max_block_s"), [(5, 128), (5, 2), (5, 1), (96, 128)])
def test_coefficients_forward_sums_the_projections_partials(mt, monkeypatch, splits, max_block_s):
    """Decode's projection comes in K-split partials: the coefficient kernel sums them as it reads
    them (max_block_s at a time, the last load masked), with fewer tokens per program, and writes
    the sums for the backward; no torch sum is launched."""
    monkeypatch.setattr(mt, "COEFF_MAX_BLOCK_S", max_block_s)
    launched = launches(mt, monkeypatch, ("_coeff_fwd_kernel",))
    m, n, c = 11, 4, 8
    x, phi, alpha, bias = mapping_inputs(m, n, c, torch.float32, peaked=True)
    proj, sumsq = projected(x, phi)
    g = torch.Generator().manual_seed(5)
    proj_parts = torch.randn(splits, m, proj.shape[1], generator=g)
    proj_parts[-1] += proj - proj_parts.sum(0)  # partials that sum to the projection (within fp32 rounding)
    sumsq_parts = torch.rand(splits, m, generator=g)
    sumsq_parts[-1] += sumsq - sumsq_parts.sum(0)
    h_pre, h_post, h_res, proj_sum, sumsq_sum = mt.coefficients_forward(
        proj_parts, sumsq_parts, *op_params(alpha, bias), n, n * c, ITERS, CLAMP, EPS, NORM_EPS)
    close(proj_sum, proj_parts.double().sum(0), 1e-6, 1e-5)
    close(sumsq_sum, sumsq_parts.double().sum(0), 1e-6, 1e-5)
    expected = coefficients_oracle(*leaves(proj_sum, sumsq_sum, alpha, bias), n, n * c)
    for actual, ref in zip((h_pre, h_post, h_res), expected, strict=True):
        close(actual, ref, 1e-5)
    block_t = max(1, min(16, mt.COEFF_SPLIT_ELEMENTS // ((1 << (splits - 1).bit_length()) * 16)))
    assert launched == [("_coeff_fwd_kernel", (-(-m // block_t),))]


@pytest.mark.parametrize(("n", "peaked"), [(1, False), (3, False), (3, True), (4, True)])
def test_coefficients_backward(mt, blocks, n, peaked):
    m, c = 13, 8
    x, phi, alpha, bias = mapping_inputs(m, n, c, torch.float32, peaked=peaked)
    proj, sumsq = projected(x, phi)
    if peaked:
        proj[0, 2 * n + n * n - 1] = 0.0  # token 0's last H_res logit is exactly +clamp: bias = clamp, d = 0
        bias[2 * n + n * n - 1] = CLAMP
    weights = output_weights(m, n)
    weights[2] = weights[2].to(torch.bfloat16)  # an incoming gradient in bf16 is upcast by the kernel
    grad_proj, grad_sumsq, grad_alpha_bias = mt.coefficients_backward(*weights, proj, sumsq, *op_params(alpha, bias),
                                                                      n, n * c, ITERS, CLAMP, EPS, NORM_EPS)
    assert grad_alpha_bias.shape == (3 + 2 * n + n * n,)  # alpha's and bias's gradients side by side
    grads = (grad_proj, grad_sumsq, grad_alpha_bias[:3], grad_alpha_bias[3:])
    inputs = leaves(proj, sumsq, alpha, bias)
    expected = grads_of(coefficients_oracle(*inputs, n, n * c), weights, inputs)
    for name, actual, ref in zip(("proj", "sumsq", "alpha", "bias"), grads, expected, strict=True):
        assert actual.dtype == torch.float32 and actual.shape == ref.shape, name
        close(actual, ref, 1e-5)
    if peaked:
        grad_proj, grad_proj_ref = grads[0], expected[0]
        logits = alpha[2] * proj[:, 2 * n :] * torch.rsqrt(sumsq / (n * c) + NORM_EPS)[:, None] + bias[2 * n :]
        outside = logits.abs() > CLAMP
        assert outside[:, 0].all() and (n == 1 or outside[:, 1].all())
        assert (grad_proj[:, 2 * n :][outside] == 0).all() and (grad_proj_ref[:, 2 * n :][outside] == 0).all()
        assert grad_proj[0, -1] != 0 and grad_proj_ref[0, -1] != 0  # on the boundary: torch.clamp passes it
        assert grads[3][2 * n] == 0  # clamped for every token: no bias gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [3, 4])
def test_mapping_end_to_end(mt, n, dtype):
    """x -> project -> coefficients and back again, against the literal RMSNorm-then-projection oracle."""
    m, c = 10, 12
    x, phi, alpha, bias = mapping_inputs(m, n, c, dtype, peaked=True, seed=n)
    width = n * c
    *outputs, proj, sumsq = mt.coefficients_forward(*mt.project_forward(x, phi), *op_params(alpha, bias), n, width,
                                                    ITERS, CLAMP, EPS, NORM_EPS)
    weights = output_weights(m, n)
    grad_proj, grad_sumsq, grad_alpha_bias = mt.coefficients_backward(
        *weights, proj, sumsq, *op_params(alpha, bias), n, width, ITERS, CLAMP, EPS, NORM_EPS
    )
    grad_alpha, grad_bias = grad_alpha_bias[:3], grad_alpha_bias[3:]
    grad_x, grad_phi = mt.project_backward(grad_proj, grad_sumsq, x, phi)

    inputs = leaves(x, phi.to(dtype), alpha, bias)
    expected = mapping_oracle(*inputs, n)
    for actual, ref in zip(outputs, expected, strict=True):
        close(actual, ref, 1e-5)
    grad_x_ref, grad_phi_ref, grad_alpha_ref, grad_bias_ref = grads_of(expected, weights, inputs)
    if dtype == torch.bfloat16:
        bf16_close(grad_x, grad_x_ref)
    else:
        close(grad_x, grad_x_ref, 1e-5)
    close(grad_phi, grad_phi_ref, 1e-5)
    close(grad_alpha, grad_alpha_ref, 1e-5)
    close(grad_bias, grad_bias_ref, 1e-5)


@pytest.mark.parametrize("dot", [False, True], ids=["fma", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 4])
def test_project_backward_sums_the_other_gradients_of_x_in_its_pass(mt, blocks, n, dtype, dot, monkeypatch):
    """grad_x = g phi + 2 x g_sumsq + grad_in + H_pre[m] g_u: the enter op's one write of dL/dX
    (C = 40 does not divide the small blocks' BLOCK_K = 32: tiles straddle two streams), with the
    g phi term as FMAs or (bf16) as tensor-core dots."""
    monkeypatch.setattr(mt, "PROJECT_BWD_DOT", dot)
    m, c = 40, 40
    x, phi, _, _ = mapping_inputs(m, n, c, dtype)
    g = torch.Generator().manual_seed(5)
    grad_proj, grad_sumsq = torch.randn(m, phi.shape[0], generator=g), torch.randn(m, generator=g)
    grad_in = torch.randn(m, n * c, generator=g).to(dtype)
    grad_u, h_pre = torch.randn(m, c, generator=g).to(dtype), torch.rand(m, n, generator=g)
    grad_x, grad_phi = mt.project_backward(grad_proj, grad_sumsq, x, phi, grad_in, (grad_u, h_pre))
    x64, phi64 = leaves(x, phi.to(dtype))
    alone_x, alone_phi = grads_of([x64 @ phi64.T, x64.square().sum(-1)], [grad_proj, grad_sumsq], [x64, phi64])
    pre_term = (h_pre.double()[:, :, None] * grad_u.double()[:, None, :]).flatten(1)
    expected = alone_x + grad_in.double() + pre_term
    if dtype == torch.bfloat16:
        bf16_close(grad_x, expected)
    else:
        close(grad_x, expected, 1e-5)
    close(grad_phi, alone_phi, 1e-5)
    only_pre, _ = mt.project_backward(grad_proj, grad_sumsq, x, phi, pre=(grad_u, h_pre))
    check_stream(only_pre, alone_x + pre_term, dtype)
    with pytest.raises(ValueError, match="do not match"):
        mt.project_backward(grad_proj, grad_sumsq, x, phi, pre=(grad_u[:, 1:], h_pre))


@pytest.mark.parametrize("dot", [False, True], ids=["fma", "dot"])
def test_project_backward_keeps_fp32_accuracy_of_grad_proj_phi_on_a_bf16_stream(mt, blocks, dot, monkeypatch):
    """grad_proj phi is summed in fp32 from exact products in both paths: here grad_in cancels it up
    to its bf16 rounding, so grad_x is that rounding residual (about 2^-9 of the term), which a
    bf16 grad_proj (one part instead of three) would get wrong by its own size."""
    monkeypatch.setattr(mt, "PROJECT_BWD_DOT", dot)
    m, n, c = 40, 4, 40
    x, phi, _, _ = mapping_inputs(m, n, c, torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    grad_proj = torch.randn(m, phi.shape[0], generator=g) * torch.logspace(-3, 3, phi.shape[0])
    term = grad_proj.double() @ phi.to(torch.bfloat16).double()
    grad_in = (-term).to(torch.bfloat16)
    grad_x, _ = mt.project_backward(grad_proj, torch.zeros(m), x, phi, grad_in)
    residual = term + grad_in.double()
    assert residual.abs().max() > 0
    close(grad_x, residual, 1e-2, 1e-2 * residual.abs().max().item())


# --- stream ops (Eq. 3) ------------------------------------------------------------------------------


def stream_inputs(m: int, n: int, c: int, x_dtype: torch.dtype, y_dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, n, c, generator=g).to(x_dtype)
    y = torch.randn(m, c, generator=g).to(y_dtype)
    h_pre = torch.rand(m, n, generator=g)
    h_post = 2 * torch.rand(m, n, generator=g)
    h_res = torch.rand(m, n, n, generator=g)
    return x, y, h_pre, h_post, h_res


def check_stream(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    if dtype == torch.bfloat16:
        bf16_close(actual, expected)
    else:
        close(actual, expected, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 4])
def test_pre(mt, blocks, n, dtype):
    m, c = 7, 40  # C = 40: a tail at BLOCK_C 64 (default) and 16 (small); 7 tokens: a short block of 2
    x, grad_out, h_pre, _, _ = stream_inputs(m, n, c, dtype, dtype)
    out = mt.pre_forward(x, h_pre)
    x64, h64 = leaves(x, h_pre)
    ref = (h64[:, :, None] * x64).sum(dim=1)
    check_stream(out, ref, dtype)
    grad_h = mt.pre_backward(grad_out, x)  # dL/dX's term: test_project_backward_sums_the_other_gradients...
    (grad_h_ref,) = grads_of([ref], [grad_out], [h64])
    assert grad_h.dtype == torch.float32
    close(grad_h, grad_h_ref, 1e-5)
    grad_h_in = torch.randn(m, n).to(dtype)  # H_pre's gradient from the op's output, added in the kernel
    close(mt.pre_backward(grad_out, x, grad_h_in), grad_h_ref + grad_h_in.double(), 1e-5)


@pytest.mark.parametrize(
    ("x_dtype", "y_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
)
@pytest.mark.parametrize("n", [1, 3, 4])
def test_apply(mt, blocks, n, x_dtype, y_dtype):
    m, c = 7, 40
    x, y, _, h_post, h_res = stream_inputs(m, n, c, x_dtype, y_dtype)
    out = mt.apply_forward(x, y, h_post, h_res)
    x64, y64, post64, res64 = leaves(x, y, h_post, h_res)
    ref = (res64[:, :, :, None] * x64[:, None, :, :]).sum(dim=2) + post64[:, :, None] * y64[:, None, :]
    check_stream(out, ref, x_dtype)

    grad_out = torch.randn(m, n, c, generator=torch.Generator().manual_seed(4)).to(x_dtype)
    grad_x, grad_y, grad_h_post, grad_h_res = mt.apply_backward(grad_out, x, y, h_post, h_res)
    expected = grads_of([ref], [grad_out], [x64, y64, post64, res64])
    check_stream(grad_x, expected[0], x_dtype)
    check_stream(grad_y, expected[1], y_dtype)
    for actual, ref_grad in zip((grad_h_post, grad_h_res), expected[2:], strict=True):
        assert actual.dtype == torch.float32
        close(actual, ref_grad, 1e-5)


@pytest.mark.parametrize(
    ("x_dtype", "y_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
)
@pytest.mark.parametrize("n", [1, 3, 4])
def test_apply_project_forward_is_apply_then_project_in_one_kernel(mt, monkeypatch, n, x_dtype, y_dtype):
    """X' exactly as apply_forward stores it, and proj and sumsq of that stored X' (the dot in its
    precision) against fp64; 37 tokens and C = 40 leave tails at 16 tokens and channels per step."""
    monkeypatch.setattr(mt, "APPLY_PROJECT_BLOCK_M", 16)
    monkeypatch.setattr(mt, "APPLY_PROJECT_BLOCK_C", 16)
    m, c = 37, 40
    x, y, _, h_post, h_res = stream_inputs(m, n, c, x_dtype, y_dtype)
    phi = torch.randn(2 * n + n * n, n * c, generator=torch.Generator().manual_seed(4)) / (n * c) ** 0.5
    out, proj, sumsq = mt.apply_project_forward(x, y, h_post, h_res, phi)
    assert torch.equal(out, mt.apply_forward(x, y, h_post, h_res))
    assert proj.dtype == sumsq.dtype == torch.float32 and proj.shape[0] == sumsq.shape[0] == 1  # one partial
    stored, phi64 = out.double().view(m, n * c), phi.to(x_dtype).double()
    close(proj[0], stored @ phi64.T, 1e-5)
    close(sumsq[0], stored.square().sum(-1), 1e-5)


@pytest.mark.parametrize(("fused", "tokens", "kernels"), [
    (False, 48, ["_apply_fwd_kernel", "_project_fwd_kernel"]),
    (True, 48, ["_apply_project_fwd_kernel"]),  # 3 blocks of 16 tokens: the projection would not split K
    (True, 16, ["_apply_fwd_kernel", "_project_fwd_kernel"]),  # 1 block: decode's shape, the two kernels
])
def test_apply_project_fuses_only_where_switched_on_and_the_projection_would_not_split(
        mt, monkeypatch, fused, tokens, kernels):
    monkeypatch.setattr(mt, "APPLY_PROJECT_FUSED", fused)
    monkeypatch.setattr(mt, "PROJECT_BLOCK_M", 16)
    monkeypatch.setattr(mt, "PROJECT_FWD_PROGRAMS", 3)
    launched = launches(mt, monkeypatch, ("_apply_fwd_kernel", "_project_fwd_kernel", "_apply_project_fwd_kernel"))
    x, y, _, h_post, h_res = stream_inputs(tokens, 4, 8, torch.float32, torch.float32)
    phi = torch.randn(24, 32)
    out, proj, sumsq = mt.apply_project(x, y, h_post, h_res, phi)
    assert [name for name, _ in launched] == kernels
    stored = out.double().view(tokens, 32)
    close(proj.sum(0), stored @ phi.double().T, 1e-5)  # partials: one, or a split of K at 16 tokens
    close(sumsq.sum(0), stored.square().sum(-1), 1e-5)


# --- the kernels behind the custom ops (llmkit/model/mhc_ops.py) ----------------------------------


def test_the_ops_route_to_the_kernels_only_where_they_should(mt, monkeypatch):
    from llmkit.model import mhc_ops

    x = torch.randn(2, 3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert mhc_ops.triton_kernels(x, True) is None  # a CPU tensor without the interpreter: PyTorch code
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert mhc_ops.triton_kernels(x, True) is mt
    assert mhc_ops.triton_kernels(x, False) is None  # mhc.implementation: torch
    assert mhc_ops.triton_kernels(x.double(), True) is None  # fp64 stays in PyTorch
    assert mhc_ops.triton_kernels(x[:0], True) is None  # no tokens: nothing to launch (a grid of 0 divided by 0)
    x, y = torch.randn(0, 4, 8), torch.randn(0, 8)
    h_post, h_res = torch.rand(0, 4), torch.rand(0, 4, 4)
    phi, alpha, bias = torch.randn(24, 32), torch.tensor([0.7, -0.4, 1.3]), torch.randn(24)
    x_next, u, *_ = mhc_ops.mhc_boundary(x, y, h_post, h_res, phi, *op_params(alpha, bias), ITERS, CLAMP, EPS,
                                         NORM_EPS, True, mhc_ops.SOURCE_HASH)
    assert x_next.shape == (0, 4, 8) and u.shape == (0, 8)


@pytest.mark.parametrize("entry_tokens", [128, 0], ids=["entry-kernel", "four-kernels"])
def test_every_op_with_its_kernels_passes_opcheck(mt, monkeypatch, entry_tokens):
    """Schema, fake kernels, autograd registration and AOT dispatch of each op on the Triton path,
    its 6 tokens' forward in the entry kernel or in four."""
    from llmkit.model import mhc_ops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(mt, "ENTRY_ONE_KERNEL_TOKENS", entry_tokens)
    torch.manual_seed(0)
    m, n, c = 6, 4, 8
    p = 2 * n + n * n
    x, y = torch.randn(m, n, c, requires_grad=True), torch.randn(m, c, requires_grad=True)
    phi, update = torch.randn(p, n * c, requires_grad=True), torch.randn(m, p, requires_grad=True)
    h_post, h_res = torch.rand(m, n, requires_grad=True), torch.rand(m, n, n, requires_grad=True)
    alpha, bias = torch.tensor([0.7, -0.4, 1.3], requires_grad=True), torch.randn(p, requires_grad=True)
    settings = (ITERS, CLAMP, EPS, NORM_EPS, True, mhc_ops.SOURCE_HASH)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    weights = (phi, *op_params(alpha, bias))
    torch.library.opcheck(mhc_ops.mhc_enter, (x, update, *weights, *settings), test_utils=tests)
    torch.library.opcheck(mhc_ops.mhc_boundary, (x, y, h_post, h_res, *weights, *settings), test_utils=tests)
    if not entry_tokens:  # mhc_apply has no entry kernel: checked once
        torch.library.opcheck(mhc_ops.mhc_apply, (x, y, h_post, h_res, True, mhc_ops.SOURCE_HASH), test_utils=tests)


@pytest.mark.parametrize(("entry_tokens", "kernels"), [
    (4, ("_entry_kernel",)),
    (3, ("_apply_fwd_kernel", "_project_fwd_kernel", "_coeff_fwd_kernel", "_pre_fwd_kernel")),
])
def test_a_decode_sublayer_is_one_kernel_and_no_torch_reduction(mt, monkeypatch, entry_tokens, kernels):
    """At decode's shape (4 tokens) mhc_boundary's forward is the entry kernel alone; with more
    tokens than ENTRY_ONE_KERNEL_TOKENS (here 3) it launches the write-back, the projection (nC =
    128 split into four partials), the coefficients (which sum the partials) and the
    pre-aggregation. Neither way a torch reduction: a decode step's CUDA graph holds no sums of the
    partials (two per sublayer until 2026-12-01)."""
    from llmkit.model import mhc_ops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(mt, "PROJECT_BLOCK_K", 32)  # nC = 128: four column tiles
    monkeypatch.setattr(mt, "ENTRY_ONE_KERNEL_TOKENS", entry_tokens)
    launched = launches(mt, monkeypatch, ("_entry_kernel", "_apply_fwd_kernel", "_project_fwd_kernel",
                                          "_coeff_fwd_kernel", "_pre_fwd_kernel"))
    torch.manual_seed(0)
    m, n, c = 4, 4, 32
    p = 2 * n + n * n
    x, y, h_post, h_res = torch.randn(m, n, c), torch.randn(m, c), torch.rand(m, n), torch.rand(m, n, n)
    weights = (torch.randn(p, n * c), *op_params(torch.tensor([0.7, -0.4, 1.3]), torch.randn(p)))
    with torch.profiler.profile() as profile:
        mhc_ops.mhc_boundary(x, y, h_post, h_res, *weights, ITERS, CLAMP, EPS, NORM_EPS, True, mhc_ops.SOURCE_HASH)
    assert [name for name, _ in launched] == list(kernels)
    if len(kernels) == 1:
        assert launched[0] == ("_entry_kernel", (4,))  # a program per token
    else:
        assert launched[1] == ("_project_fwd_kernel", (1, 4))
    torch_ops = {e.name for e in profile.events() if e.name.startswith("aten::")}
    assert not {"aten::sum", "aten::add", "aten::add_"} & torch_ops, torch_ops  # allocations and copies only


@pytest.mark.parametrize(("n", "dtype", "write_back", "update"), [
    (4, torch.float32, True, False),
    (4, torch.bfloat16, True, False),
    (3, torch.bfloat16, False, True),
    (4, torch.float32, False, True),
    (1, torch.float32, True, False),
    (8, torch.float32, True, True),
])
def test_the_entry_kernel_equals_the_sublayers_four_kernels(mt, monkeypatch, n, dtype, write_back, update):
    """entry_forward's one kernel against apply_project (or project_forward), coefficients_forward
    and pre_forward, which the tests above check against the fp64 oracle: X as stored, u, the
    coefficients, proj (a LoRA update included) and sumsq, from 3 tokens of C = 40 (channels per
    step: 16 at n = 4, 32 at n = 3, 2 at n = 8, so tails), equal up to fp32 summation order (a
    bf16 u within its rounding)."""
    monkeypatch.setattr(mt, "ENTRY_TILE_ELEMENTS", 2048)
    m, c = 3, 40
    p = 2 * n + n * n
    x, y, _, h_post, h_res = stream_inputs(m, n, c, dtype, dtype)
    g = torch.Generator().manual_seed(7)
    phi = torch.randn(p, n * c, generator=g) / (n * c) ** 0.5
    alpha = [torch.tensor([0.7]), torch.tensor([-0.4]), torch.tensor([1.3])]
    bias = [torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, n, generator=g)]
    proj_update = torch.randn(m, p, generator=g) if update else None
    settings = (ITERS, CLAMP, EPS, NORM_EPS)
    got = mt.entry_forward(x, (y, h_post, h_res) if write_back else None, proj_update, phi, alpha, bias, *settings)
    if write_back:
        stream, proj, sumsq = mt.apply_project(x, y, h_post, h_res, phi)
    else:
        stream, (proj, sumsq) = x, mt.project_forward(x.view(m, n * c), phi)
    if update:
        proj[0] += proj_update
    h_pre, *coefficients = mt.coefficients_forward(proj, sumsq, alpha, bias, n, n * c, *settings)
    expected = (stream, mt.pre_forward(stream, h_pre), h_pre, *coefficients)
    for name, actual, want in zip(("X", "u", "H_pre", "H_post", "H_res", "proj", "sumsq"), got, expected, strict=True):
        assert actual.shape == want.shape and actual.dtype == want.dtype, name
        close(actual, want, 1e-5 if name != "u" or dtype == torch.float32 else 1e-2, 1e-5 * want.abs().max().item())
    assert got[0] is x or write_back  # without a write-back X is the input itself


def test_a_lora_update_on_a_split_projection_is_added_once(mt, monkeypatch):
    """mhc_enter's proj_update (a LoRA adapter's term on phi) joins the first of the projection's
    K-split partials (6 tokens, nC = 128: four partials), so the coefficients see x phi^T + update
    once: the ops' values on the kernels equal their PyTorch code's."""
    from llmkit.model import mhc_ops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(mt, "PROJECT_BLOCK_K", 32)  # nC = 128: four column tiles
    monkeypatch.setattr(mt, "ENTRY_ONE_KERNEL_TOKENS", 0)  # the split projection, not the entry kernel
    launched = launches(mt, monkeypatch, ("_project_fwd_kernel", "_coeff_fwd_kernel"))
    torch.manual_seed(0)
    m, n, c = 6, 4, 32
    p = 2 * n + n * n
    x, phi, update = torch.randn(m, n, c), torch.randn(p, n * c) / (n * c) ** 0.5, torch.randn(m, p)
    alpha, bias = torch.tensor([0.7, -0.4, 1.3]), torch.randn(p)
    weights = (phi, *op_params(alpha, bias), ITERS, CLAMP, EPS, NORM_EPS)
    kernels = mhc_ops.mhc_enter(x, update, *weights, True, mhc_ops.SOURCE_HASH)
    assert launched == [("_project_fwd_kernel", (1, 4)), ("_coeff_fwd_kernel", (1,))]  # and no torch sum
    close(kernels[4], x.double().view(m, -1) @ phi.double().T + update.double(), 1e-5)  # proj: x phi^T + update
    reference = mhc_ops.mhc_enter(x, update, *weights, False, mhc_ops.SOURCE_HASH)
    for name, got, want in zip(("u", "H_pre", "H_post", "H_res", "proj", "sumsq"), kernels, reference, strict=True):
        assert got.shape == want.shape, name
        close(got, want, 1e-5)


@pytest.mark.parametrize(("fused", "programs", "entry_tokens"), [(False, 1, 0), (True, 1, 0), (False, 256, 0),
                                                                 (False, 256, 16)])
def test_a_model_on_the_kernels_equals_the_model_on_the_pytorch_code(mt, monkeypatch, fused, programs, entry_tokens):
    """A 2-layer n = 4 model's loss and every gradient, with the ops' Triton kernels (interpreted)
    against the same ops' PyTorch code (mhc.implementation: torch), fp32; ``fused``: each write-back
    and the next projection in one kernel (APPLY_PROJECT_FUSED). With 256 projection
    programs, as on a GPU, the 16 tokens' projection comes in four K-split partials (decode's
    shape), which the coefficient kernel sums; with ENTRY_ONE_KERNEL_TOKENS at 16, each sublayer's
    forward is the entry kernel (decode's path)."""
    from llmkit.model.config import MHCConfig, ModelConfig
    from llmkit.model.transformer import Transformer

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(mt, "APPLY_PROJECT_FUSED", fused)
    monkeypatch.setattr(mt, "PROJECT_FWD_PROGRAMS", programs)  # 1: 16 tokens fill the "GPU", the fused kernel runs
    monkeypatch.setattr(mt, "APPLY_PROJECT_BLOCK_M", 16)
    monkeypatch.setattr(mt, "ENTRY_ONE_KERNEL_TOKENS", entry_tokens)
    launched = []
    for name in ("project_backward", "coefficients_backward", "pre_backward", "apply_forward",
                 "apply_project_forward", "entry_forward"):
        kernel = getattr(mt, name)
        monkeypatch.setattr(mt, name, lambda *a, _k=kernel, _n=name: launched.append(_n) or _k(*a))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=61, n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=16, n_streams=4,
                         mhc=MHCConfig(alpha_init=0.5))
    model = Transformer(config)
    idx = torch.randint(0, 61, (2, 9))
    results = []
    for implementation in ("auto", "torch"):
        model.config.mhc.implementation = implementation  # MHCMapping reads the shared MHCConfig
        model.zero_grad()
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss_t, grads_t), (loss_p, grads_p) = results
    counts = {name: launched.count(name) for name in set(launched)}
    # 2 layers x 2 sublayers: 3 write-backs into the next sublayer's op, and the last one
    if fused:
        writes = {"apply_forward": 1, "apply_project_forward": 3, "project_backward": 4}
    elif entry_tokens:  # every sublayer's forward, write-back included, in its entry kernel; the last one apart
        writes = {"entry_forward": 4, "apply_forward": 1, "project_backward": 4}
    else:
        writes = {"apply_forward": 4, "project_backward": 4}
    assert counts == {"coefficients_backward": 4, "pre_backward": 4, **writes}
    assert abs(loss_t - loss_p) <= 1e-6 * loss_p
    assert ((grads_t - grads_p).norm() / grads_p.norm()).item() <= 1e-5


def test_cached_greedy_decode_on_the_entry_kernel_equals_decode_on_the_pytorch_code(mt, monkeypatch):
    """Cached generation (eager, fp32) of a 2-layer n = 4 model, 3 prompts: the prefill's 15 tokens
    and every decode step's 3 take the entry kernel (ENTRY_ONE_KERNEL_TOKENS = 16); greedy decoding
    picks the same 4 tokens as on the ops' PyTorch code (mhc.implementation: torch), each with the
    same log-probability within 1e-5."""
    from llmkit.model.config import MHCConfig, ModelConfig
    from llmkit.model.generation import SamplingConfig, generate
    from llmkit.model.transformer import Transformer

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(mt, "ENTRY_ONE_KERNEL_TOKENS", 16)
    launched = launches(mt, monkeypatch, ("_entry_kernel", "_project_fwd_kernel"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=61, n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=32,
                                    n_streams=4, mhc=MHCConfig(alpha_init=0.5))).eval()
    prompts, sampling = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]], SamplingConfig(max_new_tokens=4, temperature=0.0)
    kernels, pytorch = [], []
    for implementation, out in (("auto", kernels), ("torch", pytorch)):
        model.config.mhc.implementation = implementation
        out.append(generate(model, prompts, sampling, eos_id=None))
    assert torch.equal(kernels[0].tokens, pytorch[0].tokens)
    close(kernels[0].logprobs, pytorch[0].logprobs, 1e-5)
    assert {name for name, _ in launched} == {"_entry_kernel"}  # every sublayer's forward, prefill included
    assert len(launched) == 4 * 4  # 4 sublayers x (the prefill and 3 decode steps)


@pytest.mark.slow
@pytest.mark.parametrize(("tokens", "streams"), [
    (16384, ("bf16", "fp32")),  # a training step's 16k tokens
    (64, ("bf16",)),  # a decode step at batch 64: the projection splits nC, the coefficients sum its 96 partials
])
def test_every_kernel_compiles_for_an_h100_without_spilling(tokens, streams, tmp_path):
    """The interpreter cannot compile for a GPU; Triton can without one: every kernel launch the
    wrappers make at a training shape (n = 4, C = 768, 16k tokens; bf16 and fp32 streams) and at a
    decode step's (64 tokens, bf16), compiled to an sm_90 cubin, with no register spills
    (bench/mhc_triton_compile.py)."""
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = tmp_path / "compiled.json"
    done = subprocess.run([sys.executable, "bench/mhc_triton_compile.py", "--tokens", str(tokens), "--dtypes", *streams,
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {"project_fwd", "project_bwd", "coeff_fwd", "coeff_bwd", "pre_fwd", "pre_bwd", "apply_fwd", "apply_bwd",
               "apply_project_fwd", "entry"}  # the last two: the fused kernels
    assert {(r["kernel"], r["stream"]) for r in rows} == {(k, s) for k in kernels for s in streams}
    for r in rows:
        assert r["local_bytes"] == 0 and r["spills_in_loops"] == 0 and r["stack_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r


SASS_WITH_A_LOOP = """
        /*0100*/                   STL [R1], R0 ;
        /*0110*/                   FADD R2, R3, R4 ;
        /*0120*/                   LDL.LU R5, [R1+0x4] ;
        /*0130*/              @!P0 BRA 0x110 ;
        /*0140*/                   BRA 0x180 ;
        /*0150*/                   LDL R6, [R1] ;
"""


def test_the_compile_check_finds_spills_inside_loops():
    """bench/mhc_triton_compile.py counts a spill inside a loop (between a backward branch and its
    target) apart from those before or after every loop."""
    code = f"from bench.mhc_triton_compile import spill_instructions\nprint(spill_instructions({SASS_WITH_A_LOOP!r}))"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "{'spills': 3, 'spills_in_loops': 1}"


def test_the_compile_check_specializes_launches_as_the_jit_does():
    """bench/mhc_triton_compile.py compiles each recorded launch as Triton's JIT would on a GPU:
    the width C = 768 and the tensors' addresses known divisible by 16 (vectorized loads, fewer
    registers), C = 770 not; unspecialized, the kernels took up to twice the registers."""
    pytest.importorskip("triton")
    code = """
import torch
from triton.backends.compiler import GPUTarget
from bench import mhc_triton_compile as bench
from llmkit.model import mhc_triton
for c in (768, 770):
    launch = bench.record_launches(torch.bfloat16, 64, 4, c)["_pre_fwd_kernel"].launches[0]
    ttir = bench.compile_launch(mhc_triton._pre_fwd_kernel, *launch, GPUTarget("cuda", 90, 32)).asm["ttir"]
    print(c, ttir.count("tt.divisibility = 16"))
"""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = dict(line.split() for line in done.stdout.split("\n") if line)
    assert int(counts["768"]) == 5  # x, h_pre, out, M = 64 and C
    assert int(counts["770"]) == 4  # the pointers and M
