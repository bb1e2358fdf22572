"""Model configuration: the backbone's shape and its mHC residual.

Every knob of the backbone lives here; YAML files under ``configs/model/`` hold the named
sizes (``tiny``, ``120m``, ``350m``, ``900m``) and the MoE and latent-attention variants
(``moe_*``, ``mla_*``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from llmkit.errors import LLMKitError
from llmkit.io import check_yaml_keys, dataclass_from_dict

AttentionBackend = Literal["auto", "flash", "cudnn", "efficient", "math", "flash_attn"]
"""The attention kernels ``ModelConfig.attention_backend`` can name (llmkit.model.attention_backends)."""
BACKENDS: tuple[str, ...] = AttentionBackend.__args__

POST_INIT_RENAMED = {"handoff": "split", "hc": "copy"}
"""Earlier names of the ``mhc.post_init`` values, still accepted with a deprecation warning."""
MAX_SINKHORN_CLAMP = 80.0
"""Largest ``mhc.sinkhorn_clamp``: Sinkhorn's largest entry e^c, summed over at most 8 streams in a
normalisation, stays below fp32's largest value (e^88.7)."""


@dataclass
class MHCConfig:
    """Manifold-constrained hyper-connections (mHC paper, arXiv 2512.24880, Eq. 7-9).

    post_init: how H_post starts, i.e. how a sublayer's output y is written back to the n
    streams. ``split`` (default): H_post = 1/n per stream (b_post = logit(1/(2n))), so the
    streams share one y and each sublayer adds y/n to the mean read-out. ``copy``: H_post = 1
    per stream (b_post = 0), every stream gets all of y, as plain hyper-connections start.
    The earlier names ``handoff`` (= split) and ``hc`` (= copy) still work, with a warning.
    See docs/architecture.md.

    implementation: ``auto`` (default): the mHC ops (llmkit/model/mhc_ops.py) run their Triton
    kernels on CUDA and their PyTorch code elsewhere; ``torch``: the PyTorch code on every device,
    a fallback should the kernels misbehave on your GPU, and a second opinion to compare against.
    Same math either way, up to rounding: for a bf16 or fp16 stream the kernels' projection
    multiplies x by phi rounded to the stream's dtype (tensor cores, fp32 accumulation), the PyTorch
    code by phi in fp32. The earlier values ``fused`` and ``reference`` mean ``auto``, with a
    warning. See docs/performance.md.

    recompute_stream: in training, do not keep the stream X of each block's attention sublayer for
    backward but recompute it there, with that sublayer's mapping op, from the block's input (the
    mHC paper's recomputation, with the block input stored every block): that sublayer's X and its
    input u, (n + 1) C stream elements, and its O(n^2) mapping floats fewer per token and block, at
    the cost of one mapping op's forward more per block in backward. Takes
    effect in compiled blocks (``compile: true``), where the compiler honours it; eager blocks keep
    the stream, and so do blocks with a mixture of experts (their router updates buffers in place,
    which selective checkpointing refuses) and activation checkpointing, which recomputes the whole
    block anyway. See docs/performance.md.
    """

    alpha_init: float = 0.01
    sinkhorn_iters: int = 20
    sinkhorn_clamp: float = 15.0
    sinkhorn_eps: float = 1e-8
    res_bias: float = 2.0  # b_res: +res_bias on the diagonal, -res_bias off it
    post_init: str = "split"
    implementation: str = "auto"  # auto or torch (a str: the earlier values still parse)
    recompute_stream: bool = False

    @property
    def use_triton(self) -> bool:
        """Whether the mHC ops may run their Triton kernels (``implementation: auto``)."""
        return self.implementation == "auto"

    def __post_init__(self) -> None:
        if self.post_init in POST_INIT_RENAMED:
            new = POST_INIT_RENAMED[self.post_init]
            warnings.warn(
                f"mhc.post_init {self.post_init!r} is deprecated: use {new!r}, which means the same", FutureWarning,
                stacklevel=3,
            )
            self.post_init = new
        if self.implementation in ("fused", "reference"):
            warnings.warn(
                f"mhc.implementation {self.implementation!r} is gone: one mHC path runs on each device, and "
                "this config loads as 'auto'; in a YAML write 'auto' (or 'torch' for the PyTorch code "
                "everywhere)", FutureWarning, stacklevel=3,
            )
            self.implementation = "auto"
        problems = []
        if self.sinkhorn_iters < 1:
            problems.append(f"mhc.sinkhorn_iters must be >= 1 (H_res is doubly stochastic only after them), "
                            f"got {self.sinkhorn_iters}")
        if not 0 < self.sinkhorn_clamp <= MAX_SINKHORN_CLAMP:
            problems.append(f"mhc.sinkhorn_clamp must be in (0, {MAX_SINKHORN_CLAMP:g}], got {self.sinkhorn_clamp} "
                            "(Sinkhorn's M0 = exp(clamp(logits)) is fp32, whose largest value is e^88.7)")
        if not 0 < self.sinkhorn_eps < math.inf:
            problems.append(f"mhc.sinkhorn_eps must be > 0, got {self.sinkhorn_eps}")
        if not all(math.isfinite(v) for v in (self.alpha_init, self.res_bias)):
            problems.append(f"mhc.alpha_init and res_bias must be finite, got {self.alpha_init} and {self.res_bias}")
        if self.post_init not in ("split", "copy"):
            problems.append(f"mhc.post_init must be 'split' or 'copy', got {self.post_init!r}")
        if self.implementation not in ("auto", "torch"):
            problems.append(f"mhc.implementation must be 'auto' or 'torch', got {self.implementation!r}")
        if problems:
            raise LLMKitError("invalid model config: " + "; ".join(problems))


@dataclass
class MoEConfig:
    """A mixture-of-experts feed-forward in place of the dense SwiGLU (``n_experts > 0``); see
    llmkit/model/moe.py and docs/moe.md.

    Each token's router picks ``top_k`` of ``n_experts`` routed experts (SwiGLU FFNs of width
    ``expert_dim``) and the output is their score-weighted sum, plus ``n_shared`` shared experts
    every token goes through. Routers: ``switch`` (a learned linear gate; ``score`` softmax or
    sigmoid) and ``hash`` (a fixed hash of the token id picks ``top_k`` <= 2 experts with weight
    1/top_k each; no learned gate). MoE replaces the MLP in layers ``first_dense``,
    ``first_dense + every``, ... (DeepSeek-V3 keeps its first layers dense).

    Balancing (switch router; the hash router has none, ``aux_loss_weight`` is unused and the two
    others must be 0 with it): ``aux_loss_weight`` times the Switch Transformer loss
    E * sum_e f_e P_e; ``bias_update_rate`` > 0 turns on DeepSeek-V3's auxiliary-loss-free
    balancing (a per-expert bias added to the scores for selection only, moved by that rate
    toward uniform load after each step); ``z_loss_weight`` times the router z-loss
    mean(logsumexp(logits)^2) (ST-MoE).
    """

    n_experts: int = 0
    top_k: int = 2
    expert_dim: int = 512
    n_shared: int = 0
    every: int = 1
    first_dense: int = 0
    router: Literal["switch", "hash"] = "switch"
    score: Literal["softmax", "sigmoid"] = "softmax"
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    bias_update_rate: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.n_experts < 0 or self.n_shared < 0 or self.expert_dim < 1 or self.every < 1 or self.first_dense < 0:
            problems.append("moe.n_experts, n_shared and first_dense must be >= 0, expert_dim and every >= 1")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            problems.append(f"moe.top_k must be between 1 and n_experts ({self.n_experts}), got {self.top_k}")
        if self.router not in ("switch", "hash") or self.score not in ("softmax", "sigmoid"):
            problems.append(f"moe.router must be switch or hash and moe.score softmax or sigmoid, got "
                            f"{self.router!r} and {self.score!r}")
        if self.router == "hash" and self.top_k > 2:
            problems.append(f"the hash router picks at most 2 experts: moe.top_k must be 1 or 2, got {self.top_k}")
        weights = {"aux_loss_weight": self.aux_loss_weight, "z_loss_weight": self.z_loss_weight,
                   "bias_update_rate": self.bias_update_rate}
        for name, value in weights.items():
            if not 0 <= value < math.inf:  # NaN too
                problems.append(f"moe.{name} must be >= 0, got {value}")
        if self.router == "hash" and (self.bias_update_rate or self.z_loss_weight):
            problems.append(f"the hash router has no learned gate to balance: moe.bias_update_rate and z_loss_weight "
                            f"must be 0 with it, got {self.bias_update_rate} and {self.z_loss_weight}")
        if problems:
            raise LLMKitError("invalid model config: " + "; ".join(problems))

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) has the MoE feed-forward."""
        return self.n_experts > 0 and layer >= self.first_dense and (layer - self.first_dense) % self.every == 0


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, Sec. 2.1), for ``attention: mla``.

    Keys and values come from a latent c_KV of ``kv_lora_rank`` numbers per token (the only thing
    cached, with the ``qk_rope_head_dim`` RoPE key shared by all heads); queries from a latent of
    ``q_lora_rank`` (None: a full-rank query projection). Each head's query and key have
    ``qk_nope_head_dim`` dimensions without position and ``qk_rope_head_dim`` with RoPE; its value
    ``v_head_dim``. See llmkit/model/mla.py and docs/attention.md.
    """

    kv_lora_rank: int = 128
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64

    def __post_init__(self) -> None:
        sizes = {"kv_lora_rank": self.kv_lora_rank, "q_lora_rank": self.q_lora_rank,
                 "qk_nope_head_dim": self.qk_nope_head_dim, "qk_rope_head_dim": self.qk_rope_head_dim,
                 "v_head_dim": self.v_head_dim}
        problems = [f"mla.{name} must be >= 1, got {value}" for name, value in sizes.items()
                    if value is not None and value < 1]
        if self.qk_rope_head_dim >= 1 and self.qk_rope_head_dim % 2:
            problems.append(f"mla.qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if problems:
            raise LLMKitError("invalid model config: " + "; ".join(problems))


@dataclass
class RopeScaling:
    """Rotary-frequency scaling for contexts past the pretraining length, as Hugging Face's
    ``rope_scaling`` names it (see :func:`llmkit.model.layers.rope_frequencies`).

    ``linear``: every inverse frequency divided by ``factor`` (position interpolation, Chen et al.
    2023). ``llama3``: Llama 3.1's piecewise rule: wavelengths shorter than
    ``original_max_seq_len / high_freq_factor`` unchanged, longer than ``original_max_seq_len /
    low_freq_factor`` divided by ``factor``, a smooth blend between.
    """

    rope_type: Literal["linear", "llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3"):
            raise LLMKitError(f"invalid model config: rope_scaling.rope_type must be 'linear' or 'llama3', "
                              f"got {self.rope_type!r}")
        if self.factor <= 0 or (self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor):
            raise LLMKitError("invalid model config: rope_scaling needs factor > 0 and, for llama3, "
                              "high_freq_factor > low_freq_factor")


RUN_SETTINGS = ("gradient_checkpointing", "bf16_residual", "attention_backend")
"""The ``ModelConfig`` fields (with :data:`MHC_RUN_SETTINGS`) that say how to run a backbone, not
what it is: a run started from ``init_ckpt`` takes them from its own ``config``, and a resumed run
may change them (llmkit/modules/pretrain.py, the pretrain command's ``free`` settings)."""
MHC_RUN_SETTINGS = ("implementation", "recompute_stream")
"""The same for ``ModelConfig.mhc``."""

MAX_STREAMS = 8
"""The most residual streams mHC runs with: its Triton kernels keep each token's n x n H_res in
registers (llmkit/model/mhc_triton.py)."""


@dataclass
class ModelConfig:
    """A LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, causal SDPA) with an mHC residual.

    ``n_streams: 1`` gives the plain pre-norm residual x + F(x); ``n_streams > 1`` expands the
    residual into n streams mixed by mHC around every attention and MLP sublayer.

    The options that imported LLaMA-family models need (docs/interop.md) default to the plain
    LLaMA block: ``head_dim`` (None: d_model / n_heads; Qwen3 sets it explicitly),
    ``attention_bias`` (biases on the q/k/v projections, as Qwen2 has), ``qk_norm`` (an RMSNorm
    over each head of q and k before RoPE, as Qwen3 has) and ``rope_scaling`` (:class:`RopeScaling`).

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
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 2048
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    n_streams: int = 4
    mhc: MHCConfig = field(default_factory=MHCConfig)
    gradient_checkpointing: bool = False
    bf16_residual: bool = False  # under bf16 autocast, keep the residual stream in bf16 (not fp32)
    attention_backend: AttentionBackend = "auto"  # the attention kernel, see docs/attention.md
    attention: Literal["mha", "mla"] = "mha"  # mla: multi-head latent attention (MLAConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        if isinstance(self.mhc, dict):
            self.mhc = dataclass_from_dict(MHCConfig, self.mhc, "mhc")
        if isinstance(self.mla, dict):
            self.mla = dataclass_from_dict(MLAConfig, self.mla, "mla")
        if isinstance(self.moe, dict):
            self.moe = dataclass_from_dict(MoEConfig, self.moe, "moe")
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = dataclass_from_dict(RopeScaling, self.rope_scaling, "rope_scaling")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = []
        for name in ("vocab_size", "n_layers", "d_model", "d_ff", "max_seq_len", "n_heads", "n_kv_heads",
                     "n_streams"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_streams > MAX_STREAMS:
            problems.append(f"n_streams must be at most {MAX_STREAMS} (the mHC kernels hold each token's n x n H_res "
                            f"in registers; the paper uses 4), got {self.n_streams}")
        if self.n_heads >= 1 and self.n_kv_heads >= 1:  # the head checks divide by them
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
            derived = self.head_dim is None
            if derived:
                self.head_dim = self.d_model // self.n_heads
            if self.attention == "mha":  # MLA's heads take their widths from mla
                if derived and self.d_model % self.n_heads:
                    problems.append(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                                    "unless head_dim is set")
                elif self.head_dim % 2 or self.head_dim < 2:
                    problems.append(f"head_dim ({self.head_dim}) must be even for RoPE")
        if not (0 < self.norm_eps < math.inf and 0 < self.rope_theta < math.inf):
            problems.append(f"norm_eps and rope_theta must be > 0, got {self.norm_eps} and {self.rope_theta}")
        if self.moe.n_experts and not any(self.moe.is_moe_layer(i) for i in range(self.n_layers)):
            problems.append(f"moe.first_dense ({self.moe.first_dense}) leaves no MoE layer among the "
                            f"{self.n_layers} layers: lower it, or set moe.n_experts 0 for a dense model")
        if self.attention not in ("mha", "mla"):
            problems.append(f"attention must be mha or mla, got {self.attention!r}")
        if self.attention == "mla" and (self.n_kv_heads != self.n_heads or self.attention_bias or self.qk_norm):
            problems.append("attention: mla shares one latent and one RoPE key across heads; n_kv_heads (GQA), "
                            "attention_bias and qk_norm apply only to attention: mha")
        if self.attention_backend not in BACKENDS:
            problems.append(f"attention_backend must be one of {', '.join(BACKENDS)}, got {self.attention_backend!r}")
        if problems:
            raise LLMKitError("invalid model config: " + "; ".join(problems))
        for section, unused, why in (("mla", self.attention != "mla", "attention is mha"),
                                     ("moe", not self.moe.n_experts, "moe.n_experts is 0 (a dense model)")):
            values = getattr(self, section)
            changed = [f"{section}.{f.name}" for f in fields(values) if getattr(values, f.name) != f.default]
            if unused and changed:  # a warning: a checkpoint whose config has them still loads
                warnings.warn(f"{', '.join(changed)} set, but {why}: the {section} section is unused",
                              stacklevel=1)

    @property
    def rope_dim(self) -> int:
        """The dimensions RoPE rotates in each head: ``head_dim``, or MLA's ``qk_rope_head_dim``."""
        return self.mla.qk_rope_head_dim if self.attention == "mla" else self.head_dim

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
        check_yaml_keys(path)
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise LLMKitError(f"model config {path} must be a YAML mapping of ModelConfig fields")
        try:
            return cls.from_dict(values)
        except LLMKitError as e:
            raise LLMKitError(f"{path}: {e}") from None
