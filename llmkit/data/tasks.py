"""Procedurally generated SDFT tasks with exact-match answers, for continual-learning benchmarks.

Learn task A, then task B, and measure how much of A is forgotten (docs/continual.md): each
task makes endless (prompt, demonstration) pairs in the SDFT JSONL format
(:mod:`llmkit.data.examples`) plus a reference answer, and probes whose regex checks that a
completion contains that answer as a whole token (:mod:`llmkit.eval.probes`).

    arithmetic  "What is 17 + 65?"          "17 + 65 = 82"              answer 82
    reverse     "Reverse the word: lamp"    "The reverse of lamp is pmal"   answer pmal
    upper       "Write in capitals: lamp"   "In capitals, lamp is LAMP"     answer LAMP
    colors      "What color is the bamo?"   "The color is red."         answer red
    cities      "Where does tiku live?"     "In Paris."                 answer Paris

Words are 3 to 7 random lowercase letters, so the supply of distinct prompts is practically
endless. Everything is a pure function of (task, n, seed); probes come from their own seed
stream and never repeat a training prompt.

``colors`` and ``cities`` are *fact* tasks (knowledge injection): each seed fixes a table of
FACTS_PER_TABLE made-up names (two consonant-vowel syllables), each with one of eight
answers; examples are drawn from that table, and the probes are the table's facts
themselves, so they measure recall of what was taught, not generalisation. A small model
learns them in a few hundred steps, where the other tasks need far more.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from llmkit.data.examples import Example
from llmkit.errors import LLMKitError
from llmkit.io import atomic_file, write_jsonl_atomic

FACTS = {
    "colors": ("What color is the {name}?", "The color is {answer}.",
               ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")),
    "cities": ("Where does {name} live?", "In {answer}.",
               ("Paris", "London", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Rome")),
}
"""Fact tasks: (prompt template, demonstration template, the possible answers)."""

TASKS = ("arithmetic", "reverse", "upper", *FACTS)
"""The task names :func:`iter_examples` knows."""

Task = Literal[TASKS]
"""A task name, as a type (the choices of ``llmkit data tasks --task``)."""

FACTS_PER_TABLE = 64
"""Names (facts) in the table of a fact task for one seed."""

MAX_OPERAND = 99
"""Arithmetic operands are uniform in [0, MAX_OPERAND]."""

WORD_LENGTHS = (3, 7)
"""Words for ``reverse`` and ``upper`` have this many letters (inclusive range)."""

PROBE_DRAWS_PER_PROBE = 100
"""Prompts :func:`probe_candidates` draws per probe asked for: enough for a task whose distinct
prompts are nearly all in the training set, before giving up on it."""


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise LLMKitError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")


def fact_table(task: str, seed: int) -> list[tuple[str, str]]:
    """The (name, answer) facts of the fact task ``task`` for ``seed``: distinct names, answers
    uniform over the task's eight."""
    rng = random.Random(f"facts:{task}:{seed}")
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    names: list[str] = []
    while len(names) < FACTS_PER_TABLE:
        name = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(2))
        if name not in names:
            names.append(name)
    return [(name, rng.choice(FACTS[task][2])) for name in names]


def _fact(task: str, name: str, answer: str) -> tuple[str, str, str]:
    prompt, demonstration, _ = FACTS[task]
    return prompt.format(name=name), demonstration.format(answer=answer), answer


def _draw(task: str, rng: random.Random) -> tuple[str, str, str]:
    """One (prompt, demonstration, answer) of a generated (non-fact) ``task``."""
    if task == "arithmetic":
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}", str(a + b)
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(*WORD_LENGTHS)))
    if task == "reverse":
        return f"Reverse the word: {word}", f"The reverse of {word} is {word[::-1]}", word[::-1]
    return f"Write in capitals: {word}", f"In capitals, {word} is {word.upper()}", word.upper()


def iter_examples(task: str, n: int, seed: int) -> Iterator[Example]:
    """``n`` examples of ``task`` drawn with ``seed``, one at a time (the same sequence for the same
    arguments), so that millions of them are written without being held.

    Each example's meta is ``{"task": task, "answer": answer}``; prompts may repeat.
    """
    _check_task(task)
    if n < 1:
        raise LLMKitError(f"the number of examples must be >= 1, got {n}")
    rng = random.Random(seed)
    table = fact_table(task, seed) if task in FACTS else None
    for i in range(n):
        prompt, demonstration, answer = _fact(task, *rng.choice(table)) if table else _draw(task, rng)
        yield Example(prompt, demonstration, {"task": task, "answer": answer}, source=f"<{task} seed {seed}>:{i + 1}")


def make_examples(task: str, n: int, seed: int) -> list[Example]:
    """The examples of :func:`iter_examples`, as a list."""
    return list(iter_examples(task, n, seed))


def answer_regex(task: str, answer: str) -> str:
    """A regex that finds ``answer`` in a completion as a whole token: a number not inside a
    longer number (``82`` matches "= 82." but not "182" or "821"), a word not inside a longer
    word. Case-sensitive, so ``upper`` needs the capitals."""
    _check_task(task)
    if task == "arithmetic":
        return rf"(?<![0-9]){re.escape(answer)}(?![0-9])"
    return rf"\b{re.escape(answer)}\b"


def probe_candidates(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs that :func:`make_probes` takes its ``n`` probes from, in order.

    A fact task's are the first ``n`` facts of its table for ``seed`` (recall of the taught facts).
    A generated task's are the distinct prompts of the first ``PROBE_DRAWS_PER_PROBE * n`` draws of
    a seed stream of their own (``"probes:{seed}"``), not the examples'.
    """
    _check_task(task)
    if n < 1:
        raise LLMKitError(f"the number of probes must be >= 1, got {n}")
    if task in FACTS:
        if n > FACTS_PER_TABLE:
            raise LLMKitError(f"a {task} table has {FACTS_PER_TABLE} facts: ask for at most that many probes")
        return [(prompt, answer) for prompt, _, answer in
                (_fact(task, name, answer) for name, answer in fact_table(task, seed)[:n])]
    rng = random.Random(f"probes:{seed}")
    candidates: dict[str, str] = {}
    for _ in range(PROBE_DRAWS_PER_PROBE * n):
        prompt, _, answer = _draw(task, rng)
        candidates.setdefault(prompt, answer)
    return list(candidates.items())


def make_probes(task: str, n: int, seed: int, exclude: set[str]) -> list[dict[str, str]]:
    """``n`` probe records ``{"name", "prompt", "expect_regex"}`` of ``task``: the first of
    :func:`probe_candidates` whose prompts are not in ``exclude`` (the training prompts; only the
    candidates among them matter). A fact task's probes are its facts, and ``exclude`` does not apply.
    """
    candidates = probe_candidates(task, n, seed)
    kept = candidates if task in FACTS else [(p, a) for p, a in candidates if p not in exclude][:n]
    if len(kept) < n:
        raise LLMKitError(
            f"found only {len(kept)} {task} probes whose prompts are not training prompts after "
            f"{PROBE_DRAWS_PER_PROBE * n} draws: ask for fewer probes or fewer examples"
        )
    return [{"name": f"{task}-{i:04d}", "prompt": prompt, "expect_regex": answer_regex(task, answer)}
            for i, (prompt, answer) in enumerate(kept)]


DEFAULT_N_PROBES = 20
"""Probes :func:`write_task_files` writes unless told how many."""


def write_task_files(
    task: str, n: int, seed: int, out: Path, probes_out: Path | None = None, n_probes: int = DEFAULT_N_PROBES,
    progress: bool = False,
) -> dict[str, int]:
    """Write ``n`` examples of ``task`` as SDFT JSONL to ``out`` (``{"prompt", "demonstration",
    "task", "answer"}`` per line) and, if ``probes_out`` is given, ``n_probes`` probes to it
    (:func:`make_probes`). The examples are streamed (a progress bar if ``progress``): memory holds
    only the probe candidates. Both files are written to a temp file and renamed, the examples last;
    the same path for both is refused before either is written. Returns the counts written."""
    if probes_out is not None and Path(probes_out).resolve() == Path(out).resolve():
        raise LLMKitError(
            f"the examples and the probes would both be written to {out} (the probes overwriting the "
            "examples): write the probes to a file of their own"
        )
    watched = {prompt for prompt, _ in probe_candidates(task, n_probes, seed)} if probes_out is not None else set()
    taught: set[str] = set()
    with atomic_file(out) as tmp, tmp.open("w", encoding="utf-8") as f:
        for e in tqdm(iter_examples(task, n, seed), total=n, desc=f"tasks {task}", unit="ex", unit_scale=True,
                      disable=not progress):
            f.write(json.dumps({"prompt": e.prompt, "demonstration": e.demonstration, **e.meta},
                               ensure_ascii=False) + "\n")
            if e.prompt in watched:
                taught.add(e.prompt)
        probes = make_probes(task, n_probes, seed, taught) if probes_out is not None else []
        if probes_out is not None:
            write_jsonl_atomic(Path(probes_out), probes)
    return {"examples": n, "probes": len(probes)}
