"""Command-line flags from function signatures and dataclasses, declared once.

A command is a typed function whose Google-style docstring has an ``Args:`` section; a
parameter typed as a dataclass contributes one flag per field, documented in the dataclass's
``Attributes:`` section. :func:`add_command` turns either into argparse arguments:

- ``max_new_tokens`` becomes ``--max-new-tokens`` (the command-line contract in docs/ uses
  dashes, which jsonargparse, the library behind LightningCLI, cannot produce);
- a parameter without a default is required; ``X | None`` takes an X or nothing, and where its
  default is a number, also the word ``none`` (``--top-k none``);
- ``bool`` is a switch with its negation (``--compile`` / ``--no-compile``);
- ``list[X]`` takes one or more values; ``Literal[...]`` its values as choices.

:func:`call_command` calls the function with the parsed values, building each dataclass
parameter from its fields. The types are read from the annotations, so a command module must
import what its signature names: keep those imports light (no torch or Lightning), since they
run for ``llmkit --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from llmkit.errors import SettingError

_SECTION = re.compile(r"^\s*(Args|Attributes):\s*$")
_ENTRY = re.compile(r"^(\s*)(\w+)(?: \(.*?\))?:\s*(.*)$")


def docstring_entries(obj: Any) -> dict[str, str]:
    """``{name: description}`` from the ``Args:`` or ``Attributes:`` section of ``obj``'s docstring
    (continuation lines joined)."""
    lines = (inspect.getdoc(obj) or "").splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if _SECTION.match(line)), len(lines))
    entries: dict[str, str] = {}
    indent = None
    name = None
    for line in lines[start:]:
        if not line.strip():
            continue
        match = _ENTRY.match(line)
        depth = len(line) - len(line.lstrip())
        if indent is None and match:
            indent = depth
        if indent is None or depth < indent:
            break  # the section ended
        if match and depth == indent:
            name = match.group(2)
            entries[name] = match.group(3)
        elif name is not None:
            entries[name] += " " + line.strip()
    return entries


def summary(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring, on one line."""
    return " ".join(inspect.getdoc(obj).split("\n\n")[0].split())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _or_none(kind: type) -> Callable[[str], Any]:
    """argparse's ``type`` for an ``int | None`` or ``float | None`` parameter: the word none, or a number."""
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse's error says "invalid int value"
    return parse


def _add(parser: argparse.ArgumentParser, name: str, hint: Any, default: Any, help: str) -> None:
    """One argument for parameter ``name`` of type ``hint`` (``inspect.Parameter.empty``: required)."""
    required = default is inspect.Parameter.empty
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    if optional:
        hint = next(a for a in args if a is not type(None))  # X | None: an X, or None
        args = typing.get_args(hint)
    kwargs: dict[str, Any] = {"help": help, "dest": name}
    if required:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
        if default is not None:
            kwargs["help"] = f"{help.rstrip('.')} (default: {default})" if help else f"default: {default}"
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(hint) is list:
        kwargs.update(nargs="+", type=args[0])
    elif typing.get_origin(hint) is Literal:
        kwargs.update(choices=args, type=type(args[0]))
    elif hint in (int, float) and optional and default not in (None, inspect.Parameter.empty):
        kwargs["type"] = _or_none(hint)  # --top-k none turns off what is on by default
        kwargs["help"] += "; none turns it off"
    elif hint in (str, int, float, Path):
        kwargs["type"] = hint
    else:
        raise TypeError(f"parameter {name!r}: no command-line form for the type {hint!r}")
    parser.add_argument(_flag(name), **kwargs)


def add_command(parser: argparse.ArgumentParser, fn: Callable[..., Any]) -> None:
    """Add a flag for every parameter of ``fn`` (every field of a dataclass parameter) to ``parser``."""
    hints = typing.get_type_hints(fn)
    docs = docstring_entries(fn)
    for name, param in inspect.signature(fn).parameters.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            field_docs = docstring_entries(hint)
            field_hints = typing.get_type_hints(hint)
            defaults = hint()
            for f in dataclasses.fields(hint):
                _add(parser, f.name, field_hints[f.name], getattr(defaults, f.name), field_docs.get(f.name, ""))
        else:
            _add(parser, name, hint, param.default, docs.get(name, ""))
    parser.set_defaults(_command=fn)


def call_command(fn: Callable[..., Any], values: argparse.Namespace) -> Any:
    """``fn`` called with the parsed ``values`` (dataclass parameters built from their fields). A
    :class:`SettingError` about one of its flags' settings, from building a dataclass or from the
    command's work (``text_field``, found missing in line 2 of a file), names the flag the user typed
    (``--text-field``)."""
    hints = typing.get_type_hints(fn)
    kwargs = {}
    flags: set[str] = set()
    for name in inspect.signature(fn).parameters:
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            fields = [f.name for f in dataclasses.fields(hint)]
            flags.update(fields)
            try:
                kwargs[name] = hint(**{field: getattr(values, field) for field in fields})
            except SettingError as error:
                raise _flag_named(error) from None
        else:
            flags.add(name)
            kwargs[name] = getattr(values, name)
    try:
        return fn(**kwargs)
    except SettingError as error:
        if error.setting not in flags:
            raise
        raise _flag_named(error) from None


def _flag_named(error: SettingError) -> SettingError:
    """``error`` naming the flag of its setting: ``--vocab-size`` for ``vocab_size``."""
    return error.renamed("--" + error.setting.replace("_", "-"))
