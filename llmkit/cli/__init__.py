"""llmkit: one command for data jobs, training, sampling and the demo.

    llmkit data {corpus,tokenizer,pack,verify,tasks} ...  corpus, tokenizer, packed shards, SDFT task files
    llmkit pretrain {fit,validate} --config YAML  LightningCLI (YAML, --print_config, overrides)
    llmkit sdft {fit,validate} --config YAML      self-distillation fine-tuning (SDFTModule)
    llmkit sft {fit,validate} --config YAML       supervised fine-tuning baseline (SFTModule)
    llmkit ttt fit --config YAML                  TTT-Discover on one problem (TTTDiscoverModule)
    llmkit generate --ckpt CKPT --prompt TEXT     KV-cached batched sampling
    llmkit lora merge --ckpt BASE --lora ADAPTER --out MERGED
    llmkit convert {from-hf,to-hf,upcycle} ...    Hugging Face models in and out, dense -> mHC
    llmkit consolidate --run DIR --out FILE.jsonl discovery results -> SDFT examples
    llmkit scaling fit --runs DIR ...             a scaling law with breakpoints over pretraining runs
    llmkit demo                                   the whole pipeline on the stdlib corpus, CPU-sized
    llmkit --version

The table of commands is :mod:`llmkit.cli.commands`; each argparse command's flags come from
its function's signature (:mod:`llmkit.cli.signature`). torch and Lightning are imported only
when a command runs, so ``llmkit --help`` and every ``--help`` below it answer at once.
User errors (LLMKitError) print one clear line and exit with status 1; argument and YAML
errors exit with status 2 from the parsers; Ctrl-C prints one line and exits with 130, and
SIGTERM with 143 (what a command was writing is left unwritten: outputs only appear by rename,
and the command's temp files are removed on the way out). A Lightning command
stopped by Ctrl-C exits with Lightning's 1 after its graceful shutdown, and by SIGTERM with 143
(128 + 15), not 0: a scheduler must not take an interrupted run for a finished one. Both save a
resumable checkpoint first (docs/checkpoints.md).
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading
import warnings

from llmkit import __version__
from llmkit.cli.commands import COMMANDS, LIGHTNING_COMMANDS
from llmkit.cli.signature import add_command, call_command, summary
from llmkit.errors import LLMKitError, format_warning


def build_parser() -> argparse.ArgumentParser:
    """The parser of every argparse command; the LightningCLI ones are listed for ``--help`` only."""
    parser = argparse.ArgumentParser(prog="llmkit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"llmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        if callable(command):
            add_command(sub.add_parser(name, help=summary(command), description=summary(command)), command)
            continue
        about = summary(sys.modules[next(iter(command.values())).__module__])
        group = sub.add_parser(name, help=about, description=about)
        inner = group.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
        for sub_name, fn in command.items():
            add_command(inner.add_parser(sub_name, help=summary(fn), description=summary(fn)), fn)
    for name, lightning in LIGHTNING_COMMANDS.items():
        sub.add_parser(name, help=lightning.summary, add_help=False)
    return parser


def lightning_usage(name: str) -> str:
    """What ``llmkit NAME --help`` prints without loading Lightning."""
    return (
        f"usage: llmkit {name} {{{','.join(LIGHTNING_COMMANDS[name].subcommands)}}} --config YAML [--key value ...]\n\n"
        f"{LIGHTNING_COMMANDS[name].summary}.\n"
        f"`llmkit {name} fit --help` lists every option (it loads Lightning, a few seconds).\n"
    )


EXIT_SIGTERM = 143
"""The exit status of a command stopped by SIGTERM (the shell's 128 + signal 15)."""

PATH_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.EROFS, errno.ENOSPC,
               errno.EDQUOT}
"""The errors of a path the OS refuses to write (a file where a directory must be, no permission, a full
disk): one line naming it, not a traceback."""


class Terminated(BaseException):
    """SIGTERM, raised in an argparse command's main thread so that its cleanup runs as on Ctrl-C
    (Python's default SIGTERM ends the process at once, leaving temp files and worker processes)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def _end_progress_bars() -> None:
    """Close the tqdm bars a signal left open, so the line after them starts on its own line. A
    bar's ``with`` closes it on the way out, but a signal that lands while the bar is still being
    constructed (after it drew its first line, before ``__enter__``) leaves it open, and the
    message would be glued to the end of ``pack x.bin:   0%|...|``."""
    std = sys.modules.get("tqdm.std")  # not loaded: no bar was ever drawn
    if std is not None:
        for bar in list(std.tqdm._instances):  # the live bars (a WeakSet tqdm keeps for their positions)
            bar.close()


def error_prefix() -> str:
    """``llmkit: error: ``, naming the rank on the ranks above 0 of a distributed run, where every
    rank reports its own error: ``llmkit: error (rank 1): ``."""
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")  # not loaded: one process
    rank = rank_zero.rank_zero_only.rank if rank_zero is not None else 0
    return f"llmkit: error (rank {rank}): " if rank else "llmkit: error: "


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            name, rest = argv[0], argv[1:]
            if not rest or rest[0] in ("-h", "--help"):
                print(lightning_usage(name), file=sys.stdout if rest else sys.stderr, end="")
                return 0 if rest else 2
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            from llmkit.cli.lightning import run

            try:
                run(name, rest)
            except SIGTERMException:  # a SystemExit without a code, which would exit 0 as a finished run does
                return EXIT_SIGTERM
            return 0
        warnings.formatwarning = format_warning  # (Lightning commands: quiet_known_noise does it)
        args = build_parser().parse_args(argv)
        # the demo runs Lightning, which handles SIGTERM itself (a checkpoint, then exit)
        handle = argv[0] != "demo" and threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if handle else None
        try:
            return call_command(args._command, args)
        finally:
            if handle:
                signal.signal(signal.SIGTERM, previous)
    except LLMKitError as e:
        print(f"{error_prefix()}{e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in PATH_ERRORS or e.filename is None:
            raise
        reason = "a file, where a directory must be" if e.errno in (errno.EEXIST, errno.ENOTDIR) else e.strerror
        print(f"{error_prefix()}{e.filename}: {reason}: check the path and its permissions (and the disk's free "
              "space)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _end_progress_bars()
        print("llmkit: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        _end_progress_bars()
        print("llmkit: terminated", file=sys.stderr)
        return EXIT_SIGTERM
