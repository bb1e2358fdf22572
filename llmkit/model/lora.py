"""Low-rank adapters (LoRA; Hu et al. 2021, arXiv:2106.09685) for the backbone's linear layers.

A targeted ``nn.Linear`` with frozen weight W0 [out, in] becomes

    h = W0 x + (alpha / r) B A x,    A [r, in] ~ Kaiming-uniform(a=sqrt(5)),  B [out, r] = 0,

so a freshly adapted model computes exactly what the base computes, and only A and B (r (in + out)
numbers per layer) are trained. :class:`LoRALinear` shares the base layer's ``weight`` Parameter, so
the base keys of ``state_dict()`` are unchanged and a base checkpoint loads into an adapted model.

Adapters are saved alone, as a safetensors file of the ``*.lora_A`` / ``*.lora_B`` tensors whose
metadata holds the :class:`LoRAConfig` and :func:`base_fingerprint` of the base they were trained
on; see docs/lora.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from llmkit.errors import LLMKitError
from llmkit.io import atomic_file, dataclass_from_dict, non_finite_tensor
from llmkit.model.moe import GroupedLinear, cast_for_matmul, grouped_linear

LORA_FORMAT = "llmkit-lora-v1"
LORA_SUFFIXES = (".lora_A", ".lora_B")


@dataclass
class LoRAConfig:
    """Adapter shape: rank r, scale alpha / r, dropout on the adapter's input, and the targeted
    layers, matched by the last component of their qualified name (``q_proj`` matches
    ``blocks.3.attn.q_proj``)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def __post_init__(self) -> None:
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        problems = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.targets, list) or not self.targets:
            problems.append(f"targets must be a non-empty list of layer names such as ['q_proj'], got {self.targets!r}")
        elif not all(isinstance(t, str) and t and "." not in t for t in self.targets):
            problems.append(f"targets must be last name components without dots (e.g. 'q_proj'), got {self.targets}")
        if problems:
            raise LLMKitError("invalid LoRA config: " + "; ".join(problems))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoRAConfig:
        return dataclass_from_dict(cls, values, "LoRA config")


def low_rank_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """The adapter's weight update scale * B A, in float32 (batched over a leading expert dimension)."""
    return scale * (lora_B.float() @ lora_A.float())


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update: y = W x + b + scale * B A dropout(x).

    ``enabled=False`` or ``merged=True`` gives the plain linear map; when merged, B A is already
    inside ``weight`` (see :meth:`merge`).
    """

    def __init__(self, linear: nn.Linear, config: LoRAConfig) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a second weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.config = config
        self.scale = config.scale
        kw = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(config.rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
        self.train(linear.training)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LoRAConfig) -> LoRALinear:
        """Wrap ``linear``, sharing its weight and bias Parameters."""
        return cls(linear, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        update = self.low_rank(x)
        return y if update is None else y + update

    @property
    def active(self) -> bool:
        """Whether forward adds the adapter's term: enabled and not merged into ``weight``."""
        return self.enabled and not self.merged

    def low_rank(self, x: torch.Tensor) -> torch.Tensor | None:
        """The adapter's term of forward(x), scale * B A dropout(x); None unless :attr:`active`.
        For callers that apply ``weight`` themselves (the mHC mapping's projection op)."""
        if not self.active:
            return None
        return self.scale * F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """scale * B A in float32 (batched over experts for :class:`LoRAGroupedLinear`)."""
        return low_rank_delta(self.lora_A.detach(), self.lora_B.detach(), self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scale B A (in float32, cast to W's dtype); no-op if already merged."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scale B A: the base back to within float rounding; no-op if not merged."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.config.rank}, alpha={self.config.alpha}, merged={self.merged}"


class LoRAGroupedLinear(LoRALinear):
    """LoRA on every expert of a :class:`~llmkit.model.moe.GroupedLinear`: expert e computes
    W_e x + (alpha / r) B_e A_e x with its own A_e [r, in] and B_e [out, r] (stored stacked,
    ``lora_A`` [E, r, in] and ``lora_B`` [E, out, r]); merging, saving and loading work as for
    :class:`LoRALinear` (``delta_weight`` is the batched B A)."""

    def __init__(self, grouped: GroupedLinear, config: LoRAConfig) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = grouped.in_features, grouped.out_features
        self.weight = grouped.weight
        self.register_parameter("bias", None)
        self.config = config
        self.scale = config.scale
        kw = {"device": grouped.weight.device, "dtype": grouped.weight.dtype}
        n_experts = grouped.weight.size(0)
        self.lora_A = nn.Parameter(torch.empty(n_experts, config.rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(n_experts, self.out_features, config.rank, **kw))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
        self.train(grouped.training)

    def forward(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        y = grouped_linear(x, cast_for_matmul(self.weight, x), ends)
        if not self.active:
            return y
        low = grouped_linear(self.lora_dropout(x), cast_for_matmul(self.lora_A, x), ends)
        return y + self.scale * grouped_linear(low, cast_for_matmul(self.lora_B, x), ends)


def _targeted_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear | GroupedLinear]:
    """The model's nn.Linear layers and MoE expert projections whose last name component is a target."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, GroupedLinear)) and not isinstance(module, LoRALinear)
        and name.rsplit(".", 1)[-1] in targets
    }


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Replace every ``nn.Linear`` (and MoE expert projection) whose last name component is in
    ``config.targets`` by a :class:`LoRALinear` (:class:`LoRAGroupedLinear`) sharing its weight;
    returns the replaced names, sorted."""
    existing = lora_layers(model)
    if existing:
        raise LLMKitError(
            f"the model already has {len(existing)} LoRA layers (e.g. {next(iter(existing))}); apply LoRA once "
            f"per model, or build a fresh base model before applying another config"
        )
    found = _targeted_linears(model, config.targets)
    if not found:
        available = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear))
        raise LLMKitError(
            f"no nn.Linear in the model matches the LoRA targets {config.targets}; its Linear layers include "
            f"{available[:6]}: set targets to last components of those names (e.g. 'q_proj')"
        )
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, linear in found.items():
        shared = [n for n in owners[id(linear.weight)] if n != f"{name}.weight"]
        if shared:
            raise LLMKitError(
                f"cannot adapt {name}: its weight is shared with {shared} (tied embeddings?), so merging the "
                f"adapter would change both; remove {name.rsplit('.', 1)[-1]!r} from the LoRA targets"
            )
    for name, linear in found.items():
        parent, _, child = name.rpartition(".")
        adapted = LoRAGroupedLinear(linear, config) if isinstance(linear, GroupedLinear) else \
            LoRALinear.from_linear(linear, config)
        setattr(model.get_submodule(parent), child, adapted)
    return sorted(found)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require_layers(model: nn.Module, action: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise LLMKitError(f"cannot {action}: the model has no LoRA layers; call apply_lora or load_lora first")
    return layers


def _refuse_merged(layers: dict[str, LoRALinear], action: str) -> None:
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise LLMKitError(
            f"cannot {action}: {len(merged)} LoRA layers (e.g. {merged[0]}) are merged into the base weights; "
            f"call unmerge_lora(model) first"
        )


def mark_only_lora_trainable(model: nn.Module) -> int:
    """Freeze every parameter except lora_A / lora_B; returns the number of trainable parameters."""
    _require_layers(model, "train only LoRA")
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith(LORA_SUFFIXES)
        n += p.numel() if p.requires_grad else 0
    return n


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``*.lora_A`` / ``*.lora_B`` entries of ``model.state_dict()``."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(LORA_SUFFIXES)}


def base_fingerprint(model: nn.Module) -> str:
    """Hex sha256 of the base weights: every non-LoRA entry of ``state_dict()`` in sorted key order,
    hashing the key, the shape and the values as float32 on CPU (integer tensors as stored), so the
    same weights give the same fingerprint on any device and from any checkpoint file."""
    _refuse_merged(lora_layers(model), "fingerprint the base model")
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        if key.endswith(LORA_SUFFIXES):
            continue
        t = t.detach().to("cpu")
        t = t.float() if t.is_floating_point() else t
        h.update(f"{key}\0{tuple(t.shape)}\0".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _same_adapter(a: LoRAConfig, b: LoRAConfig) -> bool:
    """Same rank, alpha and targeted layers (dropout does not change the adapter's tensors)."""
    return (a.rank, a.alpha, set(a.targets)) == (b.rank, b.alpha, set(b.targets))


def save_lora(model: nn.Module, path: str | Path, config: LoRAConfig, base_sha256: str) -> Path:
    """Write the adapter's tensors and metadata (format, config, base_sha256, n_layers_adapted) to a
    safetensors file, atomically."""
    path = Path(path)
    layers = _require_layers(model, f"save adapter {path}")
    _refuse_merged(layers, f"save adapter {path}")
    have = next(iter(layers.values())).config
    if not _same_adapter(have, config):
        raise LLMKitError(
            f"cannot save adapter {path}: the config passed (rank {config.rank}, alpha {config.alpha}, targets "
            f"{config.targets}) is not the one the model was adapted with (rank {have.rank}, alpha {have.alpha}, "
            f"targets {have.targets}); pass the LoRAConfig given to apply_lora"
        )
    if not re.fullmatch(r"[0-9a-f]{64}", base_sha256):
        raise LLMKitError(
            f"cannot save adapter {path}: base_sha256 {base_sha256!r} is not a hex sha256; pass base_fingerprint(model)"
        )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    metadata = {
        "format": LORA_FORMAT,
        "config": json.dumps(config.to_dict()),
        "base_sha256": base_sha256,
        "n_layers_adapted": str(len(layers)),
    }
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


_WRITTEN_BY = "a TTT-Discover run's adapters/step_N.safetensors, or a file written by llmkit.model.lora.save_lora"
"""Where llmkit LoRA adapters come from, for the errors of :func:`read_lora`."""


def is_lora_file(path: Path) -> bool:
    """Whether ``path`` is a safetensors file whose metadata says :func:`save_lora` wrote it (its
    header only is read)."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("format") == LORA_FORMAT
    except (SafetensorError, OSError):
        return False


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], LoRAConfig, dict[str, str]]:
    """Read an adapter written by :func:`save_lora`: (tensors on CPU, config, metadata)."""
    path = Path(path)
    if path.is_dir():
        peft = " (a PEFT adapter directory, which llmkit writes but does not read)" if \
            (path / "adapter_config.json").is_file() else ""
        raise LLMKitError(f"LoRA adapter {path} is a directory{peft}: pass {_WRITTEN_BY}")
    if not path.is_file():
        raise LLMKitError(f"LoRA adapter {path} does not exist; pass {_WRITTEN_BY}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LLMKitError(
            f"cannot read LoRA adapter {path}: it is not a safetensors file ({e}); pass {_WRITTEN_BY}"
        ) from None
    if metadata.get("format") != LORA_FORMAT:
        raise LLMKitError(
            f"{path} is not an llmkit LoRA adapter (metadata format {metadata.get('format')!r}, expected "
            f"{LORA_FORMAT!r}); pass {_WRITTEN_BY}"
        )
    missing = [k for k in ("config", "base_sha256") if k not in metadata]
    if missing:
        raise LLMKitError(f"LoRA adapter {path} lacks metadata {missing}; pass {_WRITTEN_BY}")
    try:
        config = LoRAConfig.from_dict(json.loads(metadata["config"]))
    except (json.JSONDecodeError, TypeError, LLMKitError) as e:
        raise LLMKitError(f"LoRA adapter {path} has an invalid config in its metadata: {e}") from None
    strays = [k for k in tensors if not k.endswith(LORA_SUFFIXES)]
    if strays:
        raise LLMKitError(
            f"LoRA adapter {path} holds non-LoRA tensors such as {strays[0]!r}; pass {_WRITTEN_BY}"
        )
    if (damaged := non_finite_tensor(tensors)) is not None:
        raise LLMKitError(f"LoRA adapter {path}: {damaged} holds NaN or infinite values; the file is damaged or its "
                          "run diverged: pass an earlier adapter")
    return tensors, config, metadata


def load_lora(model: nn.Module, path: str | Path, expected_base_sha256: str | None = None) -> LoRAConfig:
    """Load an adapter into ``model``, applying LoRA with the adapter's config if the model has none.

    With ``expected_base_sha256`` (usually ``base_fingerprint(model)``) the adapter must have been
    trained on that base. The model is left unchanged when anything does not match.
    """
    path = Path(path)
    tensors, config, metadata = read_lora(path)
    if expected_base_sha256 is not None and metadata["base_sha256"] != expected_base_sha256:
        raise LLMKitError(
            f"adapter {path} was trained on base model {metadata['base_sha256'][:12]} but this base is "
            f"{expected_base_sha256[:12]}; load it onto the base it was trained from"
        )
    layers = lora_layers(model)
    if layers:
        _refuse_merged(layers, f"load adapter {path}")
        have = next(iter(layers.values())).config
        if not _same_adapter(have, config):
            raise LLMKitError(
                f"adapter {path} has rank {config.rank}, alpha {config.alpha}, targets {config.targets} but the "
                f"model's LoRA layers have rank {have.rank}, alpha {have.alpha}, targets {have.targets}; load it "
                f"onto a model without LoRA layers, which gets the adapter's config"
            )
        linears: dict[str, nn.Linear] = dict(layers)
    else:
        linears = _targeted_linears(model, config.targets)
    expected = {}
    for name, linear in linears.items():
        experts = tuple(linear.weight.shape[:-2])  # (E,) for an MoE expert projection, () for a Linear
        expected[f"{name}.lora_A"] = (*experts, config.rank, linear.in_features)
        expected[f"{name}.lora_B"] = (*experts, linear.out_features, config.rank)
    for key in sorted(set(expected) | set(tensors)):
        if key not in tensors:
            raise LLMKitError(f"adapter {path} has no tensor for the model's {key}; it was made for another model")
        if key not in expected:
            raise LLMKitError(f"adapter {path} has {key}, which this model has no LoRA layer for; wrong base model?")
        if tuple(tensors[key].shape) != expected[key]:
            raise LLMKitError(
                f"adapter {path}: {key} has shape {tuple(tensors[key].shape)} but the model needs {expected[key]}; "
                f"the adapter was trained on a base model of another shape"
            )
    if not layers:
        apply_lora(model, config)
    with torch.no_grad():
        for key, value in lora_state_dict(model).items():
            value.copy_(tensors[key])
    return config


def merge_lora(model: nn.Module) -> None:
    """Fold scale B A into every LoRA layer's weight (exact up to float rounding); merged layers are skipped."""
    layers = _require_layers(model, "merge LoRA")
    disabled = [name for name, layer in layers.items() if not layer.enabled]
    if disabled:
        raise LLMKitError(f"cannot merge LoRA while it is disabled (e.g. {disabled[0]}): leave disable_lora first")
    for layer in layers.values():
        layer.merge()


def merged_base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Merge every adapter into its base weight (:func:`merge_lora`) and return the state dict
    without the adapter tensors: the weights of the plain backbone it now equals."""
    merge_lora(model)
    return {k: v for k, v in model.state_dict().items() if not k.endswith(LORA_SUFFIXES)}


def merge_adapter_state(state: dict[str, torch.Tensor], config: LoRAConfig, source: str) -> dict[str, torch.Tensor]:
    """``state``, the state dict of a model with LoRA layers (a TTT-Discover checkpoint's), with every
    adapter folded into its base weight, W0 + scale B A in float32 cast to W0's dtype, and the adapter
    tensors dropped: the weights of the plain backbone it equals. ``source`` names it in errors."""
    merged = {k: v for k, v in state.items() if not k.endswith(LORA_SUFFIXES)}
    for name in sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(LORA_SUFFIXES)}):
        weight, lora_A, lora_B = (state.get(f"{name}.{part}") for part in ("weight", "lora_A", "lora_B"))
        if weight is None or lora_A is None or lora_B is None or lora_A.shape[-2] != config.rank or \
                lora_B.shape[-1] != config.rank:
            raise LLMKitError(f"{source}: {name} lacks its base weight or its lora_A / lora_B of rank "
                              f"{config.rank} (the rank its adapter config gives); the file is damaged")
        merged[f"{name}.weight"] = (weight.float() + low_rank_delta(lora_A, lora_B, config.scale)).to(weight.dtype)
    return merged


def unmerge_lora(model: nn.Module) -> None:
    """Subtract scale B A again: the base back to within float32 rounding, not bit for bit."""
    for layer in _require_layers(model, "unmerge LoRA").values():
        layer.unmerge()


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[None]:
    """Run the frozen base model (adapters off) inside the block, without a second copy of it;
    the previous ``enabled`` flags come back on exit, also on an exception."""
    layers = _require_layers(model, "disable LoRA")
    _refuse_merged(layers, "disable LoRA")
    previous = {name: layer.enabled for name, layer in layers.items()}
    for layer in layers.values():
        layer.enabled = False
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.enabled = previous[name]
