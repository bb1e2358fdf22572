"""Build a corpus, train a tokenizer, pack and verify token shards, write generated SDFT task files.

``llmkit data {corpus,tokenizer,pack,verify,tasks}``; each prints a one-line summary of what it wrote.

The work is done by :mod:`llmkit.data`; these functions only name the flags and report. Their
imports stay light (no torch, no Lightning): ``llmkit data ... --help`` answers at once.
"""

from __future__ import annotations

from pathlib import Path

from llmkit.data import packing
from llmkit.data.corpus import SUMMARY_NAME, write_corpus
from llmkit.data.tasks import DEFAULT_N_PROBES, Task, write_task_files
from llmkit.data.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
from llmkit.errors import LLMKitError
from llmkit.io import expand_inputs

BYTES_PER_MB = 1_000_000


def corpus(
    source: list[str],
    out: Path,
    val_fraction: float = 0.02,
    shard_mb: float = 16.0,
    max_files: int | None = None,
    text_field: str = "text",
    text_column: str = "text",
) -> int:
    """Write train/val text shards from this Python's own source files or from your text.

    Args:
        source: stdlib (the standard library without its tests), site-packages (plus the installed packages), or
            your files, directories and glob patterns: .txt and .md files (a document each), .jsonl (a document
            per line), .parquet (a document per row; needs pyarrow).
        out: directory for the shards.
        val_fraction: share of documents held out for validation (by a hash of their file and line or row).
        shard_mb: start a new shard past this many megabytes.
        max_files: use only the first N files (in their sorted order).
        text_field: the JSONL field that holds a document's text.
        text_column: the Parquet column that holds a document's text.
    """
    if not shard_mb > 0:
        raise LLMKitError(f"--shard-mb must be > 0, got {shard_mb}")
    summary = write_corpus(
        source, out, val_fraction=val_fraction, shard_bytes=int(shard_mb * BYTES_PER_MB), max_files=max_files,
        text_field=text_field, text_column=text_column,
    )
    print(
        f"wrote {out}: {summary['n_train_documents']:,} train documents "
        f"({summary['bytes_train']:,} bytes, {len(summary['train_files'])} shards) and "
        f"{summary['n_val_documents']:,} val documents ({summary['bytes_val']:,} bytes, "
        f"{len(summary['val_files'])} shards) from {summary['n_files']:,} files; {summary['n_skipped']:,} "
        f"documents skipped{skipped_summary(summary, out)}"
    )
    return 0


def skipped_summary(summary: dict, out: Path) -> str:
    """`` (2 blank: a.txt, ...; 1 unreadable or not UTF-8: b.txt; see corpus.json)`` for the
    skipped documents of a corpus summary: each reason's count and the first document the
    summary names for it; empty when none were skipped."""
    if not summary["n_skipped"]:
        return ""
    parts = []
    for reason, n in sorted(summary["skipped_by_reason"].items()):
        named = [entry["document"] for entry in summary["skipped"] if entry["reason"] == reason]
        parts.append(f"{n:,} {reason}" + (f": {named[0]}{', ...' if n > 1 else ''}" if named else ""))
    return f" ({'; '.join(parts)}; see {out / SUMMARY_NAME})"


def tokenizer(input: list[str], model_prefix: str, config: TokenizerTrainConfig, verbose: bool = False) -> int:
    """Train a SentencePiece tokenizer.

    Args:
        input: text files or glob patterns to train on.
        model_prefix: writes PREFIX.model and PREFIX.vocab (a trailing .model is dropped: data/tok/spm.model
            writes data/tok/spm.model and data/tok/spm.vocab); not a directory.
        config: the training options (one flag each).
        verbose: show sentencepiece's log.
    """
    inputs = expand_inputs(input, "--input")
    model = train_tokenizer(inputs, model_prefix, config, verbose=verbose)
    print(
        f"wrote {model}: {Tokenizer(model).vocab_size:,}-token {config.model_type} vocabulary "
        f"trained on {len(inputs)} file(s)"
    )
    return 0


def pack(tokenizer: Path, input: list[str], output: Path, eos: bool = True, workers: int | None = None) -> int:
    """Tokenise text files into a .bin token shard.

    Args:
        tokenizer: what to encode with: a SentencePiece PREFIX.model, a Hugging Face tokenizer.json, or a model
            directory holding one.
        input: text files or glob patterns to pack.
        output: OUT.bin (its metadata goes to OUT.bin.json).
        eos: append the EOS token after each document.
        workers: tokenizer processes (default: one per 2 MB of input, at most one per core).
    """
    inputs = expand_inputs(input, "--input")
    for path in inputs:
        if path.suffix.lower() in (".jsonl", ".parquet"):  # pack would encode the JSON syntax (or bytes) as text
            raise LLMKitError(f"--input {path}: pack reads plain text files, one document per file or per "
                              f"separator; turn {path.suffix} records into text with `llmkit data corpus` first "
                              "(docs/data.md)")
    meta = packing.pack(tokenizer, inputs, output, append_eos=eos, workers=workers)
    print(f"wrote {output}: {meta['n_tokens']:,} tokens ({meta['dtype']}) from {meta['n_documents']:,} documents")
    return 0


def verify(shard: list[str]) -> int:
    """Check packed shards against the checksums pack recorded, and every id against the vocabulary.

    Args:
        shard: .bin shards or glob patterns.
    """
    failed = []
    for path in expand_inputs(shard, "--shard"):
        try:
            tokens, meta = packing.open_shard(path)
            checked = packing.check_shard(path, tokens, meta, meta["vocab_size"], progress=True)
        except LLMKitError as error:
            print(f"FAILED {error}")
            failed.append(path)
            continue
        what = "checksums match" if checked else "no checksums recorded (packed by an older llmkit): ids checked only"
        print(f"ok {path}: {meta['n_tokens']:,} tokens, {what}")
    if failed:
        raise LLMKitError(f"{len(failed)} shard(s) failed the check: {', '.join(map(str, failed))}")
    return 0


def tasks(task: Task, n: int, out: Path, seed: int = 0, probes_out: Path | None = None,
          n_probes: int | None = None) -> int:
    """Write generated SDFT examples (and held-out probes) of a task as JSONL.

    Args:
        task: which task to generate.
        n: number of examples.
        out: the examples' .jsonl file.
        seed: the same seed gives the same files.
        probes_out: also write probes here, none repeating a training prompt (except for the fact tasks,
            colors and cities, whose probes are facts of the table the examples teach: recall, not generalisation).
        n_probes: probes to write to --probes-out (default 20).
    """
    if n_probes is not None and probes_out is None:
        raise LLMKitError(f"--n-probes {n_probes} needs --probes-out, the file to write the probes to")
    counts = write_task_files(task, n, seed, out, probes_out, DEFAULT_N_PROBES if n_probes is None else n_probes,
                              progress=True)
    probes = f" and {probes_out}: {counts['probes']:,} probes" if probes_out else ""
    print(f"wrote {out}: {counts['examples']:,} {task} examples (seed {seed}){probes}")
    return 0
