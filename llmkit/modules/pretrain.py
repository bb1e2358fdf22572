"""PretrainModule: next-token pretraining of the mHC backbone (handoff Phases 5-6, E2)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from llmkit.errors import LLMKitError
from llmkit.model.config import ModelConfig, dataclass_from_dict
from llmkit.model.transformer import Transformer


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to min_lr_ratio * lr (handoff E2).

    decay_steps: optimizer steps from 0 to the end of the cosine; None uses the Trainer's
    estimated_stepping_batches (max_steps, or epochs x batches / accumulation).
    implementation: "foreach" is safe everywhere; "fused" is faster on GPU but Lightning
    before 2.6.5 rejects it together with bf16-mixed and gradient_clip_val.
    """

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None
    implementation: Literal["foreach", "fused"] = "foreach"


class WarmupCosine:
    """LR multiplier: (s+1)/W for s < W, then 1 -> min_ratio along a half cosine until
    decay_steps, then min_ratio. A class, not a lambda, so LambdaLR can checkpoint it."""

    def __init__(self, warmup_steps: int, decay_steps: int, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.decay_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_with_schedule(model: Transformer, o: OptimConfig, trainer: L.Trainer) -> dict:
    """AdamW over ``model.param_groups`` and the warm-up + cosine LambdaLR of ``o``, stepped
    per optimizer step, in the dict ``configure_optimizers`` returns."""
    optimizer = torch.optim.AdamW(
        model.param_groups(o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, **{o.implementation: True}
    )
    decay_steps = o.decay_steps or trainer.estimated_stepping_batches
    if not math.isfinite(decay_steps):
        raise LLMKitError(
            "cannot size the cosine schedule: set trainer.max_steps, trainer.max_epochs or model.optim.decay_steps"
        )
    warmup = o.warmup_steps
    if warmup >= decay_steps:
        warmup = max(1, int(decay_steps) // 10)
        rank_zero_warn(
            f"optim.warmup_steps {o.warmup_steps} >= decay_steps {decay_steps}: warming up over {warmup} steps instead"
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, int(decay_steps), o.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def as_dataclass(cls: type, value: Any) -> Any:
    """Accept a dataclass instance or its dict (as stored in checkpoint hyperparameters)."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        return dataclass_from_dict(cls, value, cls.__name__)
    return value


class PretrainModule(L.LightningModule):
    """Causal-LM pretraining: cross-entropy on (x, y) windows from PackedDataModule.

    Logs train/loss, train/lr, train/tokens, val/loss and val/ppl to the Trainer's logger;
    add ``llmkit.callbacks.TokenThroughput`` for tokens/s and MFU. Hyperparameters are
    stored as plain dicts, so a checkpoint alone rebuilds the model and loads with
    ``torch.load(weights_only=True)``.

    Args:
        config: the backbone (see configs/model/*.yaml).
        optim: AdamW and learning-rate schedule.
        compile: torch.compile each transformer block (GPU runs).
    """

    def __init__(
        self,
        config: ModelConfig | None = None,
        optim: OptimConfig | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        config, optim = as_dataclass(ModelConfig, config), as_dataclass(OptimConfig, optim)
        optim.betas = tuple(optim.betas)
        self.save_hyperparameters(
            {"config": config.to_dict(), "optim": asdict(optim), "compile": compile}
        )
        self.config = config
        self.optim = optim
        self.compile_blocks = compile
        self.model = Transformer(config)
        self.val_loss = MeanMetric()
        self.tokens_seen = 0
        self.flops_per_batch: float | None = None  # read by ThroughputMonitor

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def configure_model(self) -> None:
        if self.compile_blocks:
            for block in self.model.blocks:
                block.compile()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.model.loss(x, y)
        if not torch.isfinite(loss):
            raise LLMKitError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); lower optim.lr, set "
                f"trainer.gradient_clip_val, or resume from the last good checkpoint"
            )
        self.tokens_seen += x.numel() * self.trainer.world_size
        self.flops_per_batch = self.model.flops_per_token(x.size(1)) * x.numel()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_loss.reset()  # fresh state in this loop's grad/inference mode

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_loss.update(self.model.loss(x, y), weight=y.numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))

    def configure_optimizers(self) -> dict:
        return adamw_with_schedule(self.model, self.optim, self.trainer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
