"""TokenThroughput: Lightning's ThroughputMonitor set up for (x, y) token batches.

Logs, per stage, batches/s, samples/s, items/s (= tokens/s) and, where the device's peak
FLOPs are known (NVIDIA GPUs), flops/s and MFU from the module's ``flops_per_batch``
(6 N + 12 L C T per token, see ``Transformer.flops_per_token``).
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.callbacks import ThroughputMonitor


def batch_windows(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Number of windows (samples) in an (x, y) batch."""
    return batch[0].size(0)


def batch_tokens(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Number of input tokens in an (x, y) batch."""
    return batch[0].numel()


def device_description() -> str:
    """What a speed was measured on: the CUDA device's name, else the CPU and its thread count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def saved_activation_bytes(model: torch.nn.Module, forward: Callable[[], Any]) -> int:
    """Bytes autograd keeps for backward while ``forward()`` runs: the distinct storages packed
    by saved-tensor hooks, ``model``'s parameters excluded. Activation memory measured the same
    way on any device, CPU included."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


class TokenThroughput(ThroughputMonitor):
    """ThroughputMonitor for token windows; ``window_size`` batches are averaged."""

    def __init__(self, window_size: int = 20, **kwargs: Any) -> None:
        super().__init__(
            batch_size_fn=batch_windows, length_fn=batch_tokens, window_size=window_size, **kwargs
        )
