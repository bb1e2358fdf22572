"""Capability probes: prompts whose greedy completion must match a regex or contain a substring.

A capability a model must keep while it learns new ones (SDFT's regression gates check
probes around every block of updates). A probe file is JSONL, one
``{"name": ..., "prompt": ..., "expect_regex": ...}`` (or ``"expect_substring"``) per line;
``llmkit data tasks --probes-out`` writes them for the generated tasks. Completions are greedy,
so a probe's outcome is a function of the weights alone; only the completion is checked,
never the prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.data.tokenizer import TokenizerLike
from llmkit.errors import LLMKitError
from llmkit.eval.mode import eval_mode
from llmkit.io import iter_jsonl_objects, text_field
from llmkit.model.generation import SamplingConfig, generate
from llmkit.model.transformer import Transformer

EXPECTATIONS = ("expect_regex", "expect_substring")
"""A probe has exactly one of these."""

_PROBE_LINE = '{"name": "...", "prompt": "...", "expect_regex": "..."} (or "expect_substring")'


@dataclass
class Probe:
    """A prompt and what its completion must show: ``re.search(expect_regex, completion)`` or
    ``expect_substring in completion``. ``source`` is where it was read (``file:line``), if anywhere."""

    name: str
    prompt: str
    expect_regex: str | None = None
    expect_substring: str | None = None
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.prompt:
            raise LLMKitError(f"probe {self.name!r} has an empty prompt: give it some text")
        given = [key for key in EXPECTATIONS if getattr(self, key) is not None]
        if len(given) != 1:
            raise LLMKitError(
                f"probe {self.name!r} must have exactly one of expect_regex and expect_substring, "
                f"it has {given or 'neither'}"
            )
        if self.expect_substring == "" or self.expect_regex == "":
            raise LLMKitError(f"probe {self.name!r} has an empty {given[0]}, which every completion passes")
        if self.expect_regex is not None:
            try:
                re.compile(self.expect_regex)
            except re.error as e:
                raise LLMKitError(
                    f"probe {self.name!r}: expect_regex {self.expect_regex!r} is not a valid Python regex ({e})"
                ) from None

    def passes(self, completion: str) -> bool:
        """Whether ``completion`` meets the probe's expectation."""
        if self.expect_regex is not None:
            return re.search(self.expect_regex, completion) is not None
        return self.expect_substring in completion


def read_probes(path: str | Path) -> list[Probe]:
    """The probes of the JSONL file ``path``, one per non-blank line; names must be unique."""
    probes: list[Probe] = []
    where: dict[str, str] = {}
    for source, record in iter_jsonl_objects(path, "probe", _PROBE_LINE):
        unknown = sorted(set(record) - {"name", "prompt", *EXPECTATIONS})
        if unknown:
            raise LLMKitError(
                f"{source}: unknown fields {unknown}; a probe has name, prompt and one of {', '.join(EXPECTATIONS)}"
            )
        name = text_field(record, "name", source, _PROBE_LINE)
        if name in where:
            raise LLMKitError(f"{source}: probe name {name!r} is already used at {where[name]}; rename one")
        where[name] = source
        prompt = text_field(record, "prompt", source, _PROBE_LINE)
        expected = {key: text_field(record, key, source, _PROBE_LINE) for key in EXPECTATIONS if key in record}
        try:
            probes.append(Probe(name, prompt, **expected, source=source))
        except LLMKitError as e:
            raise LLMKitError(f"{source}: {e}") from None
    if not probes:
        raise LLMKitError(f"probe file {path} has no probes: write one {_PROBE_LINE} per line")
    return probes


def score_probes(
    model: Transformer, tokenizer: TokenizerLike, probes: list[Probe], max_new_tokens: int = 32, batch_size: int = 32,
    chat_template: bool = False,
) -> dict:
    """Complete every probe's prompt greedily and check it; with ``chat_template`` the prompt is
    first rendered as a user message through the tokenizer's chat template, as the fine-tuning
    modules render their training prompts.

    New tokens stop at EOS and are capped so the longest prompt plus them fits the model's
    ``max_seq_len`` (the cap is reported as ``max_new_tokens``). Returns ``{"accuracy",
    "passed", "n", "max_new_tokens", "results"}``, each result ``{"name", "prompt",
    "completion", "passed"}`` in the probes' order.
    """
    if not probes:
        raise LLMKitError("no probes to score: give at least one")
    tokenizer.check_vocab_size(model.config.vocab_size, "the model")
    context = model.config.max_seq_len
    encoded = [tokenizer.encode(tokenizer.render_chat(p.prompt) if chat_template else p.prompt) for p in probes]
    for probe, ids in zip(probes, encoded, strict=True):
        if not ids or len(ids) >= context:
            where = f"{probe.source}: " if probe.source else ""
            raise LLMKitError(
                f"{where}probe {probe.name!r}: its prompt is {len(ids)} tokens; it needs 1 to {context - 1} to leave "
                f"room for a completion in the model's max_seq_len {context}: shorten it"
            )
    config = SamplingConfig(max_new_tokens=min(max_new_tokens, context - max(map(len, encoded))), temperature=0)
    results = []
    with eval_mode(model):
        for start in range(0, len(probes), batch_size):
            batch = encoded[start : start + batch_size]
            out = generate(model, batch, config, eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
            for probe, tokens, mask in zip(probes[start:], out.tokens.tolist(), out.mask.tolist(), strict=False):
                completion = tokenizer.decode([t for t, real in zip(tokens, mask, strict=True) if real])
                results.append(
                    {"name": probe.name, "prompt": probe.prompt, "completion": completion,
                     "passed": probe.passes(completion)}
                )
    passed = sum(r["passed"] for r in results)
    return {
        "accuracy": passed / len(results),
        "passed": passed,
        "n": len(results),
        "max_new_tokens": config.max_new_tokens,
        "results": results,
    }
