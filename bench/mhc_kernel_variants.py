"""Each mHC Triton kernel alone at a training shape, in the variants worth choosing between on a GPU:
time, achieved bandwidth and error against fp64.

    python -m bench.mhc_kernel_variants                    # CUDA: n = 4, C = 768, 16k tokens, bf16 stream
    python -m bench.mhc_kernel_variants --d-model 1024     # the 350m width
    TRITON_INTERPRET=1 python -m bench.mhc_kernel_variants --tokens 32 --d-model 16 --dtype fp32  # CPU: errors only

The variants are module-level settings of llmkit/model/mhc_triton.py, each set for one kernel
while it runs ("*" marks the setting in force):

- project backward (its grad_x kernel; grad_phi is a cuBLAS matmul, timed with it): its grad_proj phi
  term as fp32 FMAs or as tensor-core dots (PROJECT_BWD_DOT), tokens, columns and warps per program
  (PROJECT_BWD_ + BLOCK_M, BLOCK_K, WARPS), tiles that compile for sm_90 without spilling;
- project forward: tokens and columns per tile (PROJECT_BLOCK_M, PROJECT_BLOCK_K; compiled as the
  JIT specializes them, the wider tiles no longer spill) and the programs below which it splits K
  (PROJECT_FWD_PROGRAMS: 256 token blocks of 64 at 16k tokens; 1024 splits K in four);
- coefficients forward and backward: COEFF_BLOCK_ELEMENTS 256 and 512 (16 and 32 tokens at n = 4);
- pre and apply, forward and backward: tokens and channels per program (STREAM_BLOCK_M,
  STREAM_BLOCK_C): one token's 256 to 1024 channels, as measured on an H200, or 2 to 8 tokens
  of 128 to 512 channels (their tiles are [stream, token, channel], so Triton puts a token on a
  warp and its sums over C need no other warp: unmeasured);
- apply + project forward (APPLY_PROJECT_FUSED's one kernel for the write-back and the next
  sublayer's projection; against the apply forward and project forward rows): tokens, channels
  and warps per program (APPLY_PROJECT_ + BLOCK_M, BLOCK_C, WARPS);
- entry forward (decode): a sublayer's whole forward in one kernel, one token per program, on
  the first DECODE_TOKENS tokens (a decode step's; ENTRY_ONE_KERNEL_TOKENS routes only such few
  tokens to it): the φ tile's elements per loop step (ENTRY_TILE_ELEMENTS: 8192 is 64 channels at
  n = 4). Its time is one kernel's; what it saves against the four it replaces, in a decode
  step's CUDA graph, gpu_check's decode rows show.

Time: ``triton.testing.do_bench``'s median (it clears the L2 between runs), CUDA only. Bandwidth:
the launch's tensor bytes, as bench/mhc_triton_compile.py counts them, over that time. Error: the
largest ||out - ref|| / ||ref|| over the kernel's outputs, ref the same math in fp64 (llmkit's
PyTorch ops) on the same inputs (phi rounded to the stream's dtype, as the projection's dot sees
it). Inputs are random, never zeros. project backward's time and bytes include its grad_phi matmul
(one more read of x). Under the interpreter the rows check the code paths (every dot is fp32
there). Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bench.mhc_triton_compile import coefficient_settings, recorded, tensor_bytes
from llmkit.io import write_json_atomic
from llmkit.model import mhc_ops, mhc_triton
from llmkit.profiling import device_description

VARIANTS_JSON = "mhc_kernel_variants.json"
DECODE_TOKENS = 64
"""Tokens of the entry kernel's case: a decode step at batch 64 (the first of the case's inputs)."""


@dataclass
class Case:
    """One wrapper of mhc_triton, its kernel, the setting varied and its fp64 reference outputs."""

    name: str
    kernel: str
    setting: str | tuple[str, ...]  # a tuple: settings varied together, each value a tuple of theirs
    values: tuple
    run: Callable[[], tuple[Tensor, ...]]
    reference: tuple[Tensor, ...]
    other_bytes: int = 0  # what the case moves beside its Triton launches (a library call's reads)


@contextlib.contextmanager
def setting(name: str | tuple[str, ...], value: object) -> Iterator[None]:
    names, values = (name, value) if isinstance(name, tuple) else ((name,), (value,))
    saved = [getattr(mhc_triton, n) for n in names]
    for n, v in zip(names, values, strict=True):
        setattr(mhc_triton, n, v)
    try:
        yield
    finally:
        for n, v in zip(names, saved, strict=True):
            setattr(mhc_triton, n, v)


def launch_bytes(case: Case) -> int:
    """The tensor bytes of the launches the case makes (recorded, not run)."""
    with recorded([case.kernel]) as recorders:
        case.run()
    return sum(tensor_bytes(a, k) for a, k in recorders[case.kernel].launches) + case.other_bytes


def relative_error(outputs: tuple[Tensor, ...], reference: tuple[Tensor, ...]) -> float:
    """The largest relative error over the outputs; an output with one more dimension than its
    reference holds partial sums over its first (the projection's K splits) and is summed first."""
    summed = [o.double().sum(0) if o.dim() == r.dim() + 1 else o.double()
              for o, r in zip(outputs, reference, strict=True)]
    return max(((o - r).norm() / r.norm()).item() for o, r in zip(summed, reference, strict=True))


def cases(tokens: int, n: int, c: int, dtype: torch.dtype, device: torch.device) -> list[Case]:
    """Every kernel on random inputs of one sublayer's shape, with its fp64 reference."""
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, device=device)

    p, k = 2 * n + n * n, n * c
    x, y, phi = randn(tokens, n, c, dtype=dtype), randn(tokens, c, dtype=dtype), randn(p, k) / k**0.5
    h_pre, h_post, h_res = rand(tokens, n), 2 * rand(tokens, n), rand(tokens, n, n)
    grad_stream, grad_u = randn(tokens, n, c, dtype=dtype), randn(tokens, c, dtype=dtype)
    grad_proj, grad_sumsq = randn(tokens, p), randn(tokens) / k
    grad_h = (randn(tokens, n), randn(tokens, n), randn(tokens, n, n))
    alpha, bias = [torch.ones((), device=device) for _ in range(3)], [randn(n), randn(n), randn(n, n)]
    alpha64, bias64 = [a.double() for a in alpha], [b.double() for b in bias]
    x64, y64, phi64 = x.double(), y.double(), phi.to(dtype).double()
    flat, flat64 = x.view(tokens, k), x64.view(tokens, k)
    proj_parts64, sumsq_parts64 = mhc_ops.project(flat64, phi64, False)  # one partial: [1, tokens, p], [1, tokens]
    proj64, sumsq64 = proj_parts64[0], sumsq_parts64[0]
    proj, sumsq = proj64.float(), sumsq64.float()
    coefficient_args = (n, k, *coefficient_settings())
    pre_term = (h_pre.double()[:, :, None] * grad_u.double()[:, None, :]).view(tokens, k)
    tiles = (("STREAM_BLOCK_M", "STREAM_BLOCK_C"), ((1, 1024), (1, 512), (1, 256), (2, 512), (4, 256), (4, 128),
                                                    (8, 128)))
    project_backward = (lambda: mhc_triton.project_backward(grad_proj, grad_sumsq, flat, phi,
                                                            grad_stream.view(tokens, k), (grad_u, h_pre)),
                        (grad_proj.double() @ phi64 + 2 * flat64 * grad_sumsq.double()[:, None]
                         + grad_stream.double().view(tokens, k) + pre_term, grad_proj.double().T @ flat64))
    project_backward_tiles = ("PROJECT_BWD_DOT", "PROJECT_BWD_BLOCK_M", "PROJECT_BWD_BLOCK_K", "PROJECT_BWD_WARPS")
    applied64 = mhc_ops.apply(x64, y64, h_post.double(), h_res.double(), False)
    d = min(tokens, DECODE_TOKENS)
    entry_inputs = (x[:d], (y[:d], h_post[:d], h_res[:d]), None, phi, alpha, bias, *coefficient_settings())
    entered64 = mhc_ops.enter(applied64[:d], None, phi64, alpha64, bias64, *coefficient_settings(), False)
    return [
        Case("project forward", "_project_fwd_kernel", ("PROJECT_BLOCK_M", "PROJECT_BLOCK_K", "PROJECT_FWD_PROGRAMS"),
             ((64, 64, 256), (64, 32, 256), (32, 32, 256), (64, 32, 1024), (64, 64, 1024), (32, 32, 2048)),
             lambda: mhc_triton.project_forward(flat, phi), (proj64, sumsq64)),
        Case("project backward", "_project_bwd_kernel", project_backward_tiles,
             ((True, 64, 64, 4), (False, 16, 128, 4), (False, 32, 64, 4), (True, 16, 128, 4), (True, 32, 128, 4),
              (True, 64, 128, 8), (True, 128, 64, 8)), *project_backward,
             other_bytes=flat.nbytes),
        Case("coefficients forward", "_coeff_fwd_kernel", "COEFF_BLOCK_ELEMENTS", (256, 512),
             lambda: mhc_triton.coefficients_forward(proj[None], sumsq[None], alpha, bias, *coefficient_args),
             mhc_ops.coefficients(proj_parts64, sumsq_parts64, alpha64, bias64, *coefficient_args, False)),
        Case("coefficients backward", "_coeff_bwd_kernel", "COEFF_BLOCK_ELEMENTS", (256, 512),
             lambda: mhc_triton.coefficients_backward(*grad_h, proj, sumsq, alpha, bias, *coefficient_args),
             mhc_ops.coefficients_backward(*(t.double() for t in grad_h), proj64, sumsq64, alpha64, bias64,
                                           *coefficient_args, False)),
        Case("pre forward", "_pre_fwd_kernel", *tiles, lambda: (mhc_triton.pre_forward(x, h_pre),),
             (mhc_ops.pre(x64, h_pre.double(), False),)),
        Case("pre backward", "_pre_bwd_kernel", *tiles, lambda: (mhc_triton.pre_backward(grad_u, x),),
             (torch.bmm(x64, grad_u.double()[:, :, None]).squeeze(-1),)),
        Case("apply forward", "_apply_fwd_kernel", *tiles, lambda: (mhc_triton.apply_forward(x, y, h_post, h_res),),
             (mhc_ops.apply(x64, y64, h_post.double(), h_res.double(), False),)),
        Case("apply + project forward", "_apply_project_fwd_kernel",
             ("APPLY_PROJECT_BLOCK_M", "APPLY_PROJECT_BLOCK_C", "APPLY_PROJECT_WARPS"),
             ((32, 32, 8), (16, 32, 4), (64, 16, 4), (16, 16, 4)),
             lambda: mhc_triton.apply_project_forward(x, y, h_post, h_res, phi),
             (applied64, *(t[0] for t in mhc_ops.project(applied64.view(tokens, k), phi64, False)))),
        Case("entry forward (decode)", "_entry_kernel", "ENTRY_TILE_ELEMENTS", (8192, 4096, 16384),
             lambda: mhc_triton.entry_forward(*entry_inputs), (applied64[:d], *entered64)),
        Case("apply backward", "_apply_bwd_kernel", *tiles,
             lambda: mhc_triton.apply_backward(grad_stream, x, y, h_post, h_res),
             mhc_ops.mhc_apply_backward(grad_stream.double(), x64, y64, h_post.double(), h_res.double(), False)),
    ]


def in_force(name: str | tuple[str, ...]) -> object:
    """The value a setting (or settings varied together) has now."""
    return tuple(getattr(mhc_triton, n) for n in name) if isinstance(name, tuple) else getattr(mhc_triton, name)


def label(name: str | tuple[str, ...]) -> str:
    """A setting as the table names it: settings varied together share their prefix."""
    if isinstance(name, str):
        return name
    prefix = os.path.commonprefix(list(name))
    return f"{prefix}({', '.join(n.removeprefix(prefix) for n in name)})"


def measure(case: Case, value: object, timed: bool) -> dict:
    """One row; a variant that fails (to compile, say) gets its error's first line, and the rest still run."""
    row = {"kernel": case.name, "setting": label(case.setting), "value": value,
           "in_force": value == in_force(case.setting), "error": None, "bytes": None, "ms": None, "GB_per_s": None,
           "failed": None}
    try:
        with setting(case.setting, value):
            row.update(error=relative_error(case.run(), case.reference), bytes=launch_bytes(case))
            if timed:
                import triton.testing

                row["ms"] = triton.testing.do_bench(case.run, warmup=25, rep=100, return_mode="median")
                row["GB_per_s"] = row["bytes"] / (row["ms"] * 1e6)
    except Exception as e:  # reported in the table, as gpu_check reports a section that raised
        row["failed"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-streams", type=int, default=4)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--tokens", type=int, default=16384, help="B T of a training step")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="the stream's dtype")
    p.add_argument("--kernels", nargs="+", default=None, metavar="NAME",
                   help='only these kernels, named as the table does (e.g. "project backward"); default: all')
    p.add_argument("--out", default=str(Path(os.environ.get("OUT", "lightning_logs/bench")) / VARIANTS_JSON),
                   help="JSON path (default: in $OUT if OUT is set, else in lightning_logs/bench/)")
    args = p.parse_args(argv)
    if not (torch.cuda.is_available() or mhc_triton.INTERPRETED):
        sys.exit("mhc_kernel_variants: no CUDA device; on a CPU set TRITON_INTERPRET=1 (errors only, tiny shapes)")
    device = torch.device("cpu" if mhc_triton.INTERPRETED else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    timed = device.type == "cuda"
    rows = []
    chosen = cases(args.tokens, args.n_streams, args.d_model, dtype, device)
    if args.kernels is not None:
        unknown = set(args.kernels) - {case.name for case in chosen}
        if unknown:
            sys.exit(f"mhc_kernel_variants: no kernel named {sorted(unknown)}; the names: "
                     f"{', '.join(case.name for case in chosen)}")
        chosen = [case for case in chosen if case.name in args.kernels]
    for case in chosen:
        rows += [measure(case, value, timed) for value in case.values]

    print(f"mHC Triton kernels alone: n = {args.n_streams}, C = {args.d_model}, {args.tokens} tokens, "
          f"{args.dtype} stream, {device_description()}" + ("" if timed else " (interpreter: no times)"))
    width = max(len(f"{r['setting']} = {r['value']}") for r in rows) + 1
    print(f"{'kernel':<22} {'setting':<{width}} {'ms':>8} {'GB/s':>7} {'rel. error':>10}")
    for r in rows:
        mark = "*" if r["in_force"] else " "
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "-"
        rate = f"{r['GB_per_s']:.0f}" if r["GB_per_s"] is not None else "-"
        error = f"{r['error']:>10.1e}" if r["failed"] is None else f"FAILED {r['failed']}"
        choice = f"{r['setting']} = {r['value']}"
        print(f"{r['kernel']:<22} {mark}{choice:<{width - 1}} {ms:>8} {rate:>7} {error}")
    write_json_atomic(Path(args.out), {"args": vars(args), "device": device_description(), "rows": rows})
    print(f"wrote {args.out}")
    if any(r["failed"] for r in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
