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


DENSE_BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("gb200", 2.5e15), ("b200", 2.25e15),
    ("h200 nvl", 835e12), ("h200", 989e12),
    ("h100 nvl", 835e12), ("h100 pcie", 756e12), ("h100", 989e12),
    ("a100", 312e12), ("l40s", 362e12), ("l40", 181e12), ("l4", 121e12),
    ("rtx 4090", 165.2e12), ("rtx 3090", 71e12), ("a10g", 70e12),
)
"""Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, by a lowercase substring of
the device name, most specific first (``h200 nvl`` before ``h200``). SXM parts are the unqualified
names; GeForce figures are with fp32 accumulation (what PyTorch's matmuls use)."""


def dense_bf16_peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of the GPU called ``device_name`` (``torch.cuda.get_device_name``)
    from :data:`DENSE_BF16_PEAK_FLOPS`, or None for a chip it does not list. Used where Lightning's
    own table lacks the chip (it has no entry that matches "NVIDIA H200", so its MFU is empty there)."""
    name = device_name.lower()
    return next((peak for chip, peak in DENSE_BF16_PEAK_FLOPS if chip in name), None)


def saved_activation_bytes(model: torch.nn.Module, forward: Callable[[], Any]) -> int:
    """Bytes autograd keeps for backward while ``forward()`` runs: the distinct storages packed
    by saved-tensor hooks, ``model``'s parameters excluded. Activation memory measured the same
    way on any device, CPU included.

    The graph ``forward()`` builds keeps no tensor (it cannot run backward): the packed tensors
    are held in a list until ``forward()`` returns (so no storage is freed and its address reused
    by another while it runs), then let go. Had the graph kept them, a node's saved output would
    point back to the node (tensor -> grad_fn -> saved tensor), a cycle through C++ that Python's
    garbage collector cannot see, and every call would leak its forward's activations."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    packed: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
            packed.append(t)

    def unpack(_: None) -> torch.Tensor:
        raise RuntimeError("saved_activation_bytes: its forward's graph keeps no tensors and cannot run backward")

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            forward()
    finally:
        packed.clear()
    return sum(storages.values())
