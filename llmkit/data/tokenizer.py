"""Tokenizers: what a ``--tokenizer`` / ``tokenizer:`` setting names, loaded (:func:`load_tokenizer`)
behind one interface (:class:`TokenizerLike`); and llmkit's own, SentencePiece BPE: training it on a
text corpus, and the wrapper used to apply it (:class:`Tokenizer`).

A setting may name a SentencePiece ``.model`` (what ``llmkit data tokenizer`` writes), a Hugging
Face ``tokenizer.json`` (:class:`~llmkit.data.hf_tokenizer.HFTokenizer`), or a model directory
holding one of the two (docs/data.md#tokenizers).

Training streams the corpus line by line into sentencepiece (never the ``input=`` file list),
so document separators stay out of the vocabulary and memory stays bounded: sentencepiece
samples at most ``input_sentence_size`` lines. The special ids are fixed by the config
(pad 0, unk 1, bos 2, eos 3 by default); ``byte_fallback`` makes every string encodable.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import sentencepiece as spm
from tqdm import tqdm

from llmkit.data.corpus import is_separator
from llmkit.data.hf_tokenizer import HFTokenizer
from llmkit.errors import LLMKitError, SettingError
from llmkit.io import file_sha256, iter_text_lines, refuse_overwrite

_VOCAB_TOO_LARGE = re.compile(r"Vocabulary size too high \(\d+\)\. .*<=\s*(\d+)")
_VOCAB_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)")
_QUIET_LOG_LEVEL = 2
_VERBOSE_LOG_LEVEL = 0

HF_TOKENIZER_FILE = "tokenizer.json"
"""The Hugging Face tokenizer file of a model directory, taken first."""

SENTENCEPIECE_FILE = "tokenizer.model"
"""The SentencePiece model of a model directory, taken when it has no ``tokenizer.json``."""

_ACCEPTED = (
    "a SentencePiece .model (`llmkit data tokenizer` writes one), a Hugging Face tokenizer.json, or a model "
    "directory holding one"
)


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
        character_coverage: share of the corpus's characters that get their own piece (0.98 to 1).
        normalization: sentencepiece's normalization_rule_name: identity (the default) keeps text
            as it is; the nmt/nfkc rules rewrite it (nmt_nfkc_cf and nfkc_cf case-fold, the nmt
            ones drop newlines), and a generative model cannot write what its tokenizer drops.
        keep_whitespace: keep runs of spaces and leading spaces (indentation) instead of
            collapsing them (sentencepiece's remove_extra_whitespaces, negated; on by default:
            with identity, text round-trips exactly).
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
    normalization: Literal["nmt_nfkc_cf", "nmt_nfkc", "nfkc_cf", "nfkc", "identity"] = "identity"
    keep_whitespace: bool = True
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

    def __post_init__(self) -> None:
        """Refuse what sentencepiece refuses with its internals' words ("trainer_interface.cc(78)
        [(trainer_spec.vocab_size()) > (0)]"), which named a corpus file as the cause."""
        for name in ("vocab_size", "max_sentence_length", "num_threads"):
            if getattr(self, name) < 1:
                raise SettingError(name, f"must be >= 1, got {getattr(self, name)}")
        if not 0.98 <= self.character_coverage <= 1:
            raise SettingError("character_coverage", f"must be in [0.98, 1] (sentencepiece's range), got "
                                                     f"{self.character_coverage}")
        named: dict[int, str] = {}  # two special tokens on one id
        for name in ("pad_id", "unk_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if not (0 if name == "unk_id" else -1) <= value < self.vocab_size:
                raise SettingError(name, f"must be below vocab_size ({self.vocab_size}) and >= "
                                         f"{0 if name == 'unk_id' else '-1 (-1: no such token)'}, got {value}")
            if value >= 0 and value in named:
                raise LLMKitError(f"{named[value]} and {name} are both {value}: give each special token its own id "
                                  "(-1: no such token)")
            named[value] = name


class _SentenceStream:
    """Iterates the non-empty, non-separator lines of ``inputs``, newline stripped.

    sentencepiece turns an exception raised inside its iterator into a bare RuntimeError, so
    the first one is kept in :attr:`error` for :func:`train_tokenizer` to re-raise. sentencepiece
    reads every line (it samples ``input_sentence_size`` of them), so a bar over the input bytes
    shows how far reading is; the training that follows prints nothing. Lines longer than
    ``max_bytes`` (which sentencepiece would skip without a word) are left out here and counted:
    :attr:`long_lines` of them, :attr:`long_bytes` of the :attr:`total_bytes` read (:attr:`lines`
    went to training).
    """

    def __init__(self, inputs: Sequence[Path], progress: bool, max_bytes: int) -> None:
        self.inputs = inputs
        self.progress = progress
        self.max_bytes = max_bytes
        self.error: Exception | None = None
        self.lines = self.long_lines = self.long_bytes = self.total_bytes = 0

    def __iter__(self) -> Iterator[str]:
        total = sum(path.stat().st_size for path in self.inputs)
        try:
            with tqdm(total=total, desc="tokenizer: reading", unit="B", unit_scale=True,
                      disable=not self.progress) as bar:
                for path in self.inputs:
                    for _, line in iter_text_lines(path):
                        size = len(line.encode("utf-8"))
                        bar.update(size)
                        self.total_bytes += size
                        text = line.rstrip("\r\n")
                        if size - (len(line) - len(text)) > self.max_bytes:  # the line ending: 1 byte a character
                            self.long_lines += 1
                            self.long_bytes += size
                        elif text and not is_separator(text):
                            self.lines += 1
                            yield text
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

    Writes ``PREFIX.model`` and ``PREFIX.vocab`` (parent directories created; a ``model_prefix``
    ending in ``.model`` has it dropped; one naming a directory, or whose files are inputs, is
    refused), each renamed into place from a temp prefix only once training succeeded (a failed
    one removes the directories it created). sentencepiece's log is shown only when
    ``verbose``; a progress bar of the input read shows unless ``progress`` is False.
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
    prefix = _model_prefix(model_prefix)
    file_parent = next((parent for parent in prefix.parents if parent.is_file()), None)
    if file_parent is not None:
        raise LLMKitError(f"model prefix {model_prefix}: {file_parent} is a file, not a directory; give a prefix "
                          "inside a directory, e.g. tok/spm")
    for target in (_with_suffix(prefix, ".model"), _with_suffix(prefix, ".vocab")):
        for path in paths:
            refuse_overwrite(target, "tokenizer file", {"input": path},
                             "give a model prefix whose .model and .vocab are not inputs")
    new_dirs = [d for d in (prefix.parent, *prefix.parent.parents) if not d.exists()]  # deepest first
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    tmp_model, tmp_vocab = _with_suffix(tmp_prefix, ".model"), _with_suffix(tmp_prefix, ".vocab")
    stream = _SentenceStream(paths, progress, config.max_sentence_length)
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
        new_dirs = []
    except RuntimeError as e:
        if stream.error is not None:
            raise stream.error from e
        if stream.long_lines and not stream.lines:
            raise LLMKitError(f"every line of {', '.join(map(str, paths))} is longer than max_sentence_length "
                              f"{config.max_sentence_length} bytes: raise --max-sentence-length, or split the "
                              f"lines") from None
        raise _training_error(e, config, paths) from e
    finally:
        tmp_model.unlink(missing_ok=True)
        tmp_vocab.unlink(missing_ok=True)
        for directory in new_dirs:  # a failed training leaves no directory it created behind
            with contextlib.suppress(OSError):  # unless something else wrote there meanwhile
                directory.rmdir()
    if stream.long_lines:
        warnings.warn(f"{stream.long_lines:,} lines ({stream.long_bytes / stream.total_bytes:.1%} of the text) are "
                      f"longer than max_sentence_length {config.max_sentence_length} bytes and were left out of "
                      f"training: raise --max-sentence-length, or split them", stacklevel=2)
    return _with_suffix(prefix, ".model")


@runtime_checkable
class TokenizerLike(Protocol):
    """What llmkit uses of a tokenizer: :class:`Tokenizer` (SentencePiece) and
    :class:`~llmkit.data.hf_tokenizer.HFTokenizer` both have it. Each pickles as its path."""

    @property
    def path(self) -> Path:
        """The file the tokenizer was read from."""

    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary: every id it encodes to is below this."""

    vocab_rule: Literal["exact", "at_least"]
    """How a model's vocabulary must relate to this one's (:meth:`check_vocab_size`): ``exact`` for
    SentencePiece, ``at_least`` for Hugging Face tokenizers; packed shards record it."""

    @property
    def bos_id(self) -> int:
        """The beginning-of-sequence id (-1 if there is none)."""

    @property
    def eos_id(self) -> int:
        """The end-of-sequence id, which generation stops at."""

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids generation stops at: ``eos_id`` first, then any other end-of-turn ids the model lists."""

    @property
    def pad_id(self) -> int:
        """The id batches are padded with (the eos id for a tokenizer without a pad token)."""

    @property
    def unk_id(self) -> int:
        """The unknown-token id (-1 if there is none)."""

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the tokenizer file."""

    @property
    def chat_template(self) -> str | None:
        """The chat template (Jinja) prompts can be rendered with, or None."""

    def check_vocab_size(self, vocab_size: int, model: str) -> None:
        """Raise :class:`LLMKitError` unless a model of ``vocab_size`` rows (``model`` describes it)
        fits this tokenizer: the same size for SentencePiece, at least as large for Hugging Face."""

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with ``bos_id`` / ``eos_id`` around it if asked."""

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = 1,
        plain_text: bool = False,
    ) -> list[list[int]]:
        """:meth:`encode` each of ``texts``; with ``plain_text``, special-token text in them
        (``<|endoftext|>`` in a document) is encoded as the text it is, as packing needs: a
        document must not end itself or open a chat turn."""

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, without pad, bos and eos ids."""

    def render_chat(self, prompt: str) -> str:
        """``prompt`` as a user message rendered through :attr:`chat_template`, the assistant's turn opened."""

    @property
    def turn_end_id(self) -> int:
        """The token :attr:`chat_template` ends an assistant's turn with (a fine-tuning target's last)."""


class Tokenizer:
    """A trained sentencepiece model, loaded from ``PREFIX.model`` (or a model directory's
    ``tokenizer.model``; :func:`load_tokenizer` picks the class).

    The special ids are the model's own; one without a pad piece (``pad_id`` -1 in sentencepiece,
    as in LLaMA's) pads with ``eos_id``. It has no chat template (``chat_template`` is None).
    Pickles as its path: the receiving process (e.g. a DataLoader or packer worker) loads
    the model file again, so the file must still exist there.
    """

    chat_template: str | None = None
    vocab_rule = "exact"

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
        """Raise :class:`LLMKitError` unless this tokenizer's vocabulary has exactly ``vocab_size``
        tokens, the size of ``model`` (described as the error should name it): llmkit trains its
        models with the tokenizer's vocabulary size, so any other size means another tokenizer."""
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
    def stop_ids(self) -> tuple[int, ...]:
        return (self.eos_id,)

    @property
    def pad_id(self) -> int:
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @cached_property
    def sha256(self) -> str:
        """Hex SHA-256 of the model file, computed on first use."""
        return file_sha256(self._path)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with ``bos_id`` / ``eos_id`` around it if asked."""
        return self._sp.Encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = 1,
        plain_text: bool = False,
    ) -> list[list[int]]:
        """:meth:`encode` each of ``texts``, on ``num_threads`` sentencepiece threads (sentencepiece
        never reads control-token text as the token: ``plain_text`` changes nothing)."""
        return self._sp.Encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; pad, bos and eos ids are dropped wherever they occur.

        Decoding never stops early: an eos in the middle is skipped and the ids after it are
        decoded too.
        """
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self._sp.Decode([int(i) for i in ids if int(i) not in special])

    @property
    def turn_end_id(self) -> int:
        """``eos_id``: without a chat template, a text ends as a document does."""
        return self.eos_id

    def render_chat(self, prompt: str) -> str:
        """Always an error: a sentencepiece model has no chat template."""
        raise LLMKitError(
            f"tokenizer {self._path} is a SentencePiece model, which has no chat template: turn the chat_template "
            "option off, or pass a Hugging Face model directory whose tokenizer has one"
        )


def load_tokenizer(path: str | Path) -> Tokenizer | HFTokenizer:
    """The tokenizer ``path`` names: a ``.json`` file is a Hugging Face ``tokenizer.json``
    (:class:`HFTokenizer`), any other file a SentencePiece model (:class:`Tokenizer`); a directory
    gives its ``tokenizer.json``, else its ``tokenizer.model``. A path that is none of these is a
    :class:`LLMKitError` saying what is accepted."""
    path = Path(path)
    if path.is_dir():
        if (file := directory_tokenizer(path)) is not None:
            return load_tokenizer(file)
        raise LLMKitError(
            f"tokenizer directory {path} has neither {HF_TOKENIZER_FILE} nor {SENTENCEPIECE_FILE}: pass {_ACCEPTED}"
        )
    if not path.is_file():
        raise LLMKitError(f"tokenizer {path} does not exist: pass {_ACCEPTED}")
    return HFTokenizer(path) if path.suffix == ".json" else Tokenizer(path)


def tokenizer_record(path: Path) -> dict[str, str]:
    """The tokenizer file at ``path`` as a checkpoint records the one its weights learned
    (:data:`~llmkit.model.checkpoint.TOKENIZER_KEY`): the file and its SHA-256, which is the
    tokenizer's ``sha256`` that packed shards record."""
    return {"path": str(path.resolve()), "sha256": file_sha256(path)}


def directory_tokenizer(model_dir: Path) -> Path | None:
    """The tokenizer file of a model directory that :func:`load_tokenizer` reads: its
    ``tokenizer.json``, else its ``tokenizer.model``; None if it has neither."""
    return next((model_dir / name for name in (HF_TOKENIZER_FILE, SENTENCEPIECE_FILE) if (model_dir / name).is_file()),
                None)


def first_tokenizer(candidates: Iterable[Path]) -> Path | None:
    """The first of ``candidates`` that :func:`load_tokenizer` reads: a file, or a directory with a
    tokenizer (:func:`directory_tokenizer`, kept as the directory so that its other tokenizer files
    come along); None if none is."""
    return next((path for path in candidates if path.is_file() or (path.is_dir() and directory_tokenizer(path))),
                None)


def _has_text(path: Path) -> bool:
    """True if the file has at least one line that is neither blank nor a separator."""
    return any(line.strip() and not is_separator(line) for _, line in iter_text_lines(path))


def _model_prefix(model_prefix: str | Path) -> Path:
    """``model_prefix`` without one trailing ``.model`` (``spm.model`` writes ``spm.model``, not
    ``spm.model.model``); one that ends in a path separator or names a directory raises
    :class:`LLMKitError`, since sentencepiece would write ``DIR.model`` beside the directory."""
    text = str(model_prefix)
    stem = text.removesuffix(".model")
    if not stem or stem[-1] in (os.sep, os.altsep) or Path(stem).is_dir():
        raise LLMKitError(
            f"tokenizer model prefix {text!r} names a directory: add a file name stem, e.g. "
            f"{Path(stem) / 'spm'} writes spm.model and spm.vocab there"
        )
    return Path(stem)


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
