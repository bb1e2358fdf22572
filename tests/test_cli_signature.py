"""Command-line flags from signatures and dataclasses: each flag declared once, documented once."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from llmkit.cli.commands import COMMANDS
from llmkit.cli.signature import add_command, call_command, docstring_entries


@dataclass
class Options:
    """Options.

    Attributes:
        size: how big, on one line
            and a continuation line.
        fast: go fast.
    """

    size: int = 3
    fast: bool = False


def command(inputs: list[str], out: Path, options: Options, mode: Literal["a", "b"] = "a",
            limit: int | None = None, eos: bool = True) -> dict:
    """Do a thing.

    Args:
        inputs: files to read.
        out: where to write.
        options: the options (one flag each).
        mode: which mode.
        limit: at most this many.
        eos: append an end.
    """
    return {"inputs": inputs, "out": out, "options": options, "mode": mode, "limit": limit, "eos": eos}


def parse(*argv: str) -> dict:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_command(parser, command)
    return call_command(command, parser.parse_args(argv))


def test_flags_are_the_parameters_with_dashes_and_dataclass_fields_become_flags():
    got = parse("--inputs", "a.txt", "b.txt", "--out", "o", "--size", "5", "--fast", "--mode", "b", "--no-eos")
    assert got == {"inputs": ["a.txt", "b.txt"], "out": Path("o"), "options": Options(size=5, fast=True),
                   "mode": "b", "limit": None, "eos": False}
    assert parse("--inputs", "x", "--out", "o")["options"] == Options()  # defaults from the dataclass


def test_required_choices_and_types_are_enforced_by_the_parser():
    with pytest.raises(SystemExit):
        parse("--inputs", "x")  # --out is required
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parse("--inputs", "x", "--out", "o", "--mode", "c")
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parse("--inputs", "x", "--out", "o", "--limit", "many")


def test_help_comes_from_the_docstring_with_the_default():
    parser = argparse.ArgumentParser()
    add_command(parser, command)
    text = parser.format_help()
    assert "how big, on one line and a continuation line (default: 3)" in " ".join(text.split())
    assert "--eos, --no-eos" in text and "{a,b}" in text
    assert docstring_entries(command)["limit"] == "at most this many."


def test_a_type_without_a_command_line_form_is_refused():
    def bad(pairs: dict[str, int]) -> None:
        """Bad.

        Args:
            pairs: a mapping.
        """

    with pytest.raises(TypeError, match="no command-line form"):
        add_command(argparse.ArgumentParser(), bad)


COMMAND_FUNCTIONS = {
    f"{group} {sub}" if isinstance(entry, dict) else group: fn
    for group, entry in COMMANDS.items()
    for sub, fn in (entry.items() if isinstance(entry, dict) else [(group, entry)])
}


@pytest.mark.parametrize("name", COMMAND_FUNCTIONS)
def test_every_flag_of_every_command_is_documented(name):
    """Each parameter (each field of a dataclass parameter) has its help text in the docstring."""
    fn = COMMAND_FUNCTIONS[name]
    hints = typing.get_type_hints(fn)
    for param in inspect.signature(fn).parameters:
        if dataclasses.is_dataclass(hints[param]):
            documented, names = docstring_entries(hints[param]), [f.name for f in dataclasses.fields(hints[param])]
        else:
            documented, names = docstring_entries(fn), [param]
        assert [n for n in names if n not in documented] == [], name
