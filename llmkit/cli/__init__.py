"""The `llmkit` command: one entry point for data jobs, training, sampling and the demo.

    llmkit data {corpus,tokenizer,pack,tasks} ...  argparse (llmkit/data/commands.py)
    llmkit pretrain {fit,validate} --config YAML  LightningCLI (YAML, --print_config, overrides)
    llmkit sdft {fit,validate} --config YAML      self-distillation fine-tuning (SDFTModule)
    llmkit sft {fit,validate} --config YAML       supervised fine-tuning baseline (SFTModule)
    llmkit ttt fit --config YAML                  TTT-Discover on one problem (TTTDiscoverModule)
    llmkit consolidate --run DIR --out FILE.jsonl discovery results -> SDFT examples
    llmkit generate --ckpt CKPT --tokenizer TOK --prompt TEXT     KV-cached batched sampling
    llmkit lora merge --ckpt BASE --lora ADAPTER --out MERGED     (llmkit/model/commands.py)
    llmkit demo                                   the whole pipeline on the stdlib corpus, CPU-sized

User errors (LLMKitError) print one clear line and exit with status 1; argument and YAML
errors exit with status 2 from the parsers.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from llmkit.errors import LLMKitError

LIGHTNING_COMMANDS = {
    "pretrain": ("llmkit.modules.pretrain:PretrainModule", "llmkit.data.datamodule:PackedDataModule"),
    "sdft": ("llmkit.modules.sdft:SDFTModule", "llmkit.data.sdft_data:SDFTDataModule"),
    "sft": ("llmkit.modules.sft:SFTModule", "llmkit.data.sdft_data:SDFTDataModule"),
    "ttt": ("llmkit.modules.ttt_discover:TTTDiscoverModule", None),
}
"""`llmkit NAME fit|validate ...` runs LightningCLI over (LightningModule, LightningDataModule)."""


def _import(target: str | None) -> type | None:
    if target is None:
        return None
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def run_lightning_cli(command: str, args: list[str]) -> None:
    """`llmkit COMMAND fit|validate ...`: LightningCLI over the command's module and data module."""
    module, datamodule = (_import(target) for target in LIGHTNING_COMMANDS[command])
    with warnings.catch_warnings():  # args= is intended: `llmkit` owns sys.argv
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        LightningCLI(
            module,
            datamodule,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": f"llmkit {command}"},
            auto_configure_optimizers=False,
        )


def build_parser() -> argparse.ArgumentParser:
    from llmkit.data.commands import add_data_commands
    from llmkit.demo import add_demo_command
    from llmkit.discovery.consolidate import add_consolidate_command
    from llmkit.model.commands import add_generate_command, add_lora_commands

    parser = argparse.ArgumentParser(prog="llmkit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_commands(sub)
    for command, (module, _) in LIGHTNING_COMMANDS.items():
        help = f"LightningCLI over {module.split(':')[1]}: {command} {{fit,validate}} --config YAML"
        sub.add_parser(command, help=help, add_help=False)
    add_generate_command(sub)
    add_lora_commands(sub)
    add_consolidate_command(sub)
    add_demo_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            run_lightning_cli(argv[0], argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        return args.func(args)
    except LLMKitError as e:
        print(f"llmkit: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
