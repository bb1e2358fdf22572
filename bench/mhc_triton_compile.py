"""Compile every mHC Triton kernel for an NVIDIA GPU without one, and show what each costs on chip.

    python -m bench.mhc_triton_compile                          # sm_90 (H100/H200), the 120m shape
    python -m bench.mhc_triton_compile --arch 80 --d-model 1024  # A100, the 350m width

Each wrapper of llmkit/model/mhc_triton.py runs once on CPU tensors of the given shape with its
kernel launches recorded instead of run; every recorded launch (its arguments, constexprs,
num_warps and num_stages, exactly as the wrapper chose them) is then compiled by Triton down to a
cubin for the target (Triton ships ptxas), and ``cuobjdump --dump-resource-usage`` reads its
registers per thread, stack frame (where ptxas spills registers), local and shared memory; its
SASS says how many instructions spill, and how many of them sit inside a loop. This checks that the kernels
compile for a GPU, which Triton's CPU interpreter (what the tests run) cannot; it says nothing
about speed. Prints a table and writes JSON (--out). Must not run under TRITON_INTERPRET=1.

The table also gives each launch's tensor bytes per token: the sum of its tensor arguments' sizes,
which is its memory traffic when it reads or writes each once (the kernels' one-pass design; small
tensors that several programs re-read, φ and the projections' gradients, count once, as if from
L2), and the sum over one sublayer's 8 launches against a dense residual's (docs/performance.md
turns it into a time), plus project_backward's grad_phi matmul, which reads x once more (cuBLAS, not
a launch of these kernels). Nothing else touches the stream: the op's backward writes dL/dX once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

from llmkit.io import write_json_atomic
from llmkit.model import mhc_triton
from llmkit.model.config import ModelConfig

RESOURCES = re.compile(r"Function (\w+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
SASS_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
KERNELS = [name for name in vars(mhc_triton) if name.startswith("_") and name.endswith("_kernel")]


class RecordedLaunches:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, kernel: triton.JITFunction) -> None:
        self.kernel = kernel
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid: tuple):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def coefficient_settings() -> tuple[int, float, float, float]:
    """(Sinkhorn iterations, clamp, eps, the norm's eps) of a default model config, as the ops pass
    them to the coefficient kernels."""
    config = ModelConfig()
    return config.mhc.sinkhorn_iters, config.mhc.sinkhorn_clamp, config.mhc.sinkhorn_eps, config.norm_eps


@contextlib.contextmanager
def recorded(names: Iterable[str]) -> Iterator[dict[str, RecordedLaunches]]:
    """mhc_triton's kernels ``names`` replaced by recorders while the block runs, then put back."""
    recorders = {name: RecordedLaunches(getattr(mhc_triton, name)) for name in names}
    for name, recorder in recorders.items():
        setattr(mhc_triton, name, recorder)
    try:
        yield recorders
    finally:
        for name, recorder in recorders.items():
            setattr(mhc_triton, name, recorder.kernel)


def record_launches(dtype: torch.dtype, tokens: int, n: int, d_model: int) -> dict[str, RecordedLaunches]:
    """Run every wrapper as one sublayer's ``llmkit::mhc_boundary`` does, forward and backward, on
    CPU tensors with the kernels recorded, not run."""
    with recorded(KERNELS) as recorders:
        p = 2 * n + n * n
        x, y = torch.empty(tokens, n, d_model, dtype=dtype), torch.empty(tokens, d_model, dtype=dtype)
        phi = torch.empty(p, n * d_model)
        alpha, bias = [torch.empty(()) for _ in range(3)], [torch.empty(n), torch.empty(n), torch.empty(n, n)]
        proj, sumsq = torch.empty(tokens, p), torch.empty(tokens)
        h_pre, h_post, h_res = torch.empty(tokens, n), torch.empty(tokens, n), torch.empty(tokens, n, n)
        coefficient_args = (n, n * d_model, *coefficient_settings())
        # the previous sublayer's write-back, the projection (K-split partials at decode shapes), the coefficients
        _, proj_parts, sumsq_parts = mhc_triton.apply_project(x, y, h_post, h_res, phi)
        mhc_triton.coefficients_forward(proj_parts, sumsq_parts, alpha, bias, *coefficient_args)
        mhc_triton.pre_forward(x, h_pre)
        # backward: dL/dX' and dL/du come in the stream's dtype, as in training
        mhc_triton.pre_backward(y, x)
        mhc_triton.coefficients_backward(h_pre, h_post, h_res, proj, sumsq, alpha, bias, *coefficient_args)
        grad_x_next = torch.empty_like(x).view(tokens, -1)  # dL/dX from the next sublayer's write-back
        mhc_triton.project_backward(proj, sumsq, x.view(tokens, -1), phi, grad_x_next, (y, h_pre))
        mhc_triton.apply_backward(torch.empty_like(x), x, y, h_post, h_res)
    return recorders


FUSED = {"_apply_project_fwd_kernel": ("_apply_fwd_kernel", "_project_fwd_kernel")}
"""The kernel APPLY_PROJECT_FUSED runs, in place of two of a sublayer's."""


def record_fused_launches(dtype: torch.dtype, tokens: int, n: int, d_model: int) -> dict[str, RecordedLaunches]:
    """The launches of the fused kernel (FUSED) at this shape, recorded, not run."""
    def stream() -> torch.Tensor:  # a distinct tensor for each role: tensor_bytes counts each once
        return torch.empty(tokens, n, d_model, dtype=dtype)

    def vector() -> torch.Tensor:
        return torch.empty(tokens, d_model, dtype=dtype)

    with recorded(FUSED) as recorders:
        p = 2 * n + n * n
        h_post, h_res = torch.empty(tokens, n), torch.empty(tokens, n, n)
        phi = torch.empty(p, n * d_model)
        mhc_triton.apply_project_forward(stream(), vector(), h_post, h_res, phi)
    return recorders


ENTRY = {"_entry_kernel": ("_apply_fwd_kernel", "_project_fwd_kernel", "_coeff_fwd_kernel", "_pre_fwd_kernel")}
"""The kernel a sublayer's entry runs in place of four of its forward's at decode's few tokens
(mhc_triton.ENTRY_ONE_KERNEL_TOKENS)."""


def record_entry_launches(dtype: torch.dtype, tokens: int, n: int, d_model: int) -> dict[str, RecordedLaunches]:
    """The entry kernel's launches at this shape, recorded, not run: ``mhc_boundary``'s (with the
    write-back) and ``mhc_enter``'s with a LoRA update (without)."""
    with recorded(ENTRY) as recorders:
        p = 2 * n + n * n
        x, y = torch.empty(tokens, n, d_model, dtype=dtype), torch.empty(tokens, d_model, dtype=dtype)
        phi = torch.empty(p, n * d_model)
        alpha, bias = [torch.empty(()) for _ in range(3)], [torch.empty(n), torch.empty(n), torch.empty(n, n)]
        settings = coefficient_settings()
        write_back = (y, torch.empty(tokens, n), torch.empty(tokens, n, n))
        mhc_triton.entry_forward(x, write_back, None, phi, alpha, bias, *settings)
        mhc_triton.entry_forward(x, None, torch.empty(tokens, p), phi, alpha, bias, *settings)
    return recorders


def short(kernel: str) -> str:
    """A kernel's name as the table prints it: _project_fwd_kernel -> project_fwd."""
    return kernel.strip("_").removesuffix("_kernel")


def compile_launch(
    kernel: triton.JITFunction, args: tuple, kwargs: dict, target: GPUTarget
) -> triton.compiler.CompiledKernel:
    """The cubin of one recorded launch, specialized as Triton's JIT specializes a launch on a GPU:
    argument types from the values, ints and pointers divisible by 16 marked so (what lets it
    vectorize loads: C = 768 is), ints equal to 1 made constants."""
    kwargs = dict(kwargs)
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
    values = dict(zip([param.name for param in kernel.params], args, strict=False)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, specialization = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                                      not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = specialization
        elif specialization:
            attrs[(index,)] = BaseBackend.parse_attr(specialization)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options)


def tensor_bytes(args: tuple, kwargs: dict) -> int:
    """The summed sizes of a launch's distinct tensor arguments."""
    tensors = {t.data_ptr(): t.nbytes for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
    return sum(tensors.values())


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """What Triton's cuobjdump prints for the cubin with ``flags``."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(tool), *flags, str(path)], capture_output=True, text=True, check=True).stdout


def spill_instructions(sass: str) -> dict[str, int]:
    """How many of the SASS's instructions move spilled registers to or from the stack (STL/LDL),
    and how many of those lie inside a loop (between a backward branch and its target): a spill
    outside every loop runs once per program, one inside once per iteration."""
    instructions = [(int(address, 16), opcode, operands)
                    for address, opcode, operands in SASS_INSTRUCTION.findall(sass)]
    loops = [(int(target, 16), address) for address, opcode, operands in instructions if opcode.startswith("BRA")
             for target in re.findall(r"0x([0-9a-f]+)", operands) if int(target, 16) <= address]
    spills = [address for address, opcode, _ in instructions if opcode.split(".")[0] in ("STL", "LDL")]
    return {"spills": len(spills),
            "spills_in_loops": sum(any(start <= address <= end for start, end in loops) for address in spills)}


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread, stack, shared and local bytes, as cuobjdump reads the cubin, and its
    spill instructions (:func:`spill_instructions`)."""
    _, regs, stack, shared, local = RESOURCES.search(cuobjdump(cubin, "--dump-resource-usage")).groups()
    return {"registers": int(regs), "stack_bytes": int(stack), "shared_bytes": int(shared), "local_bytes": int(local),
            **spill_instructions(cuobjdump(cubin, "-sass"))}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10: 90 H100/H200, 80 A100, 89 L4/4090")
    p.add_argument("--dtypes", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"], help="stream dtypes")
    p.add_argument("--n-streams", type=int, default=4)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--tokens", type=int, default=16384, help="B T of a training step (sets grids and row splits)")
    p.add_argument("--out", default="lightning_logs/bench/mhc_triton_compile.json")
    args = p.parse_args(argv)
    if mhc_triton.INTERPRETED:
        sys.exit("mhc_triton_compile: TRITON_INTERPRET=1 is set; unset it to compile the kernels")
    target = GPUTarget("cuda", args.arch, 32)
    rows = []
    for dtype_name in args.dtypes:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
        shape = (dtype, args.tokens, args.n_streams, args.d_model)
        recorders = [(recorder, True) for recorder in record_launches(*shape).values()]
        recorders += [(recorder, False) for recorder in record_fused_launches(*shape).values()]
        recorders += [(recorder, False) for recorder in record_entry_launches(*shape).values()]
        for recorder, in_sublayer in recorders:
            for launch_args, launch_kwargs in recorder.launches:
                compiled = compile_launch(recorder.kernel, launch_args, launch_kwargs, target)
                rows.append({"kernel": short(recorder.kernel.__name__),
                             "stream": dtype_name, "in_sublayer": in_sublayer,
                             "num_warps": compiled.metadata.num_warps, **resource_usage(compiled.asm["cubin"]),
                             "bytes_per_token": tensor_bytes(launch_args, launch_kwargs) / args.tokens})
    print(f"mHC Triton kernels compiled for sm_{args.arch} (n = {args.n_streams}, C = {args.d_model}, "
          f"{args.tokens} tokens), triton {triton.__version__}, no GPU needed")
    print(f"{'kernel':<18} {'stream':<6} {'warps':>5} {'regs':>5} {'stack B':>7} {'spills (in loops)':>17} "
          f"{'local B':>7} {'shared B':>8} {'B/token':>8}")
    for r in rows:
        spills = f"{r['spills']} ({r['spills_in_loops']})"
        print(f"{r['kernel']:<18} {r['stream']:<6} {r['num_warps']:>5} {r['registers']:>5} {r['stack_bytes']:>7} "
              f"{spills:>17} {r['local_bytes']:>7} {r['shared_bytes']:>8} {r['bytes_per_token']:>8.0f}"
              + ("" if r["in_sublayer"] else "  (decode: in place of four above)" if r["kernel"] == "entry"
                 else "  (fused: in place of two above)"))
    for dtype_name in args.dtypes:
        size = {"bf16": 2, "fp32": 4}[dtype_name]
        matmul = size * args.n_streams * args.d_model  # project_backward's grad_phi matmul reads x once more
        by_kernel = {r["kernel"]: r["bytes_per_token"] for r in rows if r["stream"] == dtype_name}
        traffic = sum(r["bytes_per_token"] for r in rows if r["stream"] == dtype_name and r["in_sublayer"]) + matmul
        fused = traffic + sum(by_kernel[short(kernel)] - sum(by_kernel[short(k)] for k in replaced)
                              for kernel, replaced in FUSED.items())
        print(f"{dtype_name} stream: one sublayer's launches and project backward's grad_phi matmul ({matmul} B) "
              f"move {traffic:.0f} B per token = {traffic / (size * args.d_model):.1f} C stream elements "
              f"(a dense residual: 6 C, x + y and its gradient); with the fused forward kernel {fused:.0f} B = "
              f"{fused / (size * args.d_model):.1f} C")
    write_json_atomic(Path(args.out), {"args": vars(args), "triton": triton.__version__, "rows": rows})
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    main()
