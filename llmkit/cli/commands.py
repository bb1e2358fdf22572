"""Every ``llmkit`` command by name, and where its code lives.

Loading this table imports nothing heavy: the argparse commands' modules keep torch and
Lightning out of their top-level imports, and the LightningCLI commands are named by import
path, loaded only when one runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmkit.cli import consolidate, convert, data, demo, generate, lora, scaling
from llmkit.model.config import MHC_RUN_SETTINGS, RUN_SETTINGS

COMMANDS: dict[str, Callable[..., int] | dict[str, Callable[..., int]]] = {
    "data": {"corpus": data.corpus, "tokenizer": data.tokenizer, "pack": data.pack, "verify": data.verify,
             "tasks": data.tasks},
    "generate": generate.generate,
    "lora": {"merge": lora.merge},
    "convert": {"from-hf": convert.from_hf, "to-hf": convert.to_hf, "upcycle": convert.upcycle},
    "consolidate": consolidate.consolidate,
    "demo": demo.demo,
    "scaling": {"fit": scaling.fit},
}
"""The argparse commands: ``llmkit NAME [SUB] --flag ...``, flags from each function's signature."""


@dataclass(frozen=True)
class LightningCommand:
    """One ``llmkit NAME fit|validate``.

    module / datamodule: import paths of its LightningModule and data module (None: the module
        draws its own data).
    links: (source, target) argument links applied once the model is built.
    fixed_by_checkpoint: hyperparameters (dotted, prefixes) that the weights of a ``--ckpt_path``
        checkpoint depend on: a config or flag that contradicts the checkpoint is an error.
        ``free`` lists exceptions inside them, settings of how to run, not of what was trained.
    rebuild_from_checkpoint: with ``--ckpt_path``, build the model from that checkpoint (its
        ``model_config``) instead of ``model.init_ckpt``.
    subcommands: what it offers (a module without a validation step has no ``validate``).
    """

    module: str
    datamodule: str | None = None
    links: tuple[tuple[str, str], ...] = ()
    fixed_by_checkpoint: tuple[str, ...] = ()
    free: tuple[str, ...] = ()
    rebuild_from_checkpoint: bool = False
    subcommands: tuple[str, ...] = ("fit", "validate")

    @property
    def summary(self) -> str:
        names = [path.split(":")[1] for path in (self.module, self.datamodule) if path]
        return f"LightningCLI over {' and '.join(names)}: {'|'.join(self.subcommands)} --config YAML"


LIGHTNING_COMMANDS = {
    "pretrain": LightningCommand(
        "llmkit.modules.pretrain:PretrainModule", "llmkit.data.datamodule:PackedDataModule",
        links=(("model.vocab_size", "data.vocab_size"), ("model.max_seq_len", "data.max_seq_len")),
        fixed_by_checkpoint=("config",),
        free=(*(f"config.{name}" for name in RUN_SETTINGS), *(f"config.mhc.{name}" for name in MHC_RUN_SETTINGS)),
        rebuild_from_checkpoint=True,
    ),
    "sdft": LightningCommand(
        "llmkit.modules.sdft:SDFTModule", "llmkit.data.sdft_data:SDFTDataModule", rebuild_from_checkpoint=True
    ),
    "sft": LightningCommand(
        "llmkit.modules.sft:SFTModule", "llmkit.data.sdft_data:SDFTDataModule", rebuild_from_checkpoint=True
    ),
    "ttt": LightningCommand(
        "llmkit.modules.ttt_discover:TTTDiscoverModule",
        fixed_by_checkpoint=("init_ckpt", "lora.rank", "lora.alpha", "lora.targets", "ttt.env", "ttt.env_args"),
        subcommands=("fit",),  # a discovery run scores itself every step: no validation step
    ),
}
"""The LightningCLI commands: ``llmkit NAME {fit,validate} --config YAML [--key value ...]`` (ttt: fit)."""
