"""Packed token shards: a corpus tokenised once into one flat ``.bin`` array for training.

``OUT.bin`` holds every document's token ids back to back (each followed by ``eos_id`` by
default) as raw ``uint16`` (vocab <= 65535) or ``uint32``; ``OUT.bin.json`` says how to read
it and which tokenizer wrote it. Training memory-maps the ``.bin``, so a shard of any size
costs no RAM. :func:`pack` streams documents through a pool of tokenizer processes and
straight to disk, so the corpus is never held in memory either.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import re
import signal
import warnings
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from llmkit.data.corpus import DOC_SEPARATOR, is_separator
from llmkit.data.tokenizer import TokenizerLike, load_tokenizer
from llmkit.errors import LLMKitError
from llmkit.io import interrupts_held, iter_text_lines, read_json, remove_stale_temps, temp_path, write_json_atomic

PACK_FORMAT = "llmkit-packed-v1"
"""The ``format`` field of the metadata; bump it when the layout changes."""

PACK_META_SUFFIX = ".json"
"""The metadata of ``OUT.bin`` lives at ``OUT.bin`` + this suffix."""

BYTES_PER_WORKER = 2_000_000
"""With ``workers=None``, one tokenizer process per this many bytes of input (at most one per
core): a spawned worker costs about 0.4 s to start on the 2-core development VM (it imports numpy
and sentencepiece), which 2 MB of encoding repays (4.5 MB: 1.10 s with one worker, 0.85 s with two;
27 MB: 5.3 s and 3.2 s)."""

TASKS_IN_FLIGHT_PER_WORKER = 2
"""Chunks queued per worker process: enough to keep it busy, few enough to bound memory."""

META_KEYS = (
    "format",
    "vocab_size",
    "dtype",
    "n_tokens",
    "n_documents",
    "eos_appended",
    "eos_id",
    "bos_id",
    "pad_id",
    "tokenizer",
    "tokenizer_sha256",
    "inputs",
)
"""The fields every shard's metadata has."""

CHECKSUM_BLOCK_TOKENS = 1 << 24
"""Tokens per checksummed block of a shard (32 MiB of uint16 ids): pack records each block's CRC-32
(``block_crc32``), and a shard that changed since is an error naming the block's tokens. CRC-32
because it is fast (zlib: about 4 GB/s on one core of the development VM, SHA-256 1.8) and a
shard's enemy is a bad disk or copy, not an adversary."""

_PACK_HINT = "llmkit data pack --tokenizer PREFIX.model --input FILE... --output {bin}"
_TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".md")
"""Files that hold text, not tokens: given where a shard is expected, the error says to pack them."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype used for ids of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def meta_path_for(bin_path: str | Path) -> Path:
    """Where the metadata of the shard ``bin_path`` lives (``OUT.bin.json``)."""
    bin_path = Path(bin_path)
    return bin_path.with_name(bin_path.name + PACK_META_SUFFIX)


PIECE_BYTES = 4_000_000
"""About the most text pack hands a tokenizer at once: a longer document is encoded in pieces
(:func:`iter_documents`), and a chunk of documents sent to a worker stops at this size. Encoding
holds a Python list of ids, about 48x the text's size in RAM: a file with no separator lines (one
document) of a few GB would otherwise need a few hundred GB at once."""


def iter_documents(path: str | Path, piece_bytes: int = PIECE_BYTES) -> Iterator[tuple[int, str, bool]]:
    """Yield ``(index, text, ends)`` for each document of a plain-text shard, streaming it.

    Documents are separated by lines equal to ``DOC_SEPARATOR``; the last one needs no
    separator after it, and a file with none is one document. ``index`` is the document's
    0-based position in the file, counting the blank or whitespace-only documents that are
    skipped, so it points at the same document a reader would count to. ``text`` keeps its
    line endings. A document longer than ``piece_bytes`` comes in pieces of about that size, cut
    at line ends (a longer line between characters: :func:`~llmkit.io.iter_text_lines`), with
    the same index; ``ends`` marks a document's last piece. Memory stays bounded by
    ``piece_bytes``; a line that is not UTF-8 raises :class:`LLMKitError` naming the file and
    line.
    """
    assert piece_bytes > len(DOC_SEPARATOR) + 5, "piece_bytes must exceed a separator line, \\r\\n and a cut char"
    index, size, pieces, at_line_start = 0, 0, 0, True
    lines: list[str] = []
    for _, part in iter_text_lines(path, piece_bytes):
        if at_line_start and is_separator(part):  # a whole line: a part cut from a longer one is >= piece_bytes - 3
            text = "".join(lines)
            if pieces or text.strip():
                yield index, text, True
            index, size, pieces, lines = index + 1, 0, 0, []
        else:
            lines.append(part)
            size += len(part.encode("utf-8"))
            if size >= piece_bytes:  # at a line end unless a line is longer than piece_bytes
                yield index, "".join(lines), False
                size, pieces, lines = 0, pieces + 1, []
        at_line_start = part.endswith("\n")
    text = "".join(lines)
    if pieces or text.strip():
        yield index, text, True


ROUND_TRIP_BYTES = 1 << 16
"""The text (the start of the first document) :func:`check_round_trip` encodes and decodes."""


def check_round_trip(tokenizer: TokenizerLike, path: Path) -> None:
    """Warn when ``tokenizer`` does not give back the start of ``path``'s first document: what it
    drops (case, newlines, runs of spaces under a normalising sentencepiece rule) a model trained
    on its ids can never write."""
    lines, size = [], 0
    for _, line in iter_text_lines(path):
        if is_separator(line) or size >= ROUND_TRIP_BYTES:
            break
        lines.append(line)
        size += len(line)
    text = "".join(lines)
    back = tokenizer.decode(tokenizer.encode_batch([text], plain_text=True)[0])  # as pack encodes
    if back != text:
        at = next((i for i, (a, b) in enumerate(zip(text, back, strict=False)) if a != b), min(len(text), len(back)))
        warnings.warn(
            f"{tokenizer.path} does not give back the text it encodes: in {path}, {text[at:at + 24]!r} comes back as "
            f"{back[at:at + 24]!r}, and a model trained on these shards cannot write what it drops (a sentencepiece "
            f"tokenizer keeps everything trained with --normalization identity --keep-whitespace)", stacklevel=2)


class _Document(NamedTuple):
    """A document (or a piece of one: :func:`iter_documents`) on its way to a worker, with where it
    came from for error messages, whether it ends its document (eos follows it) and its size in
    bytes (for the progress bar)."""

    path: str
    index: int
    text: str
    ends: bool
    size: int


class _DocumentEncoder:
    """Encodes documents to arrays of the shard's dtype, checking every id is in the vocab."""

    def __init__(self, tokenizer_path: str, append_eos: bool) -> None:
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.append_eos = append_eos
        self.dtype = dtype_for_vocab(self.tokenizer.vocab_size)

    def __call__(self, documents: Sequence[_Document]) -> list[np.ndarray]:
        encoded = self.tokenizer.encode_batch([doc.text for doc in documents], plain_text=True)
        arrays = []
        for doc, ids in zip(documents, encoded, strict=True):
            if self.append_eos and doc.ends:
                ids.append(self.tokenizer.eos_id)
            array = np.asarray(ids, dtype=np.int64)
            if array.size and (array.max() >= self.tokenizer.vocab_size or array.min() < 0):
                raise LLMKitError(
                    f"{doc.path}: document {doc.index} encoded to an id outside "
                    f"[0, {self.tokenizer.vocab_size}) with {self.tokenizer.path}; the "
                    "tokenizer file is corrupt: train or download it again"
                )
            arrays.append(array.astype(self.dtype))
        return arrays


_worker_encoder: _DocumentEncoder | None = None


def _init_worker(tokenizer_path: str, append_eos: bool) -> None:
    """Pool initializer: load the tokenizer once per worker process; Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _worker_encoder
    _worker_encoder = _DocumentEncoder(tokenizer_path, append_eos)


def _encode_in_worker(documents: Sequence[_Document]) -> list[np.ndarray]:
    return _worker_encoder(documents)


def pack(
    tokenizer_path: str | Path,
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    append_eos: bool = True,
    workers: int | None = None,
    chunk_docs: int = 64,
    progress: bool = True,
) -> dict:
    """Tokenise the documents of the text files ``inputs`` into the shard ``output`` with the
    tokenizer ``tokenizer_path`` names (:func:`~llmkit.data.tokenizer.load_tokenizer`).

    Documents are encoded ``chunk_docs`` (or :data:`PIECE_BYTES` of text) at a time by
    ``workers`` spawned processes (in this process if ``workers == 1``; None: one per
    :data:`BYTES_PER_WORKER` of input, at most one per core); results are written in input
    order, so the shard is the same for any ``workers``. ``eos_id`` follows every document if
    ``append_eos``; a document longer than :data:`PIECE_BYTES` is encoded in pieces, and a
    warning says so. The ``.bin`` and its ``.bin.json``
    metadata only appear, via renames, once all is written; an ``output`` that is a directory,
    or whose ``.bin`` or ``.bin.json`` is one of the ``inputs`` or the tokenizer's file, is
    refused before that.
    Returns the metadata.

    Workers are started with ``spawn`` (safe whatever threads this process runs), which
    re-imports the main module: a script calling this with ``workers > 1`` must do so under
    ``if __name__ == "__main__":``.
    """
    if workers is not None and workers < 1:
        raise LLMKitError(f"workers must be >= 1, got {workers}")
    tokenizer = load_tokenizer(tokenizer_path)
    paths = [Path(p) for p in inputs]
    if not paths:
        raise LLMKitError(f"no inputs to pack into {output}: pass the text files to pack")
    for path in paths:
        if not path.is_file():
            raise LLMKitError(f"pack input {path} does not exist: check the path")
    output = Path(output)
    _check_output(output, paths, tokenizer.path)
    check_round_trip(tokenizer, paths[0])
    if workers is None:
        size = sum(path.stat().st_size for path in paths)
        workers = max(1, min(os.cpu_count() or 1, size // BYTES_PER_WORKER))
    output.parent.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    meta_file = meta_path_for(output)
    for path in (output, meta_file):
        remove_stale_temps(path)
    tmp_bin, tmp_meta = temp_path(output), temp_path(meta_file)

    n_tokens = n_documents = 0
    try:
        with (
            tmp_bin.open("wb") as f,
            closing(
                _encode_documents(tokenizer.path, paths, append_eos, workers, chunk_docs)
            ) as arrays,
            tqdm(desc=f"pack {output.name}", total=sum(path.stat().st_size for path in paths), unit="B",
                 unit_scale=True, disable=not progress) as bar,
        ):
            for document, array in arrays:
                array.tofile(f)
                n_tokens += array.size
                n_documents += document.ends
                bar.update(document.size)
                bar.set_postfix(docs=f"{n_documents:,}", tokens=f"{n_tokens:,}", refresh=False)
            bar.update(bar.total - bar.n)  # the separator lines and blank documents
        if n_tokens == 0:
            raise LLMKitError(
                f"no text to pack in {', '.join(map(str, paths))} (only blank documents): "
                "check the input files"
            )
        written = np.memmap(tmp_bin, mode="r", dtype=dtype, shape=(n_tokens,))
        checksums = block_checksums(written, CHECKSUM_BLOCK_TOKENS)
        del written
        meta = {
            "format": PACK_FORMAT,
            "vocab_size": tokenizer.vocab_size,
            "vocab_rule": tokenizer.vocab_rule,
            "dtype": dtype.name,
            "n_tokens": n_tokens,
            "n_documents": n_documents,
            "eos_appended": append_eos,
            "eos_id": tokenizer.eos_id,
            "bos_id": tokenizer.bos_id,
            "pad_id": tokenizer.pad_id,
            "tokenizer": str(tokenizer.path.resolve()),
            "tokenizer_sha256": tokenizer.sha256,
            "inputs": [str(p.resolve()) for p in paths],
            "checksum_block_tokens": CHECKSUM_BLOCK_TOKENS,
            "block_crc32": checksums,
        }
        write_json_atomic(tmp_meta, meta)
        os.replace(tmp_bin, output)
        os.replace(tmp_meta, meta_file)
    finally:
        tmp_bin.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
    return meta


def _check_output(output: Path, inputs: Sequence[Path], tokenizer: Path) -> None:
    """Refuse, before anything is written, an ``output`` that is a directory, whose ``.bin`` or
    ``.bin.json`` is one of the ``inputs`` or the ``tokenizer`` file (packing would overwrite it), or
    that is not named ``.bin`` (``--output cfg`` wrote its metadata over a ``cfg.json``)."""
    if output.is_dir():
        raise LLMKitError(
            f"pack output {output} is a directory: give the .bin file to write, e.g. {output / 'train.bin'}"
        )
    for target, what in ((output, "tokens"), (meta_path_for(output), "its metadata")):
        for path, role in [*((path, "input") for path in inputs), (tokenizer, "tokenizer")]:
            if target.exists() and target.samefile(path):
                raise LLMKitError(
                    f"pack output {output} would overwrite the {role} {path} with {what}: write the shard to a "
                    f".bin file that is neither an input nor the tokenizer"
                )
    if output.suffix != ".bin":
        raise LLMKitError(f"pack output {output}: name the shard FILE.bin (its metadata is written beside it, as "
                          f"FILE.bin.json), e.g. {output.with_name(output.name + '.bin')}")


def _encode_documents(
    tokenizer_path: Path,
    inputs: Sequence[Path],
    append_eos: bool,
    workers: int,
    chunk_docs: int,
) -> Iterator[tuple[_Document, np.ndarray]]:
    """Each document (or piece) with its token array, in input order.

    With workers, at most ``TASKS_IN_FLIGHT_PER_WORKER * workers`` chunks are queued at a
    time (``Pool.imap`` would read all input ahead and buffer all results).
    """
    chunks = _chunked(_documents(inputs), chunk_docs)
    if workers <= 1:
        encoder = _DocumentEncoder(str(tokenizer_path), append_eos)
        for chunk in chunks:
            yield from zip(chunk, encoder(chunk), strict=True)
        return
    with _worker_pool(workers, str(tokenizer_path), append_eos) as pool:
        in_flight: deque = deque()
        for chunk in chunks:
            in_flight.append((chunk, pool.apply_async(_encode_in_worker, (chunk,))))
            if len(in_flight) >= TASKS_IN_FLIGHT_PER_WORKER * workers:
                chunk, encoded = in_flight.popleft()
                yield from zip(chunk, encoded.get(), strict=True)
        while in_flight:
            chunk, encoded = in_flight.popleft()
            yield from zip(chunk, encoded.get(), strict=True)


def _documents(inputs: Sequence[Path]) -> Iterator[_Document]:
    """The documents of ``inputs`` in order, a long one in pieces (:func:`iter_documents`), which
    is said once per file: the tokens at a cut may differ from what encoding it whole gives."""
    for path in inputs:
        said = False
        for index, text, ends in iter_documents(path, PIECE_BYTES):
            if not ends and not said:
                warnings.warn(
                    f"{path}: document {index} is longer than {PIECE_BYTES / 1e6:g} MB, so it is encoded in pieces "
                    f"of about that size, cut at line ends (the ids at a cut may differ from encoding it whole); "
                    f"if it holds several documents, separate them with {DOC_SEPARATOR} lines", stacklevel=2)
                said = True
            yield _Document(str(path), index, text, ends, len(text.encode("utf-8")))


@contextmanager
def _worker_pool(workers: int, tokenizer_path: str, append_eos: bool) -> Iterator[multiprocessing.pool.Pool]:
    """A pool of ``spawn`` workers whose start a Ctrl-C or SIGTERM cannot cut short (a worker left
    starting by a parent that quit prints a traceback): the parent holds both signals until the
    pool is up (:func:`~llmkit.io.interrupts_held`), then raises them, which closes the pool. SIGINT
    is also blocked while the workers start, so they inherit it blocked: Ctrl-C is the parent's
    to handle."""
    mask = getattr(signal, "pthread_sigmask", None)
    with ExitStack() as stack:
        with interrupts_held():
            if mask:
                mask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(
                    workers, initializer=_init_worker, initargs=(tokenizer_path, append_eos)
                ))
            finally:
                if mask:
                    mask(signal.SIG_UNBLOCK, {signal.SIGINT})
        yield pool


def _chunked(documents: Iterable[_Document], size: int) -> Iterator[list[_Document]]:
    """Consecutive lists of ``size`` documents or :data:`PIECE_BYTES` of text, whichever comes
    first (the last may be shorter)."""
    chunk: list[_Document] = []
    chunk_bytes = 0
    for document in documents:
        chunk.append(document)
        chunk_bytes += document.size
        if len(chunk) == size or chunk_bytes >= PIECE_BYTES:
            yield chunk
            chunk, chunk_bytes = [], 0
    if chunk:
        yield chunk


def read_meta(bin_path: str | Path) -> dict:
    """The metadata of the shard ``bin_path``, checked against the ``.bin`` file's size."""
    bin_path = Path(bin_path)
    meta_file = meta_path_for(bin_path)
    hint = _PACK_HINT.format(bin=bin_path)
    if not bin_path.is_file():
        raise LLMKitError(f"token shard {bin_path} does not exist: create it with `{hint}`")
    shard = bin_path.with_name(bin_path.name.removesuffix(PACK_META_SUFFIX))
    if bin_path.name.endswith(PACK_META_SUFFIX) and shard.is_file():
        raise LLMKitError(f"{bin_path} is the metadata of the token shard {shard}: give the shard, {shard}")
    if not meta_file.is_file() and bin_path.suffix.lower() in _TEXT_SUFFIXES:
        text_hint = _PACK_HINT.format(bin=bin_path.with_suffix(".bin")).replace("FILE...", str(bin_path))
        raise LLMKitError(f"{bin_path} is a text file, not a token shard: pack it into one with `{text_hint}`")
    if not meta_file.is_file():
        raise LLMKitError(
            f"{meta_file} (the metadata of {bin_path}) does not exist: re-create both with `{hint}`"
        )
    meta = read_json(meta_file, f"re-create it with `{hint}`")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise LLMKitError(
            f"{meta_file} lacks {', '.join(missing)}: not llmkit shard metadata; re-create it "
            f"with `{hint}`"
        )
    n_tokens = meta["n_tokens"]
    if (
        meta["format"] != PACK_FORMAT
        or meta["dtype"] not in ("uint16", "uint32")
        or not isinstance(n_tokens, int)
        or n_tokens < 1
    ):
        raise LLMKitError(
            f"{meta_file} has format {meta['format']!r}, dtype {meta['dtype']!r} and n_tokens "
            f"{n_tokens!r}; expected {PACK_FORMAT!r}, uint16 or uint32, and a positive "
            f"count: re-create it with `{hint}`"
        )
    vocab_size = meta["vocab_size"]
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise LLMKitError(f"{meta_file} has vocab_size {vocab_size!r}; expected a positive integer: re-create it "
                          f"with `{hint}`")
    tokenizer, sha256, rule = meta["tokenizer"], meta["tokenizer_sha256"], meta.get("vocab_rule", "exact")
    if not (isinstance(tokenizer, str) and isinstance(sha256, str) and re.fullmatch("[0-9a-f]{64}", sha256)
            and rule in ("exact", "at_least")):
        raise LLMKitError(
            f"{meta_file} has tokenizer {tokenizer!r}, tokenizer_sha256 {sha256!r} and vocab_rule {rule!r}; expected "
            f"the tokenizer's path, its hex SHA-256 and exact or at_least (the record that checkpoints keep of the "
            f"tokenizer): re-create it with `{hint}`"
        )
    expected = n_tokens * np.dtype(meta["dtype"]).itemsize
    actual = bin_path.stat().st_size
    if actual != expected:
        raise LLMKitError(
            f"{bin_path} is {actual:,} bytes but {meta_file} says {n_tokens:,} "
            f"{meta['dtype']} tokens ({expected:,} bytes): truncated or not a llmkit shard; "
            f"re-create it with `{hint}`"
        )
    if "block_crc32" in meta:
        block, crcs = meta.get("checksum_block_tokens"), meta["block_crc32"]
        if not (isinstance(block, int) and block > 0 and isinstance(crcs, list)
                and len(crcs) == -(-n_tokens // block) and all(isinstance(c, int) for c in crcs)):
            raise LLMKitError(
                f"{meta_file} has malformed checksums (checksum_block_tokens {block!r}, block_crc32 of "
                f"{len(crcs) if isinstance(crcs, list) else type(crcs).__name__} entries for {n_tokens:,} tokens): "
                f"re-create it with `{hint}`"
            )
    return meta


def block_checksums(tokens: np.ndarray, block: int) -> list[int]:
    """The CRC-32 of each ``block``-token block of ``tokens``' bytes, in order (the last may be shorter)."""
    return [zlib.crc32(tokens[begin : begin + block]) for begin in range(0, len(tokens), block)]


def check_shard(
    bin_path: str | Path, tokens: np.ndarray, meta: dict, vocab_size: int, progress: bool = False
) -> bool:
    """Read the shard once, a block at a time: each block's CRC-32 against the metadata's
    ``block_crc32`` (shards packed before llmkit recorded checksums have none), and every id below
    ``vocab_size``. A mismatch is an :class:`LLMKitError` naming the shard and the block's tokens.
    Returns whether there were checksums to compare."""
    block = meta.get("checksum_block_tokens", CHECKSUM_BLOCK_TOKENS)
    crcs = meta.get("block_crc32")
    hint = _PACK_HINT.format(bin=bin_path)
    with tqdm(total=len(tokens), desc=f"check {Path(bin_path).name}", unit="tok", unit_scale=True,
              disable=not progress) as bar:
        for k, begin in enumerate(range(0, len(tokens), block)):
            chunk = tokens[begin : begin + block]
            if crcs is not None and zlib.crc32(chunk) != crcs[k]:
                raise LLMKitError(
                    f"{bin_path}: tokens {begin:,} to {begin + len(chunk) - 1:,} (block {k + 1} of {len(crcs)}) do "
                    f"not match the checksum pack recorded in {meta_path_for(bin_path)}: the file was changed or "
                    f"damaged since; re-create it with `{hint}`"
                )
            if chunk.size and int(chunk.max()) >= vocab_size:
                bad = begin + int(np.argmax(chunk >= vocab_size))
                raise LLMKitError(
                    f"{bin_path}: token id {int(tokens[bad])} at position {bad} is >= vocab_size "
                    f"{vocab_size}; the shard is corrupt or was packed with another tokenizer, re-pack it"
                )
            bar.update(len(chunk))
    return crcs is not None


def open_shard(bin_path: str | Path) -> tuple[np.memmap, dict]:
    """Memory-map the shard ``bin_path`` read-only; return the token array and its metadata."""
    meta = read_meta(bin_path)
    tokens = np.memmap(bin_path, mode="r", dtype=meta["dtype"], shape=(meta["n_tokens"],))
    return tokens, meta
