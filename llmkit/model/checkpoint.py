"""Load a trained backbone from a Lightning checkpoint, safely.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers
only, never arbitrary pickled objects. The model is rebuilt from the config dict the checkpoint
holds (:func:`model_config_dict`).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from llmkit.errors import LLMKitError
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint at ``path`` as plain data, checked to hold a model config and weights."""
    path = Path(path)
    if not path.is_file():
        raise LLMKitError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError):
        raise LLMKitError(
            f"cannot read checkpoint {path}: it is not a torch checkpoint of tensors and plain data "
            f"(a different file, a truncated one, or one holding pickled objects, which llmkit "
            f"does not load); pass a .ckpt written by `llmkit pretrain fit`"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or model_config_dict(ckpt) is None:
        raise LLMKitError(f"{path} is not an llmkit checkpoint (no model config or state_dict)")
    return ckpt


def model_config_dict(ckpt: dict) -> dict | None:
    """The backbone's config in a checkpoint: PretrainModule keeps it in its hyperparameters,
    the fine-tuning modules (whose hyperparameters name their base checkpoint instead) in
    ``ckpt["model_config"]``."""
    return ckpt.get("hyper_parameters", {}).get("config") or ckpt.get("model_config")


def load_backbone(path: str | Path, map_location: str | torch.device = "cpu") -> Transformer:
    """Rebuild the Transformer saved by PretrainModule at ``path`` (in eval mode)."""
    return backbone_from_checkpoint(read_checkpoint(path, map_location), path, map_location)


def backbone_from_checkpoint(
    ckpt: dict, path: str | Path, map_location: str | torch.device = "cpu"
) -> Transformer:
    """The Transformer of a checkpoint already read by :func:`read_checkpoint` (``path`` names it
    in errors)."""
    model = Transformer(ModelConfig.from_dict(model_config_dict(ckpt))).to(map_location)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LLMKitError(
            f"{path}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval()
