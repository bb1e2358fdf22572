"""What torch.compile makes of one transformer block: generated kernels and library calls,
forward and backward, for the mHC block and the dense block.

    python -m bench.mhc_kernels                                  # the tiny shape, any device
    python -m bench.mhc_kernels --model configs/model/350m.yaml --seq-len 1024

Generated kernels are inductor's fused loops (C++ on CPU, Triton on CUDA); library calls are
``extern_kernels.*`` (mm, bmm, ...) and the attention kernel. The C++ backend fuses outer loops
that the GPU backend launches as separate Triton kernels, so a CPU count says nothing about the
number of kernels a GPU launches (for mHC before the custom ops, ~140 more per sublayer there; with
them, 16 on an H200: docs/performance.md); count GPU kernels on a GPU, with torch.profiler
(bench/gpu_check.sh). The mHC math is one custom
op per sublayer forward and two backward (llmkit/model/mhc_ops.py; here the first block's, plus
the final write-back), listed as library calls (``mhc_*``): opaque to inductor, each a few
Triton kernels on CUDA, so what an n = 4 block generates beyond the dense block is the tiny
stacking of alpha and b.
Compile time is reported too, with
inductor's FX graph cache off (its compiled-kernel caches may still be warm from an earlier
run). Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.config
from torch._inductor.utils import run_and_get_code

from bench.models import MODEL_HELP, model_name, model_yaml
from llmkit.io import write_json_atomic
from llmkit.model.config import ModelConfig
from llmkit.model.mhc import finish
from llmkit.model.transformer import Transformer
from llmkit.profiling import device_description

KERNEL_DEFINITIONS = re.compile(r"async_compile\.(?:cpp_pybinding|cpp|triton)\(")
LIBRARY_CALLS = re.compile(
    r"extern_kernels\.(\w+)\(|torch\.ops\.aten\.(_scaled_dot_product_\w+)\.default\(|torch\.ops\.llmkit\.(\w+)\.default\(")


def count(code: str) -> tuple[int, Counter]:
    """(generated kernels, library calls by name; attention shown as sdpa / sdpa_backward, the mHC ops by name)."""
    calls = LIBRARY_CALLS.findall(code)
    names = (a or c or ("sdpa_backward" if b.endswith("backward") else "sdpa") for a, b, c in calls)
    return len(KERNEL_DEFINITIONS.findall(code)), Counter(names)


def compile_block(config: ModelConfig, args: argparse.Namespace) -> dict:
    torch._dynamo.reset()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Transformer(config).to(device)
    block = model.blocks[0]
    shape = (args.batch_size, args.seq_len) + ((config.n_streams,) if config.n_streams > 1 else ()) + (config.d_model,)
    x = torch.randn(shape, device=device, requires_grad=True)
    cos, sin = model.rope_cos[: args.seq_len], model.rope_sin[: args.seq_len]

    def step(x: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = finish(block(x, cos, sin), True)  # mHC: with the block's pending write-back
        out.float().sum().backward()

    t0 = time.perf_counter()
    _, codes = run_and_get_code(torch.compile(step), x)
    seconds = time.perf_counter() - t0
    counted = [count(code) for code in codes]
    return {"kernels": [k for k, _ in counted], "calls": [dict(c) for _, c in counted], "compile_s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", type=model_name, help=MODEL_HELP)
    p.add_argument("--n-streams", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--out", default="lightning_logs/bench/mhc_kernels.json")
    args = p.parse_args()
    torch._inductor.config.fx_graph_cache = False

    base = ModelConfig.from_yaml(model_yaml(args.model))
    variants = {
        "dense (n=1)": replace(base, n_streams=1),
        f"mHC (n={args.n_streams})": replace(base, n_streams=args.n_streams),
    }
    rows = {name: compile_block(config, args) for name, config in variants.items()}
    print(f"one block of {args.model}, batch {args.batch_size}, seq {args.seq_len}, {device_description()}")
    print(f"{'variant':<14} {'graph':<8} {'generated':>9} {'library calls':<60} {'compile(s)':>10}")
    for name, row in rows.items():
        for i, (kernels, calls) in enumerate(zip(row["kernels"], row["calls"], strict=True)):
            graph = ("forward", "backward")[i] if len(row["kernels"]) == 2 else f"graph {i}"
            listed = ", ".join(f"{k} x{v}" for k, v in sorted(calls.items()))
            print(f"{name if i == 0 else '':<14} {graph:<8} {kernels:>9} {listed:<60} "
                  f"{row['compile_s'] if i == 0 else '':>10.4}")
    out = Path(args.out)
    write_json_atomic(out, {"args": vars(args), "device": device_description(), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
