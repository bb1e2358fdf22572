"""The plain-text corpus format, and :func:`write_corpus`, which builds one from a source.

A corpus is a directory of UTF-8 text shards (``train_00000.txt``, ``val_00000.txt``, ...).
Inside a shard, documents follow each other and each one is closed by a line holding exactly
:data:`DOC_SEPARATOR` (``llmkit data pack`` ends each with EOS). The source is this Python's
own ``.py`` files (so a model can be trained with no download at all) or the user's text:
``.txt``/``.md`` files, JSONL, Parquet (:mod:`llmkit.data.sources`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from llmkit.data.sources import SourceFile, list_source_files, read_documents
from llmkit.errors import LLMKitError
from llmkit.io import temp_directory, write_json_atomic

DOC_SEPARATOR = "<|endoftext|>"
"""A line consisting of exactly this string ends a document in a plain-text shard."""

SUMMARY_NAME = "corpus.json"
"""The summary :func:`write_corpus` writes next to the shards."""

SKIPPED_NAMED = 100
"""How many skipped documents ``corpus.json`` names (with why); all are counted."""

_SHARD_NAME = re.compile(r"^(train|val)_\d{5}\.txt$")
_SEPARATOR_LINE = (DOC_SEPARATOR + "\n").encode("utf-8")
_SPLIT_HASH_HEX_DIGITS = 8


def is_separator(line: str) -> bool:
    """True if ``line`` (with or without its line ending) is a document separator."""
    return line.rstrip("\r\n") == DOC_SEPARATOR


@dataclass
class _ShardWriter:
    """Appends documents to ``{split}_00000.txt, ...``, each shard via a temp file + rename."""

    out_dir: Path
    split: str
    shard_bytes: int
    files: list[str] = field(default_factory=list)
    n_bytes: int = 0
    n_documents: int = 0
    _handle: BinaryIO | None = None
    _tmp: Path | None = None
    _shard_size: int = 0

    def add(self, text: str) -> None:
        if self._handle is None:
            self._open()
        if not text.endswith("\n"):
            text += "\n"
        data = text.encode("utf-8") + _SEPARATOR_LINE
        self._handle.write(data)
        self._shard_size += len(data)
        self.n_bytes += len(data)
        self.n_documents += 1
        if self._shard_size > self.shard_bytes:
            self.close()

    def close(self) -> None:
        """Finish the current shard: flush it and rename it into place."""
        if self._handle is None:
            return
        self._handle.close()
        os.replace(self._tmp, self.out_dir / self.files[-1])
        self._handle = self._tmp = None

    def abort(self) -> None:
        """Drop the unfinished shard, if any."""
        if self._handle is not None:
            self._handle.close()
            self._tmp.unlink(missing_ok=True)
            self._handle = self._tmp = None

    def _open(self) -> None:
        name = f"{self.split}_{len(self.files):05d}.txt"
        self.files.append(name)
        self._tmp = self.out_dir / f"{name}.tmp"
        self._handle = self._tmp.open("wb")
        self._shard_size = 0


def write_corpus(
    source: str | Sequence[str],
    out_dir: str | Path,
    *,
    val_fraction: float = 0.02,
    shard_bytes: int = 16_000_000,
    max_files: int | None = None,
    text_field: str = "text",
    text_column: str = "text",
    progress: bool = True,
) -> dict:
    """Write the documents of ``source`` as train/val text shards under ``out_dir``.

    ``source`` is ``"stdlib"``, ``"site-packages"`` or the user's files, directories and patterns
    (see :mod:`llmkit.data.sources`; ``text_field`` / ``text_column`` name the text of JSONL lines
    and Parquet rows). Files are read in their fixed order, the first ``max_files`` if given,
    one document at a time. A document goes to val when the hash of its key falls below
    ``val_fraction``, so the split is the same on every run; if that leaves val empty, the last
    document goes there. Documents that are unreadable, not UTF-8, null, blank or that contain a
    separator line are skipped, counted by reason, and the first :data:`SKIPPED_NAMED` named.

    The shards are written into a temp directory beside ``out_dir`` (``.NAME.PID.tmp``) and moved
    into it once all of them are whole: the shards and summary of an earlier run there are replaced
    then, and a run that is interrupted, fails or is killed (``kill -9`` too) leaves ``out_dir`` as
    it was; the next run removes a killed run's temp directory. So a part of a corpus never passes
    for the whole, and an earlier corpus is never left partly replaced.
    Returns the summary, also written to ``out_dir/corpus.json``: ``n_files`` files were read,
    ``n_skipped`` documents skipped (``skipped_by_reason``: their counts by reason;
    ``skipped``: the first ones, each ``{"document": KEY, "reason": ...}``), the rest written as
    ``n_train_documents`` and ``n_val_documents``; shard names in ``train_files`` / ``val_files``
    are relative to ``out_dir``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LLMKitError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for name, value in (("shard_bytes", shard_bytes), ("max_files", max_files)):
        if value is not None and value < 1:
            raise LLMKitError(f"{name} must be >= 1, got {value}")
    names = [source] if isinstance(source, str) else list(source)
    files = list_source_files(names)
    capped = max_files is not None and max_files < len(files)
    files = files[:max_files]
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LLMKitError(f"out_dir {out_dir} is a file, not a directory: give a directory to write the shards into")
    staging = temp_directory(out_dir.resolve())  # resolved: --out . has no name to put the temp name beside
    try:
        train, val, skipped = _write_shards(files, names, staging, val_fraction, shard_bytes, text_field,
                                            text_column, progress)
        n_documents = train.n_documents + val.n_documents
        if n_documents < 2:
            raise LLMKitError(
                f"corpus {source!r} gave {n_documents} usable document(s) out of {len(files)} "
                "file(s); at least 2 are needed (one for train, one for val): "
                + ("raise max_files or use another source" if capped else "add documents or use another source")
            )
        summary = {
            "source": source,
            "n_files": len(files),
            "n_skipped": skipped.total(),
            "skipped_by_reason": dict(skipped),
            "skipped": skipped.named,
            "n_train_documents": train.n_documents,
            "n_val_documents": val.n_documents,
            "train_files": train.files,
            "val_files": val.files,
            "bytes_train": train.n_bytes,
            "bytes_val": val.n_bytes,
        }
        _install(staging, out_dir, summary)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


class Skipped(Counter):
    """The documents a corpus run skipped: counts by reason, and the first :data:`SKIPPED_NAMED`
    as ``{"document": KEY, "reason": ...}`` (``named``)."""

    def __init__(self) -> None:
        super().__init__()
        self.named: list[dict[str, str]] = []

    def add(self, key: str, reason: str) -> None:
        self[reason] += 1
        if len(self.named) < SKIPPED_NAMED:
            self.named.append({"document": key, "reason": reason})


def _write_shards(
    files: list[SourceFile], names: list[str], out_dir: Path, val_fraction: float, shard_bytes: int, text_field: str,
    text_column: str, progress: bool,
) -> tuple[_ShardWriter, _ShardWriter, Skipped]:
    """Write the usable documents of ``files`` as train and val shards into ``out_dir``; the two
    writers (their shard names and counts) and the documents skipped."""
    train = _ShardWriter(out_dir, "train", shard_bytes)
    val = _ShardWriter(out_dir, "val", shard_bytes)
    pending_train: str | None = None  # held back so it can go to val if val stays empty
    skipped = Skipped()
    label = names[0] if len(names) == 1 else f"{len(names)} sources"
    try:
        with tqdm(files, desc=f"corpus {label}", unit="file", disable=not progress) as bar:
            for file in bar:
                for key, text in read_documents(file, text_field, text_column):
                    if (reason := _skip_reason(text, file)) is not None:
                        skipped.add(key, reason)
                    elif _goes_to_val(key, val_fraction):
                        val.add(text)
                    else:
                        if pending_train is not None:
                            train.add(pending_train)
                        pending_train = text
                kept = train.n_documents + val.n_documents + (pending_train is not None)
                bar.set_postfix(documents=f"{kept:,}", refresh=False)
        if pending_train is not None:
            (val if val.n_documents == 0 else train).add(pending_train)
        train.close()
        val.close()
    finally:
        train.abort()
        val.abort()
    return train, val, skipped


def _install(staging: Path, out_dir: Path, summary: dict) -> None:
    """Move the whole corpus in ``staging`` into ``out_dir``, replacing an earlier run's: the
    earlier summary is removed first and this run's written last, so that no summary ever stands
    beside a mix of the two runs' shards."""
    out_dir.mkdir(exist_ok=True)
    (out_dir / SUMMARY_NAME).unlink(missing_ok=True)
    for path in out_dir.iterdir():
        if _SHARD_NAME.match(path.name):
            path.unlink()
    for name in summary["train_files"] + summary["val_files"]:
        os.replace(staging / name, out_dir / name)
    write_json_atomic(out_dir / SUMMARY_NAME, summary)


def _skip_reason(text: str | None, file: SourceFile) -> str | None:
    """Why the format cannot hold a document (:func:`~llmkit.data.sources.read_documents` gives
    None for an unreadable or non-UTF-8 file and a null record), or None if it can."""
    if text is None:
        return "null text" if file.path.suffix in (".jsonl", ".parquet") else "unreadable or not UTF-8"
    if not text.strip():
        return "blank"
    if any(is_separator(line) for line in text.split("\n")):
        return f"holds a {DOC_SEPARATOR} line"
    return None


def _goes_to_val(key: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return int(digest[:_SPLIT_HASH_HEX_DIGITS], 16) / 16**_SPLIT_HASH_HEX_DIGITS < val_fraction
