"""What a run says on the console: where its logs and checkpoints go, the decisions it takes and
its final metrics, in a few lines; not the advertising or known-harmless warnings of the libraries
underneath.

:class:`RunSummary` (``llmkit`` commands add it, in the place of Lightning's module table) prints
the log directory, the model's sizes and parameter counts and the attention kernel when fit
starts, and the final step and metrics when it ends. The gate's decisions, TTT-Discover's per-step
rewards and failures, and the checkpoint paths are printed by their own callbacks and modules.
:func:`quiet_known_noise` filters Lightning's product tips and warnings that are known to be harmless here,
and prints llmkit's own warnings as one line, without the file and source line Python adds.
:func:`step_progress_bar` is Lightning's progress bar counting toward ``max_steps`` with a true
total after a resume: Lightning's compares the batch index since the start of the epoch with the
steps that remain ("40/9" when resuming step 30 of 40), and writes "Epoch 0/-2" when only
``max_steps`` bounds the run.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

from llmkit.callbacks.interfaces import HasBackbone, satisfies
from llmkit.errors import format_warning
from llmkit.model.attention_backends import resolve_backend

SUMMARY_METRICS = ("val/loss", "val/ppl", "val/divergence", "val/probe_accuracy", "train/loss", "train/divergence",
                   "train/policy_loss", "ttt/best_reward")
"""The metrics the final line reports, those a run has."""

HARMLESS_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's pytree use with torch >= 2.10
    r".*does not have many workers.*",  # in-memory and memory-mapped data need no worker processes
    r".*callbacks used to create the checkpoint need to be provided",  # validate --ckpt_path: weights are enough
    r"Using ModelCheckpoint with manual optimization",  # the state after step S is the one a resume needs
)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


def quiet_known_noise() -> None:
    """Drop Lightning's "Tip:" adverts and the warnings in :data:`HARMLESS_WARNINGS` for this process,
    and print llmkit's own warnings in one line."""
    warnings.formatwarning = format_warning
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


_PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype attention computes in under Lightning's ``precision`` ("bf16-mixed" -> bfloat16)."""
    return _PRECISION_DTYPES.get(str(precision).split("-")[0], torch.float32)


def _value(value: Any) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)


def _print_log_dir(trainer: L.Trainer) -> None:
    if trainer.loggers and trainer.log_dir:
        rank_zero_info(f"logs: {trainer.log_dir} (tensorboard --logdir {trainer.log_dir})")


class RunSummary(L.Callback):
    """Prints where the logs go, the model in one line and which attention kernel runs when fit
    starts (an unavailable ``attention_backend`` fails here, before the first step), and the step
    and metrics when it ends; where the logs go when a ``validate`` run starts."""

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":  # not fit's validations
            _print_log_dir(trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _print_log_dir(trainer)
        if satisfies(pl_module, HasBackbone):
            asked, dtype = pl_module.model.config.attention_backend, compute_dtype(trainer.precision)
            chosen = resolve_backend(asked, pl_module.device.type, dtype)
            rank_zero_info(f"model: {pl_module.model.summary()}")
            rank_zero_info(f"attention: {chosen} (attention_backend {asked}, {pl_module.device.type} "
                           f"{str(dtype).removeprefix('torch.')})")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        shown = ", ".join(f"{k} {_value(metrics[k]):.4g}" for k in SUMMARY_METRICS if k in metrics)
        batches = trainer.fit_loop.total_batch_idx + 1
        where = f"step {trainer.global_step}" if trainer.global_step else f"{batches} batches, no optimizer step"
        rank_zero_info(f"fit finished at {where}" + (f": {shown}" if shown else ""))


class _StepTotal:
    """Mixin: the training bar's total is the batch index this epoch ends at."""

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0 or trainer.max_epochs not in (None, -1):
            return trainer.num_training_batches
        remaining = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
        epochs = trainer.fit_loop.epoch_progress.current
        # batches begun this epoch (on resume too); none in on_train_epoch_start, where the counter, reset
        # after it, still holds the previous epoch's (a resume mid-epoch runs no on_train_epoch_start)
        done = 0 if epochs.ready > epochs.started else trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if trainer.fit_loop._should_accumulate():  # the micro-batches begun of the step under way are in both
            remaining -= done % trainer.accumulate_grad_batches
        return min(trainer.num_training_batches, done + remaining)


class RichStepProgressBar(_StepTotal, RichProgressBar):
    """Lightning's rich bar with :class:`_StepTotal`, and no "Epoch 0/-2" for a run bounded by steps."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs in (None, -1):
            return f"Epoch {current_epoch:<{len(self.validation_description) - len('Epoch ')}}"
        return super()._get_train_description(current_epoch)


class TQDMStepProgressBar(_StepTotal, TQDMProgressBar):
    """Lightning's tqdm bar with :class:`_StepTotal`, and a total after a resume mid-epoch."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """A resume mid-epoch runs no ``on_train_epoch_start``, where Lightning's bar takes its total: it
        counted the resumed epoch without one (no ETA), as the rich bar does not (it adds its task here)."""
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and bar.total is None and self.total_train_batches != float("inf"):
            bar.total = self.total_train_batches
            bar.n = bar.initial = batch_idx  # the batches before the resume: no part of this process's rate
            bar.set_description(f"Epoch {trainer.current_epoch}")
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def step_progress_bar(default: ProgressBar | None) -> ProgressBar | None:
    """The step-counting bar to use instead of ``default``, Lightning's bar with its settings (None when
    the bar is off or is the user's own class). The rich bar's metrics show 4 significant digits
    unless the theme sets a format: Lightning's ".3f" shows a learning rate of 3e-4 as 0.000."""
    if type(default) is RichProgressBar and _RICH_AVAILABLE:
        theme = default.theme
        if theme.metrics_format == RichProgressBarTheme.metrics_format:
            theme = dataclasses.replace(theme, metrics_format=".4g")
        return RichStepProgressBar(default.refresh_rate, default._leave, theme, default._console_kwargs)
    if type(default) is TQDMProgressBar:
        return TQDMStepProgressBar(default.refresh_rate, default.process_position, default._leave)
    return None


def use_step_progress_bar(trainer: L.Trainer) -> None:
    """Put :func:`step_progress_bar` in the place of ``trainer``'s bar, where there is one to replace."""
    default = trainer.progress_bar_callback
    bar = step_progress_bar(default)
    if bar is not None:
        trainer.callbacks[trainer.callbacks.index(default)] = bar
