"""SDFT examples: (prompt, demonstration) pairs and the teacher's prompt.

The data is a JSONL file whose lines are ``{"prompt": ..., "demonstration": ...}``; any other
field of a line is kept in :attr:`Example.meta` (a task name, a reference answer) and ignored by
the losses. The teacher is the same model conditioned on the question and the demonstration
through :data:`TEACHER_TEMPLATE`, the SDFT paper's template (Shenfeld et al., arXiv 2601.19897).
The authors' official code ends its last line with a period ("...including the thinking
process.") where the paper has a colon; the paper's is the default, and the template is a
setting (``SDFTConfig.teacher_template``, :func:`teacher_prompt`) for anyone matching the code.

:class:`~llmkit.data.sdft_data.SDFTDataModule` batches them for training. See docs/sdft_data.md.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import LLMKitError
from llmkit.io import expand_inputs, iter_jsonl_objects, text_field

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
"""The teacher's context (the SDFT paper's template), filled by :func:`teacher_prompt`."""

TEMPLATE_FIELDS = ("prompt", "demonstration")
"""The fields a teacher template must use, and the only ones it may use."""

_EXAMPLE_LINE = '{"prompt": "...", "demonstration": "..."}'


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
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as e:
        raise LLMKitError(f"teacher template is malformed ({e}): write literal braces as {{{{ and }}}}") from None
    shaped = [f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
              for name, spec, conversion in fields if spec or conversion]
    if shaped:
        raise LLMKitError(f"teacher template fields take the text as it is: write {{prompt}} and {{demonstration}}, "
                          f"without a conversion or format spec ({', '.join(shaped)})")
    names = {name for name, _, _ in fields}
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


def read_examples(path: str | Path) -> list[Example]:
    """The examples of the JSONL file ``path``, one per non-blank line."""
    examples = []
    for source, record in iter_jsonl_objects(path, "SDFT example", _EXAMPLE_LINE):
        prompt = text_field(record, "prompt", source, _EXAMPLE_LINE)
        demonstration = text_field(record, "demonstration", source, _EXAMPLE_LINE)
        meta = {k: v for k, v in record.items() if k not in ("prompt", "demonstration")}
        examples.append(Example(prompt, demonstration, meta, source))
    if not examples:
        raise LLMKitError(f"SDFT example file {path} has no examples: write one {_EXAMPLE_LINE} per line")
    return examples


def read_all_examples(patterns: list[str], what: str) -> list[Example]:
    """The examples of every JSONL file the paths or glob patterns name (``what``: the setting
    they came from, for errors), in file order."""
    return [example for path in expand_inputs(patterns, what) for example in read_examples(path)]
