"""The README's "Using it" walkthrough, run verbatim as a bash script: the README cannot drift from
what the commands do (about a minute and a half on the 2-core CPU VM)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def walkthrough() -> str:
    """The first bash block under "## Using it"."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Using it", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_the_walkthrough_is_there_and_runs_on_a_cpu():
    script = walkthrough()
    for command in ("data corpus", "data tokenizer", "data pack", "pretrain fit", "pretrain validate", "generate",
                    "data tasks", "sdft fit", "sdft validate", "sft fit", "ttt fit", "consolidate", "lora merge",
                    "convert to-hf"):
        assert f"llmkit {command}" in script, command
    assert "_gpu.yaml" not in script  # the GPU configs are in a block of their own


@pytest.mark.slow
def test_the_readme_walkthrough_runs_verbatim(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough()], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr

    assert torch.load(tmp_path / "lightning_logs/pretrain_tiny/version_0/checkpoints/last.ckpt",
                      weights_only=True)["global_step"] == 20
    completions = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [c["prompt"] for c in completions] == ["def main(", "import os"]
    assert list((tmp_path / "lightning_logs/sdft_tiny/version_0/gates").glob("block_*/gate_decision.json"))
    found = [json.loads(line) for line in (tmp_path / "found.jsonl").read_text().splitlines()]
    assert found and all(f["reward"] > 0 for f in found)
    assert (tmp_path / "merged.ckpt").is_file()
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == [  # validations log into their runs
        "pretrain_tiny", "sdft_tiny", "sft_tiny", "ttt_toy"]
    said = result.stdout + result.stderr
    for line in ("logs: lightning_logs/pretrain_tiny/version_0", "checkpoint: lightning_logs/sdft_tiny/version_0",
                 "gate block 1 (steps 0-4)", "discovery step 4/4: best reward", "wrote merged.ckpt"):
        assert line in said, line


def test_every_test_the_docs_cite_exists():
    """docs/ and the README cite tests (and test modules) by name as evidence; a renamed test must take
    its citations along."""
    files = list((ROOT / "tests").glob("*.py"))
    defined = {f.stem for f in files} | {m for f in files for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    cited = {(doc.name, name) for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
             for name in re.findall(r"\b(test_\w+)\b", doc.read_text(encoding="utf-8"))}
    assert sorted((doc, name) for doc, name in cited if name not in defined) == []


def documented_commands() -> list[tuple[str, list[str]]]:
    """(file, argv) of every ``llmkit ...`` line in the bash blocks of the README and docs/, with
    continuation lines joined and comments, pipes and redirections cut off."""
    commands = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = re.split(r"\s(?:#|\||>|&&)\s", f" {line.strip()} ")[0].strip()
                if line.startswith("llmkit "):
                    commands.append((doc.name, shlex.split(line)[1:]))
    return commands


def unknown_lightning_keys(argv: list[str]) -> list[str]:
    """The ``--key`` options of a LightningCLI command line that its Trainer, module or data module
    lacks, following dataclass-typed settings down (``--model.config.vocab_size``)."""
    import dataclasses
    import inspect
    import typing

    import lightning as L

    from llmkit.cli.commands import LIGHTNING_COMMANDS
    from llmkit.cli.lightning import _import

    command = LIGHTNING_COMMANDS[argv[0]]
    roots = {"trainer": L.Trainer, "model": _import(command.module), "data": _import(command.datamodule)}
    roots = {name: cls for name, cls in roots.items() if cls is not None}
    unknown = [] if argv[1] in command.subcommands else [argv[1]]
    for option in (a.split("=")[0].removeprefix("--") for a in argv[2:] if a.startswith("--")):
        if option in ("config", "ckpt_path", "print_config", "seed_everything"):
            continue
        head, *path = option.split(".")
        if head not in roots or not path:
            unknown.append(option)
            continue
        inits = [c.__init__ for c in roots[head].__mro__ if "__init__" in vars(c)]  # **kwargs: the base's
        inits = inits[:next(i for i, f in enumerate(inits) if "kwargs" not in inspect.signature(f).parameters) + 1]
        hints = {k: v for f in inits for k, v in typing.get_type_hints(f).items()}
        names = {n for f in inits for n in inspect.signature(f).parameters} - {"self", "kwargs"}
        for name in path:
            if name not in names:
                unknown.append(option)
                break
            kinds = typing.get_args(hints.get(name)) or (hints.get(name),)
            classes = [k for k in kinds if dataclasses.is_dataclass(k)]
            if not classes:  # a plain value, or a dict: nothing further to check
                break
            hints = {k: v for c in classes for k, v in typing.get_type_hints(c).items()}
            names = set(hints)
    return unknown


def test_every_llmkit_command_in_the_docs_names_real_commands_and_flags():
    """A renamed flag or setting must take the README's and docs' command lines along: argparse
    commands parse as written; LightningCLI ones name keys their Trainer, module and data module have."""
    from llmkit.cli import build_parser
    from llmkit.cli.commands import LIGHTNING_COMMANDS

    commands = documented_commands()
    assert len(commands) > 50 and {argv[0] for _, argv in commands} >= {"data", "pretrain", "sdft", "ttt", "convert"}
    parser, wrong = build_parser(), []
    for doc, argv in commands:
        if argv[0] in LIGHTNING_COMMANDS:
            wrong += [(doc, " ".join(argv), key) for key in unknown_lightning_keys(argv)]
            continue
        try:
            parser.parse_args(argv)
        except SystemExit:
            wrong.append((doc, " ".join(argv), "does not parse"))
    assert wrong == []
