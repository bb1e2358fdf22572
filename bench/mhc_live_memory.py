"""Live memory of one real training step on the CPU: the mHC ops' Triton kernels (run by Triton's
interpreter) beside the ops' PyTorch code, n = 4 beside n = 1, at two depths.

    TRITON_INTERPRET=1 python -m bench.mhc_live_memory                 # d 128, 2 and 4 layers, 64 tokens
    TRITON_INTERPRET=1 python -m bench.mhc_live_memory --compile       # compiled blocks

On an H200 the compiled n = 4 step peaked about 3.3 bf16 streams per token per sublayer above what
autograd saves (docs/performance.md). The kernels' wrappers allocate the same buffers on every
device, so running them here says whether that memory is theirs. Each step (bf16 autocast, bf16
stream) runs under ``torch.profiler`` with ``profile_memory``; from its allocation events,
matched by address, come the bytes the step allocated and still holds when its forward ends
(what the backward reads) and the step's peak. Two depths separate what each extra sublayer
holds (the slope, bytes per token per sublayer) from a per-model constant; the slope's n = 4
excess over n = 1 is set beside X_l + y_l + O(n^2) floats. Prints a table and writes JSON
(--out). CPU only: on a GPU, ``bench/gpu_check.sh``'s memory section measures the CUDA step by
allocation site.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from llmkit.io import write_json_atomic
from llmkit.model.config import MHCConfig, ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.profiling import device_description

FORWARD_END = "mhc_live_memory.forward_end"  # a profiler mark between the step's forward and backward
IMPLEMENTATIONS = {"kernels": "auto", "pytorch": "torch"}  # n > 1 rows: label -> mhc.implementation


def step_memory(config: ModelConfig, tokens: int, compile_blocks: bool) -> dict[str, int]:
    """Bytes the step allocated and still holds when its forward ends, and the step's peak.

    Two untracked steps run first (compilation, autocast's weight casts); the tracked one is
    forward + backward, gradients set to None after, under the profiler (``held_and_peak``)."""
    torch.manual_seed(0)
    model = Transformer(config).train()
    if compile_blocks:
        model.compile_blocks()
    batch = torch.randint(0, config.vocab_size, (1, tokens + 1))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(batch[:, :-1], batch[:, 1:])
        with torch.profiler.record_function(FORWARD_END):
            pass
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return held_and_peak(prof)


def held_and_peak(prof: profile) -> dict[str, int]:
    """From a profiled step's allocation events: the bytes live at the ``FORWARD_END`` mark and at
    the step's peak, counting only blocks the step allocated.

    Every allocation the profiler records counts, the ops' scratch buffers included, which
    saved-tensor hooks do not see; a free counts when it releases a block the step allocated (same
    address). Frees of blocks allocated before the step are left out: the interpreted kernels keep
    their last launch's buffers until the next launch frees them inside the step, and the profiler
    sized such a free in some runs and dropped it in others (warning of a block of unknown size),
    so summing them made the figures vary from run to run under load."""
    nodes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.children)
    forward_end = next(node.start_time_ns for node in nodes if node.name == FORWARD_END)
    blocks: dict[int, int] = {}  # address -> bytes, for blocks the tracked step allocated
    live = peak = 0
    held = None
    for node in sorted((n for n in nodes if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns):
        if held is None and node.start_time_ns >= forward_end:
            held = live
        event = node.extra_fields
        if event.alloc_size > 0:
            blocks[event.ptr] = event.alloc_size
            live += event.alloc_size
        elif event.ptr in blocks:
            live -= blocks.pop(event.ptr)
        peak = max(peak, live)
    return {"held_after_forward": live if held is None else held, "peak": peak}


def per_sublayer(rows: list[dict], key: str, depths: tuple[int, int], tokens: int) -> float:
    """What each sublayer adds to ``key``, per token: the slope between the two depths (2 sublayers
    per layer)."""
    low, high = (next(r[key] for r in rows if r["layers"] == d) for d in depths)
    return (high - low) / (2 * (depths[1] - depths[0]) * tokens)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--layers", type=int, nargs=2, default=[2, 4], help="two depths: the slope is per sublayer")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--n-streams", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="compiled blocks (inductor's CPU code around the ops)")
    p.add_argument("--out", default=str(Path(os.environ.get("OUT", "lightning_logs/bench")) / "mhc_live_memory.json"))
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("mhc_live_memory: set TRITON_INTERPRET=1 (the kernels run in Triton's interpreter on the CPU)")
    low, high = sorted(args.layers)
    if low == high:
        sys.exit("mhc_live_memory: --layers needs two different depths")
    n, c, tokens = args.n_streams, args.d_model, args.tokens
    base = ModelConfig(vocab_size=256, d_model=c, n_heads=args.n_heads, d_ff=2 * c, max_seq_len=tokens,
                       bf16_residual=True)
    runs = [("dense", 1, "torch"), *((label, n, implementation) for label, implementation in IMPLEMENTATIONS.items())]
    rows = []
    print(f"{'mHC code':<8} | {'n':>2} | {'layers':>6} | {'held after forward B':>20} | {'step peak B':>12}")
    for label, streams, implementation in runs:
        for layers in (low, high):
            config = replace(base, n_layers=layers, n_streams=streams,
                             mhc=MHCConfig(implementation=implementation))
            row = {"code": label, "n_streams": streams, "layers": layers, **step_memory(config, tokens, args.compile)}
            rows.append(row)
            print(f"{label:<8} | {streams:>2} | {layers:>6} | {row['held_after_forward']:>20,} | {row['peak']:>12,}")
    slopes = {label: per_sublayer([r for r in rows if r["code"] == label], "held_after_forward", (low, high), tokens)
              for label, _, _ in runs}
    accounting = n * c * 2 + c * 2 + 4 * (2 * (2 * n + n * n) + 1)  # X_l, y_l (bf16); proj, H, sumsq (fp32)
    summary = {label: {"held_per_token_per_sublayer": slopes[label],
                       "n_minus_dense_per_token_per_sublayer": slopes[label] - slopes["dense"]}
               for label in IMPLEMENTATIONS}
    print(f"\nheld per token per added sublayer (B): dense {slopes['dense']:,.1f}; "
          + "; ".join(f"{label} {s['held_per_token_per_sublayer']:,.1f} (n = {n} - dense: "
                      f"{s['n_minus_dense_per_token_per_sublayer']:,.1f})" for label, s in summary.items())
          + f"; X_l + y_l + O(n^2) floats: {accounting:,}")
    report = {"args": vars(args), "device": device_description(), "rows": rows, "per_sublayer": summary,
              "accounting_per_token_per_sublayer": accounting}
    write_json_atomic(Path(args.out), report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
