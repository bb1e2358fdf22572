"""The GPU check of the issue's targets in one run: one markdown table at the end (also written
beside the JSON as gpu_check.md), the JSON rewritten after each section, so a run cut short keeps
what it measured.

    bash bench/gpu_check.sh                         # H100/H200: everything below, meant to end within 8 min
    python -m bench.gpu_check --models tiny --seq-len 32 --batch-size 2 --steps 1 --warmup 1 \\
        --device cpu --no-compile --skip-pytest     # CPU smoke run of every section (no GPU numbers)

Sections (every row names the device it ran on, ``llmkit.profiling.device_description``):

1. Training throughput: ``bench.throughput.measure`` in bare mode (the Transformer and AdamW in a
   plain loop, no Trainer) for each --models x --n-streams, with activation checkpointing off:
   ms/step (median after --warmup), tokens/s, MFU, CUDA peak memory, and n/1 ratios. Then, on
   CUDA with compiled blocks (--cuda-graph-rows), --kernel-model again with its blocks compiled in
   torch.compile's "reduce-overhead" mode, each block's forward and backward replayed as CUDA
   graphs: how much of the step is host time between launches (with the graphs inductor skipped,
   whose blocks ran without: ``TORCH_LOGS=cudagraphs`` says why); and its n > 1 training with each
   --setting-rows entry of llmkit/model/mhc_triton.py settings (by default APPLY_PROJECT_FUSED=True,
   the fused write-back and projection, then mhc.recompute_stream=True, which turns that model
   setting on for the row). Shown, not judged.
2. Kernels per training step: ``torch.profiler`` around one more compiled step (forward, backward,
   clipping, AdamW) of --kernel-model after warm-up: CUDA kernel events (memcpy/memset apart),
   and (n - 1) kernels per block sublayer, (K_n - K_1) / (2 L). Where the time goes: the step's
   summed kernel time, and per mHC Triton kernel its launches, milliseconds and achieved bandwidth
   (its tensor bytes, as bench/mhc_triton_compile.py counts them, over its time). Where the GPU
   waits: its busy and idle time within the step and the idle gaps credited to the host op running
   when each ended (``idle_gaps``; the profiler slows the host, so upper bounds), and the
   allocator's cudaMalloc/cudaFree calls in the step. On a CPU:
   profiler CPU op events instead, and the llmkit ops' CPU time, labelled as such (they say
   nothing about GPU kernels).
3. Memory: section 1's peak GiB beside the bytes autograd saves in one training forward
   (``bench.throughput.training_forward_bytes``), and their n/1 ratios; on CUDA also what one more
   training step holds after its forward and its peak, above what it starts with
   (``bench.throughput.training_step_memory``): whether memory beyond the saved activations is
   held from the forward or transient in the backward; and the same of --kernel-model's step with
   eager blocks, whether it comes with compiling them.
4. Generation: new tokens/s of ``llmkit.model.generation.generate`` with the KV cache and the
   compiled (CUDA-graph) decode step, as bench/generate.py times it (random weights, warm-up run,
   best of --gen-repeats), for --gen-model at each --gen-batch-sizes and --gen-n-streams (the
   first n_streams also with each --gen-setting-rows: by default each sublayer's forward in four
   kernels, against the one entry kernel decode uses). Where a decode step's time goes, from
   torch.profiler around one more call (the prefill's kernels included, per new token): its CUDA
   kernels and their summed time beside the timed step, the GPU's busy and idle time with the
   waits credited to host ops, and the kernels that take the most time. It runs
   in a child process killed after --gen-timeout seconds (a compile or decode that hangs costs
   that, not the rest of the run), with TORCH_LOGS=recompiles,graph_breaks,cudagraphs (why it
   recompiled, where dynamo broke the graph, why a CUDA graph was skipped or re-recorded); before
   the kill the child prints every thread's stack.
5. ``pytest -m gpu -v`` over tests/ in a subprocess (JUnit XML read back): counts per file; test
   modules that do not import here (a missing jsonargparse, say) are reported, not fatal; the log
   beside the JSON names each test as it ends, so a timeout still says which ran.

The issue's targets (judged on CUDA only; "n/a" elsewhere): n=4 / n=1 step time <= 1.20 at 120m
and <= 1.15 at 350m; n=4 / n=1 peak memory <= 1.25; compiled decode at batch 64 >= 40k new
tokens/s for 120m n=4.

Time: sections 1-4 run in full except the comparison decode runs, which start only while time is
left (--time-budget); the GPU tests then get what remains of it, at least 60 s and at most
--pytest-timeout (killed after, and reported as timed out).

Exit status: 0 when every section ran (whatever the targets and tests say), 1 when one raised
(its row says ERROR), 2 when --device cuda finds no GPU. Never imports llmkit.cli or jsonargparse.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import contextlib
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from bench import targets
from bench.models import MODEL_HELP, model_name, model_yaml

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

COPIES = ("Memcpy", "Memset")
"""The profiler's CUDA events that are copies, not kernels."""
MHC_KERNEL = re.compile(r"(?<![a-z])_((?:apply_project|project|coeff|pre|apply)_(?:fwd|bwd)|entry)"
                        r"_kernel")
"""The Triton kernels of llmkit/model/mhc_triton.py as the profiler names them (group 1: the short name)."""
MISSING_MODULE = re.compile(r"No module named '([^']+)'|import of (\S+) halted")
"""What a test module that fails to import lacks (the second form: a module poisoned in sys.modules)."""
GEN_STACKS_BEFORE_KILL_S = 10
"""Seconds before section 4's child is killed at which it prints every thread's stack."""
PYTEST_RESERVE_S = 120
"""Seconds of --time-budget kept for the GPU tests: a comparison decode run (a --gen-n-streams after
the first) starts only while elapsed < budget - this."""
PEAK_SITES_SHOWN = 5
"""Allocation sites printed per memory row (the JSON keeps bench.throughput.PEAK_SITES)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", type=model_name, default=["120m", "350m"], help=MODEL_HELP)
    p.add_argument("--n-streams", type=int, nargs="+", default=[1, 4], help="include 1: ratios are against it")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed training steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="training steps before timing (compile included)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda if available; cpu hides the GPUs (CUDA_VISIBLE_DEVICES='')")
    p.add_argument("--precision", choices=["bf16-mixed", "32-true"], default=None,
                   help="default: bf16-mixed on cuda, 32-true on cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled blocks and compiled decode (default: on cuda only)")
    p.add_argument("--optimizer", choices=["fused", "foreach"], default=None,
                   help="AdamW implementation (default: fused on cuda, foreach on cpu)")
    p.add_argument("--mhc-implementation", default=None, help="default: each model YAML's mhc.implementation")
    p.add_argument("--float32-matmul-precision", choices=["highest", "high", "medium"], default=None,
                   help="torch.set_float32_matmul_precision for the run (fp32 matmuls, and an fp32 mHC "
                        "stream's projection: FMAs at highest, TF32 at high/medium); default: torch's")
    p.add_argument("--kernel-model", default=None, help="model whose step kernels are counted (default: first)")
    p.add_argument("--setting-rows", nargs="*", type=setting_row_spec,
                   default=[{"APPLY_PROJECT_FUSED": True}, {"mhc.recompute_stream": True}],
                   metavar="NAME=VALUE[,NAME=VALUE]",
                   help="llmkit/model/mhc_triton.py settings (values as Python literals), or "
                        "mhc.recompute_stream=True, to time --kernel-model's n > 1 training with, a row each "
                        "beside the default ones (default: the fused forward kernel, then the stream recomputed; "
                        "none: leave out); cuda only")
    p.add_argument("--cuda-graph-rows", action=argparse.BooleanOptionalAction, default=True,
                   help="also time --kernel-model's training with its blocks compiled mode=reduce-overhead "
                        "(CUDA graphs: what host time between launches costs); compiled cuda runs only")
    p.add_argument("--gen-model", default=None, help="model for the decode section (default: first of --models)")
    p.add_argument("--gen-n-streams", type=int, nargs="+", default=[4, 1],
                   help="the first always runs; later ones (comparisons) only within --time-budget")
    p.add_argument("--gen-setting-rows", nargs="*", type=setting_row_spec, default=[{"ENTRY_ONE_KERNEL_TOKENS": 0}],
                   metavar="NAME=VALUE[,NAME=VALUE]",
                   help="llmkit/model/mhc_triton.py settings to time the first --gen-n-streams' decode with, a "
                        "row each after the default one, within --time-budget as comparisons are (default: each "
                        "sublayer's entry in four kernels, not the one entry kernel; none: leave out); cuda only")
    p.add_argument("--gen-batch-sizes", type=int, nargs="+", default=None,
                   help="default: 64 1 on cuda (the target's batch first: an earlier run's batch 1 hung), 1 4 on cpu")
    p.add_argument("--gen-prompt-len", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=None, help="new tokens per row (default: 128 on cuda, 8 on cpu)")
    p.add_argument("--gen-repeats", type=int, default=None,
                   help="timed decode runs after the warm-up, best kept (default: 3 on cuda, 1 on cpu)")
    p.add_argument("--gen-timeout", type=float, default=240.0,
                   help="seconds at most for section 4's child process (its rows so far are kept)")
    p.add_argument("--generation-child", type=float, default=None, help=argparse.SUPPRESS)
    # (internal) run section 4 alone, its clock starting at this many seconds (the parent's)
    p.add_argument("--skip-pytest", action="store_true", help="leave out section 5 (pytest -m gpu)")
    p.add_argument("--pytest-timeout", type=int, default=300, help="seconds at most for the GPU tests")
    p.add_argument("--time-budget", type=float, default=420.0,
                   help=f"soft limit in seconds: comparison decode runs start only before budget - "
                        f"{PYTEST_RESERVE_S}, and pytest gets max(60, what is left) (capped by --pytest-timeout)")
    p.add_argument("--out", default=None,
                   help="JSON path (default: $OUT/gpu_check.json if OUT is set, else lightning_logs/bench/)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                       else Path("lightning_logs/bench/gpu_check.json"))
    args.kernel_model = args.kernel_model or args.models[0]
    args.gen_model = args.gen_model or args.models[0]
    if args.kernel_model not in args.models:
        p.error(f"--kernel-model {args.kernel_model} must be one of --models ({' '.join(args.models)}): "
                "its kernels are counted on the steps section 1 runs")
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    return args


def setting_row_spec(spec: str) -> dict[str, Any]:
    """'NAME=VALUE[,NAME=VALUE]' -> {NAME: VALUE}, each VALUE a Python literal (``ast.literal_eval``)."""
    settings = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        try:
            settings[name.strip()] = ast.literal_eval(value.strip()) if sep else None
        except (ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(f"{spec!r}: {value.strip()!r} is not a Python literal") from None
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=VALUE, got {part!r}")
    return settings


def kernel_settings(settings: dict[str, Any]) -> contextlib.AbstractContextManager:
    """llmkit/model/mhc_triton.py's module ``settings`` set for a ``with`` block, then restored
    (``bench.mhc_kernel_variants.setting``, as the kernel variants are); an unknown name is a ValueError."""
    from bench.mhc_kernel_variants import setting
    from llmkit.model import mhc_triton

    unknown = [key for key in settings if not key.isupper() or not hasattr(mhc_triton, key)]
    if unknown:
        raise ValueError(f"llmkit/model/mhc_triton.py has no setting {', '.join(unknown)} "
                         "(and the one model-config setting of --setting-rows is mhc.recompute_stream)")
    return setting(tuple(settings), tuple(settings.values()))


def measure_with_settings(settings: dict[str, Any], name: str, n_streams: int, ns: argparse.Namespace) -> dict:
    """bench.throughput.measure with :func:`kernel_settings`; ``mhc.recompute_stream`` among them sets
    that model-config field instead."""
    from bench import throughput

    settings = dict(settings)
    recompute = settings.pop("mhc.recompute_stream", False)
    with kernel_settings(settings):
        ns = argparse.Namespace(**{**vars(ns), "mhc_recompute_stream": bool(recompute)})
        return throughput.measure(name, n_streams, "bare", ns)


def setting_label(settings: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in settings.items())


def resolve_device(args: argparse.Namespace) -> None:
    """Fill the device-dependent defaults. --device cpu hides the GPUs before anything asks
    torch about CUDA, so bench.throughput (which reads torch.cuda.is_available() on import),
    device_description and the pytest subprocess all see a CPU-only machine."""
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    args.compile = cuda if args.compile is None else args.compile
    args.optimizer = args.optimizer or ("fused" if cuda else "foreach")
    # eager decode on a CPU is slow (64 x 128 new tokens took ~40 s a run on a 2-core VM): smoke-run sizes there
    args.gen_batch_sizes = args.gen_batch_sizes or ([64, 1] if cuda else [1, 4])
    args.gen_tokens = args.gen_tokens or (128 if cuda else 8)
    args.gen_repeats = args.gen_repeats or (3 if cuda else 1)


class Clock:
    """Elapsed seconds since the start (``offset`` seconds ago), and progress lines stamped with them."""

    def __init__(self, offset: float = 0.0) -> None:
        self.start = time.perf_counter() - offset

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():5.0f}s] {message}", flush=True)


def error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attempt(errors: list[dict], where: dict, run: Callable[..., T], *args: Any) -> T | None:
    """``run(*args)``; if it raises, None, after printing the traceback, recording ``where`` with the
    error in the section's ``errors`` and freeing memory (the section's other rows still run)."""
    try:
        return run(*args)
    except Exception as e:
        traceback.print_exc()
        errors.append({**where, "error": error_text(e)})
        try:
            release_memory()
        except Exception:  # a CUDA error (an illegal memory access) leaves the context unusable: so be it
            traceback.print_exc()
        return None


def bench_namespace(args: argparse.Namespace, name: str, compile_mode: str = "default") -> argparse.Namespace:
    """The options bench.throughput's measure/model_config read, for model ``name``: no
    activation checkpointing, the YAML's bf16-residual and mHC settings unless overridden."""
    from llmkit.model.config import ModelConfig

    implementation = args.mhc_implementation or ModelConfig.from_yaml(model_yaml(name)).mhc.implementation
    return argparse.Namespace(seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps,
                              warmup=args.warmup, precision=args.precision, compile=args.compile,
                              compile_mode=compile_mode, optimizer=args.optimizer, checkpointing="off",
                              bf16_residual="config", mhc_implementation=implementation)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, precision: str) -> None:
    """One optimizer step as bench.throughput.run_bare takes it (its loop body)."""
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_step_kernels(name: str, n_streams: int, ns: argparse.Namespace) -> dict:
    """Section 2: profiler events of one training step after warm-up (the compiled graphs
    bench.throughput.measure just built for this shape are still in dynamo's cache)."""
    from torch.profiler import ProfilerActivity, profile

    from bench import throughput
    from llmkit.model.transformer import Transformer

    device = torch.device("cuda" if throughput.CUDA else "cpu")
    torch.manual_seed(0)
    config = throughput.model_config(name, n_streams, ns)
    model = Transformer(config).to(device)
    if ns.compile:
        model.compile_blocks()
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=3e-4, betas=(0.9, 0.95), **{ns.optimizer: True})
    tokens = torch.randint(0, config.vocab_size, (ns.batch_size, ns.seq_len + 1), device=device)
    for _ in range(max(2, ns.warmup)):  # compile, and AdamW's first step allocating its state
        train_step(model, optimizer, tokens, ns.precision)
    throughput.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if throughput.CUDA else [])
    allocations = device_allocations()
    with profile(activities=activities) as prof:
        train_step(model, optimizer, tokens, ns.precision)
        throughput.sync()
    allocations = {k: v - allocations[k] for k, v in device_allocations().items()}
    events = prof.events()
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = cuda_kernels(events)
    if throughput.CUDA and not gpu:
        raise RuntimeError("the profiler recorded no CUDA events (is CUPTI available?)")
    copies = len(gpu) - len(kernels)
    cpu_ops = sum(e.device_type == torch.autograd.DeviceType.CPU and e.name != "[memory]" for e in events)
    del model, optimizer
    stream = torch.bfloat16 if config.bf16_residual and ns.precision == "bf16-mixed" else torch.float32
    return {"model": name, "n_streams": n_streams, "n_layers": config.n_layers,
            "counted": "cuda_kernels" if throughput.CUDA else "cpu_op_events",
            "count": len(kernels) if throughput.CUDA else cpu_ops,
            "cuda_kernels": len(kernels), "cuda_memcpy_memset": copies, "cpu_op_events": cpu_ops,
            "device_allocations": allocations, "gpu_idle": gpu_idle(gpu, events) if throughput.CUDA else None,
            **step_time_by_kernel(events, throughput.CUDA, n_streams, config.d_model,
                                  ns.batch_size * ns.seq_len, stream)}


def device_allocations() -> dict[str, int]:
    """The caching allocator's cudaMalloc and cudaFree calls and allocation retries so far (cudaFree
    waits for the device: a step that makes them idles the GPU); empty on a CPU."""
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}


IDLE_GAP_US = 10.0
"""GPU gaps at least this long are credited to a CPU op in :func:`idle_gaps` (shorter ones, the
launch latency between queued kernels, only count towards the idle total)."""


def gpu_idle(gpu: list, events: list) -> dict:
    """:func:`idle_gaps` of a profiled step: its CUDA events (kernels and copies) on the GPU, its CPU
    ops among ``events`` on the host (not the CUDA runtime's and driver's calls, ``cuda*``/``cu*``,
    nor the profiler's ``[memory]``)."""
    host = [(e.name, e.time_range.start, e.time_range.end) for e in events
            if e.device_type == torch.autograd.DeviceType.CPU and not e.name.startswith(("cu", "["))]
    return idle_gaps([(e.time_range.start, e.time_range.end) for e in gpu], host)


def idle_gaps(gpu: list[tuple[float, float]], host: list[tuple[str, float, float]], top: int = 8) -> dict:
    """Where the GPU waited in one step: busy time (the union of its intervals, us), idle time
    between its first start and last end, and each gap of at least IDLE_GAP_US credited to the
    innermost host op running when the gap ended, the op whose launch the GPU was waiting for
    (the ``top`` ops by idle time). Under the profiler the host runs slower than in the timed loop,
    so the gaps are an upper bound of the loop's."""
    gpu = sorted(gpu)
    host = sorted(host, key=lambda op: op[1])
    starts = [op[1] for op in host]
    busy = idle = credited = 0.0
    by_op: dict[str, list[float]] = {}
    end = gpu[0][0] if gpu else 0.0
    for start, stop in gpu:
        gap = start - end
        if gap > 0:
            idle += gap
            if gap >= IDLE_GAP_US:
                credited += gap
                name = "(no host op)"
                for i in range(bisect.bisect_right(starts, start) - 1, -1, -1):  # latest-starting op holding it
                    if host[i][2] >= start:
                        name = host[i][0]
                        break
                entry = by_op.setdefault(name, [0, 0.0])
                entry[0] += 1
                entry[1] += gap
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    ranked = sorted(by_op.items(), key=lambda item: -item[1][1])[:top]
    return {"busy_ms": busy / 1e3, "idle_ms": idle / 1e3, "gaps_ms": credited / 1e3,
            "by_op": [{"op": name, "gaps": count, "ms": us / 1e3} for name, (count, us) in ranked]}


def cuda_kernels(events: list) -> list:
    """The profiler's CUDA kernel events: its CUDA events less the copies (memcpy, memset)."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(COPIES)]


def step_time_by_kernel(events: list, cuda: bool, n: int, d_model: int, tokens: int, stream: torch.dtype) -> dict:
    """Where one step's time goes. On CUDA: every kernel's summed time (``kernel_ms``) and, per
    mHC Triton kernel, its launches, milliseconds and achieved bandwidth (its tensor bytes per
    launch, as bench/mhc_triton_compile.py records them at this shape, over its mean time). On a
    CPU: the llmkit ops' CPU milliseconds (no kernel total, no bandwidth)."""
    by_kernel: dict[str, dict] = {}
    if cuda:
        timed = cuda_kernels(events)
        named = [(m.group(1), e) for e in timed if (m := MHC_KERNEL.search(e.name))]
    else:
        named = [(e.name.removeprefix("llmkit::"), e) for e in events
                 if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("llmkit::")]
    for key, e in named:
        entry = by_kernel.setdefault(key, {"launches": 0, "ms": 0.0})
        entry["launches"] += 1
        entry["ms"] += e.time_range.elapsed_us() / 1e3
    if cuda and by_kernel and n > 1:
        from bench.mhc_triton_compile import record_launches, tensor_bytes

        recorded = record_launches(stream, tokens, n, d_model)
        for name, recorder in recorded.items():
            key = MHC_KERNEL.search(name).group(1)
            if key in by_kernel and recorder.launches:  # (a fused kernel is not among the default launches)
                launch_bytes = sum(tensor_bytes(a, k) for a, k in recorder.launches)
                entry = by_kernel[key]
                entry["bytes_per_launch"] = launch_bytes
                entry["GB_per_s"] = launch_bytes * entry["launches"] / (entry["ms"] * 1e6)
    return {"kernel_ms": sum(e.time_range.elapsed_us() for e in timed) / 1e3 if cuda else None,
            "mhc_ms": sum(entry["ms"] for entry in by_kernel.values()),
            "by_kernel": dict(sorted(by_kernel.items()))}


def per_sublayer(kernel_rows: list[dict]) -> list[dict]:
    """(K_n - K_1) / (2 L): the kernels each block sublayer adds at n streams over the dense one."""
    dense = {r["model"]: r for r in kernel_rows if r["n_streams"] == 1}
    return [{"model": r["model"], "n_streams": r["n_streams"], "counted": r["counted"],
             "value": (r["count"] - dense[r["model"]]["count"]) / (2 * r["n_layers"])}
            for r in kernel_rows if r["n_streams"] != 1 and r["model"] in dense]


def training_sections(args: argparse.Namespace, clock: Clock, report: dict) -> None:
    """Sections 1-3: bench.throughput.measure per (model, n), and the kernel count of
    --kernel-model right after each of its measurements."""
    from bench import throughput

    training, kernels, memory = report["training"], report["kernels"], report["memory"]
    for name in args.models:
        ns = attempt(training["errors"], {"model": name, "n_streams": None}, bench_namespace, args, name)
        if ns is None:  # a bad --models entry: the other models still run
            continue
        for n in args.n_streams:
            clock.log(f"1 training {name} n={n}: {args.warmup} warm-up + {args.steps} timed steps")
            row = attempt(training["errors"], {"model": name, "n_streams": n}, throughput.measure, name, n, "bare", ns)
            if row is None:
                continue
            row["device"] = report["device"]
            row["saved_act_bytes"] = round(row["saved_act_GiB"] * 2**30)
            training["rows"].append(row)
            peak = "-" if row["peak_mem_GiB"] is None else f"{row['peak_mem_GiB']:.2f} GiB"
            clock.log(f"  {row['step_s'] * 1e3:.1f} ms/step, {row['tokens_per_s']:,.0f} tokens/s, peak {peak}, "
                      f"saved activations {row['saved_act_GiB']:.3f} GiB (first step {row['first_step_s']:.1f} s)")
            if name != args.kernel_model:
                continue
            clock.log(f"2 kernels of one training step, {name} n={n}")
            k = attempt(kernels["errors"], {"model": name, "n_streams": n}, count_step_kernels, name, n, ns)
            if k is None:
                continue
            k["device"] = report["device"]
            kernels["rows"].append(k)
            clock.log(f"  {k['count']} {k['counted'].replace('_', ' ')}")
    if throughput.CUDA and args.compile and args.cuda_graph_rows:
        name = args.kernel_model
        for n in args.n_streams:
            clock.log(f"1 training {name} n={n} with CUDA graphs (blocks compiled mode=reduce-overhead)")
            where = {"model": name, "n_streams": n, "compile_mode": "reduce-overhead"}
            ns = attempt(training["errors"], where, bench_namespace, args, name, "reduce-overhead")
            skipped_before = counters["inductor"]["cudagraph_skips"]
            row = ns and attempt(training["errors"], where, throughput.measure, name, n, "bare", ns, False)
            if row:
                # graphs inductor did not record (TORCH_LOGS=cudagraphs says why): those blocks ran as without
                skips = counters["inductor"]["cudagraph_skips"] - skipped_before
                training["cuda_graph_rows"].append({**row, "cudagraph_skips": skips, "device": report["device"]})
                clock.log(f"  {row['step_s'] * 1e3:.1f} ms/step (first step {row['first_step_s']:.1f} s), "
                          f"{skips} graphs skipped")
    throughput.add_ratios(training["rows"])
    dense = {r["model"]: r for r in training["rows"] if r["n_streams"] == 1}
    for settings in args.setting_rows if throughput.CUDA else []:
        name = args.kernel_model
        for n in [n for n in args.n_streams if n != 1]:
            label = setting_label(settings)
            clock.log(f"1 training {name} n={n} with {label}")
            where = {"model": name, "n_streams": n, "settings": label}
            ns = attempt(training["errors"], where, bench_namespace, args, name)
            row = ns and attempt(training["errors"], where, measure_with_settings, settings, name, n, ns)
            if row:
                d = dense.get(name)
                training["setting_rows"].append({**row, "settings": label, "device": report["device"],
                                                 "time_ratio": row["step_s"] / d["step_s"] if d else None})
                clock.log(f"  {row['step_s'] * 1e3:.1f} ms/step")
    throughput.add_ratios(training["cuda_graph_rows"])
    kernels["per_sublayer"] = per_sublayer(kernels["rows"])
    memory["rows"] = [{key: r[key] for key in ("model", "n_streams", "peak_mem_GiB", "saved_act_GiB",
                                               "saved_act_bytes", "held_after_forward_GiB", "step_peak_GiB",
                                               "step_peak_traced_GiB", "step_peak_sites", "mem_ratio", "act_ratio",
                                               "device")}
                      for r in training["rows"]]
    release_memory()
    if throughput.CUDA and args.compile:  # the same step with eager blocks: is a memory excess the compiler's?
        for n in args.n_streams:
            clock.log(f"3 memory of one eager training step, {args.kernel_model} n={n}")
            row = attempt(memory["errors"], {"model": args.kernel_model, "n_streams": n}, eager_step_memory, args, n)
            if row is not None:
                memory["eager"].append({**row, "device": report["device"]})


def eager_step_memory(args: argparse.Namespace, n_streams: int) -> dict:
    """``bench.throughput.training_step_memory`` of --kernel-model with eager blocks (no compile)."""
    from bench import throughput
    from llmkit.model.transformer import Transformer

    torch._dynamo.reset()
    release_memory()
    config = throughput.model_config(args.kernel_model, n_streams, bench_namespace(args, args.kernel_model))
    model = Transformer(config).cuda()
    row = {"model": args.kernel_model, "n_streams": n_streams,
           **throughput.training_step_memory(model, args.seq_len, args.batch_size, args.precision)}
    del model
    release_memory()
    return row


def decode_rate(model: torch.nn.Module, batch: int, mode: str, args: argparse.Namespace) -> dict:
    """New tokens/s of one (model, batch), timed the way bench/generate.py's main does."""
    from bench import generate as generate_bench
    from llmkit.model.generation import SamplingConfig

    device = next(model.parameters()).device
    sampling = SamplingConfig(max_new_tokens=args.gen_tokens, temperature=1.0, top_k=50, seed=0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, args.gen_prompt_len), device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and args.precision == "bf16-mixed" else contextlib.nullcontext())
    times = []
    with autocast:
        start = time.perf_counter()
        generate_bench.run(mode, model, prompts, sampling)  # warm-up (and compile)
        generate_bench.sync()
        # whether a slow section is the compile or the decode after it (on torch 2.11 the compile never ended
        # until mhc_ops.allow_inductor_fallbacks; since, 34 s at 120m n = 4 batch 64 on an H200)
        print(f"  warm-up call (compile included): {time.perf_counter() - start:.1f} s", flush=True)
        for _ in range(max(1, args.gen_repeats)):
            generate_bench.sync()
            start = time.perf_counter()
            generate_bench.run(mode, model, prompts, sampling)
            generate_bench.sync()
            times.append(time.perf_counter() - start)
        profiled = decode_profile(lambda: generate_bench.run(mode, model, prompts, sampling), args.gen_tokens)
    seconds = min(times)
    return {"batch": batch, "mode": mode, "seconds": seconds, "new_tokens_per_s": batch * args.gen_tokens / seconds,
            "kernels_per_token": None, **(profiled or {})}


def decode_rate_with_settings(settings: dict[str, Any], model: torch.nn.Module, batch: int, mode: str,
                              args: argparse.Namespace) -> dict:
    """:func:`decode_rate` with :func:`kernel_settings` (none: as it is)."""
    with kernel_settings(settings) if settings else contextlib.nullcontext():
        return decode_rate(model, batch, mode, args)


def decode_profile(call: Callable[[], object], new_tokens: int) -> dict | None:
    """Where one more (warm) ``generate`` call's GPU time goes, by torch.profiler, per new token
    (the prefill's kernels included, replayed CUDA graphs' counted): its CUDA kernels, their summed
    time, the GPU's busy and idle time over the call with the waits credited to host ops
    (:func:`gpu_idle`), and the kernels that take the most time (:func:`top_kernels`). None on a CPU."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return None
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = cuda_kernels(events)
    timed = [(e.name, e.time_range.elapsed_us()) for e in kernels]
    return {"kernels_per_token": len(kernels) / new_tokens,
            "kernel_us_per_token": sum(us for _, us in timed) / new_tokens,
            "gpu_idle": gpu_idle([e for e in events if e.device_type == torch.autograd.DeviceType.CUDA], events),
            "top_kernels": top_kernels(timed, new_tokens)}


TOP_DECODE_KERNELS = 8
"""Kernels (by summed time) that section 4 lists per decode row; the JSON keeps as many."""
DECODE_WAITS_SHOWN = 3
"""Host ops (by the GPU's idle time credited to them) that section 4 lists per decode row; the JSON keeps
:func:`idle_gaps`' top 8."""


def top_kernels(timed: list[tuple[str, float]], new_tokens: int, top: int = TOP_DECODE_KERNELS) -> list[dict]:
    """The ``top`` kernel names by summed time among ``timed`` (name, microseconds) pairs: per new
    token, each name's launches and microseconds, and its share of all the kernels' time."""
    by_name: dict[str, list[float]] = {}
    for name, us in timed:
        entry = by_name.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
    total = sum(us for _, us in timed) or 1.0
    ranked = sorted(by_name.items(), key=lambda item: -item[1][1])[:top]
    return [{"kernel": name, "launches_per_token": count / new_tokens, "us_per_token": us / new_tokens,
             "share": us / total} for name, (count, us) in ranked]


def decode_model(args: argparse.Namespace, n_streams: int, device: torch.device) -> torch.nn.Module:
    """--gen-model with ``n_streams`` streams, random weights, on ``device`` in eval mode."""
    from bench import throughput
    from llmkit.model.transformer import Transformer

    config = throughput.model_config(args.gen_model, n_streams, bench_namespace(args, args.gen_model))
    return Transformer(config).to(device).eval()


def generation_runs(args: argparse.Namespace, cuda: bool) -> list[tuple[int, dict[str, Any]]]:
    """Section 4's (n_streams, kernel settings) in order: the first --gen-n-streams as it is, then
    (on CUDA, where the Triton kernels run) with each --gen-setting-rows, then the other n_streams."""
    first, *others = args.gen_n_streams
    with_settings = [(first, settings) for settings in args.gen_setting_rows] if cuda else []
    return [(first, {}), *with_settings, *[(n, {}) for n in others]]


def generation_section(args: argparse.Namespace, clock: Clock, report: dict,
                       on_row: Callable[[], None] = lambda: None) -> None:
    """Section 4, for each --gen-n-streams (the first always; later ones within the budget);
    ``on_row`` after each row or error."""
    from bench import throughput

    section = report["generation"]
    mode = section["mode"]
    device = torch.device("cuda" if throughput.CUDA else "cpu")
    for i, (n, settings) in enumerate(generation_runs(args, throughput.CUDA)):
        label = setting_label(settings)
        where = {"model": args.gen_model, "n_streams": n, **({"settings": label} if settings else {})}
        if i > 0 and clock.elapsed() > args.time_budget - PYTEST_RESERVE_S:
            clock.log(f"4 generation {args.gen_model} n={n} {label}: skipped (time budget)")
            section["skipped"].append({**where, "reason": "time budget"})
            continue
        torch._dynamo.reset()  # a compiled decode step (and its CUDA graph) made with other settings
        release_memory()
        torch.manual_seed(0)
        model = attempt(section["errors"], {**where, "batch": None}, decode_model, args, n, device)
        if model is None:
            continue
        for batch in args.gen_batch_sizes:
            clock.log(f"4 generation {args.gen_model} n={n} batch {batch} {label}: {mode} decode, prompt "
                      f"{args.gen_prompt_len}, {args.gen_tokens} new tokens")
            rate = attempt(section["errors"], {**where, "batch": batch}, decode_rate_with_settings, settings, model,
                           batch, mode, args)
            if rate is not None:
                row = {**where, **rate, "device": report["device"]}
                section["rows"].append(row)
                clock.log(f"  {row['new_tokens_per_s']:,.0f} new tokens/s ({row['seconds']:.3f} s)")
            on_row()
        del model
    torch._dynamo.reset()
    release_memory()


def run_child(cmd: list[str], timeout: float, **popen: Any) -> int | None:
    """Run ``cmd`` from the repository root in its own session; on a timeout kill the whole group
    (inductor's compile workers included) and return None, else its exit status."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.update(popen.pop("env", {}))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, **popen)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def generation_in_child(args: argparse.Namespace, argv: list[str], clock: Clock, report: dict) -> None:
    """Section 4 through a child process (``--generation-child``) given at most --gen-timeout
    seconds; its rows, skips and errors so far join the report, and a kill is one more error."""
    section = report["generation"]
    with tempfile.TemporaryDirectory() as tmp:
        child_out = Path(tmp) / "generation.json"
        cmd = [sys.executable, "-m", "bench.gpu_check", *argv, "--out", str(child_out),
               "--generation-child", f"{clock.elapsed():.1f}"]
        release_memory()
        returncode = run_child(cmd, args.gen_timeout,
                               env={"TORCH_LOGS": os.environ.get("TORCH_LOGS", "recompiles,graph_breaks,cudagraphs")})
        if child_out.is_file():
            child = json.loads(child_out.read_text(encoding="utf-8"))["generation"]
            for key in ("rows", "skipped", "errors"):
                section[key] += child[key]
    if returncode is None:
        section["errors"].append({"model": args.gen_model, "error": f"timed out after {args.gen_timeout:.0f} s "
                                  "(the stacks the child printed before its kill are in the console log)"})
        clock.log(f"4 generation: killed after {args.gen_timeout:.0f} s")
    elif returncode != 0 and not section["errors"]:
        section["errors"].append({"model": args.gen_model, "error": f"the child process exited {returncode}"})


def print_stacks_later(seconds: float) -> None:
    """Every other thread's Python stack on stderr after ``seconds``, from a daemon thread. Not
    faulthandler's ``dump_traceback_later``: on an H200 (Python 3.12, torch 2.11) its dump, which
    reads the frames without the GIL, crashed the interpreter (SIGSEGV) at a frame of dynamo's
    generated code during a compile. This one takes the GIL, so it prints nothing while a C call
    holds it."""

    def dump() -> None:
        time.sleep(seconds)
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident != threading.get_ident():
                print(f"Thread {names.get(ident, ident)} (most recent call last):\n"
                      + "".join(traceback.format_stack(frame)), file=sys.stderr, flush=True)

    threading.Thread(target=dump, name="print_stacks_later", daemon=True).start()


def generation_child(args: argparse.Namespace) -> int:
    """``--generation-child``: section 4 alone, the report rewritten after each row, every thread's
    stack printed shortly before the parent's kill."""
    from llmkit.io import write_json_atomic
    from llmkit.profiling import device_description

    print_stacks_later(max(1.0, args.gen_timeout - GEN_STACKS_BEFORE_KILL_S))
    clock = Clock(args.generation_child)
    report = new_report(args, device_description())
    out = Path(args.out)
    generation_section(args, clock, report, on_row=lambda: write_json_atomic(out, report))
    write_json_atomic(out, report)
    return 0


def source_file(classname: str, name: str) -> str:
    """The test module a JUnit testcase came from (a collection error names it in ``name``)."""
    parts = (classname or name).split(".")
    for end in range(len(parts), 0, -1):
        path = Path(*parts[:end]).with_suffix(".py")
        if (ROOT / path).is_file():
            return path.as_posix()
    return (classname or name).replace(".", "/") + ".py"


def summarize_junit(xml_text: str) -> dict:
    """Counts per test file, and the modules pytest could not import, from pytest's JUnit XML."""
    files: dict[str, dict[str, int]] = {}
    not_collected = []
    for case in ET.fromstring(xml_text).iter("testcase"):
        path = source_file(case.get("classname", ""), case.get("name", ""))
        error, failure, skipped = case.find("error"), case.find("failure"), case.find("skipped")
        if error is not None and error.get("message") == "collection failure":
            text = error.text or ""
            found = MISSING_MODULE.search(text)
            missing = found and (found.group(1) or found.group(2))
            last = (text.strip().splitlines() or ["?"])[-1].removeprefix("E").strip()
            reason = f"No module named '{missing}'" if found and found.group(1) else last[:200]
            source = ROOT / path
            has_gpu = source.is_file() and "mark.gpu" in source.read_text(encoding="utf-8", errors="replace")
            not_collected.append({"file": path, "reason": reason, "missing_module": missing, "has_gpu_tests": has_gpu})
            continue
        outcome = ("failed" if failure is not None else "errors" if error is not None
                   else "skipped" if skipped is not None else "passed")
        counts = files.setdefault(path, {"passed": 0, "failed": 0, "errors": 0, "skipped": 0})
        counts[outcome] += 1
    return {"files": files, "not_collected": not_collected}


def pytest_section(args: argparse.Namespace, clock: Clock, report: dict) -> None:
    """Section 5: ``pytest -m gpu tests`` in a subprocess (its output in a log beside the JSON)."""
    section = report["pytest"]
    timeout = int(min(args.pytest_timeout, max(60.0, args.time_budget - clock.elapsed())))
    log = Path(args.out).with_name(Path(args.out).stem + "_pytest.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "gpu_tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfE", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={junit}", "tests"]
        section.update(command=" ".join(cmd[1:]), log=str(log), timeout_s=timeout)
        clock.log(f"5 {section['command']} (at most {timeout} s; output in {log})")
        release_memory()
        start = time.perf_counter()
        with log.open("w", encoding="utf-8") as out:  # a file: nothing holds a pipe open after a kill
            section["returncode"] = run_child(cmd, timeout, stdout=out, stderr=subprocess.STDOUT)
        if section["returncode"] is None:
            section["timed_out"] = True
        section["seconds"] = time.perf_counter() - start
        section["output_tail"] = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        if junit.is_file():
            section.update(summarize_junit(junit.read_text(encoding="utf-8")))
    summary = next((line for line in reversed(section["output_tail"]) if line.strip()), "")
    clock.log(f"  {'timed out' if section.get('timed_out') else summary}")


def judge(value: float | None, bound: float, at_most: bool, applies: bool) -> str:
    if value is None:
        return "-"
    if not applies:
        return "n/a"
    return "PASS" if (value <= bound if at_most else value >= bound) else "FAIL"


def judge_targets(report: dict) -> list[dict]:
    """The issue's targets against the rows that exist; judged on CUDA only."""
    on_gpu = report["device_type"] == "cuda"
    results = []
    for r in report["training"]["rows"]:
        if r["n_streams"] != 4:
            continue
        if r["model"] in targets.TIME_RATIO:
            bound = targets.TIME_RATIO[r["model"]]
            results.append({"target": "time_ratio", "model": r["model"], "bound": bound, "at_most": True,
                            "value": r["time_ratio"], "result": judge(r["time_ratio"], bound, True, on_gpu)})
        results.append({"target": "mem_ratio", "model": r["model"], "bound": targets.MEM_RATIO, "at_most": True,
                        "value": r["mem_ratio"], "result": judge(r["mem_ratio"], targets.MEM_RATIO, True, on_gpu)})
    t = targets.DECODE
    for r in report["generation"]["rows"]:
        if (r["model"], r["n_streams"], r["batch"]) == (t["model"], t["n_streams"], t["batch"]) \
                and "settings" not in r:
            results.append({"target": "decode_tokens_per_s", "model": r["model"], "bound": t["bound"],
                            "at_most": False, "value": r["new_tokens_per_s"],
                            "result": judge(r["new_tokens_per_s"], t["bound"], False,
                                            on_gpu and r["mode"] == "compiled")})
    return results


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def table(report: dict) -> str:
    """The one markdown table: a bold header row per section, then its rows."""
    args, device = report["args"], report["device"]
    verdicts = {(t["target"], t["model"]): t for t in report["targets"]}
    lines = ["| case | measured | target | result | device |", "|---|---|---|---|---|"]

    def row(case: str, measured: str, target: str = "", result: str = "", dev: str = device) -> None:
        cells = [case, measured, target, result, dev]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")

    def header(text: str) -> None:
        row(f"**{text}**", "", "", "", "")

    def errors(section: dict) -> None:
        for e in section["errors"]:
            case = " ".join(str(x) for x in (e.get("model"), e.get("n_streams") and f"n={e['n_streams']}",
                                             e.get("batch") and f"batch {e['batch']}",
                                             e.get("compile_mode") and f"compile mode {e['compile_mode']}",
                                             e.get("settings")) if x)
            row(case, e["error"], "", "ERROR")

    def verdict(what: str, model: str) -> tuple[str, str]:
        t = verdicts.get((what, model))
        if t is None:
            return "", ""
        bound = f"{t['bound']:,.0f} new tok/s" if what == "decode_tokens_per_s" else f"{t['bound']:.2f}x"
        return ("<= " if t["at_most"] else ">= ") + bound, t["result"]

    blocks = "compiled blocks" if args["compile"] else "eager blocks"
    header(f"1. Training throughput: bare loop, {args['precision']}, {blocks}, {args['optimizer']} AdamW, "
           f"fp32 matmuls {args['float32_matmul_precision']}, seq {args['seq_len']} x batch {args['batch_size']}, "
           f"no checkpointing, median of {args['steps']} timed steps after {args['warmup']} warm-up")
    training = report["training"]
    for r in training["rows"]:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        row(f"{r['model']} n={r['n_streams']}",
            f"{r['step_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s, MFU {mfu}, "
            f"peak {fmt(r['peak_mem_GiB'], '.2f', ' GiB')}", "", "", r["device"])
        if r["n_streams"] != 1 and r["time_ratio"] is not None:
            target, result = verdict("time_ratio", r["model"])
            row(f"{r['model']} n={r['n_streams']} / n=1",
                f"time {r['time_ratio']:.3f}x, peak memory {fmt(r['mem_ratio'], '.3f', 'x')}",
                target and "time " + target, result, r["device"])
    for r in training["cuda_graph_rows"] + training["setting_rows"]:
        ratio = "" if r["time_ratio"] is None else f", time {r['time_ratio']:.3f}x n=1's"
        skips = f", {r['cudagraph_skips']} graphs skipped" if "cudagraph_skips" in r else ""
        row(f"{r['model']} n={r['n_streams']}, {r.get('settings', 'CUDA graphs')}",
            f"{r['step_s'] * 1e3:.1f} ms/step, peak {fmt(r['peak_mem_GiB'], '.2f', ' GiB')}{ratio}{skips}", "", "",
            r["device"])
    errors(training)

    kernels = report["kernels"]
    what = "CUDA kernels" if report["device_type"] == "cuda" else "CPU op events (no GPU: not kernels)"
    header(f"2. {what} in one training step (forward, backward, AdamW) after warm-up, torch.profiler")
    for k in kernels["rows"]:
        extra = f" (+{k['cuda_memcpy_memset']} memcpy/memset)" if k["counted"] == "cuda_kernels" else ""
        row(f"{k['model']} n={k['n_streams']}", f"{k['count']:,} {k['counted'].replace('_', ' ')}{extra}",
            "", "", k["device"])
        if k.get("by_kernel"):
            total = "" if k["kernel_ms"] is None else f"all kernels {k['kernel_ms']:.1f} ms, of which "
            what = "mHC kernels" if k["kernel_ms"] is not None else "llmkit ops (CPU time)"
            row(f"{k['model']} n={k['n_streams']} time", f"{total}{what} {k['mhc_ms']:.1f} ms", "", "", k["device"])
            for key, e in k["by_kernel"].items():
                rate = f", {e['GB_per_s']:,.0f} GB/s" if "GB_per_s" in e else ""
                row(f"  {key}", f"{e['launches']} x, {e['ms']:.2f} ms{rate}", "", "", k["device"])
        if k.get("gpu_idle"):
            idle = k["gpu_idle"]
            allocations = ", ".join(f"{v} {name.removeprefix('num_')}" for name, v in k["device_allocations"].items())
            row(f"{k['model']} n={k['n_streams']} GPU idle",
                f"busy {idle['busy_ms']:.1f} ms, idle {idle['idle_ms']:.1f} ms ({idle['gaps_ms']:.1f} ms in gaps "
                f">= {IDLE_GAP_US:.0f} us, profiled); {allocations}", "", "", k["device"])
            for op in idle["by_op"]:
                row(f"  waited on {op['op'][:60]}", f"{op['gaps']} x, {op['ms']:.2f} ms", "", "", k["device"])
    for s in kernels["per_sublayer"]:
        row(f"{s['model']} (n={s['n_streams']} - n=1) / (2 x layers)",
            f"{s['value']:.1f} more per block sublayer", "", "", device)
    errors(kernels)

    header("3. Memory: CUDA peak over the training steps; bytes autograd saves in one training forward; "
           "above one step's start: held after its forward, its peak")
    memory = report["memory"]
    for m in memory["rows"]:
        step = ("" if m.get("held_after_forward_GiB") is None else
                f"; held after forward {m['held_after_forward_GiB']:.2f} GiB, step peak {m['step_peak_GiB']:.2f} GiB")
        row(f"{m['model']} n={m['n_streams']}", f"peak {fmt(m['peak_mem_GiB'], '.2f', ' GiB')}, saved activations "
            f"{m['saved_act_GiB']:.3f} GiB{step}", "", "", m["device"])
        if m["n_streams"] != 1 and m["act_ratio"] is not None:
            target, result = verdict("mem_ratio", m["model"])
            row(f"{m['model']} n={m['n_streams']} / n=1",
                f"peak {fmt(m['mem_ratio'], '.3f', 'x')}, saved activations {m['act_ratio']:.3f}x",
                target and "peak " + target, result, m["device"])
    for m in memory.get("eager", []):
        row(f"{m['model']} n={m['n_streams']} eager blocks",
            f"held after forward {m['held_after_forward_GiB']:.2f} GiB, step peak {m['step_peak_GiB']:.2f} GiB",
            "", "", m["device"])
    for m in [*memory["rows"], *({**m, "eager": True} for m in memory.get("eager", []))]:
        if m.get("step_peak_sites"):
            what = " eager blocks" if m.get("eager") else ""
            row(f"{m['model']} n={m['n_streams']}{what}: live at the step's peak",
                f"{m['step_peak_traced_GiB']:.2f} GiB allocated in the step, by where", "", "", m["device"])
            for s in m["step_peak_sites"][:PEAK_SITES_SHOWN]:
                row(f"  {s['site']}", f"{s['GiB']:.2f} GiB in {s['blocks']} blocks: {s['code']}", "", "", m["device"])
    errors(memory)

    generation = report["generation"]
    header(f"4. Generation: {generation['mode']} decode with KV cache, prompt {args['gen_prompt_len']}, "
           f"{args['gen_tokens']} new tokens, best of {args['gen_repeats']}, random weights")
    for g in generation["rows"]:
        target, result = "", ""
        if g["batch"] == targets.DECODE["batch"] and g["n_streams"] == targets.DECODE["n_streams"] \
                and "settings" not in g:
            target, result = verdict("decode_tokens_per_s", g["model"])
        kernels = "" if g.get("kernels_per_token") is None else f", {g['kernels_per_token']:.0f} kernels/token"
        settings = f" {g['settings']}" if "settings" in g else ""
        case = f"{g['model']} n={g['n_streams']} batch {g['batch']}{settings}"
        row(case, f"{g['new_tokens_per_s']:,.0f} new tok/s ({g['seconds']:.3f} s{kernels})", target, result,
            g["device"])
        if g.get("kernel_us_per_token") is not None:
            idle = g["gpu_idle"]
            row(f"{case}: GPU per step", f"kernels {g['kernel_us_per_token']:,.0f} us of the "
                f"{g['seconds'] / args['gen_tokens'] * 1e6:,.0f} us step (timed); profiled call: busy "
                f"{idle['busy_ms']:.1f} ms, idle {idle['idle_ms']:.1f} ms", "", "", g["device"])
            for op in idle["by_op"][:DECODE_WAITS_SHOWN]:
                row(f"  waited on {op['op'][:60]}", f"{op['gaps']} x, {op['ms']:.2f} ms", "", "", g["device"])
            for k in g["top_kernels"]:
                row(f"  {k['kernel'][:70]}", f"{k['launches_per_token']:.1f} x, {k['us_per_token']:,.1f} us per step "
                    f"({100 * k['share']:.0f}% of kernel time)", "", "", g["device"])
    for s in generation["skipped"]:
        row(f"{s['model']} n={s['n_streams']}" + (f" {s['settings']}" if "settings" in s else ""),
            f"skipped: {s['reason']}", "", "-")
    errors(generation)

    pytest = report["pytest"]
    header("5. GPU tests: pytest -m gpu tests")
    if pytest.get("skipped"):
        row("pytest -m gpu", f"skipped ({pytest['skipped']})", "", "-")
    elif pytest.get("timed_out"):
        row("pytest -m gpu", f"timed out after {pytest['timeout_s']} s (see {pytest['log']})", "", "FAIL")
    elif "files" not in pytest:
        tail = next((line for line in reversed(pytest.get("output_tail", [])) if line.strip()), "no output")
        row("pytest -m gpu", f"no results (exit {pytest.get('returncode')}): {tail[:200]}", "", "ERROR")
    else:
        for path, c in sorted(pytest["files"].items()):
            counts = ", ".join(f"{v} {k}" for k, v in c.items() if v) or "none"
            result = "FAIL" if c["failed"] or c["errors"] else "PASS" if c["passed"] else "-"
            row(path, counts, "", result)
        gpu_missing = [m for m in pytest["not_collected"] if m["has_gpu_tests"]]
        for m in gpu_missing:
            row(m["file"], f"not collected: {m['reason']}", "", "NOT COLLECTED")
        others = len(pytest["not_collected"]) - len(gpu_missing)
        if others:
            names = sorted({m["missing_module"] or "?" for m in pytest["not_collected"] if not m["has_gpu_tests"]})
            row("other test modules", f"{others} without gpu tests not collected (missing: {', '.join(names)})",
                "", "-")
        if not pytest["files"] and not gpu_missing:
            row("pytest -m gpu", f"no gpu tests ran (exit {pytest.get('returncode')})", "", "-")
    return "\n".join(lines)


def new_report(args: argparse.Namespace, device: str) -> dict:
    return {
        "device": device, "device_type": args.device, "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items()},
        "training": {"rows": [], "cuda_graph_rows": [], "setting_rows": [], "errors": []},
        "kernels": {"rows": [], "per_sublayer": [], "errors": []},
        "memory": {"rows": [], "eager": [], "errors": []},
        "generation": {"mode": "compiled" if args.compile else "cached", "rows": [], "skipped": [], "errors": []},
        "pytest": {},
        "targets": [],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    resolve_device(args)
    if args.float32_matmul_precision is not None:
        torch.set_float32_matmul_precision(args.float32_matmul_precision)
    args.float32_matmul_precision = torch.get_float32_matmul_precision()  # the one in force, for the report
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    from bench import throughput  # only now: it reads torch.cuda.is_available() on import
    from llmkit.io import atomic_file, write_json_atomic
    from llmkit.profiling import device_description

    if throughput.CUDA != (args.device == "cuda"):
        print("gpu_check: --device cpu must hide the GPUs before CUDA starts; run it in a fresh process",
              file=sys.stderr)
        return 2
    if args.generation_child is not None:
        return generation_child(args)
    clock = Clock()
    report = new_report(args, device_description())
    clock.log(f"gpu_check on {report['device']}, torch {torch.__version__}, {args.precision}, "
              f"compile={args.compile}; JSON to {args.out}")
    out = Path(args.out)
    training_sections(args, clock, report)
    write_json_atomic(out, report)  # after each section: a run killed later keeps what it measured
    generation_in_child(args, argv, clock, report)
    write_json_atomic(out, report)
    if args.skip_pytest:
        report["pytest"] = {"skipped": "--skip-pytest"}
    else:
        try:
            pytest_section(args, clock, report)
        except Exception as e:
            traceback.print_exc()
            report["pytest"].update(error=error_text(e), output_tail=[error_text(e)])
    report["targets"] = judge_targets(report)
    report["elapsed_s"] = clock.elapsed()
    failed = [name for name in ("training", "kernels", "memory", "generation") if report[name]["errors"]]
    failed += ["pytest"] if report["pytest"].get("error") else []
    report["section_errors"] = failed
    write_json_atomic(out, report)
    with atomic_file(out.with_suffix(".md")) as tmp:  # the table, should the console's tail not come back
        tmp.write_text(table(report) + "\n", encoding="utf-8")
    print("\n" + table(report) + "\n")
    verdicts = [t["result"] for t in report["targets"]]
    print(f"targets: {verdicts.count('PASS')} met, {verdicts.count('FAIL')} not met, {verdicts.count('n/a')} n/a; "
          f"{clock.elapsed():.0f} s; wrote {args.out}" + (f"; sections with errors: {', '.join(failed)}"
                                                          if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
