"""MHCMonitor: stability of the mHC residual mappings during training, in TensorBoard.

Every ``every_n_steps`` training steps it reads the mappings that the training forward
already computed (forward hooks on each ``MHCMapping``; no extra forward) for a sample of
tokens (the first ``max_tokens`` positions of the batch's first row) and logs:

- per sublayer (``mhc/L{i}.attn/...``, ``mhc/L{i}.mlp/...``): the mean deviation of H_res row
  sums and column sums from 1 (``row_dev``, ``col_dev``: how doubly stochastic Sinkhorn left
  it), and the mean entries of H_pre and H_post (``h_pre``, ``h_post``);
- for the composite residual map across the whole depth, M = H_res^(2L) ... H_res^(1) per
  token, the mHC paper's "Amax gain magnitude": forward gain max_i sum_j |M_ij| (the largest
  factor a signal can grow by on the residual path) and backward gain max_j sum_i |M_ij|
  (the same for gradients), maximised over the sampled tokens (``mhc/composite/fwd_gain``,
  ``mhc/composite/bwd_gain``). A doubly-stochastic product has both equal to 1.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from llmkit.model.mhc import MHCMapping


def mhc_stats(mappings: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Statistics of mappings given in depth order as (name, H_pre [N, n], H_post [N, n],
    H_res [N, n, n]) for the same N sampled tokens."""
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
        self.every_n_steps = every_n_steps
        self.max_tokens = max_tokens
        self.active = False
        self.last_stats: dict[str, float] = {}
        self._captured: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._names: list[str] = []
        self._handles: list[Any] = []

    def _hook(self, name: str):
        def hook(module: MHCMapping, inputs: Any, outputs: tuple[torch.Tensor, ...]) -> None:
            if self.active:
                self._captured[name] = tuple(h[0, : self.max_tokens].detach().float() for h in outputs)

        return hook

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for module_name, module in pl_module.named_modules():
            if isinstance(module, MHCMapping):
                # ...blocks.{i}.{attn,mlp}_res.mapping -> L{i}.{attn,mlp}
                parts = module_name.split(".")
                name = f"L{parts[-3]}.{parts[-2].removesuffix('_res')}"
                self._names.append(name)
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.active = bool(self._names) and trainer.global_step % self.every_n_steps == 0
        self._captured.clear()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self.active:
            return
        self.active = False
        if len(self._captured) == len(self._names) and trainer.is_global_zero:
            stats = mhc_stats([(name, *self._captured[name]) for name in self._names])
            self.last_stats = stats
            for logger in trainer.loggers:  # straight to the loggers: not tied to log_every_n_steps
                logger.log_metrics(stats, step=trainer.global_step)
        self._captured.clear()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._names.clear()
