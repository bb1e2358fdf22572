"""Autoregressive sampling by re-running the model on the whole sequence each step.

Simple and exact (handoff F2): the next-token distribution is softmax(logits[:, -1] / T),
optionally restricted to the top-k logits. It costs a full forward per new token; the
KV-cached sampler replaces it for SDFT and TTT-Discover.
"""

from __future__ import annotations

import torch

from llmkit.model.transformer import Transformer


@torch.no_grad()
def sample(
    model: Transformer,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend idx [B, T] by up to max_new_tokens tokens; temperature 0 means greedy.

    The context is cropped to the model's max_seq_len. Generation stops early once every
    row has produced eos_id; rows that finished keep receiving eos_id.
    """
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.max_seq_len :])[:, -1, :]
        if temperature == 0:
            next_id = logits.argmax(dim=-1)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.size(-1):
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
        if eos_id is not None:
            next_id = torch.where(done, torch.full_like(next_id, eos_id), next_id)
            done |= next_id == eos_id
        idx = torch.cat([idx, next_id[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    return idx
