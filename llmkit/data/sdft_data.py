"""SDFT examples: (prompt, demonstration) pairs, the teacher's prompt, and their DataModule.

Handoff "SDFT" §7 fixes the data: a JSONL file whose lines are
``{"prompt": ..., "demonstration": ...}``; any other field of a line is kept in
:attr:`Example.meta` (a task name, a reference answer) and ignored by the losses. Handoff §3
fixes how the teacher sees an example: the same model conditioned on the question and the
demonstration through :data:`TEACHER_TEMPLATE`, which is the handoff's text verbatim. The
authors' official code ends the last line with a period ("...including the thinking
process.") where the handoff has a colon; the handoff's is the default, and the template is
a parameter (``SDFTDataModule(teacher_template=...)``, :func:`teacher_prompt`) for anyone
matching the official code.

:class:`SDFTDataModule` yields batches as lists of :class:`Example`, raw text: the
LightningModule tokenizes them, so a replay callback can swap examples in a batch first.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from llmkit.data.commands import expand_inputs
from llmkit.data.corpus import iter_text_lines
from llmkit.data.datamodule import ResumableLoader
from llmkit.errors import LLMKitError

TEACHER_TEMPLATE = (
    "<Question>\n"
    "{prompt}\n"
    "\n"
    "This is an example for a response to the question:\n"
    "<Demonstration>\n"
    "{demonstration}\n"
    "\n"
    "Now answer with a response of your own, including the thinking process:"
)
"""The teacher's context (handoff "SDFT" §3), filled by :func:`teacher_prompt`."""

TEMPLATE_FIELDS = ("prompt", "demonstration")
"""The fields a teacher template must use, and the only ones it may use."""

_EXAMPLE_LINE = '{"prompt": "...", "demonstration": "..."}'
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


@dataclass
class Example:
    """One SDFT example: the student sees ``prompt``; the teacher also sees ``demonstration``.

    ``meta`` holds the line's other JSON fields; ``source`` says where the example came from
    (``file:line`` for one read from a file).
    """

    prompt: str
    demonstration: str
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def check_template(template: str) -> None:
    """Raise :class:`LLMKitError` unless ``template`` uses ``{prompt}`` and ``{demonstration}``
    and no other field (literal braces are written ``{{`` and ``}}``)."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise LLMKitError(f"teacher template is malformed ({e}): write literal braces as {{{{ and }}}}") from None
    missing = [name for name in TEMPLATE_FIELDS if name not in names]
    unknown = sorted(names - set(TEMPLATE_FIELDS))
    if missing or unknown:
        raise LLMKitError(
            f"teacher template must contain {{prompt}} and {{demonstration}} and no other field; it lacks "
            f"{missing} and has unknown fields {unknown} (write literal braces as {{{{ and }}}})"
        )


def teacher_prompt(example: Example, template: str = TEACHER_TEMPLATE) -> str:
    """The teacher's context for ``example``: ``template`` with its prompt and demonstration."""
    check_template(template)
    return template.format(prompt=example.prompt, demonstration=example.demonstration)


def iter_jsonl_objects(path: str | Path, what: str, line_format: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file:line", object)`` for each non-blank line of the JSONL file ``path``.

    ``what`` names the file's contents and ``line_format`` shows a valid line, for the
    messages: a missing file, a line that is not UTF-8 or not JSON, or a JSON value that is
    not an object raises :class:`LLMKitError` naming the file (and line).
    """
    path = Path(path)
    if not path.is_file():
        raise LLMKitError(f"{what} file {path} does not exist: check the path")
    for number, line in iter_text_lines(path):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LLMKitError(f"{source}: not valid JSON ({e.msg}); each line must be {line_format}") from None
        if not isinstance(record, dict):
            raise LLMKitError(
                f"{source}: got {_JSON_TYPES.get(type(record), type(record).__name__)} where a JSON object is "
                f"needed; each line must be {line_format}"
            )
        yield source, record


def text_field(record: dict[str, Any], key: str, source: str, line_format: str) -> str:
    """``record[key]``, checked to be a non-blank string (else :class:`LLMKitError` at ``source``)."""
    if key not in record:
        raise LLMKitError(f"{source}: no {key!r} field; each line must be {line_format}")
    value = record[key]
    if not isinstance(value, str):
        kind = _JSON_TYPES.get(type(value), type(value).__name__)
        raise LLMKitError(f"{source}: {key!r} is {kind}; it must be a string (each line is {line_format})")
    if not value.strip():
        raise LLMKitError(f"{source}: {key!r} is empty; give it some text or remove the line")
    return value


def read_examples(path: str | Path) -> list[Example]:
    """The examples of the JSONL file ``path``, one per non-blank line (handoff "SDFT" §7)."""
    examples = []
    for source, record in iter_jsonl_objects(path, "SDFT example", _EXAMPLE_LINE):
        prompt = text_field(record, "prompt", source, _EXAMPLE_LINE)
        demonstration = text_field(record, "demonstration", source, _EXAMPLE_LINE)
        meta = {k: v for k, v in record.items() if k not in ("prompt", "demonstration")}
        examples.append(Example(prompt, demonstration, meta, source))
    if not examples:
        raise LLMKitError(f"SDFT example file {path} has no examples: write one {_EXAMPLE_LINE} per line")
    return examples


def _read_all(files: list[str]) -> list[Example]:
    return [example for path in expand_inputs(files) for example in read_examples(path)]


class SDFTDataModule(L.LightningDataModule):
    """Batches of :class:`Example` (lists, untokenized) from SDFT JSONL files.

    Args:
        train_files: JSONL paths or glob patterns for training.
        val_files: JSONL paths or glob patterns for validation (optional).
        batch_size: examples per batch; the last batch of an epoch may be smaller.
        seed: the training order of pass k is a shuffle seeded with ``seed + k``.
        num_workers: DataLoader worker processes.
        teacher_template: the teacher's context, with ``{prompt}`` and ``{demonstration}``.
    """

    def __init__(
        self,
        train_files: list[str] | str | None = None,
        val_files: list[str] | str | None = None,
        batch_size: int = 8,
        seed: int = 1234,
        num_workers: int = 0,
        teacher_template: str = TEACHER_TEMPLATE,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_template(teacher_template)
        if batch_size < 1:
            raise LLMKitError(f"data.batch_size must be >= 1, got {batch_size}")
        self.train_files = [train_files] if isinstance(train_files, str) else train_files
        self.val_files = [val_files] if isinstance(val_files, str) else val_files
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.teacher_template = teacher_template
        self.train_examples: list[Example] | None = None
        self.val_examples: list[Example] | None = None

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.train_examples is None:
            if not self.train_files:
                raise LLMKitError("data.train_files is empty: give the SDFT training .jsonl files")
            self.train_examples = _read_all(self.train_files)
        if stage in ("fit", "validate") and self.val_examples is None and self.val_files:
            self.val_examples = _read_all(self.val_files)
        if stage == "validate" and self.val_examples is None:
            raise LLMKitError("data.val_files is empty: give the SDFT validation .jsonl files")

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(
            self.train_examples,
            seed=self.seed,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator(),
            drop_last=False,
            collate_fn=list,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_examples is None:
            return []  # no val_files: Lightning skips validation
        return DataLoader(
            self.val_examples, batch_size=self.batch_size, shuffle=False, collate_fn=list,
            num_workers=self.num_workers,
        )
