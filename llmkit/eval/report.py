"""The evaluation report: perplexity and probe scores of one model, as one JSON document.

SDFT's regression gates compare two such reports, before and after a block of updates
(``eval_before.json``, ``eval_after.json``; docs/sdft.md), and fine-tuning validation writes
one per evaluation (``eval/step_NNNNNN.json``; a ``validate``'s ``eval/validate_step_NNNNNN.json``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmkit.data.tokenizer import TokenizerLike
from llmkit.errors import LLMKitError
from llmkit.eval.perplexity import evaluate_perplexity
from llmkit.eval.probes import Probe, read_probes, score_probes
from llmkit.io import expand_inputs
from llmkit.model.transformer import Transformer


@dataclass
class EvalConfig:
    """What :func:`evaluate` runs, as YAML can say it: the held-out shards, the probe file and
    their settings. Used by ``llmkit sdft|sft validate`` and by the RegressionGate callback.

    ppl_files: packed ``.bin`` shards (paths or globs; one may be given alone) for perplexity;
        None skips it.
    probes: a probe JSONL file (:func:`read_probes`); None skips probes.
    seq_len: perplexity window length (None: the model's max_seq_len).
    """

    ppl_files: list[str] | str | None = None
    probes: str | None = None
    seq_len: int | None = None
    batch_size: int = 8
    max_windows: int | None = 64
    max_new_tokens: int = 32
    probe_batch_size: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.ppl_files, str):
            self.ppl_files = [self.ppl_files]
        if self.probes is not None and not isinstance(self.probes, (str, os.PathLike)):
            raise LLMKitError(f"evaluation.probes takes one probe JSONL file, got {self.probes!r}")
        sizes = {"seq_len": self.seq_len, "batch_size": self.batch_size, "max_windows": self.max_windows,
                 "max_new_tokens": self.max_new_tokens, "probe_batch_size": self.probe_batch_size}
        small = [f"{name} {value}" for name, value in sizes.items() if value is not None and value < 1]
        if small:
            raise LLMKitError(f"evaluation.{', '.join(small)}: these must be >= 1 (seq_len and max_windows may be "
                              f"null: the model's max_seq_len, every window)")

    @property
    def enabled(self) -> bool:
        return self.ppl_files is not None or self.probes is not None

    def check_files(self) -> None:
        """Raise :class:`LLMKitError` now, naming the setting, if a shard is missing or the probe
        file is missing or malformed: before a run trains up to its first evaluation."""
        if self.ppl_files is not None:
            expand_inputs(self.ppl_files, "evaluation.ppl_files")
        if self.probes is not None:
            read_probes(self.probes)

    def run(self, model: Transformer, tokenizer: TokenizerLike | None, chat_template: bool = False) -> dict:
        """The report of ``model`` (see :func:`evaluate`)."""
        probes = read_probes(self.probes) if self.probes is not None else None
        return evaluate(
            model, tokenizer, self.ppl_files, probes, self.seq_len, self.batch_size, self.max_windows,
            self.max_new_tokens, self.probe_batch_size, chat_template,
        )


def evaluate(
    model: Transformer,
    tokenizer: TokenizerLike | None,
    ppl_files: list[str | Path] | None,
    probes: list[Probe] | None,
    seq_len: int | None = EvalConfig.seq_len,
    batch_size: int = EvalConfig.batch_size,
    max_windows: int | None = EvalConfig.max_windows,
    max_new_tokens: int = EvalConfig.max_new_tokens,
    probe_batch_size: int = EvalConfig.probe_batch_size,
    chat_template: bool = False,
) -> dict:
    """``{"perplexity": ..., "probes": ...}``: :func:`evaluate_perplexity` on ``ppl_files``
    (``seq_len`` defaults to the model's max_seq_len) and :func:`score_probes` on ``probes``
    (through the tokenizer's chat template with ``chat_template``); a section is None when its
    input is None. The tokenizer is needed for probes only. The settings default to
    :class:`EvalConfig`'s, declared there once."""
    if ppl_files is None and probes is None:
        raise LLMKitError("nothing to evaluate: give perplexity shards, probes, or both")
    if probes is not None and tokenizer is None:
        raise LLMKitError("probes need the model's tokenizer: pass the tokenizer it was trained with")
    perplexity = None
    if ppl_files is not None:
        seq_len = model.config.max_seq_len if seq_len is None else seq_len
        perplexity = evaluate_perplexity(model, ppl_files, seq_len, batch_size, max_windows, "evaluation.ppl_files",
                                         tokenizer)
    scores = None
    if probes is not None:
        scores = score_probes(model, tokenizer, probes, max_new_tokens, probe_batch_size, chat_template)
    return {"perplexity": perplexity, "probes": scores}
