"""The plain-text corpus format, and the embedded default corpus built from Python sources.

A corpus is a directory of UTF-8 text shards (``train_00000.txt``, ``val_00000.txt``, ...).
Inside a shard, documents follow each other and each one is closed by a line holding exactly
:data:`DOC_SEPARATOR`. :func:`write_corpus` builds such a directory from the ``.py`` files of
the running interpreter's standard library (and optionally its installed packages), so a
model can be trained with no download at all.
"""

from __future__ import annotations

import hashlib
import os
import re
import site
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from tqdm import tqdm

from llmkit.errors import LLMKitError
from llmkit.io import write_json_atomic

DOC_SEPARATOR = "<|endoftext|>"
"""A line consisting of exactly this string ends a document in a plain-text shard."""

SOURCES = ("stdlib", "site-packages")
"""The values :func:`write_corpus` accepts for ``source``."""

Source = Literal[SOURCES]
"""A corpus source, as a type (the choices of ``llmkit data corpus --source``)."""

SUMMARY_NAME = "corpus.json"
"""The summary :func:`write_corpus` writes next to the shards."""

TEST_DIR_NAMES = frozenset({"test", "tests", "idle_test"})
"""Directory names whose contents are test suites, left out of the corpus."""

TEST_FILE_PREFIX = "test_"
"""File names starting with this are tests, left out of the corpus."""

SKIPPED_DIR_NAMES = frozenset({"__pycache__", "site-packages", "dist-packages"})
"""Directory names never descended into (bytecode, and packages nested in the stdlib)."""

_SHARD_NAME = re.compile(r"^(train|val)_\d{5}\.txt$")
_SEPARATOR_LINE = (DOC_SEPARATOR + "\n").encode("utf-8")
_SPLIT_HASH_HEX_DIGITS = 8


def is_separator(line: str) -> bool:
    """True if ``line`` (with or without its line ending) is a document separator."""
    return line.rstrip("\r\n") == DOC_SEPARATOR


@dataclass(frozen=True)
class _SourceFile:
    """One ``.py`` file: where it lives, and its path relative to the root it was found in."""

    path: Path
    relative: str


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
    source: str,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.02,
    shard_bytes: int = 16_000_000,
    max_files: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the ``.py`` files of ``source`` as train/val text shards under ``out_dir``.

    ``source`` is ``"stdlib"`` (the standard library, without tests) or ``"site-packages"``
    (the standard library plus installed packages). Files are taken stdlib first, then each
    site directory, each sorted by relative path, the first ``max_files`` of them if given;
    each valid, non-blank UTF-8 file is one document.
    A file goes to val when the hash of its relative path falls below ``val_fraction``, so
    the split is the same on every run; if that leaves val empty, the last document goes
    there. Files that are not UTF-8, blank, or that contain a separator line are skipped.

    Shards left in ``out_dir`` by an earlier run that this run did not write are removed.
    Returns the summary, also written to ``out_dir/corpus.json``: ``n_files`` files were
    considered, ``n_skipped`` of them skipped, the rest written as ``n_train_documents`` and
    ``n_val_documents``; shard names in ``train_files`` / ``val_files`` are relative to
    ``out_dir``.
    """
    if source not in SOURCES:
        raise LLMKitError(f"unknown corpus source {source!r}: choose one of {', '.join(SOURCES)}")
    if not 0.0 <= val_fraction < 1.0:
        raise LLMKitError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = _list_source_files(source)
    if max_files is not None:
        files = files[:max_files]

    train = _ShardWriter(out_dir, "train", shard_bytes)
    val = _ShardWriter(out_dir, "val", shard_bytes)
    pending_train: str | None = None  # held back so it can go to val if val stays empty
    n_skipped = 0
    try:
        for file in tqdm(files, desc=f"corpus {source}", unit="file", disable=not progress):
            text = _read_document(file.path)
            if text is None:
                n_skipped += 1
            elif _goes_to_val(file.relative, val_fraction):
                val.add(text)
            else:
                if pending_train is not None:
                    train.add(pending_train)
                pending_train = text
        if pending_train is not None:
            (val if val.n_documents == 0 else train).add(pending_train)
        train.close()
        val.close()
    finally:
        train.abort()
        val.abort()

    n_documents = train.n_documents + val.n_documents
    if n_documents < 2:
        for name in train.files + val.files:
            (out_dir / name).unlink()
        raise LLMKitError(
            f"corpus {source!r} gave {n_documents} usable document(s) out of {len(files)} "
            "file(s); at least 2 are needed (one for train, one for val): raise max_files "
            "or use another source"
        )
    _remove_stale_shards(out_dir, keep=set(train.files) | set(val.files))
    summary = {
        "source": source,
        "n_files": len(files),
        "n_skipped": n_skipped,
        "n_train_documents": train.n_documents,
        "n_val_documents": val.n_documents,
        "train_files": train.files,
        "val_files": val.files,
        "bytes_train": train.n_bytes,
        "bytes_val": val.n_bytes,
    }
    write_json_atomic(out_dir / SUMMARY_NAME, summary)
    return summary


def _list_source_files(source: str) -> list[_SourceFile]:
    """The ``.py`` files of ``source``: stdlib first, then site dirs, each sorted by path."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    if source == "site-packages":
        roots += [Path(p) for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]]
    seen: set[Path] = set()
    files: list[_SourceFile] = []
    for root in roots:
        if not root.is_dir():
            continue
        for path, relative in _walk_python_files(root):
            resolved = path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                files.append(_SourceFile(path, relative))
    return files


def _walk_python_files(root: Path) -> list[tuple[Path, str]]:
    """``(path, relative posix path)`` of the non-test ``.py`` files under ``root``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if d not in SKIPPED_DIR_NAMES and d not in TEST_DIR_NAMES
        ]
        for name in filenames:
            if name.endswith(".py") and not name.startswith(TEST_FILE_PREFIX):
                path = Path(dirpath) / name
                found.append((path, path.relative_to(root).as_posix()))
    return sorted(found, key=lambda item: item[1])


def _read_document(path: Path) -> str | None:
    """The file's text, or None if it is unreadable, not UTF-8, blank or holds a separator."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.strip() or any(is_separator(line) for line in text.split("\n")):
        return None
    return text


def _goes_to_val(relative: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(relative.encode("utf-8")).hexdigest()
    return int(digest[:_SPLIT_HASH_HEX_DIGITS], 16) / 16**_SPLIT_HASH_HEX_DIGITS < val_fraction


def _remove_stale_shards(out_dir: Path, keep: set[str]) -> None:
    for path in out_dir.iterdir():
        if _SHARD_NAME.match(path.name) and path.name not in keep:
            path.unlink()
