"""Host time of one mHC sublayer's ops: what the CPU spends per sublayer to issue the forward op
(``mhc_boundary``) and its backward op (``mhc_boundary_backward``), before any GPU work.

    python -m bench.mhc_host_overhead            # CUDA: real launches on 16 tokens (the GPU idles)
    TRITON_INTERPRET=1 python -m bench.mhc_host_overhead   # CPU: the Triton kernels recorded, not run

The ops take a training step's path, the sublayer's entry in four kernels (not the one entry
kernel that decode's few tokens get). On a GPU they run on 16 tokens of width 64, so their
kernels take microseconds and the wall time of many calls (one synchronize at the end) is the
host's: custom-op dispatch, the wrappers' Python and tensor allocations, Triton's launcher and
the small torch kernels. On a CPU the Triton launches
are recorded instead of run (bench/mhc_triton_compile.py's recorder), so the figure is the ops'
own Python and dispatch without Triton's launcher, plus the small torch ops on 16 tokens (the
CPU's fallback for the dphi matmul among them). A
training step at 120m issues 24 sublayers of this; on an H200 its n = 4 step ran 6.9 ms longer
than its kernels (docs/performance.md). It times the ops a second way, their Python
implementations called directly: the difference is what torch's custom-op dispatch costs, one
part of what a compiled graph would stop paying were inductor to launch the kernels itself
(``torch.library.triton_op``, which would also take out the wrappers' Python and Triton's
launcher). Prints one line per measurement and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmkit.io import write_json_atomic
from llmkit.model import mhc_ops
from llmkit.profiling import device_description


def sublayer_ops(tokens: int, n: int, c: int, device: torch.device, dispatch: bool = True):
    """A callable issuing one sublayer's forward op and its backward op on the Triton path; with
    ``dispatch`` False it calls the ops' Python implementations directly, without torch's custom-op
    dispatch (the dispatcher's boxing of the arguments, the autograd kernel, the redispatch, the
    check that no output aliases an input): the same wrappers and kernels."""
    g = torch.Generator(device).manual_seed(0)
    p = 2 * n + n * n

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    x, y = randn(tokens, n, c, dtype=torch.bfloat16), randn(tokens, c, dtype=torch.bfloat16)
    h_post, h_res = torch.rand(tokens, n, generator=g, device=device), torch.rand(tokens, n, n, generator=g,
                                                                                  device=device)
    phi = randn(p, n * c) / (n * c) ** 0.5
    alpha, bias = [torch.ones((), device=device) for _ in range(3)], [randn(n), randn(n), randn(n, n)]
    grad = randn(tokens, n, c, dtype=torch.bfloat16)
    settings = (20, 15.0, 1e-8, 1e-5, True)
    forward, backward = mhc_ops.mhc_boundary, mhc_ops.mhc_boundary_backward
    if not dispatch:  # torch.library.custom_op keeps the function it was given
        forward, backward = forward._init_fn, backward._init_fn

    def issue() -> None:
        x1, u, h_pre, h_post1, h_res1, proj, sumsq = forward(x, y, h_post, h_res, phi, alpha, bias, *settings,
                                                             mhc_ops.SOURCE_HASH)
        backward(grad, u, h_pre, h_post1, h_res1, x, y, h_post, h_res, x1, phi, alpha, bias, proj, sumsq, h_pre,
                 *settings)

    return issue


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16, help="tokens per call: few, so the GPU work is negligible")
    p.add_argument("--n-streams", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64,
                   help="small: the host's work does not depend on it, the CPU run's small torch ops would")
    p.add_argument("--calls", type=int, default=300, help="sublayers timed per repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after a warm-up (median reported)")
    p.add_argument("--out", default=str(Path(os.environ.get("OUT", "lightning_logs/bench")) / "mhc_host_overhead.json"))
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not (cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        sys.exit("mhc_host_overhead: no CUDA device; on a CPU set TRITON_INTERPRET=1 (Triton launches recorded)")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        launches = contextlib.nullcontext({})
    else:
        from bench.mhc_triton_compile import KERNELS, recorded

        launches = recorded(KERNELS)
    warmup = 20
    recorded_launches = 0

    def count_recorded() -> None:
        """Count the recorded launches and let them go: kept, their tensors (never freed for reuse)
        slowed each repeat more than the last."""
        nonlocal recorded_launches
        for recorder in recorders.values():
            recorded_launches += len(recorder.launches)
            recorder.launches.clear()

    def time_calls(issue: Callable[[], None]) -> list[float]:
        """Seconds per call of ``issue`` in each repeat, after a warm-up (Triton's compile, the caching allocator)."""
        for _ in range(warmup):
            issue()
        count_recorded()
        per_call = []
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.calls):
                issue()
            if cuda:
                torch.cuda.synchronize()
            per_call.append((time.perf_counter() - start) / args.calls)
            count_recorded()
        return per_call

    from bench.mhc_kernel_variants import setting

    # a training step's path (four forward kernels), not the one entry kernel 16 tokens would take (decode's)
    with launches as recorders, setting("ENTRY_ONE_KERNEL_TOKENS", 0):
        per_call = time_calls(sublayer_ops(args.tokens, args.n_streams, args.d_model, device))
        direct = time_calls(sublayer_ops(args.tokens, args.n_streams, args.d_model, device, dispatch=False))
    us, direct_us = (statistics.median(times) * 1e6 for times in (per_call, direct))
    launches_per_sublayer = recorded_launches / (2 * (warmup + args.repeats * args.calls)) if not cuda else None
    what = "kernels launched" if cuda else "Triton launches recorded, not run"
    print(f"mHC sublayer ops (mhc_boundary + mhc_boundary_backward), n = {args.n_streams}, "
          f"C = {args.d_model}, {args.tokens} tokens, {what}, {device_description()}: {us:.0f} us of host time "
          f"per sublayer (median of {args.repeats} x {args.calls}); their code called directly, without torch's "
          f"custom-op dispatch: {direct_us:.0f} us, so {us - direct_us:.0f} us of dispatch")
    report = {"args": vars(args), "device": device_description(), "launched": cuda, "host_us_per_sublayer": us,
              "repeats_us": [t * 1e6 for t in per_call], "direct_us_per_sublayer": direct_us,
              "direct_repeats_us": [t * 1e6 for t in direct], "dispatch_us_per_sublayer": us - direct_us,
              "triton_launches_per_sublayer": launches_per_sublayer}
    write_json_atomic(Path(args.out), report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
