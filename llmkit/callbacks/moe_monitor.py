"""MoEMonitor: how a mixture-of-experts backbone spreads its tokens, per layer, in TensorBoard.

The training modules already log the step's balance averaged over the layers (``moe/load_std``,
``moe/max_min_load``, ``moe/aux_loss``; llmkit.model.moe.end_of_step). Every ``every_n_steps``
optimizer steps this callback adds, for each block i with an MoE layer (i counts every block,
so with ``moe.first_dense: 1`` the first is ``L1``):

- ``moe/L{i}/load_std`` and ``moe/L{i}/max_min_load``: the spread of the experts' shares of the
  step's (token, expert) assignments and the most over the least loaded expert;
- ``moe/L{i}/utilization``: a TensorBoard histogram with one bin per expert holding its
  assignments, so the Histograms tab shows each layer's expert load drifting over training.

It reads the counts the routers kept during the step: nothing is recomputed.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from llmkit.callbacks.interfaces import HasBackbone, require
from llmkit.model.moe import load_balance_std, max_min_load


class MoEMonitor(L.Callback):
    """Per-layer expert load every ``every_n_steps`` optimizer steps (see the module docstring)."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps
        self.last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            require(self, pl_module, HasBackbone, "(the backbone whose routers it reads)")

    def state_dict(self) -> dict[str, int]:
        return {"last_step": self.last_step}  # a run resumed inside an accumulation window logged its step again

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.last_step = state_dict["last_step"]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step - 1  # the optimizer step this batch completed, if it completed one
        if step <= self.last_step or step % self.every_n_steps or not trainer.is_global_zero:
            return
        self.last_step = step
        metrics = {}
        for i, block in enumerate(pl_module.model.blocks):
            if not block.uses_moe:
                continue
            router = block.mlp.router
            counts = router.load if bool(router.load.any()) else router.last_load  # before or after end_of_step
            metrics[f"moe/L{i}/load_std"] = float(load_balance_std(counts))
            metrics[f"moe/L{i}/max_min_load"] = float(max_min_load(counts))
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    write_histogram(logger, f"moe/L{i}/utilization", counts, step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def write_histogram(logger: TensorBoardLogger, tag: str, counts: torch.Tensor, step: int) -> None:
    """A histogram of expert ids with one bin per expert whose height is its count."""
    counts = counts.detach().double().cpu()
    ids = torch.arange(len(counts), dtype=torch.float64)
    logger.experiment.add_histogram_raw(
        tag, min=0.0, max=float(len(counts) - 1), num=float(counts.sum()), sum=float((ids * counts).sum()),
        sum_squares=float((ids.square() * counts).sum()), bucket_limits=(ids + 0.5).tolist(),
        bucket_counts=counts.tolist(), global_step=step,
    )
