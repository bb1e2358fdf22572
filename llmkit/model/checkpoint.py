"""Load a trained backbone from a Lightning checkpoint, safely.

Every checkpoint llmkit reads goes through :func:`load_checkpoint_file`: the file must exist, be
a complete zip archive whose every member passes its CRC-32 check (a truncated copy or a
damaged block is caught before anything is loaded), and hold only tensors and plain containers
(``torch.load(weights_only=True)``, never arbitrary pickled objects). Each failure is one
:class:`LLMKitError` line naming the file. The model is rebuilt from the config dict the
checkpoint holds (:func:`model_config_dict`).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from llmkit.errors import LLMKitError
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer

WRITER_KEY = "llmkit_module"
"""The checkpoint entry naming the LightningModule class that wrote it."""


def check_checkpoint_file(path: str | Path) -> Path:
    """``path``, checked to be a complete, undamaged checkpoint archive (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise LLMKitError(f"checkpoint {path} does not exist: check the path (ckpt_path, init_ckpt or --ckpt)")
    if path.stat().st_size == 0:
        raise LLMKitError(f"cannot read checkpoint {path}: the file is empty (an interrupted copy?); use another one")
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
    return path


def load_checkpoint_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint at ``path`` as plain data: integrity-checked, then loaded with
    ``weights_only=True`` (tensors and plain containers only)."""
    path = check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError):
        raise LLMKitError(
            f"cannot read checkpoint {path}: it is not a torch checkpoint of tensors and plain data "
            f"(a different file, or one holding pickled objects, which llmkit does not load); pass a "
            f".ckpt written by llmkit"
        ) from None
    if not isinstance(ckpt, dict):
        raise LLMKitError(f"{path} is not an llmkit checkpoint (it holds {type(ckpt).__name__}, not a dict)")
    return ckpt


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint at ``path`` as plain data, checked to hold a model config and weights."""
    ckpt = load_checkpoint_file(path, map_location)
    if "state_dict" not in ckpt or model_config_dict(ckpt) is None:
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
