"""Training throughput of the backbone, mHC (n_streams = n) against the dense residual (n = 1).

    python -m bench.throughput                                   # GPU: 120m and 350m, seq 1024, n = 1 and 4
    python -m bench.throughput --models 900m --batch-size 8      # the 900m target (checkpointing on)
    python -m bench.throughput --models tiny --seq-len 256 --batch-size 8 --steps 5   # CPU smoke run

Each (model, n, mode) runs --warmup + --steps optimizer steps on random tokens (the data
pipeline is not what is measured):

- ``trainer``: the real ``PretrainModule`` through ``lightning.Trainer`` (precision plugin,
  gradient clipping, LR schedule, logging hooks);
- ``bare``: the same ``Transformer`` and AdamW in a plain loop (what Lightning costs is the
  difference).

Step time is the median after the warm-up steps; "first step" is the first step's wall time,
which includes torch.compile: cold for the first configuration of a block graph in a fresh
TORCHINDUCTOR_CACHE_DIR; later runs of the same graph reuse compiled kernels from disk.
MFU = (6 N + 12 L C T) FLOPs per token x tokens/s / the device's dense bf16 peak (Lightning's
table; N = non-embedding parameters, PaLM appendix B). "act GiB" is what autograd keeps for
backward in one training forward (distinct storages, no parameters), counted through
saved-tensor hooks after the timed steps: activation memory on any device, CPU included (under
eager activation checkpointing it misses the block inputs the checkpoint holds), while "peak
GiB" is the CUDA allocator's peak over the timed steps. Defaults on
a GPU: bf16-mixed, compiled blocks, fused AdamW, the mHC Triton kernels, and each model YAML's
activation-checkpointing and bf16-residual settings. Prints a table, the n/1 ratios, the
issue's targets, and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import gc
import linecache
import statistics
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
import torch._dynamo
import torch._inductor.config
from lightning.fabric.utilities.throughput import get_available_flops
from torch.utils.data import DataLoader, Dataset

from bench import targets
from bench.models import MODEL_HELP, model_name, model_yaml
from llmkit.io import write_json_atomic
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.modules.pretrain import PretrainModule
from llmkit.optim import OptimConfig
from llmkit.profiling import dense_bf16_peak_flops, device_description, saved_activation_bytes

CUDA = torch.cuda.is_available()

# The targets (bench/targets.py), checked when the rows they need were measured on a GPU:
# (model, what, bound) with what one of "dense_mfu" (>=), "time_ratio" (<=), "mem_ratio" (<=),
# "first_step_s" (n = 4, <=).
TARGETS = (
    [(model, "dense_mfu", bound) for model, bound in targets.DENSE_MFU.items()]
    + [(model, "time_ratio", bound) for model, bound in targets.TIME_RATIO.items()]
    + [(model, "mem_ratio", targets.MEM_RATIO) for model in targets.TIME_RATIO]
    + [(model, "first_step_s", bound) for model, bound in targets.FIRST_STEP_S.items()]
)


class RandomWindows(Dataset):
    def __init__(self, vocab_size: int, seq_len: int, n: int) -> None:
        self.tokens = torch.randint(0, vocab_size, (n, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[i, :-1], self.tokens[i, 1:]


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class StepTimer(L.Callback):
    """Wall time of each training batch (one optimizer step here), synchronised on CUDA."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        sync()
        self.times.append(time.perf_counter() - self._t0)


def model_config(name: str, n_streams: int, args: argparse.Namespace) -> ModelConfig:
    base = ModelConfig.from_yaml(model_yaml(name))
    checkpointing = base.gradient_checkpointing if args.checkpointing == "config" else args.checkpointing == "on"
    bf16_residual = base.bf16_residual if args.bf16_residual == "config" else args.bf16_residual == "on"
    return replace(
        base,
        n_streams=n_streams,
        max_seq_len=max(base.max_seq_len, args.seq_len),
        gradient_checkpointing=checkpointing,
        bf16_residual=bf16_residual,
        mhc=replace(base.mhc, implementation=args.mhc_implementation,
                    recompute_stream=getattr(args, "mhc_recompute_stream", base.mhc.recompute_stream)),
    )


def run_trainer(config: ModelConfig, args: argparse.Namespace) -> tuple[list[float], Transformer]:
    module = PretrainModule(config, OptimConfig(warmup_steps=1, implementation=args.optimizer), compile=args.compile)
    steps = args.warmup + args.steps
    data = DataLoader(RandomWindows(config.vocab_size, args.seq_len, steps * args.batch_size),
                      batch_size=args.batch_size, pin_memory=CUDA)
    timer = StepTimer()
    L.Trainer(
        max_steps=steps,
        accelerator="auto",
        devices=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[timer],
    ).fit(module, data)
    return timer.times, module.model


def bare_step(model: Transformer, tokens: torch.Tensor, optimizer: torch.optim.Optimizer, autocast: bool) -> None:
    """One training step of the bare loop on ``tokens`` [B, T + 1]: forward (under bf16 autocast with
    ``autocast``), backward, clipping to norm 1, the optimizer's step."""
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_bare(config: ModelConfig, args: argparse.Namespace) -> tuple[list[float], Transformer]:
    device = torch.device("cuda" if CUDA else "cpu")
    model = Transformer(config).to(device)
    if args.precision == "bf16-true":
        model = model.to(torch.bfloat16)
    cuda_graphs = args.compile and args.compile_mode == "reduce-overhead"
    if args.compile:
        model.compile_blocks(mode=None if args.compile_mode == "default" else args.compile_mode)
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=3e-4, betas=(0.9, 0.95), **{args.optimizer: True})
    generator = torch.Generator(device=device).manual_seed(0)
    times = []
    for _ in range(args.warmup + args.steps):
        tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), device=device,
                               generator=generator)
        sync()
        t0 = time.perf_counter()
        if cuda_graphs:  # a new iteration: the last step's CUDA-graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        bare_step(model, tokens, optimizer, autocast=args.precision == "bf16-mixed")
        sync()
        times.append(time.perf_counter() - t0)
    return times, model


def training_forward_bytes(model: Transformer, seq_len: int, batch_size: int, precision: str) -> int:
    """Bytes autograd keeps for backward in one training forward (``saved_activation_bytes``)."""
    device = torch.device("cuda" if CUDA else "cpu")
    model.to(device)  # the Trainer hands the module back on the CPU after fit
    model.train()
    tokens = torch.randint(0, model.config.vocab_size, (batch_size, seq_len + 1), device=device)

    def forward() -> None:
        torch.compiler.cudagraph_mark_step_begin()  # blocks compiled with CUDA graphs: a new iteration
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            model.loss(tokens[:, :-1], tokens[:, 1:])

    return saved_activation_bytes(model, forward)


TORCH_DIR = str(Path(torch.__file__).parent)
PEAK_SITES = 8  # allocation sites listed for the memory live at a step's peak
HISTORY = 1_000_000  # allocator events a probe records at most (a ring: past it the oldest would be dropped)


def allocation_site(frames: list[dict]) -> tuple[str, str]:
    """("file:line function", that line's code) of an allocation: the innermost Python frame of its
    traceback (innermost first, as the CUDA allocator records it) outside torch's own package, so
    llmkit's code, a Triton wrapper or inductor's generated code; torch's innermost frame if none."""
    frame = next((f for f in frames if not f["filename"].startswith(TORCH_DIR)), frames[0] if frames else None)
    if frame is None:
        return "(no traceback)", ""
    code = linecache.getline(frame["filename"], frame["line"]).strip()
    return f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}", code[:120]


def peak_allocation_sites(trace: list[dict], top: int = PEAK_SITES) -> dict:
    """What was live when one CUDA device's recorded allocations peaked, by allocation site.

    ``trace`` is that device's ``torch.cuda.memory._snapshot()["device_traces"]`` entry, recorded
    with tracebacks (``_record_memory_history``): its alloc and free_requested events are replayed,
    counting only blocks allocated while it recorded. Returns the peak (bytes above the recording's
    start) and the ``top`` sites of the blocks live at that moment, largest first, with their bytes
    and block counts: whether memory beyond the saved activations is the compiler's buffers, a
    kernel wrapper's or llmkit's own."""
    live: dict[int, dict] = {}
    total = peak = 0
    peak_at = -1
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, peak_at = total, index
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    live = {}
    for event in trace[:peak_at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_requested":
            live.pop(event["addr"], None)
    sites: dict[tuple[str, str], list[int]] = {}
    for event in live.values():
        entry = sites.setdefault(allocation_site(event.get("frames", [])), [0, 0])
        entry[0] += event["size"]
        entry[1] += 1
    ranked = sorted(sites.items(), key=lambda item: -item[1][0])[:top]
    return {"peak_bytes": peak,
            "sites": [{"site": site, "code": code, "bytes": size, "blocks": blocks}
                      for (site, code), (size, blocks) in ranked]}


def training_step_memory(model: Transformer, seq_len: int, batch_size: int, precision: str) -> dict:
    """On CUDA, GiB above what one training step starts with (weights, optimizer state): held
    after its forward (what backward needs: the saved activations and the loss graph's tensors)
    and its peak through backward, and what was live at that peak by allocation site
    (:func:`peak_allocation_sites`, from the allocator's recorded history); None elsewhere. Beside
    the saved-tensor bytes they say whether memory beyond the saved activations is held from the
    forward or transient in the backward, and where it was allocated."""
    if not CUDA:
        return {"held_after_forward_GiB": None, "step_peak_GiB": None, "step_peak_sites": None,
                "step_peak_traced_GiB": None}
    model.to("cuda").train()
    model.zero_grad(set_to_none=True)
    tokens = torch.randint(0, model.config.vocab_size, (batch_size, seq_len + 1), device="cuda")
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(enabled=None)  # an earlier recording's entries, if any, go
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=HISTORY)
    try:
        recorded_before = len(torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()])
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        held = torch.cuda.memory_allocated() - start
        loss.backward()
        peak = torch.cuda.max_memory_allocated() - start
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()][recorded_before:]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    model.zero_grad(set_to_none=True)
    sites = peak_allocation_sites(trace)
    return {"held_after_forward_GiB": held / 2**30, "step_peak_GiB": peak / 2**30,
            "step_peak_sites": [{"site": s["site"], "code": s["code"], "GiB": s["bytes"] / 2**30, "blocks": s["blocks"]}
                                for s in sites["sites"]],
            "step_peak_traced_GiB": sites["peak_bytes"] / 2**30}


def measure(name: str, n_streams: int, mode: str, args: argparse.Namespace, memory_probes: bool = True) -> dict:
    """One (model, n, mode) row: step times, throughput, MFU, CUDA peak memory and, with
    ``memory_probes``, the saved activations and one more step's held/peak memory (None without:
    the CUDA-graph rows skip them, saved-tensor hooks and forward-only calls being no part of a
    replayed training step)."""
    torch._dynamo.reset()  # each configuration compiles from scratch: first_step_s is its compile cost
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    config = model_config(name, n_streams, args)
    times, model = (run_trainer if mode == "trainer" else run_bare)(config, args)
    step = statistics.median(times[args.warmup :])
    tokens = args.batch_size * args.seq_len
    peak = None
    if CUDA and "bf16" in args.precision:
        # llmkit's table first: Lightning's warns about every chip it lacks (the H200 among them)
        peak = dense_bf16_peak_flops(torch.cuda.get_device_name()) or get_available_flops(torch.device("cuda"),
                                                                                           torch.bfloat16)
    flops_per_step = model.flops_per_token(args.seq_len) * tokens
    row = {
        "model": name,
        "n_streams": n_streams,
        "mode": mode,
        "compile_mode": args.compile_mode if args.compile else None,
        "params_M": model.num_params() / 1e6,
        "gradient_checkpointing": config.gradient_checkpointing,
        "bf16_residual": config.bf16_residual,
        "step_s": step,
        "first_step_s": times[0],
        "tokens_per_s": tokens / step,
        "mfu": flops_per_step / step / peak if peak else None,
        "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if CUDA else None,
    }
    if memory_probes:
        row["saved_act_GiB"] = training_forward_bytes(model, args.seq_len, args.batch_size, args.precision) / 2**30
        row.update(training_step_memory(model, args.seq_len, args.batch_size, args.precision))
    else:
        row.update(saved_act_GiB=None, held_after_forward_GiB=None, step_peak_GiB=None, step_peak_sites=None,
                   step_peak_traced_GiB=None)
    del model
    return row


def add_ratios(rows: list[dict]) -> None:
    """time_ratio and mem_ratio of each row against the n = 1 row of the same model, mode and compile mode."""
    dense = {(r["model"], r["mode"], r["compile_mode"]): r for r in rows if r["n_streams"] == 1}
    for r in rows:
        d = dense.get((r["model"], r["mode"], r["compile_mode"]))
        r["time_ratio"] = r["step_s"] / d["step_s"] if d else None
        r["mem_ratio"] = r["peak_mem_GiB"] / d["peak_mem_GiB"] if d and r["peak_mem_GiB"] else None
        r["act_ratio"] = r["saved_act_GiB"] / d["saved_act_GiB"] if d and d["saved_act_GiB"] else None


def check_targets(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """The TARGETS whose rows exist, each with its measured value and verdict; none off a GPU
    or outside bf16-mixed, where the targets do not apply."""
    results = []
    if not CUDA or args.precision != "bf16-mixed":
        return results
    for model, what, bound in TARGETS:
        # first_step_s: the trainer row only, the first n = 4 compile of its model (the bare
        # row after it finds inductor's compiled kernels already on disk)
        for mode in ("trainer",) if what == "first_step_s" else ("trainer", "bare"):
            n = 1 if what == "dense_mfu" else 4
            row = next((r for r in rows if (r["model"], r["mode"], r["n_streams"]) == (model, mode, n)), None)
            key = {"dense_mfu": "mfu"}.get(what, what)
            if row is None or row.get(key) is None:
                continue
            value = row[key]
            ok = value >= bound if what == "dense_mfu" else value <= bound
            results.append({"model": model, "mode": mode, "target": what, "bound": bound, "value": value, "met": ok})
    return results


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", type=model_name, default=["120m", "350m"], help=MODEL_HELP)
    p.add_argument("--n-streams", type=int, nargs="+", default=[1, 4])
    p.add_argument("--modes", nargs="+", choices=["trainer", "bare"], default=["trainer", "bare"])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", default="bf16-mixed" if CUDA else "32-true",
                   choices=["bf16-mixed", "bf16-true", "32-true"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=CUDA)
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead"], default="default",
                   help="torch.compile mode of the blocks in bare rows (reduce-overhead: CUDA graphs)")
    p.add_argument("--optimizer", choices=["fused", "foreach"], default="fused" if CUDA else "foreach")
    p.add_argument("--mhc-implementation", choices=["auto", "torch"], default="auto",
                   help="auto: the Triton kernels on CUDA; torch: the ops' PyTorch code (docs/performance.md)")
    p.add_argument("--mhc-recompute-stream", action=argparse.BooleanOptionalAction, default=False,
                   help="mhc.recompute_stream: compiled mHC blocks recompute their attention sublayer's stream "
                        "in backward (docs/performance.md)")
    p.add_argument("--checkpointing", choices=["config", "on", "off"], default="config",
                   help="activation checkpointing per block: the model YAML's setting, or forced on/off")
    p.add_argument("--bf16-residual", choices=["config", "on", "off"], default="config",
                   help="residual stream in bf16 under bf16-mixed: the model YAML's setting, or forced on/off")
    p.add_argument("--compile-cache", action=argparse.BooleanOptionalAction, default=False,
                   help="reuse inductor's FX graph cache (off: first_step_s includes tracing and lowering again)")
    p.add_argument("--out", default="lightning_logs/bench/throughput.json")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.compile_mode != "default" and "trainer" in args.modes:
        p.error("--compile-mode applies to --modes bare (PretrainModule compiles its blocks in the default mode)")
    torch._inductor.config.fx_graph_cache = args.compile_cache

    rows = []
    for name in args.models:
        for mode in args.modes:
            for n in args.n_streams:
                rows.append(measure(name, n, mode, args))
                r = rows[-1]
                print(f"measured {name} {mode} n={n}: {r['step_s'] * 1e3:.1f} ms/step", flush=True)
    add_ratios(rows)
    targets = check_targets(rows, args)
    device = device_description()
    print(f"\nseq {args.seq_len}, batch {args.batch_size}, {args.precision}, compile={args.compile} "
          f"({args.compile_mode}), "
          f"AdamW {args.optimizer}, mHC {args.mhc_implementation}, bf16 residual {args.bf16_residual}, {device}")
    header = (f"{'model':>6} {'mode':>7} {'n':>2} {'params(M)':>9} {'ckpt':>4} {'step(ms)':>9} {'first(s)':>8} "
              f"{'tokens/s':>9} {'MFU':>6} {'peak GiB':>8} {'act GiB':>7} {'time x':>6} {'mem x':>6} {'act x':>6}")
    print(header)
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        print(f"{r['model']:>6} {r['mode']:>7} {r['n_streams']:>2} {r['params_M']:>9.1f} "
              f"{'on' if r['gradient_checkpointing'] else 'off':>4} {r['step_s'] * 1e3:>9.1f} "
              f"{r['first_step_s']:>8.1f} {r['tokens_per_s']:>9.0f} {mfu:>6} "
              f"{fmt(r['peak_mem_GiB'], '.2f'):>8} {r['saved_act_GiB']:>7.3f} {fmt(r['time_ratio'], '.3f'):>6} "
              f"{fmt(r['mem_ratio'], '.3f'):>6} {fmt(r['act_ratio'], '.3f'):>6}")
    if targets:
        print("\ntargets (issue 6):")
        for t in targets:
            print(f"  {t['model']:>5} {t['mode']:>7} {t['target']:<13} {t['value']:.3f} vs {t['bound']}: "
                  f"{'met' if t['met'] else 'NOT met'}")
    out = Path(args.out)
    write_json_atomic(out, {"args": vars(args), "device": device, "torch": torch.__version__,
                            "rows": rows, "targets": targets})
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
