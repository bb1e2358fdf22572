"""Every ``llmkit`` command by name, and where its code lives.

Loading this table imports nothing heavy: the argparse commands' modules keep torch and
Lightning out of their top-level imports, and the LightningCLI commands are named by import
path, loaded only when one runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmkit.cli import consolidate, data, demo, generate, lora

COMMANDS: dict[str, Callable[..., int] | dict[str, Callable[..., int]]] = {
    "data": {"corpus": data.corpus, "tokenizer": data.tokenizer, "pack": data.pack, "tasks": data.tasks},
    "generate": generate.generate,
    "lora": {"merge": lora.merge},
    "consolidate": consolidate.consolidate,
    "demo": demo.demo,
}
"""The argparse commands: ``llmkit NAME [SUB] --flag ...``, flags from each function's signature."""


@dataclass(frozen=True)
class LightningCommand:
    """One ``llmkit NAME fit|validate``: import paths of its LightningModule and data module (None:
    the module draws its own data), and the (source, target) links applied after instantiation."""

    module: str
    datamodule: str | None = None
    links: tuple[tuple[str, str], ...] = ()

    @property
    def summary(self) -> str:
        names = [path.split(":")[1] for path in (self.module, self.datamodule) if path]
        return f"LightningCLI over {' and '.join(names)}: fit|validate --config YAML"


LIGHTNING_COMMANDS = {
    "pretrain": LightningCommand(
        "llmkit.modules.pretrain:PretrainModule", "llmkit.data.datamodule:PackedDataModule",
        links=(("model.vocab_size", "data.vocab_size"),),
    ),
    "sdft": LightningCommand("llmkit.modules.sdft:SDFTModule", "llmkit.data.sdft_data:SDFTDataModule"),
    "sft": LightningCommand("llmkit.modules.sft:SFTModule", "llmkit.data.sdft_data:SDFTDataModule"),
    "ttt": LightningCommand("llmkit.modules.ttt_discover:TTTDiscoverModule"),
}
"""The LightningCLI commands: ``llmkit NAME {fit,validate} --config YAML [--key value ...]``."""
