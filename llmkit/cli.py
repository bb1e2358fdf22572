"""The `llmkit` command: one entry point for data jobs, training, sampling and the demo.

    llmkit data {corpus,tokenizer,pack,tasks} ...  argparse (llmkit/data/commands.py)
    llmkit pretrain {fit,validate} --config YAML  LightningCLI (YAML, --print_config, overrides)
    llmkit generate --ckpt CKPT --tokenizer TOK --prompt TEXT     KV-cached batched sampling
    llmkit lora merge --ckpt BASE --lora ADAPTER --out MERGED     (llmkit/model/commands.py)
    llmkit demo                                   the whole pipeline on the stdlib corpus, CPU-sized

User errors (LLMKitError) print one clear line and exit with status 1; argument and YAML
errors exit with status 2 from the parsers.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from llmkit.errors import LLMKitError

LIGHTNING_COMMANDS = ("pretrain",)


def run_pretrain_cli(args: list[str]) -> None:
    """`llmkit pretrain fit|validate ...`: LightningCLI over PretrainModule + PackedDataModule."""
    from llmkit.data.datamodule import PackedDataModule
    from llmkit.modules.pretrain import PretrainModule

    with warnings.catch_warnings():  # args= is intended: `llmkit` owns sys.argv
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        LightningCLI(
            PretrainModule,
            PackedDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "llmkit pretrain"},
            auto_configure_optimizers=False,
        )


def build_parser() -> argparse.ArgumentParser:
    from llmkit.data.commands import add_data_commands
    from llmkit.demo import add_demo_command
    from llmkit.model.commands import add_generate_command, add_lora_commands

    parser = argparse.ArgumentParser(prog="llmkit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_commands(sub)
    sub.add_parser("pretrain", help="LightningCLI: pretrain {fit,validate} --config YAML", add_help=False)
    add_generate_command(sub)
    add_lora_commands(sub)
    add_demo_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "pretrain":
            run_pretrain_cli(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        return args.func(args)
    except LLMKitError as e:
        print(f"llmkit: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
