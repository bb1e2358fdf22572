"""Peak training memory of a model config without a GPU: one eager training step (forward, backward,
AdamW) on fake tensors, its live tensor bytes tracked by category, n = 1 beside n = 4.

    python -m bench.memory_estimate                              # 120m and 350m, seq 1024, batch 16
    python -m bench.memory_estimate --models 900m --batch-size 8 --checkpointing on

Each (model, n) runs under ``torch._subclasses.FakeTensorMode`` (shapes and dtypes, no storage, no
arithmetic: seconds on a CPU) inside ``torch.distributed._tools.mem_tracker.MemTracker``, which
records the peak of live tensor bytes by kind (parameters, gradients, optimizer state, activations,
temporaries). One step runs untracked first so that AdamW's state exists, as in training. bf16-mixed
is CPU autocast, whose matmuls run in bf16 as CUDA's do.

What it is not: a GPU measurement. It counts tensors, not the CUDA caching allocator's reserved
blocks; it runs the blocks eagerly, where compiled graphs keep other intermediates (an H200 peak of
the compiled dense 350m, 42.5 GiB, is above this estimate's 30.4); the mHC ops run their fake
implementations, so the kernels' own scratch buffers are missing. What it shows well is what n = 4
adds over n = 1, which the ops fix on every device: ``extra act. B/token/sublayer`` is the difference
of the activations alive at the end of the forward (what the backward reads) per token per block
sublayer (docs/performance.md compares it with X_l + y_l + O(n^2) floats). Prints a table and
writes JSON (--out).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from bench.models import MODEL_HELP, model_name
from bench.throughput import model_config
from llmkit.io import write_json_atomic
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer

GIB = 2**30
KINDS = ("Parameter", "Gradient", "Optstate", "Activation", "Temp")


def by_kind(snapshot: dict) -> dict[str, int]:
    """A MemTracker snapshot of the one device (the CPU), keyed by kind name."""
    (stats,) = snapshot.values()
    return {getattr(kind, "value", kind): value for kind, value in stats.items()}


def peak_bytes(config: ModelConfig, seq_len: int, batch_size: int, precision: str) -> dict[str, int]:
    """The tracked peak of one training step of ``config``, by kind and in total ("Total"), and
    "Saved": the activations alive when the forward ends, what the backward reads. The peak may
    fall in the optimizer step, where no activation is alive (small shapes), so the activations
    n adds are compared at the end of the forward."""
    saved = {}
    with FakeTensorMode():
        model = Transformer(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1))

        def step(tracker: MemTracker | None = None) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss = model.loss(tokens[:, :-1], tokens[:, 1:])
            if tracker is not None:
                saved.update(by_kind(tracker.get_tracker_snapshot("current")))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        tracker = MemTracker()
        tracker.track_external(model, optimizer, tokens)
        with tracker:
            step(tracker)
        peak = by_kind(tracker.get_tracker_snapshot("peak"))
    return {**{kind: peak.get(kind, 0) for kind in (*KINDS, "Total")}, "Saved": saved.get("Activation", 0)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", type=model_name, default=["120m", "350m"], help=MODEL_HELP)
    p.add_argument("--n-streams", type=int, nargs="+", default=[1, 4], help="include 1: ratios are against it")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", choices=["bf16-mixed", "32-true"], default="bf16-mixed")
    p.add_argument("--checkpointing", choices=["off", "on", "config"], default="off",
                   help="activation checkpointing (config: as the model YAML says)")
    p.add_argument("--bf16-residual", choices=["config", "on", "off"], default="config")
    p.add_argument("--mhc-implementation", default="auto", help="(what the ops would run; fake tensors run neither)")
    p.add_argument("--out", default=str(Path(os.environ.get("OUT", "lightning_logs/bench")) / "memory_estimate.json"))
    args = p.parse_args(argv)
    rows = []
    for name in args.models:
        dense = None
        for n in args.n_streams:
            config = model_config(name, n, args)  # as bench/throughput.py builds it
            row = {"model": name, "n_streams": n, **peak_bytes(config, args.seq_len, args.batch_size, args.precision)}
            if n == 1:
                dense = row
            elif dense is not None:
                row["ratio"] = row["Total"] / dense["Total"]
                sublayer_tokens = 2 * config.n_layers * args.seq_len * args.batch_size
                extra = row["Saved"] - dense["Saved"]
                row["extra_activation_bytes_per_token_sublayer"] = extra / sublayer_tokens
            rows.append(row)

    print(f"peak tensor memory of one eager training step (fake tensors, no GPU): seq {args.seq_len} x batch "
          f"{args.batch_size}, {args.precision}, checkpointing {args.checkpointing}, AdamW")
    print(f"{'model':<6} {'n':>2} " + " ".join(f"{k[:10]:>10}" for k in (*KINDS, "Total")) +
          f" {'n/1':>6} {'extra act. B/token/sublayer':>28}")
    for r in rows:
        extra = f"{r['extra_activation_bytes_per_token_sublayer']:,.0f}" if "ratio" in r else "-"
        print(f"{r['model']:<6} {r['n_streams']:>2} " + " ".join(f"{r[k] / GIB:>10.3f}" for k in (*KINDS, "Total")) +
              f" {r['ratio'] if 'ratio' in r else 1:>6.3f} {extra:>28}")
    write_json_atomic(Path(args.out), {"args": vars(args), "units": "bytes", "rows": rows})
    print(f"wrote {args.out} (GiB above)")
    return rows


if __name__ == "__main__":
    main()
