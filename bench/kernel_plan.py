"""The kernels a CUDA training step and a cached decode step would launch, counted without a GPU.

    python -m bench.kernel_plan                                   # 120m: training n = 1 and 4, decode at batch 64
    python -m bench.kernel_plan --model tiny --layers 1 2 --decode-batch 4   # a quick look

Why: inductor's CPU backend fuses a graph's loops into a few C++ functions, so the CPU's plan says
nothing about how many kernels the same graph becomes on a GPU (docs/performance.md: it hid ~140 per
mHC sublayer). Here inductor plans the compiled blocks and the compiled decode step for its Triton
backend instead (``torch._inductor.config.cpu_backend = "triton"``: the scheduler, fusion rules and
code generation its CUDA path uses) under a stand-in Triton driver that reports an sm_90 target. The
Triton kernels it generates are never compiled or run; everything else runs on CPU tensors, whose
values are therefore garbage (only the launches count, so ``torch.multinomial`` is answered with
token 0). While one step runs (after a warm-up step that compiles), a dispatch mode counts:

- inductor's Triton kernels, one per launch of a generated kernel;
- ATen ops that launch at least one kernel on CUDA (views and allocations apart): the GEMMs and
  attention inductor calls out to, and the eager code around the compiled blocks (embedding, loss,
  autograd's accumulation, clipping, AdamW, sampling), each once: cuBLAS's split-K reductions, a
  top-k's passes or a foreach op's chunks would add kernels on a GPU;
- the mHC custom ops' own launches: their Triton kernels (``TRITON_INTERPRET=1``, set here, routes
  the ops to the kernels' wrappers, whose launches are recorded, not run) and the ATen ops inside
  them, the wrappers taking their CUDA branches (:func:`planning`);
- ``.item()``-style reads of a tensor's value (on CUDA, a copy to the host that waits for the GPU).

Decode is counted per new token, the prompt's forward and the sampling included (as gpu_check
counts it), and per call of the compiled decode step alone. The
counts are a plan, not a profile: they say which launches exist and how they change with a code
change, never how long they take. Compare with gpu_check's torch.profiler counts where a GPU is at
hand (docs/performance.md has both). Prints a table per section and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the mHC ops take their kernels' path

import torch  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402
from torch._library.custom_ops import OPDEFS  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402

from bench.models import MODEL_HELP, model_name, model_yaml  # noqa: E402
from bench.throughput import bare_step  # noqa: E402
from llmkit.io import write_json_atomic  # noqa: E402
from llmkit.model import generation  # noqa: E402
from llmkit.model.config import ModelConfig  # noqa: E402
from llmkit.model.generation import SamplingConfig, generate  # noqa: E402
from llmkit.model.transformer import Transformer  # noqa: E402

PLANNED_TARGET = GPUTarget("cuda", 90, 32)
"""What the stand-in driver reports: an H100/H200 (sm_90, 32-thread warps)."""

NO_KERNEL = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "reshape",
    "_reshape_alias", "as_strided", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze", "select", "slice",
    "split", "split_with_sizes", "unbind", "chunk", "narrow", "detach", "alias", "lift_fresh", "view_as_real",
    "view_as_complex", "resize_", "set_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "is_same_size", "_has_compatible_shallow_copy_type", "is_nonzero", "result_type", "promote_types",
    "_local_scalar_dense", "_record_function_enter", "_record_function_enter_new", "_record_function_exit",
})
"""ATen ops that launch no kernel on CUDA (views, allocations, metadata); ``_local_scalar_dense``
(``.item()``) is counted apart, as a read that waits for the GPU."""


class _PlanningDriver:
    """A Triton driver for planning only: inductor asks it for the target it generates code for."""

    def get_current_target(self) -> GPUTarget:
        return PLANNED_TARGET

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


class LaunchCount(TorchDispatchMode):
    """Counts, while active, what the module docstring lists; ``inductor`` is bumped by the
    generated kernels' launcher (:func:`planning`), ``recorded`` is the recorders' launch total."""

    def __init__(self, recorded: Callable[[], int]) -> None:
        super().__init__()
        self.recorded = recorded
        self.inductor = 0
        self.aten: Counter[str] = Counter()
        self.mhc_calls: Counter[str] = Counter()
        self.mhc_triton: Counter[str] = Counter()
        self.mhc_aten: Counter[str] = Counter()
        self.host_reads = 0
        self._inside: str | None = None

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Off while torch.compile traces and compiles, on while what it compiled runs (else dynamo
        would run every compiled function eagerly under this mode)."""
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.namespace == "llmkit" and self._inside is None:
            before, self._inside = self.recorded(), name
            try:
                with self:  # the op's Python implementation, whose ATen ops come back here, counted as the op's
                    out = OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
            finally:
                self._inside = None
            self.mhc_calls[name] += 1
            self.mhc_triton[name] += self.recorded() - before
            return out
        if self._inside and func._can_decompose():  # a composite op (inside the op, autograd's keys are off)
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func.namespace == "inductor" or name in NO_KERNEL:
            self.host_reads += name == "_local_scalar_dense"
            return func(*args, **kwargs)
        (self.mhc_aten if self._inside else self.aten)[f"{self._inside}: {name}" if self._inside else name] += 1
        if name == "multinomial":  # garbage probabilities: any token will do
            probs, samples = args[0], args[1]
            return torch.zeros(*probs.shape[:-1], samples, dtype=torch.long, device=probs.device)
        if func is torch.ops.aten.mm.dtype:  # CUDA only (_cuda_grad_phi): an output of its shape will do
            return torch.empty(args[0].shape[0], args[1].shape[1], dtype=args[2])
        return func(*args, **kwargs)

    def launches(self) -> int:
        """Launches counted so far, every kind."""
        return (self.inductor + sum(self.aten.values()) + sum(self.mhc_triton.values())
                + sum(self.mhc_aten.values()))

    def summary(self, per: float = 1.0) -> dict:
        """Launches by kind (divided by ``per``: new tokens, for decode)."""
        kinds = {"inductor triton kernels": self.inductor, "aten ops": sum(self.aten.values()),
                 "mHC triton kernels": sum(self.mhc_triton.values()),
                 "aten ops inside mHC ops": sum(self.mhc_aten.values())}
        return {**{k: v / per for k, v in kinds.items()}, "total": sum(kinds.values()) / per,
                "host reads": self.host_reads / per, "mhc_ops": {k: v / per for k, v in self.mhc_calls.items()},
                "aten": {k: v / per for k, v in self.aten.most_common()},
                "aten_inside_mhc": {k: v / per for k, v in self.mhc_aten.most_common()}}


def _cuda_grad_phi(parts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mhc_triton._grad_phi's CUDA branch, whatever the device (its launches: one matmul with an fp32
    output, one sum), where a CPU takes a branch with two casts more."""
    return torch.mm(parts, x, out_dtype=torch.float32).view(3, -1, x.shape[1]).sum(dim=0)


@contextlib.contextmanager
def planning() -> Iterator[Callable[[], LaunchCount]]:
    """While open: inductor generates Triton code for CPU graphs against :data:`PLANNED_TARGET`,
    its kernels are neither compiled nor run (a launch counts in the latest :class:`LaunchCount`),
    and the mHC Triton kernels are recorded, not run, their wrappers taking CUDA's branches (phi
    handed over in its own dtype, not rounded first for the interpreter; :func:`_cuda_grad_phi`).
    Yields a factory of counters; dynamo's caches are reset on entry and exit (what it compiled
    here cannot run anywhere else)."""
    from torch._inductor.runtime import triton_heuristics

    from bench.mhc_kernel_variants import setting
    from bench.mhc_triton_compile import KERNELS, recorded
    from llmkit.model import mhc_triton

    autotuner = triton_heuristics.CachingAutotuner
    saved = (autotuner.precompile, autotuner.run, inductor_config.cpu_backend, inductor_config.compile_threads,
             triton_driver._active)  # None on a machine without a GPU: no driver is active
    latest: list[LaunchCount] = []  # the counter a generated kernel's launch counts in

    def launch(self, *args, **kwargs) -> None:  # a generated kernel's launch, not run
        if latest:
            latest[0].inductor += 1

    torch._dynamo.reset()
    with (recorded(KERNELS) as recorders, setting("INTERPRETED", False),
          mock.patch.object(mhc_triton, "_grad_phi", _cuda_grad_phi)):
        def new_counter() -> LaunchCount:
            for r in recorders.values():  # their tensors, let go (only the count matters)
                r.launches.clear()
            latest[:] = [LaunchCount(lambda: sum(len(r.launches) for r in recorders.values()))]
            return latest[0]

        triton_driver.set_active(_PlanningDriver())
        autotuner.precompile, autotuner.run = (lambda self, *a, **k: None), launch
        inductor_config.cpu_backend, inductor_config.compile_threads = "triton", 1
        try:
            yield new_counter
        finally:
            (autotuner.precompile, autotuner.run, inductor_config.cpu_backend, inductor_config.compile_threads,
             triton_driver._active) = saved
            torch._dynamo.reset()


def plan_training(config: ModelConfig, tokens: int, new_counter: Callable[[], LaunchCount]) -> dict:
    """The launches of one compiled training step of ``config`` on ``tokens`` tokens (one row), as
    bench/throughput.py's bare mode runs it (bf16 autocast, clipping, fused AdamW)."""
    torch.manual_seed(0)
    model = Transformer(config)
    model.compile_blocks()
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=3e-4, fused=True)
    batch = torch.randint(0, config.vocab_size, (1, tokens + 1))
    with new_counter():  # compiles; counted only for the CUDA-only ops it answers
        bare_step(model, batch, optimizer, autocast=True)
    counter = new_counter()
    with counter:
        bare_step(model, batch, optimizer, autocast=True)
    return counter.summary()


def plan_decode(config: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                new_counter: Callable[[], LaunchCount]) -> dict:
    """The launches per new token of a compiled, cached ``generate`` call (prompt included)."""
    torch.manual_seed(0)
    model = Transformer(config).eval()
    prompts = torch.randint(0, config.vocab_size, (batch, prompt_len)).tolist()
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, top_k=50, seed=0, compile=True)
    steps: list[int] = []  # launches of each call of the compiled decode step
    make_decode = generation._decode_fn

    def counted_decode_fn(*args, **kwargs) -> Callable[..., torch.Tensor]:
        decode = make_decode(*args, **kwargs)

        def step(*step_args) -> torch.Tensor:
            before = counter.launches()
            logits = decode(*step_args)
            steps.append(counter.launches() - before)
            return logits

        return step

    with torch.autocast("cpu", dtype=torch.bfloat16), mock.patch.object(generation, "_decode_fn", counted_decode_fn):
        with (counter := new_counter()):  # compiles; counted only for the ops it answers
            generate(model, prompts, sampling, eos_id=None)
        steps.clear()
        with (counter := new_counter()):
            generate(model, prompts, sampling, eos_id=None)
    return {**counter.summary(per=new_tokens), "decode step": sum(steps) / len(steps)}


KINDS = ("inductor triton kernels", "aten ops", "mHC triton kernels", "aten ops inside mHC ops", "total",
         "host reads")


def print_table(title: str, rows: list[dict], kinds: tuple[str, ...] = KINDS) -> None:
    print(f"\n{title}\n")
    print("| layers | n | " + " | ".join(kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for row in rows:
        print(f"| {row['layers']} | {row['n_streams']} | " + " | ".join(f"{row[k]:.4g}" for k in kinds) + " |")


def per_layer(rows: list[dict]) -> dict[int, float]:
    """Total launches per layer, by n_streams: the slope between the deepest and shallowest rows."""
    slopes = {}
    for n in sorted({r["n_streams"] for r in rows}):
        mine = sorted((r for r in rows if r["n_streams"] == n), key=lambda r: r["layers"])
        if len(mine) > 1:
            slopes[n] = (mine[-1]["total"] - mine[0]["total"]) / (mine[-1]["layers"] - mine[0]["layers"])
    return slopes


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="120m", type=model_name, help=MODEL_HELP)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2],
                   help="depths to plan (the model's own width); the slope between them is per layer")
    p.add_argument("--n-streams", type=int, nargs="+", default=[1, 4])
    p.add_argument("--tokens", type=int, default=256,
                   help="training tokens per step: more than mhc_triton.ENTRY_ONE_KERNEL_TOKENS, so the training path")
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--out", default=str(Path(os.environ.get("OUT", "lightning_logs/bench")) / "kernel_plan.json"))
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("kernel_plan: TRITON_INTERPRET must be 1 (it routes the mHC ops to their recorded Triton kernels)")
    base = ModelConfig.from_yaml(model_yaml(args.model))
    report: dict = {"args": vars(args), "target": f"sm_{PLANNED_TARGET.arch}", "training": [], "decode": []}
    with planning() as new_counter:
        for layers in args.layers:
            for n in args.n_streams:
                config = dataclasses.replace(base, n_layers=layers, n_streams=n, gradient_checkpointing=False,
                                             bf16_residual=True, max_seq_len=max(base.max_seq_len, args.tokens))
                row = {"layers": layers, "n_streams": n, **plan_training(config, args.tokens, new_counter)}
                report["training"].append(row)
                if not args.skip_decode:
                    config = dataclasses.replace(config, max_seq_len=max(base.max_seq_len,
                                                                         args.prompt_len + args.new_tokens))
                    report["decode"].append({"layers": layers, "n_streams": n, **plan_decode(
                        config, args.decode_batch, args.prompt_len, args.new_tokens, new_counter)})
    print_table(f"Training step ({args.model} width, {args.tokens} tokens, bf16 autocast, compiled blocks, "
                f"planned for sm_{PLANNED_TARGET.arch}): launches per step", report["training"])
    report["training_per_layer"] = per_layer(report["training"])
    print(f"per layer: {report['training_per_layer']}")
    if report["decode"]:
        print_table(f"Decode (compiled, batch {args.decode_batch}, prompt {args.prompt_len}, {args.new_tokens} new "
                    "tokens, top-k 50): launches per new token (the prompt's forward and the sampling included), "
                    "and per call of the compiled decode step", report["decode"], (*KINDS, "decode step"))
        report["decode_per_layer"] = per_layer(report["decode"])
        print(f"per layer: {report['decode_per_layer']}")
    write_json_atomic(Path(args.out), report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
