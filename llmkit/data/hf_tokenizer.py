"""Hugging Face tokenizers: a model's ``tokenizer.json``, applied with the ``tokenizers`` library.

:class:`HFTokenizer` has the interface of the SentencePiece :class:`~llmkit.data.tokenizer.Tokenizer`
(:class:`~llmkit.data.tokenizer.TokenizerLike`), so imported LLaMA-family models (Llama,
Mistral, Qwen) fine-tune, generate and pack with their own tokenizer. ``transformers`` is not
needed: encoding is the ``tokenizers`` library's with ``add_special_tokens=False`` (what
``PreTrainedTokenizerFast(tokenizer_file=...).encode(text, add_special_tokens=False)`` gives), and
the special ids come from the JSON files beside ``tokenizer.json`` in the model directory
(:func:`special_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers

from llmkit.data.chat_template import (
    TOKENIZER_CONFIG_FILE,
    assistant_turn_end,
    compile_chat_template,
    read_chat_template,
    render_user_prompt,
)
from llmkit.errors import LLMKitError
from llmkit.io import file_sha256, read_json

if TYPE_CHECKING:
    from jinja2 import Template

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
ID_FILES = (CONFIG_FILE, GENERATION_CONFIG_FILE)
"""The files whose ``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` give special ids, in this order."""

SPECIAL_ROLES = ("bos", "eos", "pad")
"""The special tokens read from the model directory (:func:`special_ids`)."""


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` and the special ids of the model directory it is in.

    The special ids (:func:`special_ids`) come from ``config.json``, then ``generation_config.json``,
    then the token strings of ``tokenizer_config.json``, all beside the ``tokenizer.json``. Where
    ``eos_token_id`` lists several ids, the first is ``eos_id``. Without a pad token, ``pad_id`` is
    ``eos_id`` (decoding drops both, and the losses tell padding from EOS by position, not by id).
    Without a bos token, ``bos_id`` is -1 and encoding with ``bos=True`` is an error; without an unk
    token (byte-level BPE never needs one), ``unk_id`` is -1. A tokenizer without an eos token is an
    error when it loads.

    ``vocab_size`` counts the added tokens too. Models often have more embedding rows than that
    (Qwen: 151936 for 151665 tokens), so :meth:`check_vocab_size` accepts a model vocabulary at
    least as large, and :meth:`decode` drops the ids beyond the tokenizer's.

    ``chat_template`` is the model's chat template (:func:`~llmkit.data.chat_template.read_chat_template`),
    or None. Pickles as its path, like the SentencePiece tokenizer: the receiving process reads the
    files again.
    """

    vocab_rule = "at_least"

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        if not self._path.is_file():
            raise LLMKitError(
                f"tokenizer file {self._path} does not exist: pass a Hugging Face tokenizer.json or the model "
                "directory that holds one"
            )
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self._path))
        except Exception as e:  # the tokenizers library raises a bare Exception for any unreadable file
            raise LLMKitError(
                f"{self._path} is not a Hugging Face tokenizer.json ({' '.join(str(e).split())}): pass the "
                "tokenizer.json of a model directory"
            ) from None
        self._tok.no_truncation()  # a tokenizer.json may carry the settings it was saved with
        self._tok.no_padding()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(len(vocab), max(vocab.values(), default=-1) + 1)
        directory = self._path.parent
        tokenizer_config = _read_optional(directory / TOKENIZER_CONFIG_FILE)
        ids = special_ids(self._tok, self._vocab_size, directory, tokenizer_config)
        if ids["eos"] is None:
            raise LLMKitError(
                f"{self._path}: no eos token beside it (eos_token_id in {' or '.join(ID_FILES)}, eos_token in "
                f"{TOKENIZER_CONFIG_FILE}); add one of them to the model directory"
            )
        self._bos_id = -1 if ids["bos"] is None else ids["bos"]
        self._eos_id = ids["eos"]
        self._pad_id = self._eos_id if ids["pad"] is None else ids["pad"]
        self._stop_ids = _stop_ids(self._eos_id, directory, self._vocab_size)
        self._unk_id = _unk_id(self._tok, tokenizer_config)
        found = read_chat_template(directory, tokenizer_config)
        self.chat_template: str | None = found[0] if found else None
        self._chat_template_file = found[1] if found else None

    def __reduce__(self) -> tuple[type[HFTokenizer], tuple[str]]:
        return HFTokenizer, (str(self._path),)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self._path)!r}, vocab_size={self.vocab_size})"

    @property
    def path(self) -> Path:
        return self._path

    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary, added tokens included (one more than the largest id)."""
        return self._vocab_size

    def check_vocab_size(self, vocab_size: int, model: str) -> None:
        """Raise :class:`LLMKitError` unless ``model`` (described as the error should name it), of
        ``vocab_size`` embedding rows, has a row for every token: ``vocab_size`` may exceed this
        tokenizer's (models pad their embedding) but not fall short of it."""
        if vocab_size < self.vocab_size:
            raise LLMKitError(
                f"tokenizer {self._path} has vocab_size {self.vocab_size} but {model} has only {vocab_size}; "
                "use the tokenizer the model was trained with"
            )

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids generation stops at: ``eos_id`` and every other id the model's ``eos_token_id``
        lists (Llama 3.x Instruct ends a turn with ``<|eot_id|>``, the third of its three)."""
        return self._stop_ids

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @cached_property
    def sha256(self) -> str:
        """Hex SHA-256 of the ``tokenizer.json``, computed on first use."""
        return file_sha256(self._path)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with ``bos_id`` / ``eos_id`` around it if asked. The tokenizer's
        post-processor adds nothing; special tokens written in ``text`` are matched as such."""
        return self._around(self._tok.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = 1,
        plain_text: bool = False,
    ) -> list[list[int]]:
        """:meth:`encode` each of ``texts``: in this thread if ``num_threads`` is 1, else on the
        ``tokenizers`` library's thread pool (its size is the library's: ``RAYON_NUM_THREADS``).
        With ``plain_text``, special-token text in them is encoded as the text it is (the library's
        ``encode_special_tokens``), as packing raw documents needs."""
        self._tok.encode_special_tokens = plain_text
        try:
            if num_threads > 1:
                encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
            else:
                encodings = [self._tok.encode(text, add_special_tokens=False) for text in texts]
        finally:
            self._tok.encode_special_tokens = False
        return [self._around(encoding.ids, bos, eos) for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` as the ``tokenizers`` library decodes it (special tokens skipped);
        pad, bos and eos ids are dropped wherever they occur, and so are ids outside the vocabulary
        (a model's padding rows). Decoding never stops early at an eos."""
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self._tok.decode([i for i in map(int, ids) if i not in special and 0 <= i < self.vocab_size])

    def render_chat(self, prompt: str) -> str:
        """``prompt`` as a user message followed by the opening of the assistant's turn, rendered by
        :attr:`chat_template` in jinja2's sandbox (:mod:`llmkit.data.chat_template`)."""
        return render_user_prompt(self._compiled_chat_template, self._chat_template_file, prompt,
                           self._token(self.bos_id), self._token(self.eos_id))

    @cached_property
    def turn_end_id(self) -> int:
        """The token an assistant's turn ends with under :attr:`chat_template`: the first of
        :attr:`stop_ids` in the text the template writes after the assistant's content, else
        ``eos_id`` (Llama 3.x lists ``<|end_of_text|>`` first but ends a turn with ``<|eot_id|>``).
        Without a chat template, ``eos_id``: a text ends as a document does."""
        if self.chat_template is None:
            return self.eos_id
        end = assistant_turn_end(self._compiled_chat_template, self._chat_template_file, self._token(self.bos_id),
                                 self._token(self.eos_id))
        return next((i for i in self.encode(end) if i in self.stop_ids), self.eos_id)

    @cached_property
    def _compiled_chat_template(self) -> Template:
        if self.chat_template is None:
            raise LLMKitError(
                f"tokenizer {self._path} has no chat template ({TOKENIZER_CONFIG_FILE}'s chat_template or "
                "chat_template.jinja beside it): turn the chat_template option off"
            )
        return compile_chat_template(self.chat_template, self._chat_template_file)

    def _token(self, token_id: int) -> str:
        """The text of the token ``token_id``; "" for -1 (no such token)."""
        return "" if token_id < 0 else self._tok.id_to_token(token_id) or ""

    def _around(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id < 0:
                raise LLMKitError(
                    f"tokenizer {self._path} has no bos token (bos_token_id in {' or '.join(ID_FILES)}, bos_token in "
                    f"{TOKENIZER_CONFIG_FILE} beside it): encode without bos, or add one"
                )
            ids = [self.bos_id, *ids]
        return [*ids, self.eos_id] if eos else ids


def special_ids(
    tok: tokenizers.Tokenizer, vocab_size: int, directory: Path, tokenizer_config: dict[str, Any]
) -> dict[str, int | None]:
    """``{"bos": id, "eos": id, "pad": id}`` of the model in ``directory``, None where it has none.

    Each comes from the first of: ``config.json``'s ``ROLE_token_id``, ``generation_config.json``'s
    (either an id or a list of ids, of which the first is taken; a negative id counts as none), and
    ``tokenizer_config.json``'s ``ROLE_token`` (a string or ``{"content": ...}``) looked up in the
    vocabulary. An id outside the vocabulary or a token not in it is an error naming the file and key.
    """
    configs = [(directory / name, _read_optional(directory / name)) for name in ID_FILES]

    def find(role: str) -> int | None:
        for file, config in configs:
            found = _config_id(config.get(f"{role}_token_id"), file, f"{role}_token_id", vocab_size)
            if found is not None:
                return found
        return _token_id(tok, tokenizer_config.get(f"{role}_token"), directory / TOKENIZER_CONFIG_FILE,
                         f"{role}_token")

    return {role: find(role) for role in SPECIAL_ROLES}


def _stop_ids(eos_id: int, directory: Path, vocab_size: int) -> tuple[int, ...]:
    """``eos_id``, then the further ids that the ``eos_token_id`` lists of ``config.json`` and
    ``generation_config.json`` in ``directory`` name, in order, each once."""
    stops = [eos_id]
    for name in ID_FILES:
        listed = _read_optional(directory / name).get("eos_token_id")
        for value in listed if isinstance(listed, list) else []:
            found = _config_id(value, directory / name, "eos_token_id", vocab_size)
            if found is not None and found not in stops:
                stops.append(found)
    return tuple(stops)


def _config_id(value: Any, file: Path, key: str, vocab_size: int) -> int | None:
    """The id a config's ``key`` holds (the first of a list), None if it holds none."""
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise LLMKitError(f"{file}: {key} must be a token id or a list of them, not {value!r}; fix the file")
    if value < 0:
        return None
    if value >= vocab_size:
        raise LLMKitError(
            f"{file}: {key} {value} is outside the tokenizer's vocabulary of {vocab_size} tokens; the tokenizer.json "
            "beside it belongs to another model"
        )
    return value


def _token_id(tok: tokenizers.Tokenizer, token: Any, file: Path, key: str) -> int | None:
    """The id of the token a ``tokenizer_config.json`` entry names (a string or ``{"content": ...}``)."""
    content = token.get("content") if isinstance(token, dict) else token
    if not content:
        return None
    if not isinstance(content, str):
        raise LLMKitError(f"{file}: {key} must be a token string or {{'content': ...}}, not {token!r}; fix the file")
    token_id = tok.token_to_id(content)
    if token_id is None:
        raise LLMKitError(f"{file}: {key} {content!r} is not in the vocabulary of the tokenizer.json beside it")
    return token_id


def _unk_id(tok: tokenizers.Tokenizer, tokenizer_config: dict[str, Any]) -> int:
    """The id of the tokenizer model's unknown token, else of ``tokenizer_config.json``'s, else -1."""
    unk = getattr(tok.model, "unk_token", None) or tokenizer_config.get("unk_token")
    content = unk.get("content") if isinstance(unk, dict) else unk
    token_id = tok.token_to_id(content) if isinstance(content, str) else None
    return -1 if token_id is None else token_id


def _read_optional(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} if there is no such file."""
    return read_json(path, "it should be a Hugging Face model's JSON settings file") if path.is_file() else {}
