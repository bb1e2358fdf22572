"""Load a trained backbone from a Lightning checkpoint or a model directory, safely.

Every checkpoint file llmkit reads goes through :func:`load_checkpoint_file`: the file must exist, be
a complete zip archive whose every member passes its CRC-32 check (a truncated copy or a
damaged block is caught before anything is loaded), and hold only tensors and plain containers
(``torch.load(weights_only=True)``, never arbitrary pickled objects). Each failure is one
:class:`LLMKitError` line naming the file. The model is rebuilt from the config dict the
checkpoint holds (:func:`model_config_dict`).

Wherever a checkpoint is read (:func:`read_checkpoint`: ``--ckpt``, ``init_ckpt``) a model
directory works too: an llmkit model directory (``config.json`` with ``model_type: llmkit`` and a
``model.safetensors`` in llmkit's names, :func:`save_model_dir`) or a Hugging Face LLaMA-family
directory, converted in memory (:mod:`llmkit.model.hf`).

So does a sharded checkpoint, the folder Lightning's FSDPStrategy writes with
``state_dict_type: sharded`` (:func:`is_sharded_checkpoint`): every rank's shard of the weights
and optimizer state in ``torch.distributed.checkpoint`` files, and everything else in
``meta.pt``. It is read in one process, on the CPU, whatever the number of ranks that wrote it:
``meta.pt`` (integrity-checked, ``weights_only``) with the weights gathered from the shards
(:func:`sharded_weights`), never the optimizer state; so ``validate --ckpt_path``, ``generate``
and ``init_ckpt`` take it on any strategy, and resuming its training takes FSDP again.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import LLMKitError
from llmkit.io import atomic_file, non_finite_tensor, write_json_atomic
from llmkit.model.config import ModelConfig
from llmkit.model.hf import (
    model_config_from_hf,
    read_hf_config,
    read_hf_model,
    read_safetensors,
    tie_head,
    write_weights,
)
from llmkit.model.lora import LORA_SUFFIXES, LoRAConfig, is_lora_file, merge_adapter_state
from llmkit.model.mhc import reshape_scalar_alphas
from llmkit.model.transformer import Transformer

WRITER_KEY = "llmkit_module"
"""The checkpoint entry naming the LightningModule class that wrote it."""
LOGGED_STEP_KEY = "llmkit_logged_step"
"""The checkpoint entry holding the step its module's logs number the checkpoint's state with:
``global_step``, but TTT-Discover's discovery steps, which ``mode: best_of_n`` counts without an
optimizer step."""
TOKENIZER_KEY = "llmkit_tokenizer"
"""The checkpoint entry naming the tokenizer whose ids the weights learned, ``{"path", "sha256"}``
(the SHA-256 of its file, which packed shards record as ``tokenizer_sha256``): every module writes
it, ``llmkit convert from-hf`` too where the model directory holds a tokenizer, and
:func:`check_tokenizer` holds a tokenizer met later to it. Checkpoints written before it existed,
and model directories, have none."""
MODEL_DIR_TYPE = "llmkit"
"""The ``model_type`` in the ``config.json`` of an llmkit model directory."""
SHARDED_METADATA = "meta.pt"
"""The file of a sharded checkpoint folder that holds everything but the weights and optimizer
state (Lightning's ``_METADATA_FILENAME``); ``.metadata`` is torch.distributed.checkpoint's index."""


def check_writer(checkpoint: dict[str, Any], module: str) -> None:
    """Raise :class:`LLMKitError` when the training checkpoint ``checkpoint`` was written by another
    llmkit LightningModule than ``module`` (its ``WRITER_KEY``), before its weights meet the wrong
    module's (a resume would otherwise fail on state_dict keys, or train on)."""
    writer = checkpoint.get(WRITER_KEY, module)
    if writer != module:
        raise LLMKitError(
            f"this checkpoint was written by {writer}, not {module}: resume or load it with {writer}, or give it to "
            f"{module} as init_ckpt to start from its weights"
        )


_CHECKED: dict[Path, tuple[int, int]] = {}
"""Files this process has checked, with their (size, mtime in ns) then: a file read twice (a run's
config from ``init_ckpt``, then its weights) is checked once, unless it changed in between."""


def check_tokenizer(checkpoint: dict[str, Any], ckpt: str | Path, tokenizer: dict[str, str] | None) -> None:
    """Raise :class:`LLMKitError` when ``tokenizer`` (``{"path", "sha256"}``, or None: unknown) is not
    the tokenizer the weights of ``checkpoint`` (read from ``ckpt``) learned (:data:`TOKENIZER_KEY`),
    where both are known: another tokenizer of the same size passes every shape check, and its ids
    mean other text."""
    learned = checkpoint.get(TOKENIZER_KEY)
    if learned and tokenizer and learned["sha256"] != tokenizer["sha256"]:
        raise LLMKitError(
            f"{ckpt} learned the ids of the tokenizer {learned['path']} (sha256 {learned['sha256'][:12]}), not of "
            f"{tokenizer['path']} (sha256 {tokenizer['sha256'][:12]}): the same ids mean other text; use the "
            f"model's tokenizer, and data packed with it"
        )


def tokenizer_candidates(ckpt: str | Path, checkpoint: dict[str, Any]) -> list[Path]:
    """Where the tokenizer of ``checkpoint`` (read from ``ckpt``) may be, best first: the file it
    records (:data:`TOKENIZER_KEY`), a fine-tuning run's ``tokenizer`` hyperparameter (as that run
    was given it: relative to where it ran), the model directory it was converted from, and
    ``ckpt`` itself when it is a directory; :func:`llmkit.data.tokenizer.first_tokenizer` picks the
    first that holds a tokenizer, and :func:`check_tokenizer` still checks what it picked."""
    named = [(checkpoint.get(TOKENIZER_KEY) or {}).get("path"),
             (checkpoint.get("hyper_parameters") or {}).get("tokenizer"),
             (checkpoint.get("converted_from") or {}).get("model_dir")]
    return [Path(p) for p in named if p] + ([Path(ckpt)] if Path(ckpt).is_dir() else [])


def check_checkpoint_file(path: str | Path) -> Path:
    """``path``, checked to be a complete, undamaged checkpoint archive (see the module docstring)."""
    path = Path(path)
    if path.is_dir():  # read_checkpoint reads model directories itself: a directory here came from --ckpt_path
        kind = "a model directory" if (path / "config.json").is_file() else "a directory"
        raise LLMKitError(
            f"checkpoint {path} is {kind}, not a training checkpoint: --ckpt_path takes a Lightning .ckpt file "
            f"(e.g. .../checkpoints/last.ckpt); to validate or train from a model directory give it as "
            f"--model.init_ckpt {path}, to sample from it `llmkit generate --ckpt {path}`"
        )
    if not path.is_file():
        raise LLMKitError(f"checkpoint {path} does not exist: check the path (ckpt_path, init_ckpt or --ckpt)")
    if path.suffix == ".safetensors" and is_lora_file(path):
        raise LLMKitError(f"{path} is a LoRA adapter, not a checkpoint: give the checkpoint it was trained on, and "
                          f"the adapter as --lora (llmkit generate, llmkit lora merge)")
    if path.suffix == ".safetensors":
        raise LLMKitError(f"{path} is a weights file, not a checkpoint: give the model directory it is in "
                          f"({path.parent}), which llmkit reads with its config.json, or a .ckpt")
    if path.suffix in (".bin", ".pt", ".pth") and (path.parent / "config.json").is_file():
        raise LLMKitError(f"{path} is a Hugging Face weights file in pickle format, which llmkit does not load: "
                          f"re-save the model with safetensors (transformers' save_pretrained) and give its "
                          f"directory")
    stat = path.stat()
    if stat.st_size == 0:
        raise LLMKitError(f"cannot read checkpoint {path}: the file is empty (an interrupted copy?); use another one")
    key, checked = path.resolve(), (stat.st_size, stat.st_mtime_ns)
    if _CHECKED.get(key) == checked:
        return path
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise LLMKitError(
            f"cannot read checkpoint {path}: it is not a complete checkpoint archive ({e}); the file is "
            "truncated or not a checkpoint: pass a .ckpt written by llmkit"
        ) from None
    if damaged is not None:
        raise LLMKitError(
            f"cannot read checkpoint {path}: its member {damaged} fails the CRC check, the file is damaged; "
            "use another checkpoint (an earlier one, or a fresh copy)"
        )
    _CHECKED[key] = checked
    return path


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (see the module docstring)."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_METADATA).is_file() and (path / ".metadata").is_file()


def sharded_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The full weights (``state_dict``) of the sharded checkpoint folder ``path``, gathered from
    every rank's shard into CPU tensors in this one process; the optimizer state is not read."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    try:  # the planner rebuilds the saved tensors from the index: no model or process group needed
        _load_state_dict(state, storage_reader=FileSystemReader(path),
                         planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    except (CheckpointException, OSError, RuntimeError, ValueError) as e:
        raise LLMKitError(
            f"cannot read the sharded checkpoint {path}: {str(e).splitlines()[0]}; a shard file is missing or "
            "damaged: use another checkpoint"
        ) from None
    if "model" not in state:
        raise LLMKitError(f"{path} is a sharded checkpoint without weights (no 'model' in its shards)")
    return state["model"]


def load_checkpoint_file(path: str | Path, map_location: str | torch.device = "cpu", weights: bool = True) -> dict:
    """The checkpoint at ``path`` as plain data: integrity-checked, then loaded with
    ``weights_only=True`` (tensors and plain containers only) and ``mmap=True`` (a tensor is read
    from disk when it is used: the weights of a checkpoint that also holds optimizer state cost
    no memory for that state), onto the CPU: its tensors are moved to ``map_location`` after, so
    a device that is unknown or absent is never reported as a bad file. A sharded checkpoint
    folder reads as its ``meta.pt`` with, if ``weights``, the gathered ``state_dict``
    (:func:`sharded_weights`)."""
    if is_sharded_checkpoint(path):
        ckpt = load_checkpoint_file(Path(path) / SHARDED_METADATA, map_location)
        if weights:
            ckpt["state_dict"] = {k: v.to(map_location) for k, v in sharded_weights(path).items()}
        return ckpt
    path = check_checkpoint_file(path)
    try:  # onto the CPU, so that what fails here is the file, never the device (unknown, absent, full)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError):
        raise LLMKitError(
            f"cannot read checkpoint {path}: it is not a torch checkpoint of tensors and plain data "
            f"(a different file, or one holding pickled objects, which llmkit does not load); pass a "
            f".ckpt written by llmkit"
        ) from None
    if not isinstance(ckpt, dict):
        raise LLMKitError(f"{path} is not an llmkit checkpoint (it holds {type(ckpt).__name__}, not a dict)")
    return ckpt if torch.device(map_location).type == "cpu" else _to_device(ckpt, torch.device(map_location))


def _to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (in dicts, lists and tuples, at any depth) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint at ``path`` as plain data, checked to hold a model config and weights, every
    weight finite (checked here, once: what reads a checkpoint reads it through this); a model
    directory (see the module docstring) reads as ``{"model_config", "state_dict"}``, a sharded
    checkpoint folder as :func:`load_checkpoint_file` says."""
    if Path(path).is_dir() and not is_sharded_checkpoint(path):
        ckpt = _read_model_dir(Path(path))
    else:
        ckpt = load_checkpoint_file(path, map_location)
        if "state_dict" not in ckpt or model_config_dict(ckpt) is None:
            raise LLMKitError(f"{path} is not an llmkit checkpoint (no model config or state_dict)")
        if (damaged := non_finite_tensor(ckpt["state_dict"])) is not None:
            raise LLMKitError(f"{path}: {damaged.removeprefix('model.')} holds NaN or infinite values; the file is "
                              "damaged or its run diverged: use an earlier checkpoint")
    reshape_scalar_alphas(ckpt["state_dict"])
    return ckpt


def reshape_scalar_alpha_moments(ckpt: dict) -> None:
    """In place, the optimizer states of a training checkpoint written while the mHC mappings'
    alphas were 0-d (before FSDP's refusal of scalar parameters made them [1]) made to fit today's
    model: every 0-d per-parameter state but ``step`` was an alpha's, and foreach and single-tensor
    AdamW refuse to step a [1] parameter with 0-d moments. (The weights: the Transformer's load
    pre-hook.)"""
    for optimizer_state in ckpt.get("optimizer_states", []):
        _reshape_scalar_moments(optimizer_state)


def _reshape_scalar_moments(optimizer_state: dict) -> None:
    """The 0-d per-parameter states (but ``step``) of an optimizer's state dict reshaped to [1],
    in place; a combined optimizer's parts too (Muon's ``{"muon": ..., "adamw": ...}``)."""
    for key, value in optimizer_state.items():
        if key == "state":
            for per_param in value.values():
                for name, t in per_param.items():
                    if name != "step" and isinstance(t, torch.Tensor) and t.ndim == 0:
                        per_param[name] = t.reshape(1)
        elif isinstance(value, dict):
            _reshape_scalar_moments(value)


def checkpoint_model_config(path: str | Path) -> ModelConfig:
    """The backbone config of the checkpoint (file, sharded folder or model directory) at ``path``,
    without building the model: a sharded checkpoint's weights are not gathered for it."""
    if Path(path).is_dir() and not is_sharded_checkpoint(path):
        return _model_dir_config(Path(path))  # config.json only: the weights are not read
    config = model_config_dict(load_checkpoint_file(path, weights=False))
    if config is None:
        raise LLMKitError(f"{path} is not an llmkit checkpoint (no model config)")
    return ModelConfig.from_dict(config)


def model_config_dict(ckpt: dict) -> dict | None:
    """The backbone's config in a checkpoint: ``ckpt["model_config"]``, which every module and
    ``llmkit convert`` write; a PretrainModule checkpoint from before it existed keeps the config
    in its hyperparameters only."""
    return ckpt.get("model_config") or ckpt.get("hyper_parameters", {}).get("config")


def load_backbone(path: str | Path, map_location: str | torch.device = "cpu") -> Transformer:
    """Rebuild the Transformer saved by PretrainModule at ``path`` (in eval mode)."""
    return backbone_from_checkpoint(read_checkpoint(path, map_location), path, map_location)


def backbone_from_checkpoint(
    ckpt: dict, path: str | Path, map_location: str | torch.device = "cpu"
) -> Transformer:
    """The Transformer of a checkpoint already read by :func:`read_checkpoint` (``path`` names it
    in errors), with the weights of :func:`backbone_state`."""
    model = Transformer(ModelConfig.from_dict(model_config_dict(ckpt))).to(map_location)
    state, expected = backbone_state(ckpt, path), model.state_dict()
    wrong = [f"{name} has shape {list(t.shape)} where its config makes {list(expected[name].shape)}"
             for name, t in state.items() if name in expected and t.shape != expected[name].shape]
    if wrong:
        raise LLMKitError(f"{path}: weights do not match its config ({wrong[0]}"
                          + (f", and {len(wrong) - 1} more" if len(wrong) > 1 else "") + ")")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LLMKitError(
            f"{path}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval()


def backbone_state(ckpt: dict, path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone's weights in a checkpoint already read by :func:`read_checkpoint` (its
    ``model.`` entries, without the prefix). A TTT-Discover checkpoint holds the base weights and
    the adapter it trained: its backbone is the adapted model, the adapter merged into the base
    weights (:func:`~llmkit.model.lora.merge_adapter_state`)."""
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if holds_adapter(ckpt):
        lora = ckpt.get("hyper_parameters", {}).get("lora")
        if not isinstance(lora, dict):
            raise LLMKitError(f"{path} holds LoRA adapter tensors but no adapter config (hyper_parameters.lora), "
                              f"so they cannot be merged: pass the checkpoint its run wrote")
        state = merge_adapter_state(state, LoRAConfig.from_dict(lora), str(path))
    return state


def holds_adapter(ckpt: dict) -> bool:
    """Whether a checkpoint's weights include LoRA adapter tensors (a TTT-Discover run's do)."""
    return any(k.startswith("model.") and k.endswith(LORA_SUFFIXES) for k in ckpt["state_dict"])


def tokenizer_link(ckpt: str | Path, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint written from ``ckpt`` (read as ``checkpoint``) by ``llmkit convert upcycle``
    or ``llmkit lora merge`` keeps of its source, so that ``llmkit convert to-hf`` still finds the
    tokenizer and later commands still check it: the source's :data:`TOKENIZER_KEY` and
    ``converted_from``, or a ``converted_from`` naming ``ckpt`` when it is a model directory."""
    link = {TOKENIZER_KEY: checkpoint[TOKENIZER_KEY]} if TOKENIZER_KEY in checkpoint else {}
    if "converted_from" in checkpoint:
        return link | {"converted_from": checkpoint["converted_from"]}
    if Path(ckpt).is_dir():
        return link | {"converted_from": {"model_dir": str(Path(ckpt).resolve())}}
    return link


def write_backbone_checkpoint(
    path: str | Path, config: ModelConfig, state: dict[str, torch.Tensor], **extra: Any
) -> None:
    """Write a checkpoint that every command reading a backbone accepts: ``model_config``, the
    ``state_dict`` under ``model.`` and the ``extra`` entries; through :func:`llmkit.io.atomic_file`."""
    with atomic_file(path) as tmp:
        torch.save({"model_config": config.to_dict(), "state_dict": {f"model.{k}": v for k, v in state.items()},
                    **extra}, tmp)


def save_model_dir(
    config: ModelConfig, state: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype,
    extra_config: dict[str, Any],
) -> None:
    """Write a model (``config``, ``state``) as an llmkit model directory into ``out_dir``:
    ``config.json`` (``model_type: llmkit``, the model config, ``extra_config`` such as the special
    token ids) and ``model.safetensors`` (llmkit's names, in ``dtype``)."""
    write_weights(config, state, out_dir / "model.safetensors", dtype)
    write_json_atomic(out_dir / "config.json", {
        "model_type": MODEL_DIR_TYPE, "llmkit_model_config": config.to_dict(),
        "torch_dtype": str(dtype).removeprefix("torch."), **extra_config,
    })


def _model_dir_config(model_dir: Path) -> ModelConfig:
    """The backbone config of an llmkit or Hugging Face model directory, from its config.json alone."""
    values = read_hf_config(model_dir)
    if values.get("model_type") != MODEL_DIR_TYPE:
        return model_config_from_hf(values, model_dir / "config.json")
    if not isinstance(values.get("llmkit_model_config"), dict):
        raise LLMKitError(f"{model_dir / 'config.json'}: no 'llmkit_model_config'; write the directory with "
                          "`llmkit convert to-hf`")
    try:
        return ModelConfig.from_dict(values["llmkit_model_config"])
    except LLMKitError as e:
        raise LLMKitError(f"{model_dir / 'config.json'}: llmkit_model_config: {e}") from None


def _read_model_dir(model_dir: Path) -> dict:
    """An llmkit or Hugging Face model directory as ``{"model_config", "state_dict"}``, every weight
    checked finite (a Hugging Face one's by :func:`~llmkit.model.hf.read_hf_model`, naming its file)."""
    if read_hf_config(model_dir).get("model_type") != MODEL_DIR_TYPE:
        config, state = read_hf_model(model_dir)
    else:
        config = _model_dir_config(model_dir)
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise LLMKitError(f"{model_dir} has no *.safetensors weights: the directory is incomplete")
        state = tie_head(config, {name: tensor for path in files for name, tensor in read_safetensors(path)})
        if (damaged := non_finite_tensor(state)) is not None:
            raise LLMKitError(f"{model_dir}: {damaged} holds NaN or infinite values; the weights are damaged: write "
                              "the directory again (llmkit convert to-hf) from its checkpoint")
    return {"model_config": config.to_dict(), "state_dict": {f"model.{k}": v for k, v in state.items()}}
