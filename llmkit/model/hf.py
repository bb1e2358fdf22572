"""Hugging Face LLaMA-family models in and out of llmkit (docs/interop.md).

Reads a local model directory (``config.json`` and ``*.safetensors``, sharded with
``model.safetensors.index.json`` or not) of the Llama, Mistral, Qwen2 and Qwen3 families, with
the ``safetensors`` library alone: ``transformers`` is not needed. Shards are opened lazily and
each tensor is read once, so converting takes about one copy of the weights in memory. Writing
goes the other way for a model with one residual stream: a ``config.json`` and
``model.safetensors`` that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

The families differ only in options of the one backbone (:class:`~llmkit.model.config.ModelConfig`):
Qwen2 has biases on the q/k/v projections, Qwen3 an RMSNorm on each head of q and k and an
explicit ``head_dim``, Llama 3.x a rescaled RoPE. What llmkit does not implement (another
architecture, a RoPE type other than default/linear/llama3, a sliding window shorter than the
context, quantised weights) is refused with one line naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmkit.errors import LLMKitError
from llmkit.io import non_finite_tensor, read_json, write_json_atomic
from llmkit.model.config import ModelConfig, RopeScaling
from llmkit.model.lora import LORA_SUFFIXES, LoRAConfig
from llmkit.model.transformer import Transformer

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}
"""The ``model_type`` values llmkit imports, and their ``architectures`` class."""

_TOP_LEVEL = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "lm_head.weight"}
_IN_LAYER = {"input_layernorm.": "attn_norm.", "post_attention_layernorm.": "mlp_norm.", "self_attn.": "attn.",
             "mlp.": "mlp."}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_IGNORED = ("rotary_emb.inv_freq",)  # a buffer some older checkpoints saved; llmkit computes it


def llmkit_name(hf_name: str) -> str | None:
    """The llmkit parameter a Hugging Face tensor name maps to (None: not a weight llmkit knows).
    ``model.layers.3.self_attn.q_proj.weight`` is ``blocks.3.attn.q_proj.weight``."""
    if hf_name in _TOP_LEVEL:
        return _TOP_LEVEL[hf_name]
    match = _HF_LAYER.fullmatch(hf_name)
    if match:
        for hf_part, part in _IN_LAYER.items():
            if match[2].startswith(hf_part):
                return f"blocks.{match[1]}.{part}{match[2][len(hf_part):]}"
    return None


def hf_name(name: str) -> str:
    """The Hugging Face tensor name of the llmkit parameter ``name`` (the inverse of :func:`llmkit_name`)."""
    for hf, ours in _TOP_LEVEL.items():
        if name == ours:
            return hf
    match = _BLOCK.fullmatch(name)
    if match:
        for hf_part, part in _IN_LAYER.items():
            if match[2].startswith(part):
                return f"model.layers.{match[1]}.{hf_part}{match[2][len(part):]}"
    raise LLMKitError(f"parameter {name} has no Hugging Face equivalent (an mHC or LoRA parameter?)")


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face model directory."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise LLMKitError(f"model directory {model_dir} is a file: pass the local Hugging Face model directory "
                          "(config.json and *.safetensors)")
    if not model_dir.is_dir():
        raise LLMKitError(f"model directory {model_dir} does not exist: pass a local Hugging Face model directory")
    if not (model_dir / "config.json").is_file():
        raise LLMKitError(
            f"{model_dir} has no config.json: pass a Hugging Face model directory (config.json and *.safetensors)"
        )
    return read_json(model_dir / "config.json", "it must be the model's Hugging Face config")


def _field(hf: dict[str, Any], key: str, source: Path, kind: type[int] | type[float] = int,
           default: float | None = None) -> Any:
    """``hf[key]`` as ``kind`` (:func:`_number`); ``default`` where it is absent or null, and without
    a default, an error naming the key."""
    if hf.get(key) is None:
        if default is None:
            raise LLMKitError(f"{source}: no {key!r}; a {hf.get('model_type')} config needs it")
        return default
    return _number(hf[key], key, source, kind)


def _optional(hf: dict[str, Any], key: str, source: Path) -> int | None:
    """``hf[key]`` as a whole number (:func:`_number`), or None where it is absent or null."""
    return None if hf.get(key) is None else _number(hf[key], key, source, int)


def _number(value: Any, key: str, source: Path, kind: type[int] | type[float]) -> Any:
    """``value`` of the field ``key`` as ``kind``: a whole number for int (2.0 reads as 2), any number
    for float; text, a bool, 2.5 layers are one line naming the key (int() took 2.5 as 2)."""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not whole):
        raise LLMKitError(f"{source}: {key} must be {'a whole number' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _rope_spec(spec: dict[str, Any], hf: dict[str, Any], source: Path) -> dict[str, Any]:
    """A RoPE dict as transformers completes it: ``type`` read as ``rope_type`` (default ``default``),
    ``rope_theta`` and ``partial_rotary_factor`` taken from the top level when the dict lacks them."""
    spec = dict(spec)
    legacy_type = spec.pop("type", "default")
    spec["rope_type"] = spec.get("rope_type", legacy_type)
    spec["rope_theta"] = _number(spec.get("rope_theta", hf.get("rope_theta", 10000.0)), "rope_theta", source, float)
    spec["partial_rotary_factor"] = spec.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return spec


def _rope(hf: dict[str, Any], source: Path) -> tuple[float, RopeScaling | None]:
    """RoPE's base and scaling from ``rope_parameters`` (transformers >= 5) or ``rope_theta`` and
    ``rope_scaling`` (earlier). A config with both must say the same in each: transformers reads
    ``rope_scaling`` alone then (5's ``convert_rope_params_to_dict``; 4 ignores ``rope_parameters``)."""
    params, scaling = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise LLMKitError(f"{source}: {key} must be a mapping such as {{\"rope_type\": \"default\"}}, "
                              f"got {value!r}")
    if params and scaling:
        params, scaling = _rope_spec(params, hf, source), _rope_spec(scaling, hf, source)
        for key in sorted(set(params) | set(scaling), key=lambda k: (k != "rope_type", k)):
            if params.get(key) != scaling.get(key):
                raise LLMKitError(
                    f"{source}: rope_parameters has {key} {params.get(key)!r} but rope_scaling has "
                    f"{scaling.get(key)!r} (transformers reads rope_scaling); remove the wrong one of the two keys"
                )
    spec = _rope_spec({**scaling, **params}, hf, source)
    theta, rope_type = spec["rope_theta"], spec["rope_type"]
    if spec["partial_rotary_factor"] != 1.0:
        raise LLMKitError(f"{source}: partial_rotary_factor is not supported (llmkit rotates whole heads)")
    if rope_type == "default":
        return theta, None
    where = "rope_parameters" if params else "rope_scaling"
    if rope_type in ("linear", "llama3"):
        needed = ("factor",) if rope_type == "linear" else \
            ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if missing := [key for key in needed if spec.get(key) is None]:
            raise LLMKitError(f"{source}: {where} of rope type {rope_type!r} lacks {', '.join(missing)}; "
                              "transformers needs them too: add them from the model's release")
        value = {key: _number(spec[key], f"{where}.{key}", source, int if key.startswith("original") else float)
                 for key in needed}
        if rope_type == "linear":
            return theta, RopeScaling("linear", factor=value["factor"])
        return theta, RopeScaling(
            "llama3", factor=value["factor"], low_freq_factor=value["low_freq_factor"],
            high_freq_factor=value["high_freq_factor"], original_max_seq_len=value["original_max_position_embeddings"],
        )
    raise LLMKitError(
        f"{source}: rope type {rope_type!r} ({where}) is not supported: "
        "llmkit implements default, linear and llama3"
    )


def _windowed(hf: dict[str, Any], model_type: str) -> bool:
    """Whether any layer attends over a sliding window, as transformers decides: ``layer_types``
    where the config lists them; else every Mistral layer, and the Qwen layers from
    ``max_window_layers`` on when ``use_sliding_window`` is set."""
    if hf.get("layer_types") is not None:
        return "sliding_attention" in hf["layer_types"]
    if model_type == "mistral":
        return True
    return bool(hf.get("use_sliding_window")) and hf.get("max_window_layers", 0) < hf.get("num_hidden_layers", 0)


def model_config_from_hf(hf: dict[str, Any], source: Path, max_seq_len: int | None = None) -> ModelConfig:
    """The llmkit :class:`ModelConfig` (one residual stream) of a Hugging Face config read from
    ``source``; ``max_seq_len`` caps the context (default: ``max_position_embeddings``)."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise LLMKitError(
            f"{source}: model_type {model_type!r} is not supported; llmkit imports {', '.join(FAMILIES)}"
        )
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise LLMKitError(f"{source}: quantization_config ({method}): quantised weights are not supported; "
                          "use the unquantised checkpoint")
    if hf.get("hidden_act", "silu") != "silu":
        raise LLMKitError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (llmkit's MLP is SwiGLU: silu)")
    if hf.get("mlp_bias"):
        raise LLMKitError(f"{source}: mlp_bias true is not supported (llmkit's MLP projections have no bias)")
    if hf.get("attention_bias") and model_type != "qwen2":
        raise LLMKitError(f"{source}: attention_bias true is not supported for {model_type} (it biases o_proj too)")
    theta, scaling = _rope(hf, source)
    context = _field(hf, "max_position_embeddings", source)
    seq_len = min(context, max_seq_len) if max_seq_len else context
    window = _optional(hf, "sliding_window", source)
    if window is not None and _windowed(hf, model_type) and window < seq_len:
        raise LLMKitError(
            f"{source}: sliding_window {window} is shorter than the context {seq_len}, and llmkit attends over "
            f"the whole context: convert with --max-seq-len {window} (or less)"
        )
    n_heads = _field(hf, "num_attention_heads", source)
    fields = dict(
        vocab_size=_field(hf, "vocab_size", source),
        n_layers=_field(hf, "num_hidden_layers", source),
        d_model=_field(hf, "hidden_size", source),
        n_heads=n_heads,
        n_kv_heads=_field(hf, "num_key_value_heads", source, default=n_heads),
        head_dim=_optional(hf, "head_dim", source),
        d_ff=_field(hf, "intermediate_size", source),
        max_seq_len=seq_len,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=_field(hf, "rms_norm_eps", source, float, default=1e-6),
        init_std=_field(hf, "initializer_range", source, float, default=0.02),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        n_streams=1,
    )
    try:
        return ModelConfig(**fields)
    except LLMKitError as e:  # a shape no model has (heads that do not divide...): name the file it came from
        raise LLMKitError(f"{source}: {e} (in llmkit's names for the file's fields)") from None


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: those its index names, else ``model.safetensors``,
    else every ``*.safetensors``."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "it must be the safetensors index written with the model").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LLMKitError(f"{index}: no 'weight_map' of tensor names to shard files")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise LLMKitError(f"{index} names the shard {path.name}, which is missing from {model_dir}: "
                                  "download the complete model")
        return files
    if (model_dir / "model.safetensors").is_file():  # as transformers reads it: a stray file beside it is not read
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LLMKitError(f"{model_dir} has no *.safetensors weights (pytorch_model.bin is not read): "
                          "save the model with safetensors")
    return files


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of each tensor in a safetensors file, read one at a time."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise LLMKitError(f"cannot read {path}: {e}; the file is damaged or not safetensors") from None


def tie_head(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with ``lm_head.weight`` the very tensor ``tok_emb.weight`` is when ``config``
    ties them (files store a tied head once: :func:`write_weights` leaves it out)."""
    if config.tie_embeddings and "tok_emb.weight" in state:
        state["lm_head.weight"] = state["tok_emb.weight"]
    return state


def _check_tied_head(embedding: torch.Tensor, path: Path, head: torch.Tensor) -> None:
    """Refuse a stored ``lm_head.weight`` that differs from the embedding under ``tie_word_embeddings``
    true: transformers 4 ties them (its ``tie_weights`` puts the embedding in the head after loading),
    5 keeps the file's head (``tie_weights`` warns "so we will NOT tie them"), so the checkpoint means
    one model or another depending on the version. An equal head (a tied model saved with both) ties."""
    if not torch.equal(head.to(embedding.dtype), embedding):
        raise LLMKitError(
            f"{path}: lm_head.weight differs from model.embed_tokens.weight, but config.json has "
            "tie_word_embeddings true (transformers 4 ties them, 5 does not): set tie_word_embeddings to false "
            "to keep this head, or delete lm_head.weight to tie it to the embedding"
        )


def read_hf_model(
    model_dir: str | Path, max_seq_len: int | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The llmkit config and state dict (llmkit names; ``lm_head.weight`` is ``tok_emb.weight``
    when tied) of a Hugging Face model directory, each tensor in the dtype it is stored in.

    Every tensor is checked against the shape the config implies; a missing, unexpected,
    misshapen or integer (quantised) tensor raises :class:`LLMKitError` naming it and its file.
    """
    model_dir = Path(model_dir)
    hf = read_hf_config(model_dir)
    config = model_config_from_hf(hf, model_dir / "config.json", max_seq_len)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Transformer(config).state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    stored_head: tuple[Path, torch.Tensor] | None = None  # a tied config's lm_head.weight, if the files hold one
    for path in weight_files(model_dir):
        for key, tensor in read_safetensors(path):
            name = llmkit_name(key)
            if name is None and key.endswith(_IGNORED):
                continue
            if name not in expected:
                raise LLMKitError(f"{path}: tensor {key} is not a weight of this {hf['model_type']} config; "
                                  "the weights and config.json do not belong together")
            if name in state:
                raise LLMKitError(f"{path}: tensor {key} is in another file of {model_dir} too; keep one copy of "
                                  "the weights (or a model.safetensors.index.json naming the shards)")
            if tuple(tensor.shape) != expected[name]:
                raise LLMKitError(f"{path}: {key} has shape {list(tensor.shape)} but config.json implies "
                                  f"{list(expected[name])}; the weights and config.json do not belong together")
            if not tensor.is_floating_point():
                raise LLMKitError(f"{path}: {key} is {tensor.dtype}: quantised or integer weights are not supported")
            if non_finite_tensor({key: tensor}):
                raise LLMKitError(f"{path}: {key} holds NaN or infinite values; the file is damaged: download the "
                                  "model again")
            if name == "lm_head.weight" and config.tie_embeddings:
                stored_head = (path, tensor)  # tied: the head is the embedding, if the two are equal (below)
                continue
            state[name] = tensor
    if stored_head is not None and "tok_emb.weight" in state:
        _check_tied_head(state["tok_emb.weight"], *stored_head)
    tie_head(config, state)
    missing = [name for name in expected if name not in state]
    if missing:
        raise LLMKitError(f"{model_dir}: the weights lack {hf_name(missing[0])}"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                          + "; download the complete model")
    return config, state


def hf_exportable(config: ModelConfig) -> bool:
    """Whether a model has a Hugging Face LLaMA-family form: one residual stream, standard
    attention, the dense MLP (mHC, latent attention and MoE have none)."""
    return config.n_streams == 1 and config.attention == "mha" and config.moe.n_experts == 0


def hf_config(
    config: ModelConfig, dtype: torch.dtype, special_ids: dict[str, int | list[int] | None]
) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of a one-stream llmkit model: Qwen3 if it has qk-norm,
    Qwen2 if it has q/k/v biases, Llama otherwise. ``special_ids`` holds ``bos_token_id``,
    ``eos_token_id`` and ``pad_token_id``."""
    if not hf_exportable(config):
        raise LLMKitError(f"this model (n_streams {config.n_streams}, attention {config.attention}, "
                          f"{config.moe.n_experts} experts) has no Hugging Face LLaMA-family architecture; "
                          "it is exported as an llmkit model directory")
    if config.qk_norm and config.attention_bias:
        raise LLMKitError("no supported Hugging Face family has both qk_norm and attention_bias")
    model_type = "qwen3" if config.qk_norm else "qwen2" if config.attention_bias else "llama"
    rope_scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope_scaling = {"rope_type": s.rope_type, "factor": s.factor}
        if s.rope_type == "llama3":
            rope_scaling |= {"low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                             "original_max_position_embeddings": s.original_max_seq_len}
    return {
        "architectures": [FAMILIES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": config.norm_eps,
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **special_ids,
    }


def write_weights(
    config: ModelConfig, state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype,
    rename: Callable[[str], str] = lambda name: name,
) -> None:
    """Write the weights ``state`` of a model with ``config`` in ``dtype`` to the safetensors file
    ``path``, each under ``rename(name)``; a tied ``lm_head.weight`` is left out (it is the embedding)."""
    tensors = {rename(name): tensor.detach().to("cpu", dtype).contiguous() for name, tensor in state.items()
               if not (name == "lm_head.weight" and config.tie_embeddings)}
    save_file(tensors, str(path), metadata={"format": "pt"})


def save_hf_model(
    config: ModelConfig, state: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype,
    special_ids: dict[str, int | list[int] | None], generation: dict[str, Any] | None = None,
) -> None:
    """Write ``config.json``, ``generation_config.json`` and ``model.safetensors`` (Hugging Face
    names, in ``dtype``) of a one-stream model (``config``, ``state``) into ``out_dir``. The
    generation config is ``generation`` (a source model's sampling defaults) with ``special_ids``."""
    hf = hf_config(config, dtype, special_ids)  # refuses what has no Hugging Face form before writing
    write_weights(config, state, out_dir / "model.safetensors", dtype, hf_name)
    write_json_atomic(out_dir / "config.json", hf)
    write_json_atomic(out_dir / "generation_config.json", {**(generation or {}), **special_ids})


def save_peft_adapter(tensors: dict[str, torch.Tensor], config: LoRAConfig, out_dir: Path) -> None:
    """Write an llmkit LoRA adapter (:func:`llmkit.model.lora.read_lora`'s tensors and config) in
    PEFT's layout: ``adapter_config.json`` and ``adapter_model.safetensors``, which
    ``peft.PeftModel.from_pretrained`` loads onto the exported base. Same math: PEFT's LoRA adds
    (lora_alpha / r) B A x, with A [r, in] and B [out, r] as llmkit stores them."""
    renamed = {}
    for name, tensor in tensors.items():
        layer, suffix = name.rsplit(".", 1)
        if f".{suffix}" not in LORA_SUFFIXES:
            raise LLMKitError(f"adapter tensor {name} is not a LoRA factor")
        base = hf_name(f"{layer}.weight").removesuffix(".weight")
        renamed[f"base_model.model.{base}.{suffix}.weight"] = tensor.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(renamed, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json_atomic(out_dir / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "target_modules": list(config.targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True, "base_model_name_or_path": None,
    })
