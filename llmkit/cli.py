"""The `llmkit` command: one entry point for data jobs, training, sampling and the demo.

    llmkit data {corpus,tokenizer,pack} ...      argparse (llmkit/data/commands.py)
    llmkit pretrain {fit,validate} --config YAML  LightningCLI (YAML, --print_config, overrides)
    llmkit generate --ckpt CKPT --tokenizer TOK --prompt TEXT
    llmkit demo                                   the whole pipeline on the stdlib corpus, CPU-sized

User errors (LLMKitError) print one clear line and exit with status 1; argument and YAML
errors exit with status 2 from the parsers.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
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


def generate(args: argparse.Namespace) -> int:
    from llmkit.checkpoint import load_backbone
    from llmkit.data.tokenizer import Tokenizer
    from llmkit.model.sampling import sample

    model = load_backbone(args.ckpt, map_location=args.device)
    tokenizer = Tokenizer(args.tokenizer)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise LLMKitError(
            f"tokenizer {args.tokenizer} has vocab_size {tokenizer.vocab_size} but checkpoint "
            f"{args.ckpt} was trained with {model.config.vocab_size}; use the tokenizer it was trained with"
        )
    ids = tokenizer.encode(args.prompt, bos=args.bos)
    if not ids:
        raise LLMKitError("--prompt is empty: give at least one character of text")
    if len(ids) >= model.config.max_seq_len:
        raise LLMKitError(
            f"the prompt is {len(ids)} tokens, at or beyond the model's max_seq_len "
            f"{model.config.max_seq_len}; shorten it"
        )
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    prompt = torch.tensor([ids] * args.num_samples, device=args.device)
    out = sample(
        model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        eos_id=tokenizer.eos_id, generator=generator,
    )
    for row in out.tolist():
        print(tokenizer.decode(row))
        if args.num_samples > 1:
            print("-" * 40)
    return 0


def add_generate_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--ckpt", required=True, help="a Lightning .ckpt written by `llmkit pretrain fit`")
    p.add_argument("--tokenizer", required=True, help="the SentencePiece .model used to pack its data")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bos", action="store_true", help="prepend the BOS token to the prompt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=generate)


def build_parser() -> argparse.ArgumentParser:
    from llmkit.data.commands import add_data_commands
    from llmkit.demo import add_demo_command

    parser = argparse.ArgumentParser(prog="llmkit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_commands(sub)
    sub.add_parser("pretrain", help="LightningCLI: pretrain {fit,validate} --config YAML", add_help=False)
    add_generate_command(sub)
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
