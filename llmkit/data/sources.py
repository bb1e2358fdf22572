"""Where corpus documents come from: this Python's own source files, or the user's text.

A source is either the name of an embedded one, ``stdlib`` (the standard library's ``.py`` files,
tests excluded) or ``site-packages`` (plus the installed packages), or a list of the user's
files, directories (walked recursively) and glob patterns. User files by suffix:

=========================  ==========================================================
``.txt``, ``.md`` (``.py``)  the whole file is one document
``.jsonl``                 one document per line: the string field ``text_field``
``.parquet``               one document per row: the string column ``text_column``
                           (needs pyarrow: ``pip install 'llmkit[parquet]'``)
=========================  ==========================================================

Files are listed in a fixed order (each directory sorted by relative path) and read one
document at a time (Parquet in batches of rows), so memory stays bounded whatever the size.
Each document has a stable key (the file's relative path, plus the line or row) that
:func:`llmkit.data.corpus.write_corpus` hashes to split train from val.
"""

from __future__ import annotations

import os
import site
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmkit.errors import LLMKitError, SettingError
from llmkit.io import expand_inputs, iter_jsonl_objects, json_kind

SOURCES = ("stdlib", "site-packages")
"""The embedded sources, by name."""

USER_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
"""The user files a directory contributes (``.py`` files only when named one by one)."""

TEST_DIR_NAMES = frozenset({"test", "tests", "idle_test"})
"""Directory names whose contents are test suites, left out of the embedded sources."""

TEST_FILE_PREFIX = "test_"
"""File names starting with this are tests, left out of the embedded sources."""

SKIPPED_DIR_NAMES = frozenset({"__pycache__", "site-packages", "dist-packages"})
"""Directory names never descended into in the embedded sources (bytecode, nested packages)."""

PARQUET_BATCH_ROWS = 1024
"""Rows read from a Parquet file at a time."""


@dataclass(frozen=True)
class SourceFile:
    """One file of a source: where it lives, and its key (its path relative to the root it was
    found under, or as given), from which its documents' keys derive."""

    path: Path
    key: str


def list_source_files(source: Sequence[str]) -> list[SourceFile]:
    """The files of ``source`` (see the module docstring) in their fixed order."""
    if len(source) == 1 and source[0] in SOURCES:
        return _python_files(source[0])
    if not source or any(s in SOURCES for s in source):
        raise LLMKitError(
            f"corpus source {list(source)}: give one of {', '.join(SOURCES)}, or your own files, directories "
            "and patterns (not both)"
        )
    files: list[SourceFile] = []
    for entry in source:
        path = Path(entry).expanduser()
        if path.is_dir():
            named = sorted(p for p in path.rglob("*") if p.suffix in USER_SUFFIXES and not p.is_dir())
            files += [SourceFile(p, f"{path.name}/{p.relative_to(path).as_posix()}") for p in named if p.is_file()]
            if unread := [str(p) for p in named if not p.is_file()]:  # opened, a pipe would wait forever
                warnings.warn(f"corpus source {entry}: left out {len(unread)} path(s) named like text files that are "
                              f"not readable files (a broken link, a pipe): {', '.join(unread[:3])}", stacklevel=2)
            continue
        if not path.exists() and not any(c in entry for c in "*?["):
            raise LLMKitError(
                f"corpus source {entry!r} is neither {' nor '.join(SOURCES)} nor an existing file, directory or "
                "pattern: check the path"
            )
        for match in expand_inputs([entry], f"corpus source {entry!r}"):
            if match.suffix not in (*USER_SUFFIXES, ".py"):
                raise LLMKitError(
                    f"corpus source {match}: unsupported file type {match.suffix or '(none)'!r}; use .txt, .md, "
                    ".jsonl or .parquet"
                )
            files.append(SourceFile(match, match.as_posix()))
    if not files:
        raise LLMKitError(f"corpus source {list(source)} holds no .txt, .md, .jsonl or .parquet file")
    return files


def read_documents(file: SourceFile, text_field: str = "text", text_column: str = "text") -> Iterator[
        tuple[str, str | None]]:
    """``(key, text)`` for each document of ``file``; text is None where the file is unreadable or
    not UTF-8, or a JSONL or Parquet document's text is null (it is then skipped and counted, as the
    embedded sources' unreadable files are)."""
    if file.path.suffix == ".jsonl":
        yield from _jsonl_documents(file, text_field)
    elif file.path.suffix == ".parquet":
        yield from _parquet_documents(file, text_column)
    else:
        try:
            yield file.key, file.path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            yield file.key, None


def _jsonl_documents(file: SourceFile, text_field: str) -> Iterator[tuple[str, str | None]]:
    line_format = f'{{"{text_field}": "..."}}'
    for source, record in iter_jsonl_objects(file.path, "corpus", line_format):
        text = record.get(text_field)
        if text is None and text_field in record:  # a null, as a Parquet null: skipped and counted
            yield f"{file.key}:{source.rsplit(':', 1)[1]}", None
            continue
        if not isinstance(text, str):
            found = "no such field" if text_field not in record else f"it is {json_kind(text)}"
            raise SettingError("text_field", f"{text_field!r} is not a string field of {source} ({found}): set it to "
                                             f"the field that holds the document text (fields here: {sorted(record)})")
        yield f"{file.key}:{source.rsplit(':', 1)[1]}", text


def _parquet_documents(file: SourceFile, text_column: str) -> Iterator[tuple[str, str | None]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LLMKitError(
            f"{file.path}: reading Parquet needs pyarrow: pip install 'llmkit[parquet]' (or pyarrow)"
        ) from None
    try:
        parquet = pq.ParquetFile(file.path)
    except (pa.ArrowException, OSError) as e:
        raise LLMKitError(f"{file.path} is not a readable Parquet file ({e})") from None
    schema = parquet.schema_arrow
    if text_column not in schema.names:
        raise SettingError("text_column", f"{text_column!r} is not a column of {file.path}: set it to one of "
                                          f"{schema.names}")
    kind = schema.field(text_column).type
    stored = kind.value_type if pa.types.is_dictionary(kind) else kind  # a pandas categorical: dictionary-encoded
    if not (pa.types.is_string(stored) or pa.types.is_large_string(stored) or pa.types.is_string_view(stored)):
        raise LLMKitError(f"{file.path}: column {text_column!r} holds {kind}, not text")
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_column]):
            for text in batch.column(0).to_pylist():
                yield f"{file.key}#{row}", text
                row += 1
    except (pa.ArrowException, OSError) as e:  # its pages, read as it goes (the footer read whole above)
        raise LLMKitError(f"{file.path} is not a readable Parquet file: after row {row}, {e}") from None


def _python_files(source: str) -> list[SourceFile]:
    """The ``.py`` files of an embedded source: stdlib first, then site dirs, each sorted by path."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    if source == "site-packages":
        roots += [Path(p) for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]]
    seen: set[Path] = set()
    files: list[SourceFile] = []
    for root in roots:
        if not root.is_dir():
            continue
        for path, relative in _walk_python_files(root):
            resolved = path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                files.append(SourceFile(path, relative))
    return files


def _walk_python_files(root: Path) -> list[tuple[Path, str]]:
    """``(path, relative posix path)`` of the non-test ``.py`` files under ``root``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIR_NAMES and d not in TEST_DIR_NAMES]
        for name in filenames:
            if name.endswith(".py") and not name.startswith(TEST_FILE_PREFIX):
                path = Path(dirpath) / name
                found.append((path, path.relative_to(root).as_posix()))
    return sorted(found, key=lambda item: item[1])
