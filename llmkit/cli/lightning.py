"""``llmkit {pretrain,sdft,sft,ttt} {fit,validate}``: LightningCLI over each LightningModule.

YAML configs, ``--print_config``, dotted overrides and ``--ckpt_path`` work as Lightning users
expect. Where a data module needs a value the model owns, it is linked explicitly
(``LightningCLI.link_arguments``), never read from the module at run time: the pretraining
shards are checked against the model's vocabulary through ``model.vocab_size -> data.vocab_size``,
applied once the model is built (so ``validate --ckpt_path`` links the checkpoint's vocabulary).
"""

from __future__ import annotations

import importlib
import warnings

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from llmkit.cli.commands import LIGHTNING_COMMANDS, LightningCommand


def _import(target: str | None) -> type | None:
    if target is None:
        return None
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


class LLMKitCLI(LightningCLI):
    """LightningCLI with the command's links between model and data arguments."""

    def __init__(self, command: LightningCommand, **kwargs: object) -> None:
        self.command = command
        super().__init__(_import(command.module), _import(command.datamodule), **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target in self.command.links:
            parser.link_arguments(source, target, apply_on="instantiate")


def run(name: str, args: list[str]) -> None:
    """``llmkit NAME ...``: LightningCLI over the command's module and data module."""
    with warnings.catch_warnings():  # args= is intended: `llmkit` owns sys.argv
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        LLMKitCLI(
            LIGHTNING_COMMANDS[name],
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": f"llmkit {name}"},
            auto_configure_optimizers=False,
        )
