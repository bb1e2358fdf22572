"""Model configuration: the backbone's shape and its mHC residual.

Every knob of the backbone lives here; YAML files under ``configs/model/`` hold the named
sizes (``tiny``, ``120m``, ``350m``, ``900m``).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from llmkit.errors import LLMKitError
from llmkit.io import dataclass_from_dict

AttentionBackend = Literal["auto", "flash", "cudnn", "efficient", "math", "flash_attn"]
"""The attention kernels ``ModelConfig.attention_backend`` can name (llmkit.model.attention_backends)."""
BACKENDS: tuple[str, ...] = AttentionBackend.__args__

POST_INIT_RENAMED = {"handoff": "split", "hc": "copy"}
"""Earlier names of the ``mhc.post_init`` values, still accepted with a deprecation warning."""


@dataclass
class MHCConfig:
    """Manifold-constrained hyper-connections (mHC paper, arXiv 2512.24880, Eq. 7-9).

    post_init: how H_post starts, i.e. how a sublayer's output y is written back to the n
    streams. ``split`` (default): H_post = 1/n per stream (b_post = logit(1/(2n))), so the
    streams share one y and each sublayer adds y/n to the mean read-out. ``copy``: H_post = 1
    per stream (b_post = 0), every stream gets all of y, as plain hyper-connections start.
    The earlier names ``handoff`` (= split) and ``hc`` (= copy) still work, with a warning.
    See docs/architecture.md.

    implementation: ``fused`` (norm after the projection, compile-friendly pre-aggregation and
    "apply", recomputing Sinkhorn backward) or ``reference`` (the equations as written, autograd
    through every Sinkhorn iteration). Same math; see llmkit/model/mhc.py and docs/performance.md.
    """

    alpha_init: float = 0.01
    sinkhorn_iters: int = 20
    sinkhorn_clamp: float = 15.0
    sinkhorn_eps: float = 1e-8
    res_bias: float = 2.0  # b_res: +res_bias on the diagonal, -res_bias off it
    post_init: str = "split"
    implementation: Literal["fused", "reference"] = "fused"

    def __post_init__(self) -> None:
        if self.post_init in POST_INIT_RENAMED:
            new = POST_INIT_RENAMED[self.post_init]
            warnings.warn(
                f"mhc.post_init {self.post_init!r} is deprecated: use {new!r}, which means the same", FutureWarning,
                stacklevel=3,
            )
            self.post_init = new
        problems = []
        if self.post_init not in ("split", "copy"):
            problems.append(f"mhc.post_init must be 'split' or 'copy', got {self.post_init!r}")
        if self.implementation not in ("fused", "reference"):
            problems.append(f"mhc.implementation must be 'fused' or 'reference', got {self.implementation!r}")
        if problems:
            raise LLMKitError("invalid model config: " + "; ".join(problems))


@dataclass
class ModelConfig:
    """A LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, causal SDPA) with an mHC residual.

    ``n_streams: 1`` gives the plain pre-norm residual x + F(x); ``n_streams > 1`` expands the
    residual into n streams mixed by mHC around every attention and MLP sublayer.

    ``bf16_residual``: under bf16 autocast (``precision: bf16-mixed``) the embedding makes the
    residual stream fp32 and every residual add keeps it fp32; with this flag the stream is cast
    to bf16 once and stays bf16, as in the mHC paper, halving its memory traffic and saved
    activations (n x C per token per sublayer). Norms and the mHC mapping math still compute in
    fp32. Without autocast it does nothing. See docs/performance.md.
    """

    vocab_size: int = 32000
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: same as n_heads; fewer gives grouped-query attention
    d_ff: int = 2048
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    n_streams: int = 4
    mhc: MHCConfig = field(default_factory=MHCConfig)
    gradient_checkpointing: bool = False
    bf16_residual: bool = False  # under bf16 autocast, keep the residual stream in bf16 (not fp32)
    attention_backend: AttentionBackend = "auto"  # the attention kernel, see docs/attention.md

    def __post_init__(self) -> None:
        if isinstance(self.mhc, dict):
            self.mhc = MHCConfig(**self.mhc)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = []
        if self.d_model % self.n_heads:
            problems.append(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if (self.d_model // self.n_heads) % 2:
            problems.append(f"head size d_model/n_heads ({self.d_model // self.n_heads}) must be even for RoPE")
        if self.n_streams < 1:
            problems.append(f"n_streams must be >= 1, got {self.n_streams}")
        for name in ("vocab_size", "n_layers", "d_ff", "max_seq_len", "n_heads"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_backend not in BACKENDS:
            problems.append(f"attention_backend must be one of {', '.join(BACKENDS)}, got {self.attention_backend!r}")
        if problems:
            raise LLMKitError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        return dataclass_from_dict(cls, values, "model config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """Read a model YAML such as ``configs/model/120m.yaml``."""
        path = Path(path)
        if not path.is_file():
            raise LLMKitError(f"model config {path} does not exist")
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise LLMKitError(f"model config {path} must be a YAML mapping of ModelConfig fields")
        try:
            return cls.from_dict(values)
        except LLMKitError as e:
            raise LLMKitError(f"{path}: {e}") from None
