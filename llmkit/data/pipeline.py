"""corpus -> tokenizer -> packed shards in one call: what `llmkit demo` and the benchmarks run.

The same three steps as `llmkit data corpus|tokenizer|pack`, with their default settings (the
tokenizer keeps case and whitespace, see docs/data.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmkit.data.corpus import write_corpus
from llmkit.data.packing import pack
from llmkit.data.tokenizer import TokenizerTrainConfig, train_tokenizer


@dataclass
class CorpusShards:
    """What :func:`build_corpus_shards` wrote: the tokenizer's .model, the two shards and their sizes."""

    tokenizer: Path
    train: Path
    val: Path
    train_tokens: int
    val_tokens: int
    vocab_size: int


def build_corpus_shards(
    out: str | Path, source: str, vocab_size: int, max_files: int | None = None,
    log: Callable[[str], None] = print,
) -> CorpusShards:
    """Write ``out``/corpus, ``out``/tokenizer/spm.model and ``out``/data/{train,val}.bin."""
    out = Path(out)
    log(f"corpus: {source} -> {out / 'corpus'}")
    corpus = write_corpus(source, out / "corpus", max_files=max_files)
    train_txt = [out / "corpus" / name for name in corpus["train_files"]]
    val_txt = [out / "corpus" / name for name in corpus["val_files"]]
    log(f"tokenizer: SentencePiece BPE, vocab {vocab_size}")
    tokenizer = train_tokenizer(train_txt, out / "tokenizer" / "spm", TokenizerTrainConfig(vocab_size=vocab_size))
    log("pack: train and val shards")
    train = pack(tokenizer, train_txt, out / "data" / "train.bin")
    val = pack(tokenizer, val_txt, out / "data" / "val.bin")
    log(f"      {train['n_tokens']:,} train tokens, {val['n_tokens']:,} val tokens")
    return CorpusShards(tokenizer, out / "data" / "train.bin", out / "data" / "val.bin", train["n_tokens"],
                        val["n_tokens"], train["vocab_size"])
