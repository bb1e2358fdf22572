"""Procedurally generated SDFT tasks with exact-match answers, for continual-learning benchmarks.

Learn task A, then task B, and measure how much of A is forgotten (handoff "SDFT" §8-9,
Phase 12): each task makes endless (prompt, demonstration) pairs in the SDFT JSONL format
(:mod:`llmkit.data.sdft_data`) plus a reference answer, and probes whose regex checks that a
completion contains that answer as a whole token (:mod:`llmkit.eval.probes`).

    arithmetic  "What is 17 + 65?"          "17 + 65 = 82"              answer 82
    reverse     "Reverse the word: lamp"    "The reverse of lamp is pmal"   answer pmal
    upper       "Write in capitals: lamp"   "In capitals, lamp is LAMP"     answer LAMP

Words are 3 to 7 random lowercase letters, so the supply of distinct prompts is practically
endless. Everything is a pure function of (task, n, seed); probes come from their own seed
stream and never repeat a training prompt.
"""

from __future__ import annotations

import random
import re
import string
from pathlib import Path

from llmkit.data.corpus import write_jsonl_atomic
from llmkit.data.sdft_data import Example
from llmkit.errors import LLMKitError

TASKS = ("arithmetic", "reverse", "upper")
"""The task names :func:`make_examples` knows."""

MAX_OPERAND = 99
"""Arithmetic operands are uniform in [0, MAX_OPERAND]."""

WORD_LENGTHS = (3, 7)
"""Words for ``reverse`` and ``upper`` have this many letters (inclusive range)."""

PROBE_DRAWS_PER_PROBE = 100
"""How many candidates :func:`make_probes` may draw per probe before giving up on a task
whose distinct prompts are nearly all in the training set."""


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise LLMKitError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")


def _draw(task: str, rng: random.Random) -> tuple[str, str, str]:
    """One (prompt, demonstration, answer) of ``task``."""
    if task == "arithmetic":
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}", str(a + b)
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(*WORD_LENGTHS)))
    if task == "reverse":
        return f"Reverse the word: {word}", f"The reverse of {word} is {word[::-1]}", word[::-1]
    return f"Write in capitals: {word}", f"In capitals, {word} is {word.upper()}", word.upper()


def make_examples(task: str, n: int, seed: int) -> list[Example]:
    """``n`` examples of ``task`` drawn with ``seed`` (the same list for the same arguments).

    Each example's meta is ``{"task": task, "answer": answer}``; prompts may repeat.
    """
    _check_task(task)
    if n < 1:
        raise LLMKitError(f"the number of examples must be >= 1, got {n}")
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        prompt, demonstration, answer = _draw(task, rng)
        meta = {"task": task, "answer": answer}
        examples.append(Example(prompt, demonstration, meta, source=f"<{task} seed {seed}>:{i + 1}"))
    return examples


def answer_regex(task: str, answer: str) -> str:
    """A regex that finds ``answer`` in a completion as a whole token: a number not inside a
    longer number (``82`` matches "= 82." but not "182" or "821"), a word not inside a longer
    word. Case-sensitive, so ``upper`` needs the capitals."""
    _check_task(task)
    if task == "arithmetic":
        return rf"(?<![0-9]){re.escape(answer)}(?![0-9])"
    return rf"\b{re.escape(answer)}\b"


def make_probes(task: str, n: int, seed: int, exclude: set[str]) -> list[dict[str, str]]:
    """``n`` probe records ``{"name", "prompt", "expect_regex"}`` of ``task``, with distinct
    prompts none of which is in ``exclude`` (the training prompts).

    They are drawn from a seed stream of their own (``"probes:{seed}"``), not the examples'.
    """
    _check_task(task)
    if n < 1:
        raise LLMKitError(f"the number of probes must be >= 1, got {n}")
    rng = random.Random(f"probes:{seed}")
    seen = set(exclude)
    probes = []
    for _ in range(PROBE_DRAWS_PER_PROBE * n):
        prompt, _, answer = _draw(task, rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        name = f"{task}-{len(probes):04d}"
        probes.append({"name": name, "prompt": prompt, "expect_regex": answer_regex(task, answer)})
        if len(probes) == n:
            return probes
    raise LLMKitError(
        f"found only {len(probes)} {task} probes whose prompts are not training prompts after "
        f"{PROBE_DRAWS_PER_PROBE * n} draws: ask for fewer probes or fewer examples"
    )


def write_task_files(
    task: str, n: int, seed: int, out: Path, probes_out: Path | None = None, n_probes: int = 20
) -> dict[str, int]:
    """Write ``n`` examples of ``task`` as SDFT JSONL to ``out`` (``{"prompt", "demonstration",
    "task", "answer"}`` per line) and, if ``probes_out`` is given, ``n_probes`` held-out probes
    to it. Both files are written to a temp file and renamed. Returns the counts written."""
    examples = make_examples(task, n, seed)
    probes = make_probes(task, n_probes, seed, {e.prompt for e in examples}) if probes_out is not None else []
    write_jsonl_atomic(Path(out), [{"prompt": e.prompt, "demonstration": e.demonstration, **e.meta} for e in examples])
    if probes_out is not None:
        write_jsonl_atomic(Path(probes_out), probes)
    return {"examples": len(examples), "probes": len(probes)}
