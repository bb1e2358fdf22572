"""TokenThroughput: Lightning's ThroughputMonitor set up for (x, y) token batches.

Logs, per stage, batches/s, samples/s, items/s (= tokens/s) and, where the device's peak
FLOPs are known (NVIDIA GPUs: Lightning's table, else llmkit.profiling's dense bf16 peaks), flops/s
and MFU from the module's ``flops_per_batch`` (6 N_active + attention per token, see
``Transformer.flops_per_token``). Its running totals of training
(``train/time``, ``train/batches``, ``train/samples``, ``train/lengths``) are saved in checkpoints,
so a resumed run's curves continue where they stopped instead of starting again at 0.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage

from llmkit.callbacks.interfaces import batch_kind
from llmkit.errors import LLMKitError
from llmkit.profiling import dense_bf16_peak_flops


def _inputs(batch: Any) -> torch.Tensor:
    """x of an (x, y) batch of token windows; :class:`LLMKitError` for another kind of batch."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise LLMKitError(f"TokenThroughput counts (x, y) batches of token windows (PackedDataModule's, in "
                      f"PretrainModule runs), got a {batch_kind(batch)}")


def batch_windows(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Number of windows (samples) in an (x, y) batch."""
    return _inputs(batch).size(0)


def batch_tokens(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Number of input tokens in an (x, y) batch."""
    return _inputs(batch).numel()


class TokenThroughput(ThroughputMonitor):
    """ThroughputMonitor for token windows; ``window_size`` batches are averaged."""

    def __init__(self, window_size: int = 20, **kwargs: Any) -> None:
        super().__init__(
            batch_size_fn=batch_windows, length_fn=batch_tokens, window_size=window_size, **kwargs
        )
        self._resumed: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Lightning's setup; where its FLOPs table lacks this GPU under a bf16 precision, the
        peak comes from :func:`~llmkit.profiling.dense_bf16_peak_flops`, so MFU is not left empty
        (and Lightning's warning that it found no FLOPs for the chip is not shown)."""
        device = trainer.strategy.root_device
        ours = None
        if device.type == "cuda" and "bf16" in str(trainer.precision):
            ours = dense_bf16_peak_flops(torch.cuda.get_device_name(device))
        with warnings.catch_warnings():
            if ours is not None:
                warnings.filterwarnings("ignore", message="FLOPs not found for")
            super().setup(trainer, pl_module, stage)
        if self.available_flops is None and ours is not None:
            self.available_flops = ours
            for throughput in self._throughputs.values():
                throughput.available_flops = ours

    def state_dict(self) -> dict[str, float]:
        stage = RunningStage.TRAINING
        if stage not in self._samples:
            return dict(self._resumed)
        return {"time": time.perf_counter() - self._t0s[stage], "batches": self._batches[stage],
                "samples": self._samples[stage], "lengths": self._lengths[stage]}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self._resumed = dict(state_dict)

    def _start(self, trainer: L.Trainer) -> None:
        super()._start(trainer)
        stage = trainer.state.stage
        if stage == RunningStage.TRAINING and self._resumed:  # continue the saved totals
            self._t0s[stage] -= self._resumed["time"]
            self._batches[stage] = int(self._resumed["batches"])
            self._samples[stage] = int(self._resumed["samples"])
            self._lengths[stage] = int(self._resumed["lengths"])
            self._resumed = {}
