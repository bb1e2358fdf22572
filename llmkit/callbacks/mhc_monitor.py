"""MHCMonitor: stability of the mHC residual mappings during training, in TensorBoard.

Every ``every_n_steps`` training steps it runs the backbone, without gradients and eagerly, on
a sample of tokens (the first ``max_tokens`` positions of the batch's first row), reads every
``MHCMapping``'s output through forward hooks that exist only during that small forward, and
logs:

- per sublayer (``mhc/L{i}.attn/...``, ``mhc/L{i}.mlp/...``): the mean deviation of H_res row
  sums and column sums from 1 (``row_dev``, ``col_dev``: how doubly stochastic Sinkhorn left
  it), and the mean entries of H_pre and H_post (``h_pre``, ``h_post``);
- for the composite residual map across the whole depth, M = H_res^(2L) ... H_res^(1) per
  token, the mHC paper's "Amax gain magnitude": forward gain max_i sum_j |M_ij| (the largest
  factor a signal can grow by on the residual path) and backward gain max_j sum_i |M_ij|
  (the same for gradients), maximised over the sampled tokens (``mhc/composite/fwd_gain``,
  ``mhc/composite/bwd_gain``). A doubly-stochastic product has both equal to 1.

Hooks inside the training forward would be traced into compiled blocks (a graph break under
activation checkpointing, which silently runs the block eagerly); the separate forward, under
``torch.compiler.set_stance("force_eager")``, keeps the compiled training step untouched and
costs one forward of ``max_tokens`` tokens per ``every_n_steps`` steps. It reads the mappings
of the weights after that step's update. Batches are (x, y) token windows (PretrainModule).
Under DDP rank 0 reads and logs its own batch; under FSDP every rank runs that forward through
the root FSDP module (each gathers the shards with the others) and rank 0 logs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.distributed.fsdp import FullyShardedDataParallel

from llmkit.callbacks.interfaces import HasBackbone, require
from llmkit.errors import LLMKitError
from llmkit.eval.mode import eval_mode
from llmkit.model.mhc import Entry, MHCMapping

WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
"""Module-name parts that FSDP and activation-checkpoint wrappers insert between a block and its sublayers."""


def mhc_stats(mappings: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Statistics of mappings given in depth order as (name, H_pre [N, n], H_post [N, n],
    H_res [N, n, n]) for the same N sampled tokens (docs/math.md, "Stability statistics"): per
    mapping the mean |sum_j H_res,ij - 1| (row_dev) and |sum_i H_res,ij - 1| (col_dev) and the means
    of H_pre and H_post; for the composite M = H_res^(L) ... H_res^(1) of all of them, the Amax gains
    max over tokens of max_i sum_j |M_ij| (fwd_gain) and of max_j sum_i |M_ij| (bwd_gain)."""
    stats: dict[str, float] = {}
    composite = None
    for name, h_pre, h_post, h_res in mappings:
        h_res = h_res.double()
        stats[f"mhc/{name}/row_dev"] = (h_res.sum(-1) - 1).abs().mean().item()
        stats[f"mhc/{name}/col_dev"] = (h_res.sum(-2) - 1).abs().mean().item()
        stats[f"mhc/{name}/h_pre"] = h_pre.double().mean().item()
        stats[f"mhc/{name}/h_post"] = h_post.double().mean().item()
        composite = h_res if composite is None else h_res @ composite  # apply this layer after the earlier ones
    if composite is not None:
        stats["mhc/composite/fwd_gain"] = composite.abs().sum(-1).amax().item()
        stats["mhc/composite/bwd_gain"] = composite.abs().sum(-2).amax().item()
    return stats


class MHCMonitor(L.Callback):
    """Logs :func:`mhc_stats` every ``every_n_steps`` optimizer steps (see module docstring)."""

    def __init__(self, every_n_steps: int = 50, max_tokens: int = 64) -> None:
        if every_n_steps < 1 or max_tokens < 1:
            raise LLMKitError(f"MHCMonitor every_n_steps and max_tokens must be >= 1, got {every_n_steps} and "
                              f"{max_tokens}")
        self.every_n_steps = every_n_steps
        self.max_tokens = max_tokens
        self.last_stats: dict[str, float] = {}
        self.last_step = -1

    @torch.no_grad()
    def read_mappings(
        self, model: torch.nn.Module, idx: torch.Tensor, forward: Callable[[torch.Tensor], Any] | None = None
    ) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(name, H_pre, H_post, H_res) of every mHC sublayer in depth order for the tokens idx
        [T] (one row), from an eager forward of ``model`` in eval mode, or of ``forward`` when
        something else runs it (under FSDP the root module, which gathers the shards). Eval mode:
        no dropout, and an MoE router counts none of these tokens in the step's load (in training
        mode they moved the balancing bias and the ``moe/*`` metrics of every step logged here)."""
        captured: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        handles = []
        for module_name, module in model.named_modules():
            if isinstance(module, MHCMapping):
                # ...blocks.{i}.{attn,mlp}_res.mapping -> L{i}.{attn,mlp}, past FSDP's and checkpointing's wrappers
                parts = [part for part in module_name.split(".") if part not in WRAPPER_NAMES]
                name = f"L{parts[-3]}.{parts[-2].removesuffix('_res')}"

                def hook(mod: MHCMapping, inputs: Any, entry: Entry, name: str = name) -> None:
                    captured.append((name, *(h[0].float() for h in (entry.h_pre, entry.h_post, entry.h_res))))

                handles.append(module.register_forward_hook(hook))
        try:
            with torch.compiler.set_stance("force_eager"), eval_mode(model):
                (model if forward is None else forward)(idx[None])
        finally:
            for handle in handles:
                handle.remove()
        return captured

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            require(self, pl_module, HasBackbone, "(the backbone whose mappings it reads)")

    def state_dict(self) -> dict[str, int]:
        return {"last_step": self.last_step}  # a run resumed inside an accumulation window logged its step again

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.last_step = state_dict["last_step"]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step - 1  # the optimizer step this batch completed, if it completed one
        sharded = isinstance(trainer.strategy.model, FullyShardedDataParallel)  # every rank joins the forward
        if step <= self.last_step or step % self.every_n_steps or not (sharded or trainer.is_global_zero):
            return
        self.last_step = step
        idx = batch[0] if isinstance(batch, (tuple, list)) else None
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise LLMKitError(
                f"MHCMonitor needs (x, y) token-window batches (PretrainModule); got {type(batch).__name__}: "
                "remove it from this run's trainer.callbacks"
            )
        forward = trainer.strategy.model if sharded else None
        mappings = self.read_mappings(pl_module.model, idx[0, : self.max_tokens], forward)
        if not mappings or not trainer.is_global_zero:
            return
        self.last_stats = mhc_stats(mappings)
        for logger in trainer.loggers:  # straight to the loggers: not tied to log_every_n_steps
            logger.log_metrics(self.last_stats, step=step)
