"""SentencePiece BPE tokenizer: training it on a text corpus, and the wrapper used to apply it.

Training streams the corpus line by line into sentencepiece (never the ``input=`` file list),
so document separators stay out of the vocabulary and memory stays bounded: sentencepiece
samples at most ``input_sentence_size`` lines. The special ids are fixed by the config
(pad 0, unk 1, bos 2, eos 3 by default); ``byte_fallback`` makes every string encodable.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import sentencepiece as spm
from tqdm import tqdm

from llmkit.data.corpus import is_separator
from llmkit.errors import LLMKitError
from llmkit.io import iter_text_lines

_VOCAB_TOO_LARGE = re.compile(r"Vocabulary size too high \(\d+\)\. .*<=\s*(\d+)")
_VOCAB_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)")
_QUIET_LOG_LEVEL = 2
_VERBOSE_LOG_LEVEL = 0


@dataclass
class TokenizerTrainConfig:
    """Options of :func:`train_tokenizer`, each passed to the sentencepiece trainer option of the
    same name unless said otherwise (these are also the flags of ``llmkit data tokenizer``).

    ``add_dummy_prefix`` is off, unlike in sentencepiece: training sees single lines but
    encoding whole documents, so a space prefixed to each would mark every training line start
    yet only document starts when encoding, and decoding concatenated documents would insert
    spaces between them.

    Attributes:
        vocab_size: tokens in the vocabulary, special tokens and byte fallbacks included.
        model_type: sentencepiece's algorithm.
        character_coverage: share of the corpus's characters that get their own piece.
        normalization: sentencepiece's normalization_rule_name: nmt_nfkc_cf case-folds; identity
            keeps text as is, which code needs (pair it with keep_whitespace).
        keep_whitespace: keep runs of spaces and leading spaces (indentation) instead of
            collapsing them (sentencepiece's remove_extra_whitespaces, negated).
        byte_fallback: unknown characters become byte tokens, so every string is encodable.
        input_sentence_size: lines sampled from the input to train on (bounds memory).
        shuffle_input_sentence: sample those lines at random rather than take the first ones.
        max_sentence_length: longest line, in bytes, used for training.
        num_threads: sentencepiece training threads.
        allow_whitespace_only_pieces: allow pieces made of spaces only (indentation runs).
        split_digits: split numbers into single digits.
        add_dummy_prefix: prefix a space to every input (off: see the class docstring).
        pad_id: id of the padding token.
        unk_id: id of the unknown token.
        bos_id: id of the beginning-of-sequence token.
        eos_id: id of the end-of-sequence token.
    """

    vocab_size: int = 32000
    model_type: Literal["bpe", "unigram"] = "bpe"
    character_coverage: float = 0.9995
    normalization: str = "nmt_nfkc_cf"
    keep_whitespace: bool = False
    byte_fallback: bool = True
    input_sentence_size: int = 2_000_000
    shuffle_input_sentence: bool = True
    max_sentence_length: int = 16384
    num_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    allow_whitespace_only_pieces: bool = True
    split_digits: bool = True
    add_dummy_prefix: bool = False
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3


class _SentenceStream:
    """Iterates the non-empty, non-separator lines of ``inputs``, newline stripped.

    sentencepiece turns an exception raised inside its iterator into a bare RuntimeError, so
    the first one is kept in :attr:`error` for :func:`train_tokenizer` to re-raise. sentencepiece
    reads every line (it samples ``input_sentence_size`` of them), so a bar over the input bytes
    shows how far reading is; the training that follows prints nothing.
    """

    def __init__(self, inputs: Sequence[Path], progress: bool) -> None:
        self.inputs = inputs
        self.progress = progress
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        total = sum(path.stat().st_size for path in self.inputs)
        try:
            with tqdm(total=total, desc="tokenizer: reading", unit="B", unit_scale=True,
                      disable=not self.progress) as bar:
                for path in self.inputs:
                    for _, line in iter_text_lines(path):
                        bar.update(len(line.encode("utf-8")))
                        line = line.rstrip("\r\n")
                        if line and not is_separator(line):
                            yield line
            if self.progress:
                print("tokenizer: training sentencepiece on the sampled lines ...", file=sys.stderr)
        except Exception as e:
            self.error = e
            raise


def train_tokenizer(
    inputs: Sequence[str | Path],
    model_prefix: str | Path,
    config: TokenizerTrainConfig,
    *,
    verbose: bool = False,
    progress: bool = True,
) -> Path:
    """Train a tokenizer on the text files ``inputs``; return the path of ``PREFIX.model``.

    Writes ``PREFIX.model`` and ``PREFIX.vocab`` (parent directories created), each renamed
    into place from a temp prefix only once training succeeded. sentencepiece's log is shown
    only when ``verbose``; a progress bar of the input read shows unless ``progress`` is False.
    """
    paths = [Path(p) for p in inputs]
    for path in paths:
        if not path.is_file():
            raise LLMKitError(f"tokenizer input {path} does not exist: check the path")
    if not any(_has_text(path) for path in paths):
        raise LLMKitError(
            f"tokenizer inputs have no text (only blank or separator lines): "
            f"{', '.join(map(str, paths))}"
        )
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    tmp_model, tmp_vocab = _with_suffix(tmp_prefix, ".model"), _with_suffix(tmp_prefix, ".vocab")
    stream = _SentenceStream(paths, progress)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(stream),
            model_prefix=str(tmp_prefix),
            vocab_size=config.vocab_size,
            model_type=config.model_type,
            character_coverage=config.character_coverage,
            normalization_rule_name=config.normalization,
            remove_extra_whitespaces=not config.keep_whitespace,
            byte_fallback=config.byte_fallback,
            input_sentence_size=config.input_sentence_size,
            shuffle_input_sentence=config.shuffle_input_sentence,
            max_sentence_length=config.max_sentence_length,
            num_threads=config.num_threads,
            allow_whitespace_only_pieces=config.allow_whitespace_only_pieces,
            split_digits=config.split_digits,
            add_dummy_prefix=config.add_dummy_prefix,
            pad_id=config.pad_id,
            unk_id=config.unk_id,
            bos_id=config.bos_id,
            eos_id=config.eos_id,
            minloglevel=_VERBOSE_LOG_LEVEL if verbose else _QUIET_LOG_LEVEL,
        )
        os.replace(tmp_vocab, _with_suffix(prefix, ".vocab"))
        os.replace(tmp_model, _with_suffix(prefix, ".model"))
    except RuntimeError as e:
        if stream.error is not None:
            raise stream.error from e
        raise _training_error(e, config, paths) from e
    finally:
        tmp_model.unlink(missing_ok=True)
        tmp_vocab.unlink(missing_ok=True)
    return _with_suffix(prefix, ".model")


class Tokenizer:
    """A trained sentencepiece model, loaded from ``PREFIX.model``.

    Pickles as its path: the receiving process (e.g. a DataLoader or packer worker) loads
    the model file again, so the file must still exist there.
    """

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        if not self._path.is_file():
            raise LLMKitError(
                f"tokenizer model {self._path} does not exist: train one with "
                "`llmkit data tokenizer --input ... --model-prefix PREFIX`"
            )
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self._path))
        except (RuntimeError, OSError) as e:
            raise LLMKitError(
                f"{self._path} is not a sentencepiece model ({e}): pass the .model file "
                "written by `llmkit data tokenizer`"
            ) from e

    def __reduce__(self) -> tuple[type[Tokenizer], tuple[str]]:
        return Tokenizer, (str(self._path),)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self._path)!r}, vocab_size={self.vocab_size})"

    @property
    def path(self) -> Path:
        return self._path

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def check_vocab_size(self, vocab_size: int, model: str) -> None:
        """Raise :class:`LLMKitError` unless this tokenizer's vocabulary has ``vocab_size``
        tokens, the size of ``model`` (described as the error should name it)."""
        if self.vocab_size != vocab_size:
            raise LLMKitError(
                f"tokenizer {self._path} has vocab_size {self.vocab_size} but {model} has {vocab_size}; "
                "use the tokenizer the model was trained with"
            )

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @cached_property
    def sha256(self) -> str:
        """Hex SHA-256 of the model file, computed on first use."""
        return hashlib.sha256(self._path.read_bytes()).hexdigest()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with ``bos_id`` / ``eos_id`` around it if asked."""
        return self._sp.Encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """:meth:`encode` each of ``texts``, on ``num_threads`` sentencepiece threads."""
        return self._sp.Encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; pad, bos and eos ids are dropped wherever they occur.

        Decoding never stops early: an eos in the middle is skipped and the ids after it are
        decoded too.
        """
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self._sp.Decode([int(i) for i in ids if int(i) not in special])


def _has_text(path: Path) -> bool:
    """True if the file has at least one line that is neither blank nor a separator."""
    return any(line.strip() and not is_separator(line) for _, line in iter_text_lines(path))


def _with_suffix(prefix: Path, suffix: str) -> Path:
    """``prefix`` + ``suffix``, without treating dots in the prefix's name as a suffix."""
    return prefix.with_name(prefix.name + suffix)


def _training_error(
    error: RuntimeError, config: TokenizerTrainConfig, inputs: Sequence[Path]
) -> LLMKitError:
    """Turn a sentencepiece training failure into a message that says what to change."""
    message = str(error)
    names = ", ".join(map(str, inputs))
    too_large = _VOCAB_TOO_LARGE.search(message)
    if too_large:
        return LLMKitError(
            f"vocab size {config.vocab_size} is too large for the corpus {names}: sentencepiece "
            f"allows at most {too_large.group(1)}; use vocab_size {too_large.group(1)} or "
            "train on more text"
        )
    too_small = _VOCAB_TOO_SMALL.search(message)
    if too_small:
        return LLMKitError(
            f"vocab size {config.vocab_size} is too small for the {too_small.group(1)} "
            f"characters and special pieces of the corpus {names}: use vocab_size "
            f"{too_small.group(1)} or more, or a lower character_coverage"
        )
    if "Vocabulary size" in message:
        return LLMKitError(
            f"vocab size {config.vocab_size} does not fit the corpus {names} ({message}): "
            "use another vocab_size"
        )
    return LLMKitError(f"sentencepiece failed to train on {names}: {message}")
