"""A scaling sweep: a grid of model sizes x token budgets, each run's logs ready for `llmkit scaling fit`.

    python -m bench.sweep                                 # 2 widths x 2 depths x 3 budgets, CPU, minutes
    llmkit scaling fit --runs lightning_logs/bench/sweep/runs --plot sweep.png
    python -m bench.sweep --d-models 256 512 --n-layers 4 8 --tokens 5_000_000 20_000_000 \
        --seq-len 512 --batch-size 32 --vocab-size 8192 --source site-packages --max-files 5000   # one GPU

Every run trains a model of the tiny family (4 heads, SwiGLU of 2.75 d, ``--n-streams``
residual streams, context = ``--seq-len``) through the real PretrainModule, PackedDataModule and
Trainer on the same corpus shards, with one seed, for its token budget, and validates once, at
its last step, on the fixed validation windows. Its TensorBoard logs go to
``WORK/runs/d{D}_l{L}_n{STREAMS}_t{TOKENS}/version_0`` (a rerun of the same run replaces them):
``val/loss``, ``train/tokens`` and hparams.yaml, which is what ``llmkit scaling fit`` reads.
Prints a table (non-embedding parameters, tokens, FLOPs, final val/loss, time) and writes JSON
(--out).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from llmkit.data.datamodule import PackedDataModule
from llmkit.data.pipeline import CorpusShards, build_corpus_shards
from llmkit.io import write_json_atomic
from llmkit.model.config import ModelConfig
from llmkit.modules.pretrain import PretrainModule
from llmkit.optim import OptimConfig
from llmkit.profiling import device_description

N_HEADS = 4
FF_RATIO = 2.75  # d_ff / d_model of configs/model/tiny.yaml (704 / 256)


def model_config(d_model: int, n_layers: int, args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    """A member of the tiny family: width and depth from the grid, the rest from the arguments."""
    return ModelConfig(vocab_size=vocab_size, n_layers=n_layers, d_model=d_model, n_heads=N_HEADS,
                       d_ff=int(FF_RATIO * d_model), max_seq_len=args.seq_len, n_streams=args.n_streams)


def train_run(d_model: int, n_layers: int, tokens: int, args: argparse.Namespace, shards: CorpusShards) -> dict:
    """Train one grid point for ``tokens`` tokens, validate at its last step, and report it."""
    config = model_config(d_model, n_layers, args, shards.vocab_size)
    steps = max(1, tokens // (args.batch_size * args.seq_len))
    name = f"d{d_model}_l{n_layers}_n{args.n_streams}_t{tokens}"
    run_dir = Path(args.work) / "runs" / name / "version_0"
    shutil.rmtree(run_dir, ignore_errors=True)  # one run per name: a rerun replaces it, never adds to it
    L.seed_everything(args.seed, verbose=False)
    module = PretrainModule(config, OptimConfig(lr=args.lr, warmup_steps=max(1, steps // 20)))
    data = PackedDataModule(
        train_files=[str(shards.train)], val_files=[str(shards.val)], seq_len=args.seq_len,
        batch_size=args.batch_size, val_windows=args.val_windows, seed=args.seed, num_workers=args.num_workers,
        vocab_size=config.vocab_size,
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="auto",
        devices=1,
        precision=args.precision,
        gradient_clip_val=1.0,
        logger=TensorBoardLogger(Path(args.work) / "runs", name=name, version=0, default_hp_metric=False),
        val_check_interval=steps,  # validate once, after the last step
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=args.progress,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    trained = steps * args.batch_size * args.seq_len
    return {
        "run": str(run_dir),
        "d_model": d_model,
        "n_layers": n_layers,
        "n_streams": args.n_streams,
        "params": module.model.num_params(non_embedding=True),
        "tokens": trained,
        "flops": module.model.flops_per_token(args.seq_len) * trained,
        "val_loss": float(trainer.callback_metrics["val/loss"]),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-models", type=int, nargs="+", default=[64, 128], help="model widths")
    p.add_argument("--n-layers", type=int, nargs="+", default=[2, 4], help="model depths")
    p.add_argument("--tokens", type=int, nargs="+", default=[16_384, 49_152, 147_456],
                   help="training tokens per run (rounded down to whole batches)")
    p.add_argument("--n-streams", type=int, default=4, help="residual streams (1: the plain residual)")
    p.add_argument("--seq-len", type=int, default=64, help="training window, and the models' context")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0, help="the data order and initialisation of every run")
    p.add_argument("--source", default="stdlib", choices=["stdlib", "site-packages"])
    p.add_argument("--max-files", type=int, default=300)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--val-windows", type=int, default=128, help="fixed validation windows per run")
    p.add_argument("--precision", default="bf16-mixed" if torch.cuda.is_available() else "32-true")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    p.add_argument("--work", default="lightning_logs/bench/sweep", help="data cache, run logs (WORK/runs)")
    p.add_argument("--out", default=None, help="JSON results (default WORK/sweep.json)")
    args = p.parse_args(argv)

    shards = build_corpus_shards(Path(args.work), args.source, args.vocab_size, args.max_files)
    rows = []
    for d_model in args.d_models:
        for n_layers in args.n_layers:
            for tokens in args.tokens:
                rows.append(train_run(d_model, n_layers, tokens, args, shards))
                r = rows[-1]
                print(f"  d{d_model} l{n_layers} {r['tokens']:,} tokens: val loss {r['val_loss']:.4f} "
                      f"({r['seconds']:.1f} s)")
    device = device_description()
    print(
        f"\n{args.source} corpus ({shards.train_tokens:,} train / {shards.val_tokens:,} val tokens, vocab "
        f"{shards.vocab_size}), n_streams {args.n_streams}, seq {args.seq_len}, batch {args.batch_size}, "
        f"lr {args.lr}, seed {args.seed}, {device}"
    )
    print(f"{'d_model':>7} {'layers':>6} {'params':>9} {'tokens':>10} {'FLOPs':>10} {'val loss':>9} {'seconds':>8}")
    for r in rows:
        print(f"{r['d_model']:>7} {r['n_layers']:>6} {r['params']:>9,} {r['tokens']:>10,} {r['flops']:>10.3g} "
              f"{r['val_loss']:>9.4f} {r['seconds']:>8.1f}")
    out = Path(args.out or Path(args.work) / "sweep.json")
    write_json_atomic(out, {"args": vars(args), "device": device, "runs": rows})
    print(f"wrote {out}\nnext: llmkit scaling fit --runs {Path(args.work) / 'runs'}")
    return rows


if __name__ == "__main__":
    main()
