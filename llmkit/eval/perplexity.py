"""Perplexity of a backbone on packed shards: the held-out half of the evaluation report.

The windows are exactly those pretraining validates on: :class:`PackedDataModule`'s fixed
validation windows (consecutive, non-overlapping, from the start of each shard, the first
``max_windows`` of them), so this number and ``val/loss`` of ``llmkit pretrain validate``
agree. The loss is the token-weighted mean next-token cross-entropy in nats.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from llmkit.data.datamodule import PackedDataModule
from llmkit.data.packing import read_meta
from llmkit.data.tokenizer import TokenizerLike
from llmkit.errors import LLMKitError
from llmkit.eval.mode import eval_mode
from llmkit.io import expand_inputs
from llmkit.model.transformer import Transformer


def evaluate_perplexity(
    model: Transformer,
    shard_files: list[str | Path] | str | Path,
    seq_len: int,
    batch_size: int = 8,
    max_windows: int | None = 256,
    what: str = "ppl_files",
    tokenizer: TokenizerLike | None = None,
) -> dict:
    """Next-token loss of ``model`` on the fixed validation windows of ``shard_files`` (paths
    or glob patterns; ``what`` names the setting they came from, for errors), packed with
    ``tokenizer`` where it is given (the model's: a tokenizer of the same size would go unnoticed).

    Returns ``{"loss", "ppl", "bits_per_token", "tokens", "windows", "seq_len", "files"}``:
    loss in nats per token, ppl = exp(loss) (inf past float64's range), bits_per_token =
    loss / ln 2. Runs without gradients, in eval mode, on the model's device; the model's
    training mode is restored afterwards.
    """
    shard_files = [shard_files] if isinstance(shard_files, (str, Path)) else list(shard_files)
    if not shard_files:
        raise LLMKitError("no perplexity shards given: pass the .bin files to evaluate on")
    if seq_len > model.config.max_seq_len:
        raise LLMKitError(
            f"perplexity seq_len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}; "
            f"use seq_len <= {model.config.max_seq_len}"
        )
    files = expand_inputs(shard_files, what)
    for path in files if tokenizer is not None else []:
        meta = read_meta(path)
        if meta.get("tokenizer_sha256") != tokenizer.sha256:
            raise LLMKitError(
                f"{what}: {path} was packed with another tokenizer ({meta.get('tokenizer')}) than the model's "
                f"({tokenizer.path}): its ids mean other text; pack it with the model's tokenizer"
            )
    data = PackedDataModule(
        val_files=[str(f) for f in files], seq_len=seq_len, batch_size=batch_size, val_windows=max_windows,
        vocab_size=model.config.vocab_size,
    )
    data.setup("validate")
    device = next(model.parameters()).device
    total, tokens, windows = 0.0, 0, 0
    with torch.no_grad(), eval_mode(model):
        for x, y in data.val_dataloader():
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total += F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="sum").item()
            tokens += y.numel()
            windows += y.size(0)
    loss = total / tokens
    return {
        "loss": loss,
        "ppl": torch.tensor(loss, dtype=torch.float64).exp().item(),
        "bits_per_token": loss / math.log(2),
        "tokens": tokens,
        "windows": windows,
        "seq_len": seq_len,
        "files": [str(path) for path in files],
    }
