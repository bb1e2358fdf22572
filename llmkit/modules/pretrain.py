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
    implementation: "foreach" or "fused" (one kernel for the whole update; the GPU configs use
    it). Lightning's mixed-precision plugin refuses to clip gradients for a fused optimizer even
    in bf16, where there is no loss scaler; PretrainModule clips them itself in that case.
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


def clip_grad_norm(module: L.LightningModule, optimizer: Any, max_norm: float) -> None:
    """Scale ``module``'s gradients so their global L2 norm is at most ``max_norm``.

    Goes through Lightning (``module.clip_gradients``: loss-scaler unscaling, FSDP) except for a
    fused optimizer under bf16-mixed: a fused AdamW unscales inside its step, so Lightning's
    mixed-precision plugin refuses to clip for it, although only an fp16 loss scaler needs that;
    bf16 has none, so the gradients are clipped directly."""
    inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the torch one
    if getattr(inner, "_step_supports_amp_scaling", False) and module.trainer.precision == "bf16-mixed":
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)
    else:
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


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
            self.model.compile_blocks()

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

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """``trainer.gradient_clip_val`` by global norm through :func:`clip_grad_norm` (which
        accepts a fused AdamW under bf16-mixed); clipping by value goes to Lightning."""
        if gradient_clip_val and gradient_clip_algorithm != "value":
            clip_grad_norm(self, optimizer, gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
