"""TokenThroughput: Lightning's ThroughputMonitor set up for (x, y) token batches.

Logs, per stage, batches/s, samples/s, items/s (= tokens/s) and, where the device's peak
FLOPs are known (NVIDIA GPUs), flops/s and MFU from the module's ``flops_per_batch``
(6 N + 12 L C T per token, see ``Transformer.flops_per_token``).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import ThroughputMonitor


def batch_windows(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Number of windows (samples) in an (x, y) batch."""
    return batch[0].size(0)


def batch_tokens(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Number of input tokens in an (x, y) batch."""
    return batch[0].numel()


class TokenThroughput(ThroughputMonitor):
    """ThroughputMonitor for token windows; ``window_size`` batches are averaged."""

    def __init__(self, window_size: int = 20, **kwargs: Any) -> None:
        super().__init__(
            batch_size_fn=batch_windows, length_fn=batch_tokens, window_size=window_size, **kwargs
        )
