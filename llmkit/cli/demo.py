"""`llmkit demo`: the whole pretraining pipeline on the embedded corpus, sized for a CPU.

stdlib corpus -> SentencePiece tokenizer (small vocab, case and whitespace kept) -> packed
train/val shards -> pretrain the `tiny` mHC model -> validate -> sample from the checkpoint.
Prints the val loss before and after training and where the TensorBoard logs are. Lightning
and torch load when the demo runs, not when the module loads, so ``--help`` is instant.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from llmkit.errors import LLMKitError
from llmkit.io import atomic_file

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class DemoConfig:
    """What ``llmkit demo`` runs (each field is a flag).

    Attributes:
        out: where corpus, tokenizer, shards and the checkpoint (OUT/checkpoints/last.ckpt) go.
        log_dir: TensorBoard logs go to LOG_DIR/demo/version_N.
        model: the model YAML (in an llmkit checkout: configs/model/tiny.yaml).
        max_files: use only the first N stdlib files (default: all of them).
        vocab_size: tokenizer vocabulary.
        seq_len: tokens per training window (at most the model's max_seq_len).
        batch_size: windows per step.
        max_steps: optimizer steps.
        lr: peak learning rate.
        warmup_steps: linear warm-up steps.
        val_windows: validation windows.
        seed: seeds data order, initialisation and the sample.
        prompt: text the sample continues.
        max_new_tokens: tokens sampled after the prompt.
    """

    out: Path = Path("lightning_logs/demo")
    log_dir: Path = Path("lightning_logs")
    model: Path = REPO_CONFIGS / "model" / "tiny.yaml"
    max_files: int | None = None
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    max_steps: int = 200
    lr: float = 2e-3
    warmup_steps: int = 40
    val_windows: int = 64
    seed: int = 1234
    prompt: str = "def "
    max_new_tokens: int = 64


def run_demo(cfg: DemoConfig) -> dict:
    """Run the pipeline; returns the val losses, timings, artifact paths and the last MHCMonitor statistics."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from llmkit.callbacks import AtomicCheckpointIO, Checkpoint, MHCMonitor, TokenThroughput
    from llmkit.callbacks.console import quiet_known_noise, use_step_progress_bar
    from llmkit.data.datamodule import PackedDataModule
    from llmkit.data.pipeline import build_corpus_shards
    from llmkit.data.tokenizer import Tokenizer
    from llmkit.model.checkpoint import load_backbone
    from llmkit.model.config import ModelConfig
    from llmkit.model.generation import SamplingConfig, generate
    from llmkit.modules.pretrain import PretrainModule
    from llmkit.optim import OptimConfig

    if not cfg.model.is_file():
        raise LLMKitError(
            f"model config {cfg.model} not found: run the demo from an llmkit checkout or pass "
            "--model path/to/tiny.yaml"
        )
    quiet_known_noise()
    start = time.perf_counter()
    L.seed_everything(cfg.seed, verbose=False)
    out = Path(cfg.out)
    print("[1-3/5] corpus, tokenizer, shards")
    data_files = build_corpus_shards(out, "stdlib", cfg.vocab_size, cfg.max_files, log=lambda m: print("      " + m))
    tok_path = data_files.tokenizer

    model_cfg = replace(ModelConfig.from_yaml(cfg.model), vocab_size=data_files.vocab_size)
    seq_len = min(cfg.seq_len, model_cfg.max_seq_len)
    module = PretrainModule(
        model_cfg, OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, weight_decay=0.1)
    )
    data = PackedDataModule(
        train_files=[str(data_files.train)],
        val_files=[str(data_files.val)],
        seq_len=seq_len,
        batch_size=cfg.batch_size,
        val_windows=cfg.val_windows,
        seed=cfg.seed,
        vocab_size=model_cfg.vocab_size,
    )
    logger = TensorBoardLogger(cfg.log_dir, name="demo", default_hp_metric=False)
    run_ckpt = Path(logger.log_dir) / "checkpoints" / "last.ckpt"  # the run's; at its end it becomes the demo's
    monitor = MHCMonitor(every_n_steps=max(1, cfg.max_steps // 10))  # H_res in TensorBoard, ten times a run
    trainer = L.Trainer(
        max_steps=cfg.max_steps,
        accelerator="auto",
        devices=1,
        precision="bf16-mixed" if torch.cuda.is_available() else "32-true",
        gradient_clip_val=1.0,
        logger=logger,
        callbacks=[TokenThroughput(), monitor, Checkpoint(dirpath=run_ckpt.parent, save_top_k=0)],
        plugins=[AtomicCheckpointIO()],
        val_check_interval=max(1, cfg.max_steps // 4),
        check_val_every_n_epoch=None,
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    use_step_progress_bar(trainer)
    module.configure_model()  # the Trainer would build it later; the parameter count is printed now
    n_params = module.model.num_params()
    print(f"[4/5] pretrain: {cfg.model.stem} model, {n_params / 1e6:.1f}M params, n_streams {model_cfg.n_streams}, "
          f"{cfg.max_steps} steps of {cfg.batch_size}x{seq_len} tokens")
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    train_start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_seconds = time.perf_counter() - train_start
    after = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    if not run_ckpt.is_file():
        raise LLMKitError(f"training finished but no checkpoint was written to {run_ckpt}")
    ckpt = out / "checkpoints" / "last.ckpt"  # where configs/{sdft,sft,ttt} look for it: replaced once a run
    ckpt.parent.mkdir(parents=True, exist_ok=True)  # finishes (an interrupted rerun saved a partial one over it)
    with atomic_file(ckpt) as tmp:
        shutil.copyfile(run_ckpt, tmp)
    run_ckpt.unlink()
    with contextlib.suppress(OSError):  # the run's checkpoint directory, left empty (a user's file stays)
        run_ckpt.parent.rmdir()

    print(f"[5/5] sample from {ckpt} (the run's {run_ckpt}, moved)")
    tokenizer = Tokenizer(tok_path)
    model = load_backbone(ckpt)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.8, top_k=50, seed=cfg.seed)
    out = generate(model, [tokenizer.encode(cfg.prompt)], sampling, tokenizer.stop_ids, tokenizer.pad_id)
    text = cfg.prompt + tokenizer.decode(out.tokens[0][out.mask[0]].tolist())
    result = {
        "val_loss_before": before,
        "val_loss_after": after,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "checkpoint": str(ckpt),
        "tokenizer": str(tok_path),
        "log_dir": logger.log_dir,
        "sample": text,
        "mhc": monitor.last_stats,
    }
    print("-" * 60)
    print(text)
    print("-" * 60)
    print(f"val loss (nats/token): {before:.3f} before -> {after:.3f} after "
          f"{cfg.max_steps} steps ({train_seconds:.0f} s of training, {result['total_seconds']:.0f} s total)")
    if monitor.last_stats:
        print(f"mHC residual across the depth at step {monitor.last_step}: gain "
              f"{monitor.last_stats['mhc/composite/fwd_gain']:.3f} forward, "
              f"{monitor.last_stats['mhc/composite/bwd_gain']:.3f} backward (doubly stochastic H_res keeps both "
              f"near 1; TensorBoard shows every sublayer under mhc/)")
    print(f"checkpoint: {ckpt}")
    print(f"TensorBoard: tensorboard --logdir {logger.log_dir}")
    return result


def demo(config: DemoConfig) -> int:
    """The whole pipeline on the stdlib corpus, CPU-sized.

    Args:
        config: what to run (one flag per field).
    """
    run_demo(config)
    return 0
