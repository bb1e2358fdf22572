"""Training throughput of PretrainModule through the real Trainer, n_streams = 1 vs n.

    python bench/throughput.py --model configs/model/tiny.yaml --n-streams 1 4 --seq-len 256 --batch-size 16
    python bench/throughput.py --model configs/model/120m.yaml --n-streams 1 4 --precision bf16-mixed --compile

Random token batches (the data pipeline is not what is measured). The first --warmup steps
(compilation, allocator warm-up) are excluded; the step time is the median of the rest.
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from llmkit.callbacks.throughput import device_description
from llmkit.data.corpus import write_json_atomic
from llmkit.model.config import ModelConfig
from llmkit.modules.pretrain import OptimConfig, PretrainModule


class RandomWindows(Dataset):
    def __init__(self, vocab_size: int, seq_len: int, n: int) -> None:
        self.tokens = torch.randint(0, vocab_size, (n, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[i, :-1], self.tokens[i, 1:]


class StepTimer(L.Callback):
    """Wall time of each optimizer step, synchronised on CUDA."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, *args) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._t0)


def measure(config: ModelConfig, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    module = PretrainModule(config, OptimConfig(warmup_steps=1), compile=args.compile)
    steps = args.warmup + args.steps
    data = DataLoader(
        RandomWindows(config.vocab_size, args.seq_len, steps * args.batch_size), batch_size=args.batch_size
    )
    timer = StepTimer()
    trainer = L.Trainer(
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
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, data)
    step = statistics.median(timer.times[args.warmup :])
    tokens = args.batch_size * args.seq_len
    return {
        "n_streams": config.n_streams,
        "params_M": module.model.num_params() / 1e6,
        "step_s": step,
        "first_step_s": timer.times[0],
        "tokens_per_s": tokens / step,
        "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="configs/model/tiny.yaml")
    p.add_argument("--n-streams", type=int, nargs="+", default=[1, 4])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="bf16-mixed" if torch.cuda.is_available() else "32-true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default="lightning_logs/bench/throughput.json")
    args = p.parse_args()

    base = ModelConfig.from_yaml(args.model)
    rows = [measure(replace(base, n_streams=n), args) for n in args.n_streams]
    device = device_description()
    print(
        f"{args.model}, seq {args.seq_len}, batch {args.batch_size}, {args.precision}, compile={args.compile}, {device}"
    )
    print(f"{'n':>3} {'params(M)':>10} {'step(s)':>9} {'tokens/s':>10} {'peak GiB':>9} {'vs n=1':>7}")
    dense = next((r for r in rows if r["n_streams"] == 1), None)
    for r in rows:
        ratio = r["step_s"] / dense["step_s"] if dense else float("nan")
        mem = f"{r['peak_mem_GiB']:.2f}" if r["peak_mem_GiB"] is not None else "-"
        cells = f"{r['params_M']:>10.2f} {r['step_s']:>9.3f} {r['tokens_per_s']:>10.0f} {mem:>9} {ratio:>7.2f}"
        print(f"{r['n_streams']:>3} {cells}")
    out = Path(args.out)
    write_json_atomic(out, {"args": vars(args), "device": device, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
