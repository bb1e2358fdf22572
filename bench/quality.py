"""Does mHC learn better here? Does Muon, MoE, MLA? Equal-token pretraining of backbone variants
and optimizers, several seeds.

    python -m bench.quality                                   # tiny model, stdlib corpus, CPU-sized
    python -m bench.quality --variants dense n4_split --optimizers adamw muon   # AdamW vs Muon
    python -m bench.quality --variants dense moe mla n4_split moe_n4 mla_n4      # MoE and MLA, +- mHC
    python -m bench.quality --model configs/model/120m.yaml --source site-packages \
        --tokens 50_000_000 --seq-len 1024 --batch-size 16 --lr 6e-4 --seeds 0 1   # one GPU

Every variant trains through the real PretrainModule and Trainer on the same shards, for the
same number of tokens, with the same data order per seed (the DataModule's windows and their
order depend only on the seed) and the same model initialisation seed. The final validation
loss is measured over every fixed validation window, and converted to bits per byte of raw
text with the val shard's bytes-per-token ratio, so tokenizers of different vocabularies
compare. Prints a table with the mean and seed spread (sample standard deviation) and writes
JSON (--out).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from bench.models import MODEL_HELP, model_name, model_yaml
from llmkit.callbacks import MHCMonitor
from llmkit.data.datamodule import PackedDataModule
from llmkit.data.packing import open_shard
from llmkit.data.pipeline import build_corpus_shards
from llmkit.data.tokenizer import Tokenizer
from llmkit.io import write_json_atomic
from llmkit.model.config import ModelConfig
from llmkit.modules.pretrain import PretrainModule
from llmkit.optim import OptimConfig
from llmkit.profiling import device_description

MOE = {"n_experts": 8, "n_shared": 1, "top_k": 3, "expert_dim": 176}
"""The MoE of configs/model/moe_tiny.yaml: 3 routed + 1 shared experts of width 176 per token, the
active width of the tiny model's dense d_ff 704 (equal active compute), 9 experts' parameters."""
MLA = {"kv_lora_rank": 128, "q_lora_rank": None, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64}
"""Latent attention for the tiny model's 4 heads of 64: 160 cached numbers per token and layer
where its attention caches 512."""

VARIANTS = {  # name -> ModelConfig fields over --model's
    "dense": {"n_streams": 1},
    "n4_split": {"n_streams": 4, "mhc": {"post_init": "split"}},
    "n4_copy": {"n_streams": 4, "mhc": {"post_init": "copy"}},
    "n2_split": {"n_streams": 2, "mhc": {"post_init": "split"}},
    "n2_copy": {"n_streams": 2, "mhc": {"post_init": "copy"}},
    "moe": {"n_streams": 1, "moe": MOE},
    "moe_n4": {"n_streams": 4, "mhc": {"post_init": "split"}, "moe": MOE},
    "mla": {"n_streams": 1, "attention": "mla", "mla": MLA},
    "mla_n4": {"n_streams": 4, "mhc": {"post_init": "split"}, "attention": "mla", "mla": MLA},
}


def variant_config(base: ModelConfig, name: str, vocab_size: int) -> ModelConfig:
    """``base`` with variant ``name``'s fields (nested ones merged) and the shards' vocabulary."""
    values = base.to_dict()
    for key, value in VARIANTS[name].items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    return ModelConfig.from_dict({**values, "vocab_size": vocab_size})


def bytes_per_token(val_bin: Path, tokenizer: Tokenizer) -> float:
    """UTF-8 bytes of the decoded val text per val token (EOS tokens decode to nothing)."""
    tokens, _ = open_shard(val_bin)
    text = tokenizer.decode(np.asarray(tokens).tolist())
    return len(text.encode("utf-8")) / len(tokens)


def train_variant(name: str, seed: int, base: ModelConfig, args: argparse.Namespace, shards, optimizer: str = "adamw"
                  ) -> dict:
    config = variant_config(base, name, shards.vocab_size)
    n_streams = config.n_streams
    torch._dynamo.reset()  # each variant's block graphs count towards dynamo's recompile limit (docs/performance.md)
    steps = max(1, args.tokens // (args.batch_size * args.seq_len))
    L.seed_everything(seed, verbose=False)
    optim = OptimConfig(name=optimizer, lr=args.lr, muon_lr=args.muon_lr, warmup_steps=max(1, steps // 20))
    module = PretrainModule(config, optim, compile=args.compile)
    data = PackedDataModule(
        train_files=[str(shards.train)],
        val_files=[str(shards.val)],
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        val_windows=None,
        seed=seed,
        num_workers=args.num_workers,
        vocab_size=config.vocab_size,
    )
    callbacks = [MHCMonitor(every_n_steps=max(1, steps // 20))] if n_streams > 1 else []
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="auto",
        devices=1,
        precision=args.precision,
        gradient_clip_val=1.0,
        logger=TensorBoardLogger(Path(args.work) / "tb", name=f"{name}_{optimizer}_seed{seed}"),
        callbacks=callbacks,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=args.progress,
        log_every_n_steps=max(1, steps // 50),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    val_trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        precision=args.precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    val_loss = val_trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    return {
        "variant": name,
        "optimizer": optimizer,
        "seed": seed,
        "params": module.model.num_params(),
        "active_params": module.model.active_params(),
        "tokens": steps * args.batch_size * args.seq_len,
        "val_loss": val_loss,
        "train_seconds": seconds,
        "tokens_per_s": steps * args.batch_size * args.seq_len / seconds,
    }


def summarise(runs: list[dict], bytes_per_tok: float) -> list[dict]:
    rows = []
    for name, optimizer in dict.fromkeys((r["variant"], r["optimizer"]) for r in runs):
        mine = [r for r in runs if (r["variant"], r["optimizer"]) == (name, optimizer)]
        losses = [r["val_loss"] for r in mine]
        bpb = [loss / math.log(2) / bytes_per_tok for loss in losses]
        rows.append(
            {
                "variant": name,
                "optimizer": optimizer,
                "params": mine[0]["params"],
                "active_params": mine[0]["active_params"],
                "tokens": mine[0]["tokens"],
                "seeds": len(mine),
                "val_loss_mean": statistics.mean(losses),
                "val_loss_std": statistics.stdev(losses) if len(mine) > 1 else None,  # one seed: no spread
                "bpb_mean": statistics.mean(bpb),
                "bpb_std": statistics.stdev(bpb) if len(mine) > 1 else None,
                "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in mine),
            }
        )
    return rows


def mean_std(mean: float, std: float | None) -> str:
    """``mean ± std``, or the mean alone where one seed gives no spread."""
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", type=model_name, help=MODEL_HELP)
    p.add_argument("--variants", nargs="+", default=["dense", "n4_split", "n4_copy"], choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--tokens", type=int, default=800_000, help="training tokens per run")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW's peak LR")
    p.add_argument("--optimizers", nargs="+", default=["adamw"], choices=["adamw", "muon"],
                   help="each variant is trained with each (muon: Muon on the hidden matrices, AdamW on the rest)")
    p.add_argument("--muon-lr", type=float, default=0.02, help="Muon's peak LR")
    p.add_argument("--source", default="stdlib", choices=["stdlib", "site-packages"])
    p.add_argument("--max-files", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--precision", default="bf16-mixed" if torch.cuda.is_available() else "32-true")
    p.add_argument("--compile", action="store_true", help="compile each block")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    p.add_argument("--work", default="lightning_logs/bench/quality", help="data cache, TensorBoard logs")
    p.add_argument("--out", default=None, help="JSON results (default WORK/quality.json)")
    args = p.parse_args(argv)

    shards = build_corpus_shards(Path(args.work), args.source, args.vocab_size, args.max_files)
    bpt = bytes_per_token(shards.val, Tokenizer(shards.tokenizer))
    base = ModelConfig.from_yaml(model_yaml(args.model))
    runs = []
    for seed in args.seeds:
        for name in args.variants:
            for optimizer in args.optimizers:
                runs.append(train_variant(name, seed, base, args, shards, optimizer))
                r = runs[-1]
                print(f"  {name} {optimizer} seed {seed}: val loss {r['val_loss']:.4f} ({r['tokens_per_s']:.0f} tok/s)")
    rows = summarise(runs, bpt)
    device = device_description()
    print(
        f"\n{args.model}, {args.source} corpus ({shards.train_tokens:,} train / {shards.val_tokens:,} val tokens, "
        f"{bpt:.2f} bytes/token), seq {args.seq_len}, batch {args.batch_size}, lr {args.lr}, seeds {args.seeds}, "
        f"{device}"
    )
    print(f"{'variant':<12} {'optimizer':<9} {'params':>8} {'active':>8} {'tokens':>11} {'val loss (nats/tok)':>21} "
          f"{'bits/byte':>17} {'tok/s':>8}")
    for r in rows:
        print(
            f"{r['variant']:<12} {r['optimizer']:<9} {r['params'] / 1e6:>7.2f}M {r['active_params'] / 1e6:>7.2f}M "
            f"{r['tokens']:>11,} "
            f"{mean_std(r['val_loss_mean'], r['val_loss_std']):>21} {mean_std(r['bpb_mean'], r['bpb_std']):>17} "
            f"{r['tokens_per_s']:>8.0f}"
        )
    out = Path(args.out or Path(args.work) / "quality.json")
    report = {"args": vars(args), "device": device, "bytes_per_token": bpt, "runs": runs, "summary": rows}
    write_json_atomic(out, report)
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
