"""The ``llmkit data ...`` subcommands: build a corpus, train a tokenizer, pack token shards,
generate SDFT task files.

:func:`add_data_commands` attaches them to the top-level CLI's subparsers; each sets
``func`` to a handler ``(args) -> int`` that runs the job and prints a one-line summary.
Errors the user can fix are raised as :class:`LLMKitError` for the CLI to print.
"""

from __future__ import annotations

import argparse
import glob
import os
from collections.abc import Sequence
from pathlib import Path

from llmkit.data.corpus import SOURCES, write_corpus
from llmkit.data.packing import pack
from llmkit.data.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
from llmkit.errors import LLMKitError

BYTES_PER_MB = 1_000_000
DEFAULT_SHARD_MB = 16.0


def expand_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """The files named by ``patterns``, each a path or a glob pattern (``**`` recurses).

    Each pattern's matches are sorted; patterns keep their order and a file named twice is
    kept once. A pattern that matches no file raises :class:`LLMKitError`.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise LLMKitError(f"--input {pattern!r} matches no file: check the path or pattern")
        for path in matches:
            if path not in seen:
                seen.add(path)
                files.append(path)
    return files


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command, with its ``corpus``, ``tokenizer``, ``pack`` and ``tasks``
    subcommands."""
    data = subparsers.add_parser(
        "data", help="build a corpus, train a tokenizer, pack shards, generate SDFT tasks"
    )
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    _add_corpus_command(commands)
    _add_tokenizer_command(commands)
    _add_pack_command(commands)
    _add_tasks_command(commands)


def _add_corpus_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "corpus", help="write train/val text shards from this Python's own source files"
    )
    parser.add_argument("--source", choices=SOURCES, required=True, help="which files to use")
    parser.add_argument("--out", type=Path, required=True, help="directory for the shards")
    parser.add_argument(
        "--val-fraction", type=float, default=0.02, help="share of files held out for val"
    )
    parser.add_argument(
        "--shard-mb", type=float, default=DEFAULT_SHARD_MB, help="start a new shard past this"
    )
    parser.add_argument("--max-files", type=int, help="use only the first N files (sorted)")
    parser.set_defaults(func=_run_corpus)


def _run_corpus(args: argparse.Namespace) -> int:
    summary = write_corpus(
        args.source,
        args.out,
        val_fraction=args.val_fraction,
        shard_bytes=int(args.shard_mb * BYTES_PER_MB),
        max_files=args.max_files,
    )
    print(
        f"wrote {args.out}: {summary['n_train_documents']:,} train documents "
        f"({summary['bytes_train']:,} bytes, {len(summary['train_files'])} shards) and "
        f"{summary['n_val_documents']:,} val documents ({summary['bytes_val']:,} bytes, "
        f"{len(summary['val_files'])} shards); {summary['n_skipped']} files skipped"
    )
    return 0


def _add_tokenizer_command(commands: argparse._SubParsersAction) -> None:
    defaults = TokenizerTrainConfig()
    parser = commands.add_parser("tokenizer", help="train a SentencePiece tokenizer")
    parser.add_argument(
        "--input", nargs="+", required=True, help="text files or glob patterns to train on"
    )
    parser.add_argument(
        "--model-prefix", type=Path, required=True, help="writes PREFIX.model and PREFIX.vocab"
    )
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default=defaults.model_type)
    parser.add_argument("--character-coverage", type=float, default=defaults.character_coverage)
    parser.add_argument(
        "--normalization",
        default=defaults.normalization,
        help="sentencepiece normalization rule; 'identity' keeps case (use it for code)",
    )
    parser.add_argument(
        "--keep-whitespace",
        action="store_true",
        help="keep runs of spaces and leading spaces (indentation) instead of collapsing them",
    )
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=defaults.input_sentence_size,
        help="lines sampled from the input to train on (bounds memory)",
    )
    parser.add_argument("--threads", type=int, default=defaults.num_threads)
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's log")
    parser.set_defaults(func=_run_tokenizer)


def _run_tokenizer(args: argparse.Namespace) -> int:
    inputs = expand_inputs(args.input)
    config = TokenizerTrainConfig(
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        normalization=args.normalization,
        remove_extra_whitespaces=not args.keep_whitespace,
        input_sentence_size=args.input_sentence_size,
        num_threads=args.threads,
    )
    model = train_tokenizer(inputs, args.model_prefix, config, verbose=args.verbose)
    tokenizer = Tokenizer(model)
    print(
        f"wrote {model}: {tokenizer.vocab_size:,}-token {config.model_type} vocabulary "
        f"trained on {len(inputs)} file(s)"
    )
    return 0


def _add_pack_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("pack", help="tokenise text files into a .bin token shard")
    parser.add_argument("--tokenizer", type=Path, required=True, help="PREFIX.model to use")
    parser.add_argument(
        "--input", nargs="+", required=True, help="text files or glob patterns to pack"
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="OUT.bin (metadata goes to OUT.bin.json)"
    )
    parser.add_argument(
        "--no-eos", action="store_true", help="do not append eos after each document"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes"
    )
    parser.set_defaults(func=_run_pack)


def _run_pack(args: argparse.Namespace) -> int:
    meta = pack(
        args.tokenizer,
        expand_inputs(args.input),
        args.output,
        append_eos=not args.no_eos,
        workers=args.workers,
    )
    print(
        f"wrote {args.output}: {meta['n_tokens']:,} tokens ({meta['dtype']}) from "
        f"{meta['n_documents']:,} documents"
    )
    return 0


def _add_tasks_command(commands: argparse._SubParsersAction) -> None:
    # imported here, not at the top: tasks imports sdft_data, whose datamodule import needs this module
    from llmkit.data.tasks import TASKS

    parser = commands.add_parser(
        "tasks", help="write generated SDFT examples (and held-out probes) of a task as JSONL"
    )
    parser.add_argument("--task", choices=TASKS, required=True, help="which task to generate")
    parser.add_argument("--n", type=int, required=True, help="number of examples")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same files")
    parser.add_argument("--out", type=Path, required=True, help="the examples' .jsonl file")
    parser.add_argument(
        "--probes-out", type=Path, help="also write probes, none repeating a training prompt"
    )
    parser.add_argument("--n-probes", type=int, default=20, help="probes to write to --probes-out")
    parser.set_defaults(func=_run_tasks)


def _run_tasks(args: argparse.Namespace) -> int:
    from llmkit.data.tasks import write_task_files

    counts = write_task_files(args.task, args.n, args.seed, args.out, args.probes_out, args.n_probes)
    probes = f" and {args.probes_out}: {counts['probes']:,} probes" if args.probes_out else ""
    print(f"wrote {args.out}: {counts['examples']:,} {args.task} examples (seed {args.seed}){probes}")
    return 0
