"""Which kernel computes attention: PyTorch SDPA's backends, or the FlashAttention packages.

``ModelConfig.attention_backend`` names it:

==============  ==========================================================================
``auto``        the preferred one available for the device and dtype (below); the default
``flash``       SDPA's FlashAttention-2 kernel (CUDA, fp16/bf16; also SDPA's CPU kernel)
``cudnn``       SDPA's cuDNN kernel (CUDA)
``efficient``   SDPA's memory-efficient kernel (CUDA)
``math``        SDPA's reference implementation (any device and dtype)
``flash_attn``  the ``flash_attn_interface`` (FlashAttention-3, Hopper) or ``flash_attn``
                (FlashAttention-2) package, if installed (CUDA, fp16/bf16)
==============  ==========================================================================

``auto`` picks, on a CUDA device in fp16/bf16: ``flash_attn`` when FlashAttention-3 is installed;
else ``cudnn`` on Hopper and newer (compute capability >= 9.0), ``flash`` before; ``efficient`` in
fp32 or when neither is built in. On a CPU it picks ``flash``, elsewhere ``math``. The order follows
published kernel measurements (docs/attention.md), not a measurement on your device.

The chosen backend computes the causal attention of training and of prefill without padding.
Calls with a padding mask (batched sampling and the KV-cached decode step) need a kernel that
takes an arbitrary mask: on CUDA they use SDPA's memory-efficient or math kernels whatever the
backend, on a CPU the chosen one (both CPU kernels take masks). Grouped-query attention is
passed to the kernels that support it (``enable_gqa`` for SDPA's math and flash kernels, natively
for the FlashAttention packages); for the others the key/value heads are repeated first.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmkit.errors import LLMKitError
from llmkit.model.config import BACKENDS

_SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
_SDPA_GQA = (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)  # the kernels that take enable_gqa
_HALF = (torch.float16, torch.bfloat16)


def _flash_attn_package() -> str | None:
    """The FlashAttention package installed: FlashAttention-3's interface first, else -2's."""
    for name in ("flash_attn_interface", "flash_attn"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


@torch.compiler.assume_constant_result
def resolve_backend(name: str, device_type: str, dtype: torch.dtype) -> str:
    """The backend ``name`` means for tensors of ``dtype`` on ``device_type``; an unavailable
    one is an :class:`LLMKitError` saying why (see the module docstring). Under torch.compile it
    runs once while tracing and its answer is a constant of the graph."""
    return _resolve(name, device_type, dtype)


@cache
def _resolve(name: str, device_type: str, dtype: torch.dtype) -> str:
    if name not in BACKENDS:
        raise LLMKitError(f"attention_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    cuda = device_type == "cuda"
    if name == "auto":
        if not cuda:
            return "flash" if device_type == "cpu" else "math"
        if dtype not in _HALF:
            return "efficient"
        if _flash_attn_package() == "flash_attn_interface":
            return "flash_attn"
        if torch.cuda.get_device_capability() >= (9, 0) and torch.backends.cudnn.is_available():
            return "cudnn"
        return "flash" if torch.backends.cuda.is_flash_attention_available() else "efficient"
    if name == "flash" and device_type not in ("cpu", "cuda"):
        raise LLMKitError(
            f"attention_backend flash needs a CPU or CUDA device (this is {device_type}): use auto or math"
        )
    if name in ("cudnn", "efficient", "flash_attn") and not cuda:
        raise LLMKitError(
            f"attention_backend {name} needs a CUDA device (this is {device_type}): use auto, flash or math"
        )
    if cuda and name in ("flash", "cudnn", "flash_attn") and dtype not in _HALF:
        raise LLMKitError(
            f"attention_backend {name} needs fp16 or bf16 on CUDA (here {dtype}): train with precision bf16-mixed, "
            "or use auto or efficient"
        )
    if cuda and name == "flash" and not torch.backends.cuda.is_flash_attention_available():
        raise LLMKitError("attention_backend flash: this PyTorch build has no FlashAttention kernel; use auto or cudnn")
    if name == "flash_attn":
        if _flash_attn_package() is None:
            raise LLMKitError(
                "attention_backend flash_attn needs the flash_attn package (FlashAttention-2) or flash_attn_interface "
                "(FlashAttention-3), neither is installed: pip install 'llmkit[flash]' or use auto"
            )
    return name


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    return x.repeat_interleave(n_heads // x.size(1), dim=1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, backend: str) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, H_kv, S, D]: causal without ``mask``, else
    ``mask`` [B, 1, T, S] (True = may attend), with the resolved ``backend``."""
    if mask is None and backend == "flash_attn":
        return _flash_attn(q, k, v)
    if mask is not None and q.device.type == "cuda" and backend != "math":
        kernels = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # the CUDA kernels that take any mask
    else:
        kernels = [_SDPA[backend]]
    gqa = k.size(1) != q.size(1)
    if gqa and kernels[0] not in _SDPA_GQA:
        k, v, gqa = _repeat_kv(k, q.size(1)), _repeat_kv(v, q.size(1)), False
    with sdpa_kernel(kernels):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention through the FlashAttention package (it takes [B, T, H, D] and GQA natively)."""
    module = importlib.import_module(_flash_attn_package())
    out = module.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    out = out[0] if isinstance(out, tuple) else out  # FlashAttention-3 may return (out, lse)
    return out.transpose(1, 2)
