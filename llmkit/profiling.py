"""What a measurement ran on and what it kept: shared by the benchmarks in bench/ and the tests.

Speeds and memory figures mean little without the device they came from (a CPU run says
nothing about a GPU), so every benchmark records :func:`device_description` beside its numbers.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import torch


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
