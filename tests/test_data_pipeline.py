"""Tests of the data pipeline: corpus shards, tokenizer training, packing and the data CLI."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

from llmkit.cli import main
from llmkit.data import corpus, packing
from llmkit.data.corpus import DOC_SEPARATOR, write_corpus
from llmkit.data.packing import (
    PACK_FORMAT,
    dtype_for_vocab,
    iter_documents,
    open_shard,
    pack,
    read_meta,
)
from llmkit.data.sources import SourceFile, read_documents
from llmkit.data.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
from llmkit.errors import LLMKitError
from llmkit.io import expand_inputs
from tests.conftest import dead_pid, synthetic_source

VOCAB_SIZE = 400
ROUND_TRIP_TEXTS = [
    "def f(x):\n    return X + 1\n",
    "class Foo(Bar):\n\tdef __init__(self):\n\t\tself.CamelCase = None\n\n\n",
    "    leading and trailing spaces   ",
    "naïve café = 'Grüße' + '中文' + '🙂'\n",
    "if a:\r\n    b = [1, 22, 333]\r\n",
]


def _document(i: int) -> str:
    return textwrap.dedent(
        f'''\
        class Widget{i}(Base):
            """Docstring for widget number {i}."""

            def __init__(self, value: int = {i * 7}) -> None:
                self.value = value
                self.name = "widget_{i}"

            def compute(self, x):
                if x > {i}:
                    return self.value * x + {i * 3}
                for k in range(x):
                    yield k ** 2
        '''
    )


def _write_shard(path: Path, documents: list[str]) -> Path:
    path.write_text("".join(doc + DOC_SEPARATOR + "\n" for doc in documents), encoding="utf-8")
    return path


def _docs_in(paths: list[Path]) -> list[str]:
    return [text for path in paths for _, text, _ in iter_documents(path)]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    _write_shard(root / "train_00000.txt", [_document(i) for i in range(30)])
    _write_shard(root / "train_00001.txt", [_document(i) for i in range(30, 50)])
    # The last document has no trailing separator: it must still be packed.
    (root / "val_00000.txt").write_text(
        _document(50) + DOC_SEPARATOR + "\n" + _document(51), encoding="utf-8"
    )
    return root


@pytest.fixture(scope="module")
def tokenizer(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    config = TokenizerTrainConfig(
        vocab_size=VOCAB_SIZE, normalization="identity", keep_whitespace=True
    )
    prefix = tmp_path_factory.mktemp("tokenizer") / "tok"
    model = train_tokenizer(sorted(corpus_dir.glob("*.txt")), prefix, config)
    assert model == prefix.with_name("tok.model")
    assert model.is_file() and prefix.with_name("tok.vocab").is_file()
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["tok.model", "tok.vocab"]
    return Tokenizer(model)


# --- tokenizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text, text]) == [ids, ids]
    assert tokenizer.encode(text, bos=True, eos=True) == [tokenizer.bos_id, *ids, tokenizer.eos_id]


def test_the_default_tokenizer_gives_back_case_newlines_and_indentation(corpus_dir: Path, tmp_path: Path) -> None:
    """The default was nmt_nfkc_cf: every document came back lowercased and without newlines, and a
    model trained on its ids could never write a capital letter or a line break; pack now says so."""
    default = Tokenizer(train_tokenizer(sorted(corpus_dir.glob("*.txt")), tmp_path / "default",
                                        TokenizerTrainConfig(vocab_size=VOCAB_SIZE)))
    text = "Two Sentences.\n\n    Indented, UPPER and lower.\n"
    assert default.decode(default.encode(text)) == text
    lossy = Tokenizer(train_tokenizer(sorted(corpus_dir.glob("*.txt")), tmp_path / "lossy",
                                      TokenizerTrainConfig(vocab_size=VOCAB_SIZE, normalization="nmt_nfkc_cf")))
    (tmp_path / "doc.txt").write_text(text)
    says = r"does not give back the text it encodes: in .*doc.txt, 'Two Sentences.*' comes back as 'two sentences"
    with pytest.warns(UserWarning, match=says + r".*', and a model trained on these shards cannot write"):
        pack(lossy.path, [tmp_path / "doc.txt"], tmp_path / "lossy.bin", workers=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pack(default.path, [tmp_path / "doc.txt"], tmp_path / "default.bin", workers=1, progress=False)


def test_tokenizer_properties(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert len(tokenizer.sha256) == 64
    # The separator never reached training, so it is no single piece of the vocabulary.
    assert len(tokenizer.encode(DOC_SEPARATOR)) > 1


def test_tokenizer_decode_drops_special_ids(tokenizer: Tokenizer) -> None:
    a, b = tokenizer.encode("x = 1\n"), tokenizer.encode("y = 2\n")
    ids = [tokenizer.bos_id, *a, tokenizer.eos_id, *b, tokenizer.pad_id, tokenizer.pad_id]
    assert tokenizer.decode(ids) == "x = 1\ny = 2\n"


def test_tokenizer_pickles_as_its_path(tokenizer: Tokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.path == tokenizer.path
    assert clone.encode(ROUND_TRIP_TEXTS[1]) == tokenizer.encode(ROUND_TRIP_TEXTS[1])


def test_tokenizer_rejects_missing_and_invalid_model(tmp_path: Path) -> None:
    with pytest.raises(LLMKitError, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(LLMKitError, match="not a sentencepiece model"):
        Tokenizer(bad)


def test_train_tokenizer_vocab_too_large(corpus_dir: Path, tmp_path: Path) -> None:
    config = TokenizerTrainConfig(vocab_size=50_000, normalization="identity")
    with pytest.raises(LLMKitError, match=r"vocab size 50000 is too large.*use vocab_size \d+"):
        train_tokenizer([corpus_dir / "val_00000.txt"], tmp_path / "big", config)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(LLMKitError, match=r"vocab size 50000 is too large"):  # the directories it made go too
        train_tokenizer([corpus_dir / "val_00000.txt"], tmp_path / "tok" / "v1" / "big", config)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("flags", "message"), [
    (["--vocab-size", "0"], "--vocab-size must be >= 1, got 0"),
    (["--vocab-size", "500", "--bos-id", "600"], "--bos-id must be below vocab_size (500) and >= -1 (-1: no such "
                                                  "token), got 600"),
    (["--character-coverage", "2"], "--character-coverage must be in [0.98, 1] (sentencepiece's range), got 2.0"),
    (["--character-coverage", "0.5"], "--character-coverage must be in [0.98, 1] (sentencepiece's range), got 0.5"),
])
def test_a_tokenizer_setting_out_of_range_names_its_flag(flags: list[str], message: str, corpus_dir: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """sentencepiece's internals said it ("trainer_interface.cc(78) [(trainer_spec.vocab_size()) > (0)]"), after
    "sentencepiece failed to train on" a corpus file, as if the file were the cause."""
    assert main(["data", "tokenizer", "--input", str(corpus_dir / "train_00000.txt"), "--model-prefix",
                 str(tmp_path / "spm"), *flags]) == 1
    assert capsys.readouterr().err == f"llmkit: error: {message}\n"
    assert not list(tmp_path.iterdir())


def test_train_tokenizer_vocab_too_small(corpus_dir: Path, tmp_path: Path) -> None:
    config = TokenizerTrainConfig(vocab_size=100, normalization="identity")
    with pytest.raises(LLMKitError, match=r"vocab size 100 is too small.*use vocab_size \d+ or more"):
        train_tokenizer([corpus_dir / "val_00000.txt"], tmp_path / "small", config)
    assert list(tmp_path.iterdir()) == []


def test_train_tokenizer_input_errors(tmp_path: Path) -> None:
    config = TokenizerTrainConfig(vocab_size=300)
    with pytest.raises(LLMKitError, match=r"missing\.txt"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "tok", config)
    empty = tmp_path / "empty.txt"
    empty.write_text(f"\n{DOC_SEPARATOR}\n  \n{DOC_SEPARATOR}\n", encoding="utf-8")
    with pytest.raises(LLMKitError, match="no text"):
        train_tokenizer([empty], tmp_path / "tok", config)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"x = 1\ny = 2\nz = 'caf\xe9'\n")
    with pytest.raises(LLMKitError, match=r"latin\.txt:3: not valid UTF-8"):
        train_tokenizer([latin], tmp_path / "tok", config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "latin.txt"]


def test_tokenizer_model_prefix_drops_model_and_refuses_a_directory(
    corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--model-prefix spm.model` wrote spm.model.model, and `--model-prefix toks/` wrote toks.model
    beside the directory."""
    config = TokenizerTrainConfig(vocab_size=360, normalization="identity")
    inputs = [corpus_dir / "train_00000.txt"]
    assert train_tokenizer(inputs, tmp_path / "spm.model", config, progress=False) == tmp_path / "spm.model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spm.model", "spm.vocab"]

    assert main(["data", "tokenizer", "--input", str(inputs[0]), "--model-prefix", f"{tmp_path}/toks/"]) == 1
    assert capsys.readouterr().err == (
        f"llmkit: error: tokenizer model prefix '{tmp_path}/toks/' names a directory: add a file name stem, e.g. "
        f"{tmp_path}/toks/spm writes spm.model and spm.vocab there\n"
    )
    (tmp_path / "d").mkdir()
    with pytest.raises(LLMKitError, match=r"tokenizer model prefix '.*d\.model' names a directory"):
        train_tokenizer(inputs, tmp_path / "d.model", config, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "spm.model", "spm.vocab"]
    assert not any((tmp_path / "d").iterdir())



@pytest.mark.parametrize(("args", "message"), [
    (["--model-prefix", "{tmp}/a.jsonl/spm"], "model prefix {tmp}/a.jsonl/spm: {tmp}/a.jsonl is a file, not a "
                                              "directory; give a prefix inside a directory, e.g. tok/spm"),
    (["--model-prefix", "{tmp}/spm", "--pad-id", "3"], "pad_id and eos_id are both 3: give each special token its "
                                                       "own id (-1: no such token)"),
])
def test_tokenizer_training_errors_that_sentencepiece_gave_as_internals_are_one_line(
    args: list[str], message: str, corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file where the prefix needs a directory was a FileExistsError traceback; two special tokens on one id,
    sentencepiece's "INTERNAL: src/trainer_interface.cc(830) [insert_id(...)]"."""
    (tmp_path / "a.jsonl").write_text("{}\n")
    argv = ["data", "tokenizer", "--input", str(corpus_dir / "train_00000.txt"), "--vocab-size", "360",
            *[a.format(tmp=tmp_path) for a in args]]
    assert main(argv) == 1
    assert capsys.readouterr().err == f"llmkit: error: {message.format(tmp=tmp_path)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_a_tokenizer_whose_files_are_its_inputs_is_refused(corpus_dir: Path, tmp_path: Path) -> None:
    """`--input notes.vocab --model-prefix notes` trained on the text, then replaced it with the vocabulary."""
    text = tmp_path / "notes.vocab"
    text.write_bytes((corpus_dir / "train_00000.txt").read_bytes())
    with pytest.raises(LLMKitError, match=r"^tokenizer file .*notes\.vocab is the input it reads: give a model prefix "
                                          r"whose \.model and \.vocab are not inputs$"):
        train_tokenizer([text], tmp_path / "notes", TokenizerTrainConfig(vocab_size=360), progress=False)
    assert text.read_bytes() == (corpus_dir / "train_00000.txt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.vocab"]


# --- documents and packing ---------------------------------------------------------------


def test_lines_too_long_to_train_on_are_counted_and_said(corpus_dir: Path, tmp_path: Path) -> None:
    """sentencepiece skipped them without a word (96% of a file's text, measured), and a file of
    nothing else failed with its INTERNAL error."""
    long_lines = "".join("x" * 300 + f" {i}\n" for i in range(10))
    (tmp_path / "long.txt").write_text(long_lines)
    config = TokenizerTrainConfig(vocab_size=VOCAB_SIZE, max_sentence_length=256)
    with pytest.warns(UserWarning, match=r"^10 lines \(\d+\.\d% of the text\) are longer than max_sentence_length 256 "
                                         r"bytes and were left out of training: raise --max-sentence-length"):
        train_tokenizer([*sorted(corpus_dir.glob("*.txt")), tmp_path / "long.txt"], tmp_path / "mixed", config)
    with pytest.raises(LLMKitError, match=r"every line of .*long.txt is longer than max_sentence_length 256 bytes"):
        train_tokenizer([tmp_path / "long.txt"], tmp_path / "only_long", config)


def test_dtype_for_vocab_boundary() -> None:
    assert dtype_for_vocab(VOCAB_SIZE) == np.uint16
    assert dtype_for_vocab(65535) == np.uint16
    assert dtype_for_vocab(65536) == np.uint32


def test_iter_documents(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text(
        f"a = 1\n{DOC_SEPARATOR}\n\n   \n{DOC_SEPARATOR}\nb\r\nc\n{DOC_SEPARATOR}\r\nlast",
        encoding="utf-8",
    )
    assert list(iter_documents(path)) == [(0, "a = 1\n", True), (2, "b\r\nc\n", True), (3, "last", True)]

    plain = tmp_path / "plain.txt"
    plain.write_text("x\ny\n", encoding="utf-8")
    assert list(iter_documents(plain)) == [(0, "x\ny\n", True)]

    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(LLMKitError, match=r"latin\.txt:2: not valid UTF-8"):
        list(iter_documents(latin))


def _pack_expectation(tokenizer: Tokenizer, inputs: list[Path], eos: bool) -> list[int]:
    return [i for doc in _docs_in(inputs) for i in tokenizer.encode(doc, eos=eos)]


def test_pack_round_trip_is_the_same_for_any_workers(
    tokenizer: Tokenizer, corpus_dir: Path, tmp_path: Path
) -> None:
    inputs = sorted(corpus_dir.glob("*.txt"))
    expected = _pack_expectation(tokenizer, inputs, eos=True)
    shards = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}" / "train.bin"
        meta = pack(tokenizer.path, inputs, out, workers=workers, chunk_docs=8, progress=False)
        tokens, meta_read = open_shard(out)
        assert meta_read == meta
        assert tokens.dtype == np.uint16
        assert tokens.tolist() == expected
        assert out.stat().st_size == meta["n_tokens"] * tokens.itemsize
        assert sorted(p.name for p in out.parent.iterdir()) == ["train.bin", "train.bin.json"]
        shards[workers] = out.read_bytes()
    assert shards[1] == shards[2]

    assert meta == {
        "format": PACK_FORMAT,
        "vocab_size": VOCAB_SIZE,
        "vocab_rule": "exact",
        "dtype": "uint16",
        "n_tokens": len(expected),
        "n_documents": 52,
        "eos_appended": True,
        "eos_id": 3,
        "bos_id": 2,
        "pad_id": 0,
        "tokenizer": str(tokenizer.path.resolve()),
        "tokenizer_sha256": tokenizer.sha256,
        "inputs": [str(p.resolve()) for p in inputs],
        "checksum_block_tokens": 1 << 24,
        "block_crc32": [zlib.crc32(shards[1])],
    }
    assert json.loads((tmp_path / "w1" / "train.bin.json").read_text()) == meta
    assert expected.count(tokenizer.eos_id) == 52


def test_pack_without_eos(tokenizer: Tokenizer, corpus_dir: Path, tmp_path: Path) -> None:
    inputs = [corpus_dir / "val_00000.txt"]
    meta = pack(
        tokenizer.path, inputs, tmp_path / "v.bin", append_eos=False, workers=1, progress=False
    )
    tokens, _ = open_shard(tmp_path / "v.bin")
    assert tokens.tolist() == _pack_expectation(tokenizer, inputs, eos=False)
    assert meta["eos_appended"] is False and meta["n_documents"] == 2
    assert tokenizer.eos_id not in tokens


def test_pack_errors_leave_no_output(tokenizer: Tokenizer, tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    with pytest.raises(LLMKitError, match=r"missing\.txt"):
        pack(tokenizer.path, [tmp_path / "missing.txt"], out, workers=1, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text(f"{DOC_SEPARATOR}\n \n\t\n{DOC_SEPARATOR}\n\n", encoding="utf-8")
    with pytest.raises(LLMKitError, match=r"empty\.txt"):
        pack(tokenizer.path, [empty], out, workers=1, progress=False)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"x = 1\n" + (DOC_SEPARATOR + "\n").encode() + b"s = 'caf\xe9'\n")
    with pytest.raises(LLMKitError, match=r"latin\.txt:3: not valid UTF-8"):
        pack(tokenizer.path, [latin], out, workers=2, chunk_docs=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "latin.txt"]


def test_pack_refuses_to_overwrite_an_input_or_the_tokenizer_or_write_to_a_directory(
    tokenizer: Tokenizer, corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--output` equal to an input (even through a symlink) or to the tokenizer, or whose
    .bin.json is one, would replace that file with tokens; a directory output failed in
    os.replace after tokenizing."""
    text = tmp_path / "val_00000.txt"
    text.write_bytes((corpus_dir / "val_00000.txt").read_bytes())
    original = text.read_bytes()
    (tmp_path / "link.txt").symlink_to(text)
    (tmp_path / "x.bin.json").write_bytes(original)
    (tmp_path / "data").mkdir()
    names = sorted(p.name for p in tmp_path.iterdir())

    assert main(["data", "pack", "--tokenizer", str(tokenizer.path), "--input", str(text), "--output", str(text)]) == 1
    assert capsys.readouterr().err == (
        f"llmkit: error: pack output {text} would overwrite the input {text} with tokens: write the shard to a "
        ".bin file that is neither an input nor the tokenizer\n"
    )
    model = tmp_path / "spm.model"
    model.write_bytes(tokenizer.path.read_bytes())
    with pytest.raises(LLMKitError, match=r"pack output .*spm\.model would overwrite the tokenizer .*spm\.model with "
                                          r"tokens"):
        pack(model, [text], model, workers=1, progress=False)
    assert model.read_bytes() == tokenizer.path.read_bytes()
    model.unlink()
    with pytest.raises(LLMKitError, match=r"pack output .*val_00000\.txt would overwrite the input .*link\.txt"):
        pack(tokenizer.path, [tmp_path / "link.txt"], text, workers=1, progress=False)
    with pytest.raises(LLMKitError, match=r"pack output .*x\.bin would overwrite the input .*x\.bin\.json with its "
                                          r"metadata"):
        pack(tokenizer.path, [text, tmp_path / "x.bin.json"], tmp_path / "x.bin", workers=1, progress=False)
    with pytest.raises(LLMKitError, match=r"pack output .*data is a directory: give the \.bin file to write, e\.g\. "
                                          r".*data/train\.bin$"):
        pack(tokenizer.path, [text], tmp_path / "data", workers=1, progress=False)
    (tmp_path / "cfg.json").write_text('{"important": true}')  # --output cfg wrote shard metadata over it (rc 0)
    with pytest.raises(LLMKitError, match=r"pack output .*cfg: name the shard FILE\.bin \(its metadata is written "
                                          r"beside it, as FILE\.bin\.json\), e\.g\. .*cfg\.bin$"):
        pack(tokenizer.path, [text], tmp_path / "cfg", workers=1, progress=False)
    assert (tmp_path / "cfg.json").read_text() == '{"important": true}'
    (tmp_path / "cfg.json").unlink()
    assert text.read_bytes() == original and (tmp_path / "x.bin.json").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == names and not any((tmp_path / "data").iterdir())


def test_read_meta_errors(tokenizer: Tokenizer, corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "val.bin"
    meta_file = tmp_path / "val.bin.json"
    with pytest.raises(LLMKitError, match="llmkit data pack"):
        read_meta(out)
    pack(tokenizer.path, [corpus_dir / "val_00000.txt"], out, workers=1, progress=False)
    good_meta = meta_file.read_text()

    meta_file.write_text("{not json")
    with pytest.raises(LLMKitError, match=r"val\.bin\.json is not valid JSON"):
        read_meta(out)

    meta_file.write_text(json.dumps({"format": PACK_FORMAT}))
    with pytest.raises(LLMKitError, match="lacks vocab_size"):
        read_meta(out)

    meta_file.unlink()
    with pytest.raises(LLMKitError, match=r"val\.bin\.json .*does not exist.*llmkit data pack"):
        read_meta(out)

    meta_file.write_text(good_meta)
    out.write_bytes(out.read_bytes()[:-2])
    with pytest.raises(LLMKitError, match="truncated or not a llmkit shard"):
        open_shard(out)


# --- corpus ------------------------------------------------------------------------------


def _corpus_documents(out_dir: Path, names: list[str]) -> list[str]:
    return _docs_in([out_dir / name for name in names])


def test_write_corpus_stdlib(tmp_path: Path) -> None:
    summary = write_corpus("stdlib", tmp_path, max_files=30, progress=False)
    assert json.loads((tmp_path / "corpus.json").read_text()) == summary
    assert summary["source"] == "stdlib" and summary["n_files"] == 30
    assert summary["train_files"] == ["train_00000.txt"]
    assert summary["val_files"] == ["val_00000.txt"]

    train = _corpus_documents(tmp_path, summary["train_files"])
    val = _corpus_documents(tmp_path, summary["val_files"])
    assert len(train) == summary["n_train_documents"] and len(val) == summary["n_val_documents"]
    assert len(train) + len(val) + summary["n_skipped"] == 30
    assert len(val) >= 1
    for split, docs in (("train", train), ("val", val)):
        text = (tmp_path / f"{split}_00000.txt").read_text(encoding="utf-8")
        assert text.count(f"\n{DOC_SEPARATOR}\n") == len(docs)
        assert len(text.encode("utf-8")) == summary[f"bytes_{split}"]

    # The documents are the first 30 non-test .py files of the stdlib, sorted by path.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    relative = sorted(
        p.relative_to(stdlib).as_posix()
        for p in stdlib.rglob("*.py")
        if not {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
        & set(p.relative_to(stdlib).parts[:-1])
        and not p.name.startswith("test_")
    )[:30]
    expected = {(stdlib / r).read_text(encoding="utf-8") for r in relative}
    assert {doc if doc in expected else doc[:-1] for doc in train + val} <= expected


def _fake_stdlib(root: Path) -> Path:
    files = {
        "a.py": "import os\n",
        "b.py": "x = 1",  # no trailing newline: one is added
        "pkg/__init__.py": "from . import c\n",
        "pkg/c.py": "def c():\n    return 'c'\n",
        "pkg/tests/t.py": "assert False\n",
        "test/regrtest.py": "assert False\n",
        "idlelib/idle_test/x.py": "assert False\n",
        "test_thing.py": "assert False\n",
        "__pycache__/a.py": "assert False\n",
        "site-packages/nested.py": "assert False\n",
        "notes.txt": "not python\n",
        "blank.py": "  \n\n",
        "separator.py": f"x = 1\n{DOC_SEPARATOR}\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "latin1.py").write_bytes(b"s = 'caf\xe9'\n")
    return root


def test_write_corpus_selection_and_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stdlib = _fake_stdlib(tmp_path / "stdlib")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(stdlib)})
    out = tmp_path / "out"

    summary = write_corpus("stdlib", out, val_fraction=0.0, shard_bytes=1, progress=False)
    assert summary["n_files"] == 7 and summary["n_skipped"] == 3  # blank, latin1, separator
    assert summary["train_files"] == ["train_00000.txt", "train_00001.txt", "train_00002.txt"]
    train = _corpus_documents(out, summary["train_files"])
    val = _corpus_documents(out, summary["val_files"])
    # Sorted by relative path; with val_fraction=0 the last document still goes to val.
    assert train == ["import os\n", "x = 1\n", "from . import c\n"]
    assert val == ["def c():\n    return 'c'\n"]

    again = write_corpus("stdlib", out, val_fraction=0.0, progress=False)
    assert again["train_files"] == ["train_00000.txt"]
    assert sorted(p.name for p in out.iterdir()) == [
        "corpus.json",
        "train_00000.txt",
        "val_00000.txt",
    ]
    assert _corpus_documents(out, again["train_files"]) == train

    split = write_corpus("stdlib", out, val_fraction=0.5, progress=False)
    assert split == write_corpus("stdlib", out, val_fraction=0.5, progress=False)


def test_an_interrupted_corpus_leaves_the_earlier_one_whole(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after some shards leaves the earlier corpus as it was and no temp directory. The shards
    went straight into --out: an interrupt removed the earlier corpus, and SIGKILL left this run's
    first shards beside the earlier run's later ones and its corpus.json, a mix that looked whole."""
    from llmkit.data import corpus

    stdlib = _fake_stdlib(tmp_path / "stdlib")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(stdlib)})
    out = tmp_path / "out"
    write_corpus("stdlib", out, val_fraction=0.0, shard_bytes=1, progress=False)  # an earlier, whole corpus
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    documents = corpus.read_documents

    def interrupted(file, *args):
        if file.path.name == "c.py":
            raise KeyboardInterrupt
        yield from documents(file, *args)

    monkeypatch.setattr(corpus, "read_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_corpus("stdlib", out, val_fraction=0.0, shard_bytes=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier and "corpus.json" in earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stdlib"]


def test_a_killed_corpus_run_leaves_the_earlier_one_and_its_temp_directory_goes_next_run(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    stdlib = _fake_stdlib(tmp_path / "stdlib")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(stdlib)})
    out = tmp_path / "out"
    summary = write_corpus("stdlib", out, val_fraction=0.0, shard_bytes=1, progress=False)
    killed = tmp_path / f".out.{dead_pid()}.tmp"  # what kill -9 in the middle of a second run leaves
    killed.mkdir()
    (killed / "train_00000.txt").write_text("half a corpus\n")
    assert write_corpus("stdlib", out, val_fraction=0.0, shard_bytes=1, progress=False) == summary
    assert not killed.exists()


def test_write_corpus_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LLMKitError, match="corpus source 'pypi' is neither stdlib nor site-packages nor an existing"):
        write_corpus("pypi", tmp_path, progress=False)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path / "none")})
    with pytest.raises(LLMKitError, match="0 usable document"):
        write_corpus("stdlib", tmp_path / "out", progress=False)
    stdlib = _fake_stdlib(tmp_path / "stdlib")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(stdlib)})
    with pytest.raises(LLMKitError, match="1 usable document"):
        write_corpus("stdlib", tmp_path / "one", max_files=1, progress=False)
    # the directories these failed runs created are gone again; one that was there stays
    assert not (tmp_path / "out").exists() and not (tmp_path / "one").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(LLMKitError, match="1 usable document"):
        write_corpus("stdlib", tmp_path / "mine", max_files=1, progress=False)
    assert list((tmp_path / "mine").iterdir()) == []


# --- commands ----------------------------------------------------------------------------


def test_cli_tokenizer_and_pack(
    corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "tok"
    code = main(
        [
            "data",
            "tokenizer",
            "--input",
            str(corpus_dir / "train_*.txt"),
            "--model-prefix",
            str(prefix),
            "--vocab-size",
            "360",
            "--normalization",
            "identity",
            "--keep-whitespace",
        ]
    )
    assert code == 0
    tokenizer = Tokenizer(tmp_path / "tok.model")
    assert tokenizer.vocab_size == 360
    assert tokenizer.decode(tokenizer.encode("    x = 1\n")) == "    x = 1\n"

    out = tmp_path / "data" / "train.bin"
    code = main(
        [
            "data",
            "pack",
            "--tokenizer",
            str(tokenizer.path),
            "--input",
            str(corpus_dir / "train_*.txt"),
            str(corpus_dir / "val_00000.txt"),
            "--output",
            str(out),
            "--workers",
            "1",
        ]
    )
    assert code == 0
    meta = read_meta(out)
    assert meta["n_documents"] == 52 and meta["eos_appended"] is True
    assert f"wrote {out}: {meta['n_tokens']:,} tokens (uint16) from 52 documents" in (
        capsys.readouterr().out
    )


def test_cli_tasks_refuse_one_file_for_examples_and_probes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The probes overwrote the examples while the summary said both were written."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "t5.jsonl"
    out.write_text("keep\n", encoding="utf-8")
    assert main(["data", "tasks", "--task", "arithmetic", "--n", "5", "--out", str(out), "--probes-out",
                 "t5.jsonl"]) == 1
    assert capsys.readouterr().err == (
        f"llmkit: error: the examples and the probes would both be written to {out} (the probes overwriting the "
        "examples): write the probes to a file of their own\n"
    )
    assert out.read_text(encoding="utf-8") == "keep\n" and [p.name for p in tmp_path.iterdir()] == ["t5.jsonl"]


def test_cli_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "corpus", "--source", "stdlib", "--out", str(tmp_path), "--max-files", "5"]) == 0
    assert json.loads((tmp_path / "corpus.json").read_text())["n_files"] == 5
    capsys.readouterr()
    corpus_json = tmp_path / "corpus.json"
    assert main(["data", "corpus", "--source", "stdlib", "--out", str(corpus_json), "--max-files", "5"]) == 1
    assert capsys.readouterr().err == (f"llmkit: error: out_dir {corpus_json} is a file, not a directory: give a "
                                       "directory to write the shards into\n")


def test_expand_inputs(corpus_dir: Path, tmp_path: Path) -> None:
    assert expand_inputs([str(corpus_dir / "val_*.txt"), str(corpus_dir / "*.txt")], "--input") == [
        corpus_dir / "val_00000.txt",
        corpus_dir / "train_00000.txt",
        corpus_dir / "train_00001.txt",
    ]
    alias = corpus_dir / ".." / corpus_dir.name / "val_00000.txt"  # one file, spelled two ways: read once
    assert expand_inputs([str(corpus_dir / "val_00000.txt"), str(alias)], "--input") == [corpus_dir / "val_00000.txt"]
    with pytest.raises(LLMKitError, match=r"^data\.val_files: '.*\*\.nothing' matches no file"):
        expand_inputs([str(tmp_path / "*.nothing")], "data.val_files")
    with pytest.raises(LLMKitError, match=r"^--input: '.*' is a directory: name its files \(paths, or a glob pattern "
                                          r"inside it\); check the path or pattern$"):
        expand_inputs([str(corpus_dir)], "--input")


def test_a_corpus_of_one_document_says_to_raise_max_files_only_when_it_cut_the_files(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("alpha\n", encoding="utf-8")
    with pytest.raises(LLMKitError, match=r"gave 1 usable document\(s\) out of 1 file\(s\); at least 2 are needed "
                                          r"\(one for train, one for val\): add documents or use another source$"):
        write_corpus([str(notes)], tmp_path / "o1", progress=False)
    (notes / "b.txt").write_text("beta\n", encoding="utf-8")
    with pytest.raises(LLMKitError, match=r": raise max_files or use another source$"):
        write_corpus([str(notes)], tmp_path / "o2", max_files=1, progress=False)


@pytest.mark.parametrize("args, message", [
    (["corpus", "--source", "{corpus}", "--out", "{tmp}/c", "--shard-mb", "0"], "--shard-mb must be > 0, got 0.0"),
    (["corpus", "--source", "{corpus}", "--out", "{tmp}/c", "--max-files", "-1"], "max_files must be >= 1, got -1"),
    (["pack", "--tokenizer", "{tok}", "--input", "{corpus}/val_00000.txt", "--output", "{tmp}/v.bin", "--workers",
      "0"], "workers must be >= 1, got 0"),
])
def test_a_count_or_size_below_one_is_refused(args, message, corpus_dir, tokenizer, tmp_path, capsys) -> None:
    """They ran: --shard-mb 0 wrote a shard per document, --max-files -1 left the last file out,
    --workers 0 or -2 packed in one process."""
    argv = [a.format(corpus=corpus_dir, tmp=tmp_path, tok=tokenizer.path) for a in args]
    assert main(["data", *argv]) == 1
    assert capsys.readouterr().err == f"llmkit: error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_pack_removes_the_temp_files_a_killed_run_left(corpus_dir: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    """kill -9 leaves a temp file nobody can clean up at the time; the next pack of that output does."""
    out = tmp_path / "train.bin"
    stale = [tmp_path / f".train.bin.{dead_pid()}.tmp", tmp_path / f".train.bin.json.{dead_pid()}.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    pack(tokenizer.path, [corpus_dir / "val_00000.txt"], out, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "train.bin.json"]


def user_terminal_sigint() -> None:
    """In the child, before exec: SIGINT as a user's shell gives it (default action, not blocked).
    A child inherits an ignored or blocked SIGINT, and Python then never installs its Ctrl-C
    handler. A test runner started as a background job of a non-interactive shell (``cmd &`` in a
    script) has SIGINT ignored, and without this the pack ran to completion through 30 SIGINTs in
    such full-suite runs. What this test checks is the pack under a user's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.slow
@pytest.mark.parametrize(("sent", "code", "line"), [(signal.SIGINT, 130, "llmkit: interrupted"),
                                                   (signal.SIGTERM, 143, "llmkit: terminated")])
def test_ctrl_c_or_sigterm_during_pack_is_one_line_and_leaves_no_file(sent, code, line, tokenizer: Tokenizer,
                                                                       tmp_path: Path) -> None:
    """SIGTERM killed the pack at once: exit 143 with no message, its temp file left, and a warning
    of leaked semaphores from the worker pool it never closed."""
    big = tmp_path / "big.txt"
    big.write_text((synthetic_source(300, seed=2) * 400), encoding="utf-8")  # 64 MB: seconds to pack on 2 workers
    out = tmp_path / "out" / "big.bin"
    process = subprocess.Popen(
        [sys.executable, "-m", "llmkit", "data", "pack", "--tokenizer", str(tokenizer.path), "--input", str(big),
         "--output", str(out), "--workers", "2"], stderr=subprocess.PIPE, text=True, preexec_fn=user_terminal_sigint,
    )
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(".big.bin.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)  # wait until the pack has started writing
    assert process.poll() is None, "the pack ended before the test could interrupt it: give it more input"
    process.send_signal(sent)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code
    assert err.rstrip().splitlines()[-1] == line and "Traceback" not in err and "leaked" not in err
    assert list(out.parent.iterdir()) == []


def test_write_corpus_from_user_text_folders_jsonl_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "a.txt").write_text("first note\nsecond line\n", encoding="utf-8")
    (notes / "sub" / "b.md").write_text("# Title\n\nbody\n", encoding="utf-8")
    (notes / "ignored.csv").write_text("a,b\n", encoding="utf-8")  # not a text type: not read
    (notes / "blank.txt").write_text("  \n", encoding="utf-8")
    (notes / "latin1.txt").write_bytes(b"caf\xe9\n")
    lines = tmp_path / "lines.jsonl"
    records = [{"text": f"record {i}", "id": i} for i in range(6)] + [{"text": None, "id": 6}]  # a null, skipped
    lines.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    table = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"body": [f"row {i}" for i in range(5)] + [None], "n": list(range(6))}), table,
                   row_group_size=2)

    out = tmp_path / "out"
    summary = write_corpus([str(notes), str(lines), str(table)], out, val_fraction=0.3, text_column="body",
                           progress=False)
    train = _corpus_documents(out, summary["train_files"])
    val = _corpus_documents(out, summary["val_files"])
    expected = ["first note\nsecond line\n", "# Title\n\nbody\n", *(f"record {i}\n" for i in range(6)),
                *(f"row {i}\n" for i in range(5))]
    assert sorted(train + val) == sorted(expected)  # every document once, each closed by the separator
    assert summary["n_files"] == 6 and summary["n_skipped"] == 4  # blank, latin1, the null line and row
    assert summary["skipped_by_reason"] == {"blank": 1, "unreadable or not UTF-8": 1, "null text": 2}
    assert summary["skipped"] == [  # in the order read; keys as the split hashes them
        {"document": "notes/blank.txt", "reason": "blank"},
        {"document": "notes/latin1.txt", "reason": "unreadable or not UTF-8"},
        {"document": f"{lines.as_posix()}:7", "reason": "null text"},
        {"document": f"{table.as_posix()}#5", "reason": "null text"},
    ]
    assert 0 < len(val) < len(expected) and summary["source"] == [str(notes), str(lines), str(table)]
    again = write_corpus([str(notes), str(lines), str(table)], tmp_path / "again", val_fraction=0.3,
                         text_column="body", progress=False)
    assert _corpus_documents(tmp_path / "again", again["val_files"]) == val  # the split is deterministic


def test_cli_corpus_names_what_it_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(3):
        (notes / f"{i}.txt").write_text(f"note {i}\n", encoding="utf-8")
    (notes / "blank.txt").write_text("  \n", encoding="utf-8")
    (notes / "latin1.txt").write_bytes(b"caf\xe9\n")
    (notes / "sep.txt").write_text(f"a\n{DOC_SEPARATOR}\nb\n", encoding="utf-8")
    out = tmp_path / "out"
    monkeypatch.setattr(corpus, "SKIPPED_NAMED", 2)
    assert main(["data", "corpus", "--source", str(notes), "--out", str(out)]) == 0
    assert (f"from 6 files; 3 documents skipped (1 blank: notes/blank.txt; 1 holds a {DOC_SEPARATOR} line; "
            f"1 unreadable or not UTF-8: notes/latin1.txt; see {out / 'corpus.json'})\n") in capsys.readouterr().out
    summary = json.loads((out / "corpus.json").read_text())
    assert summary["n_skipped"] == 3 and len(summary["skipped"]) == 2  # all counted, the first SKIPPED_NAMED named


def test_a_dictionary_encoded_or_string_view_text_column_is_text(tmp_path: Path) -> None:
    """A pandas categorical's column (dictionary<values=string>) and a string_view one were refused as not text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document {i} " * 10 for i in range(4)]
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), tmp_path / "categorical.parquet")
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string_view())}), tmp_path / "view.parquet")
    for name in ("categorical", "view"):
        file = SourceFile(tmp_path / f"{name}.parquet", name)
        assert [text for _, text in read_documents(file)] == texts, name


def test_user_text_errors_name_the_file_and_what_to_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """They named text_field and text_column, the Python arguments, to a user of the command's flags."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(LLMKitError, match=r"^text_field 'text' is not a string field of .*bad\.jsonl:2 \(no such "
                                          r"field\): set it to the field that holds the document text \(fields here: "
                                          r"\['body'\]\)$"):
        write_corpus([str(bad)], tmp_path / "o1", progress=False)
    table = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"body": ["row"]}), table)
    with pytest.raises(LLMKitError, match=r"^text_column 'text' is not a column of .*rows\.parquet: set it to one of "
                                          r"\['body'\]$"):
        write_corpus([str(table)], tmp_path / "o5", progress=False)
    for flag, source in (("--text-field", bad), ("--text-column", table)):  # the command names the flag typed
        assert main(["data", "corpus", "--source", str(source), "--out", str(tmp_path / "o7")]) == 1
        assert capsys.readouterr().err.splitlines()[-1].startswith(f"llmkit: error: {flag} 'text' is not a ")
    damaged = tmp_path / "damaged.parquet"  # the footer whole, a page not: an OSError traceback
    pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(2000)]}), damaged, compression="none")
    data = bytearray(damaged.read_bytes())
    data[200:2000] = bytes(range(256)) * 7 + bytes(8)
    damaged.write_bytes(bytes(data))
    with pytest.raises(LLMKitError, match=r"damaged\.parquet is not a readable Parquet file: after row 0, "):
        write_corpus([str(damaged)], tmp_path / "o6", progress=False)
    assert not (tmp_path / "o6").exists()
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(LLMKitError, match=r"unsupported file type '\.csv'; use \.txt, \.md, \.jsonl or \.parquet"):
        write_corpus([str(csv)], tmp_path / "o2", progress=False)
    with pytest.raises(LLMKitError, match=r"'nowhere/\*\.txt' matches no file"):
        write_corpus(["nowhere/*.txt"], tmp_path / "o3", progress=False)
    with pytest.raises(LLMKitError, match="not both"):
        write_corpus(["stdlib", str(bad)], tmp_path / "o4", progress=False)


def test_a_broken_link_or_a_pipe_among_user_files_is_named_not_dropped_silently(tmp_path: Path) -> None:
    """They were left out of the corpus with no word, in neither n_files nor skipped."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a.txt", "b.txt"):
        (docs / name).write_text(f"document {name}\n" * 5, encoding="utf-8")
    (docs / "c.txt").symlink_to(tmp_path / "nowhere.txt")
    os.mkfifo(docs / "d.txt")
    with pytest.warns(UserWarning, match=r"corpus source .*docs: left out 2 path\(s\) named like text files that "
                                         r"are not readable files \(a broken link, a pipe\): .*c\.txt, .*d\.txt$"):
        summary = write_corpus([str(docs)], tmp_path / "out", val_fraction=0.5, progress=False)
    assert summary["n_files"] == 2


def test_cli_corpus_from_user_files_then_tokenizer_and_pack(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i:02d}.txt").write_text(f"Document {i} says hello to {i * 7} friends.\n" * 5, encoding="utf-8")
    out = tmp_path / "corpus"
    assert main(["data", "corpus", "--source", str(docs), "--out", str(out), "--val-fraction", "0.2"]) == 0
    assert main(["data", "tokenizer", "--input", str(out / "train_*.txt"), "--model-prefix", str(tmp_path / "t"),
                 "--vocab-size", "300"]) == 0
    assert main(["data", "pack", "--tokenizer", str(tmp_path / "t.model"), "--input", str(out / "val_*.txt"),
                 "--output", str(tmp_path / "val.bin")]) == 0
    summary = json.loads((out / "corpus.json").read_text())
    assert read_meta(tmp_path / "val.bin")["n_documents"] == summary["n_val_documents"] > 0


def test_pack_refuses_jsonl_and_parquet_inputs_pointing_to_data_corpus(tokenizer: Tokenizer, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A .jsonl was packed as raw text: the model would train on the JSON syntax."""
    records = tmp_path / "a.JSONL"
    records.write_text('{"text": "hello world"}\n')
    assert main(["data", "pack", "--tokenizer", str(tokenizer.path), "--input", str(records),
                 "--output", str(tmp_path / "p.bin")]) == 1
    assert capsys.readouterr().err == (
        f"llmkit: error: --input {records}: pack reads plain text files, one document per file or per separator; "
        "turn .JSONL records into text with `llmkit data corpus` first (docs/data.md)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.JSONL"]


def test_a_corpus_can_be_written_into_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out .`: the temp directory is named after the resolved directory ('.' has no name)."""
    stdlib = _fake_stdlib(tmp_path / "stdlib")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(stdlib)})
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    summary = write_corpus("stdlib", ".", val_fraction=0.0, progress=False)
    assert sorted(p.name for p in (tmp_path / "here").iterdir()) == sorted(
        ["corpus.json", *summary["train_files"], *summary["val_files"]])


def test_malformed_checksums_in_the_metadata_are_named(tokenizer: Tokenizer, corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "val.bin"
    meta = pack(tokenizer.path, [corpus_dir / "val_00000.txt"], out, workers=1, progress=False)
    for broken in ({"block_crc32": meta["block_crc32"] + [0]}, {"block_crc32": "abc"},
                   {"checksum_block_tokens": 0}, {"block_crc32": [str(c) for c in meta["block_crc32"]]}):
        (tmp_path / "val.bin.json").write_text(json.dumps({**meta, **broken}))
        with pytest.raises(LLMKitError, match=r"val\.bin\.json has malformed checksums .*llmkit data pack"):
            read_meta(out)


def test_a_vocab_size_in_the_metadata_that_is_no_positive_integer_is_named(tokenizer: Tokenizer, corpus_dir: Path,
                                                                           tmp_path: Path) -> None:
    """Text or null crashed `data verify` and training with a TypeError; true, -1 or 1.5 read as a vocabulary."""
    out = tmp_path / "val.bin"
    meta = pack(tokenizer.path, [corpus_dir / "val_00000.txt"], out, workers=1, progress=False)
    for broken in ("abc", None, [500], True, -1, 1.5):
        (tmp_path / "val.bin.json").write_text(json.dumps({**meta, "vocab_size": broken}))
        with pytest.raises(LLMKitError, match=f"^{re.escape(str(tmp_path / 'val.bin.json'))} has vocab_size "
                                              f"{re.escape(repr(broken))}; expected a positive integer: re-create "
                                              "it with `llmkit data pack"):
            read_meta(out)


def test_cli_verify_reports_every_shard_and_fails_on_a_changed_one(
    tokenizer: Tokenizer, corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, changed, old = tmp_path / "good.bin", tmp_path / "changed.bin", tmp_path / "old.bin"
    for path in (good, changed, old):
        meta = pack(tokenizer.path, [corpus_dir / "val_00000.txt"], path, workers=1, progress=False)
    ids = np.fromfile(changed, dtype=np.uint16)
    ids[-1] = (ids[-1] + 1) % tokenizer.vocab_size
    ids.tofile(changed)
    del meta["block_crc32"], meta["checksum_block_tokens"]
    (tmp_path / "old.bin.json").write_text(json.dumps(meta))

    assert main(["data", "verify", "--shard", str(good), str(old)]) == 0
    out = capsys.readouterr().out
    assert f"ok {good}: {meta['n_tokens']:,} tokens, checksums match" in out
    assert f"ok {old}: {meta['n_tokens']:,} tokens, no checksums recorded" in out

    assert main(["data", "verify", "--shard", str(tmp_path / "*.bin")]) == 1
    captured = capsys.readouterr()
    assert f"FAILED {changed}: tokens 0 to {meta['n_tokens'] - 1:,} (block 1 of 1) do not match" in captured.out
    assert f"ok {good}" in captured.out and f"ok {old}" in captured.out
    assert f"1 shard(s) failed the check: {changed}" in captured.err


def test_a_long_document_comes_in_pieces_cut_at_line_ends(tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    lines = [f"line {i} {'é' * (i % 7)}\n" for i in range(40)]
    path.write_text("".join(lines) + f"{DOC_SEPARATOR}\nshort\n", encoding="utf-8")
    pieces = list(iter_documents(path, piece_bytes=50))
    assert [(index, ends) for index, _, ends in pieces] == [(0, False)] * (len(pieces) - 2) + [(0, True), (1, True)]
    assert "".join(text for index, text, _ in pieces if index == 0) == "".join(lines)
    longest_line = max(len(line.encode()) for line in lines)
    assert all(text.endswith("\n") and 50 <= len(text.encode()) < 50 + longest_line
               for _, text, ends in pieces if not ends)

    one_line = tmp_path / "one_line.txt"  # no line end at all: cut between characters, never above 2 pieces' size
    one_line.write_text("ab€" * 100 + f"\n{DOC_SEPARATOR}\n" + "x" * 10 + DOC_SEPARATOR, encoding="utf-8")
    pieces = list(iter_documents(one_line, piece_bytes=41))  # 41: some cuts fall inside a 3-byte €
    assert "".join(text for index, text, _ in pieces if index == 0) == "ab€" * 100 + "\n"
    assert all(len(text.encode()) <= 82 for _, text, _ in pieces)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n" + b"a" * 50 + b"\xff\n")
    with pytest.raises(LLMKitError, match=r"bad\.txt:2: not valid UTF-8 \(invalid start byte at byte 50 of the line\)"):
        list(iter_documents(bad, piece_bytes=24))
    assert pieces[-1] == (1, "x" * 10 + DOC_SEPARATOR, True)  # a separator's text ending a line is text
    tail = tmp_path / "tail.txt"  # ... also when the limit cuts the line right before it
    tail.write_text("y" * 40 + f"{DOC_SEPARATOR}\nz\n", encoding="utf-8")
    assert list(iter_documents(tail, piece_bytes=40)) == [(0, "y" * 40, False), (0, f"{DOC_SEPARATOR}\nz\n", True)]


def test_pack_encodes_a_document_without_separators_in_pieces_with_one_eos(
    tokenizer: Tokenizer, corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "".join(_docs_in([corpus_dir / "train_00000.txt"]))
    one_document = tmp_path / "book.txt"
    one_document.write_text(text, encoding="utf-8")
    monkeypatch.setattr(packing, "PIECE_BYTES", 300)
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.bin"
        with pytest.warns(UserWarning, match=rf"book.txt: document 0 is longer than 0.0003 MB, so it is encoded in "
                                             rf"pieces .* separate them with {re.escape(DOC_SEPARATOR)} lines"):
            meta = pack(tokenizer.path, [one_document], out, workers=workers, progress=False)
        ids = np.fromfile(out, dtype=np.uint16).tolist()
        assert meta["n_documents"] == 1 and ids.count(tokenizer.eos_id) == 1 and ids[-1] == tokenizer.eos_id
        assert tokenizer.decode(ids) == text
        assert len(text) > 20 * 300  # many pieces


def test_the_corpus_bar_ends_on_the_number_of_documents_written(tmp_path, capsys):
    """The bar counted the document held back for val (written last) out: 3 of 4."""
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(4):
        (notes / f"n{i}.txt").write_text(f"note {i}: some text\n")
    summary = write_corpus(str(notes), tmp_path / "corpus", val_fraction=0.0)
    assert (summary["n_train_documents"], summary["n_val_documents"]) == (3, 1)
    assert capsys.readouterr().err.rstrip().endswith("documents=4]")


def test_a_tokenizer_record_in_the_metadata_that_is_no_path_and_hash_is_named(tokenizer: Tokenizer, corpus_dir: Path,
                                                                              tmp_path: Path) -> None:
    """The metadata's tokenizer and its SHA-256 become a checkpoint's tokenizer record: a number there made
    `llmkit generate` crash with a TypeError, and a misspelt vocab_rule read as at_least."""
    out = tmp_path / "val.bin"
    meta = pack(tokenizer.path, [corpus_dir / "val_00000.txt"], out, workers=1, progress=False)
    for broken in ({"tokenizer_sha256": 5}, {"tokenizer_sha256": "abc"}, {"tokenizer": None}, {"tokenizer": 7},
                   {"vocab_rule": "exactly"}):
        (tmp_path / "val.bin.json").write_text(json.dumps({**meta, **broken}))
        with pytest.raises(LLMKitError, match=f"^{re.escape(str(tmp_path / 'val.bin.json'))} has tokenizer .*; "
                                              "expected the tokenizer's path, its hex SHA-256 and exact or at_least "
                                              r".*re-create it with `llmkit data pack"):
            read_meta(out)
    (tmp_path / "val.bin.json").write_text(json.dumps(meta))
    assert read_meta(out)["tokenizer_sha256"] == tokenizer.sha256
