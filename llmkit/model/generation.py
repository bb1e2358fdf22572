"""Batched, KV-cached sampling and exact continuation scoring (docs/architecture.md, "Sampling").

Prompts of different lengths are left-padded to a common length P, so every row's next
token sits in the same column. Row b has ``pad[b]`` pad tokens; its real token at column j
gets RoPE position j - pad[b], and no query ever attends to a pad key. Generation prefills
the cache with the prompts in one forward, then feeds one token per step: the keys and
values of earlier tokens are read from the cache, never recomputed.

Log-probabilities are those of the tempered model distribution softmax(logits / T) (T = 1
for greedy decoding), before any top-k/top-p truncation: the quantity RL and distillation
losses need. :func:`sequence_logprobs` recomputes exactly these in one batched forward.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import LLMKitError, SettingError
from llmkit.model import mhc_ops
from llmkit.model.config import ModelConfig
from llmkit.model.kv_cache import KVCache
from llmkit.model.transformer import Transformer

STOP_CHECK_INTERVAL = {"cuda": 8}
"""Steps between the host's reads of whether every row has stopped, by device type (1 where
absent). Each read waits for the GPU to finish every queued step; between reads the host queues
steps ahead. A batch that has stopped runs at most interval - 1 more steps, whose tokens are
masked and cut off."""

COMPILE_PAD_MULTIPLE = 64
"""With compile, prompts are left-padded to a multiple of this many tokens: the compiled decode
step has static shapes, and this bounds how many distinct shapes (compiles) a run meets."""


@dataclass
class SamplingConfig:
    """How to sample. temperature 0 is greedy; top_k/top_p None disables them.

    compile: run the decode step through torch.compile; the step has static shapes (the
    cache is pre-allocated and every step attends over all of it under a mask), so on CUDA
    it is captured as a CUDA graph ("reduce-overhead"). Prompts are then left-padded to a
    multiple of COMPILE_PAD_MULTIPLE tokens. The cache (and, under autocast, the bf16 weight
    copies) stay allocated for the next compiled call on the model, so its CUDA graph replays.
    Eager is the default, and the right choice on CPU.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        """Raise :class:`SettingError`, naming the field, for a value out of range."""
        if self.max_new_tokens < 1:
            raise SettingError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:  # NaN too; inf divided every logit to 0 (uniform sampling)
            raise SettingError("temperature", f"must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SettingError("top_k", f"must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SettingError("top_p", f"must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """Per row: ``tokens`` [B, N] generated ids (pad_id after EOS), ``mask`` [B, N] True on
    real tokens up to and including EOS, ``logprobs`` [B, N] (0 where mask is False)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor


def left_pad(
    sequences: list[list[int]], pad_id: int, device: torch.device, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, P] with each sequence right-aligned, and pad counts [B]; P is the longest
    sequence's length, or ``width`` if given (at least that length)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise LLMKitError("every prompt/context must have at least one token")
    width = max(max(len(s) for s in sequences), width or 0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
    pad = torch.tensor([width - len(s) for s in sequences], dtype=torch.long)
    return ids.to(device), pad.to(device)


def padded_attention_mask(pad: torch.Tensor, query_cols: torch.Tensor, n_keys: int) -> torch.Tensor:
    """mask [B, 1, T, S]: query column i may attend to key column j iff pad[b] <= j <= i.

    A pad query (i < pad[b]) attends to itself only, so its output stays finite; nothing
    real ever attends to it.
    """
    keys = torch.arange(n_keys, device=pad.device)
    i, j = query_cols[None, :, None], keys[None, None, :]
    allowed = (j <= i) & (j >= pad[:, None, None])
    return (allowed | (j == i)).unsqueeze(1)


def _positions(pad: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """RoPE positions [B, T] of columns ``cols``: column - pad[b], 0 on pad columns."""
    return (cols[None, :] - pad[:, None]).clamp(min=0)


def sample_tokens(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] from logits [B, V] (greedy, or temperature + top-k + top-p), and
    their log-probabilities under softmax(logits / T)."""
    if config.temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, F.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    logits = logits / config.temperature
    logprobs = F.log_softmax(logits, dim=-1)
    allowed = logits
    if config.top_k is not None and config.top_k < logits.size(-1):
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        allowed = allowed.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1:
        sorted_logits, order = allowed.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= config.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        allowed = allowed.masked_fill(drop, float("-inf"))
    tokens = torch.multinomial(allowed.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def _decode_step(model: Transformer, tokens: torch.Tensor, pad: torch.Tensor, slot: torch.Tensor,
                 cache: KVCache) -> torch.Tensor:
    """Logits [B, V] for one new token per row, at cache column ``slot`` [1]; its positions and
    mask are built here, so a compiled step computes them inside its graph."""
    mask = padded_attention_mask(pad, slot, cache.max_len)
    return model(tokens, _positions(pad, slot), mask, cache, slot)[:, -1]


def _decode_fn(config: SamplingConfig, device: torch.device, cache: KVCache) -> Callable[..., torch.Tensor]:
    if not config.compile:
        return _decode_step
    mhc_ops.allow_inductor_fallbacks()  # one graph of every sublayer: see its docstring
    for buffer in cache.buffers():
        torch._dynamo.mark_static_address(buffer)
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(_decode_step, mode=mode, dynamic=False)


@contextmanager
def matmul_weights_in_autocast_dtype(
    model: Transformer, device_type: str, kept: list[torch.Tensor] | None = None
) -> Iterator[None]:
    """Under autocast, hold the model's :meth:`~llmkit.model.transformer.Transformer.matmul_only_params`
    in the autocast dtype until exit; without autocast, do nothing.

    Autocast casts an fp32 weight at every matmul that reads it, so a compiled decode step casts
    every weight for every new token (an eager step caches the casts of weights that require
    grad, not of frozen ones). Rounded once here, as autocast rounds them, the weights give the
    same values with no per-token casts (docs/performance.md counts them). The modules hold the
    copies as new parameters and get their own back on exit, whatever happens inside: the
    original parameters are never touched, so an optimizer or DDP holding them is unaffected.
    The copies take half the weights' fp32 memory meanwhile.

    ``kept``: a list the copies stay in after exit, rewritten in place by the next call whose
    weights have the same shapes (a compiled decode step's CUDA graph reads them at fixed
    addresses); refilled when they do not.
    """
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    dtype = torch.get_autocast_dtype(device_type)
    weights = [(module, name, p) for module, name in model.matmul_only_params()
               if (p := module._parameters[name]).dtype == torch.float32
               and type(p.data) is torch.Tensor]  # not a sharded (FSDP) DTensor
    fits = kept is not None and ([(k.shape, k.dtype, k.device) for k in kept]
                                 == [(p.shape, dtype, p.device) for _, _, p in weights])
    if fits:
        copies = [k.copy_(p.detach()) for k, (_, _, p) in zip(kept, weights, strict=True)]
    else:
        copies = [p.detach().to(dtype) for _, _, p in weights]
        if kept is not None:
            kept[:] = copies
    held = []
    try:
        for (module, name, p), copy in zip(weights, copies, strict=True):
            module._parameters[name] = nn.Parameter(copy, requires_grad=False)
            held.append((module, name, p))
        yield
    finally:
        for module, name, p in held:
            module._parameters[name] = p


@dataclass
class _CompiledDecodeBuffers:
    """What a compiled ``generate`` call leaves for the next one on the same model. The decode
    step's CUDA graph reads its static inputs (the KV cache, the held bf16 weights) at the
    addresses it was recorded with: new ones at every call would mean a new recording at every
    call, each kept by PyTorch (and on PyTorch 2.11, past cudagraph_unexpected_rerecord_limit,
    128, no CUDA graph at all)."""

    cache: KVCache | None = None
    weights: list[torch.Tensor] = field(default_factory=list)


_compiled_decode_buffers: weakref.WeakKeyDictionary[Transformer, _CompiledDecodeBuffers] = weakref.WeakKeyDictionary()


def _kv_cache(buffers: _CompiledDecodeBuffers | None, config: ModelConfig, batch_size: int, max_len: int,
              device: torch.device, dtype: torch.dtype) -> KVCache:
    """A zeroed KV cache: the one ``buffers`` holds where its shapes fit, else a new one (kept there)."""
    if buffers is None:
        return KVCache(config, batch_size, max_len, device, dtype)
    cache = buffers.cache
    if cache is not None and cache.fits(config, batch_size, max_len, device, dtype):
        for b in cache.buffers():
            b.zero_()
        return cache
    buffers.cache = None  # let the allocator reuse its memory
    buffers.cache = KVCache(config, batch_size, max_len, device, dtype)
    return buffers.cache


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    config: SamplingConfig,
    eos_id: int | Sequence[int] | None,
    pad_id: int = 0,
) -> Generation:
    """Sample up to ``config.max_new_tokens`` tokens after each prompt, in one batch.

    Rows stop independently at ``eos_id`` (or at any of several ids: a tokenizer's ``stop_ids``);
    the loop ends when all rows have stopped (read every :data:`STOP_CHECK_INTERVAL` steps). The
    same seed gives the same samples. Under autocast the matmul weights are rounded once for the
    call (:func:`matmul_weights_in_autocast_dtype`).
    """
    cfg = model.config
    longest = max((len(p) for p in prompts), default=0)
    if longest + config.max_new_tokens > cfg.max_seq_len:
        raise LLMKitError(
            f"a prompt of {longest} tokens plus max_new_tokens {config.max_new_tokens} exceeds the "
            f"model's context window max_seq_len {cfg.max_seq_len}; shorten the prompt or ask for fewer tokens"
        )
    device = next(model.parameters()).device
    width = None
    if config.compile:  # bucket the prompt width so new prompt lengths rarely mean a new compile
        width = min(-(-longest // COMPILE_PAD_MULTIPLE) * COMPILE_PAD_MULTIPLE, cfg.max_seq_len - config.max_new_tokens)
    ids, pad = left_pad(prompts, pad_id, device, width)
    stops = None if eos_id is None else torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id),
                                                     device=device)
    B, P = ids.shape
    S = P + config.max_new_tokens
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else model.lm_head.weight.dtype
    kept = _compiled_decode_buffers.setdefault(model, _CompiledDecodeBuffers()) if config.compile else None
    cache = _kv_cache(kept, cfg, B, S, device, dtype)
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)

    with matmul_weights_in_autocast_dtype(model, device.type, kept.weights if kept is not None else None):
        cols = torch.arange(P, device=device)
        logits = model(ids, _positions(pad, cols), padded_attention_mask(pad, cols, S), cache, cols)[:, -1]
        decode = _decode_fn(config, device, cache)
        tokens = torch.full((B, config.max_new_tokens), pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, config.max_new_tokens, device=device)
        mask = torch.zeros(B, config.max_new_tokens, dtype=torch.bool, device=device)
        alive = torch.ones(B, dtype=torch.bool, device=device)
        check_every = STOP_CHECK_INTERVAL.get(device.type, 1)
        for step in range(config.max_new_tokens):
            token, logprob = sample_tokens(logits, config, generator)
            tokens[:, step] = torch.where(alive, token, pad_id)
            logprobs[:, step] = torch.where(alive, logprob, 0.0)
            mask[:, step] = alive
            if stops is not None:
                alive &= ~torch.isin(token, stops)
                if (step + 1) % check_every == 0 and not bool(alive.any()):
                    break
            if step + 1 == config.max_new_tokens:
                break
            slot = torch.full((1,), P + step, device=device)  # a fill kernel: no host-to-device copy, which waits
            logits = decode(model, tokens[:, step : step + 1], pad, slot, cache)
    n = int(mask.any(dim=0).sum())  # the columns up to the one where the last row stopped (alive only falls)
    return Generation(tokens[:, :n], mask[:, :n], logprobs[:, :n])


def continuation_logits(
    model: Transformer, contexts: list[list[int]], continuations: list[list[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits that predict every continuation token, in one batched forward.

    Contexts are left-padded to P columns and continuations right-padded to L, so every
    continuation starts at column P and the logits at column P - 1 + t predict its token t:
    the F4 slice [C - 1, C - 1 + L) of each row, whatever its context length C. Returns
    (logits [B, L, V], targets [B, L], mask [B, L]); mask is True on real continuation
    tokens (an EOS among them included) and is built from the lengths, never by comparing
    ids with pad_id, so pad_id == eos_id cannot hide an EOS. Differentiable.

    Each row's context + continuation must fit the model's window; the batch's P + L need not
    (a long context in one row, a long continuation in another): the padding after a short
    continuation, which no real token attends to, takes the window's last position.
    """
    if len(contexts) != len(continuations):
        raise LLMKitError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    window = model.config.max_seq_len
    for row, (context, continuation) in enumerate(zip(contexts, continuations, strict=True)):
        if len(context) + len(continuation) > window:
            raise LLMKitError(f"row {row}: context ({len(context)}) + continuation ({len(continuation)}) tokens "
                              f"exceed the model's max_seq_len {window}")
    device = next(model.parameters()).device
    ctx, pad = left_pad(contexts, pad_id, device)
    B, P = ctx.shape
    L = max((len(c) for c in continuations), default=0)
    if L == 0:
        raise LLMKitError("every continuation is empty: nothing to score")
    cont = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for row, seq in enumerate(continuations):
        cont[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = True
    cont, mask = cont.to(device), mask.to(device)
    ids = torch.cat([ctx, cont], dim=1)
    cols = torch.arange(P + L, device=device)
    positions = _positions(pad, cols).clamp(max=window - 1)
    real = torch.cat([cols[None, :P] >= pad[:, None], mask], dim=1)  # MoE balancing leaves the padding out
    logits = model(ids, positions, padded_attention_mask(pad, cols, P + L), real_tokens=real)
    return logits[:, P - 1 : P + L - 1], cont, mask


def sequence_logprobs(
    model: Transformer,
    contexts: list[list[int]],
    continuations: list[list[int]],
    pad_id: int = 0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(continuation_t | context, continuation_<t) for every continuation token, in one
    batched forward (:func:`continuation_logits`): (logprobs [B, L], mask [B, L]), 0 where
    mask is False. Differentiable: TTT-Discover's log π_θ(a|s) and SFT's likelihood.
    """
    if temperature <= 0:
        raise LLMKitError(f"temperature must be > 0 to score (greedy samples are scored at 1.0), got {temperature}")
    logits, cont, mask = continuation_logits(model, contexts, continuations, pad_id)
    logprobs = F.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(-1, cont[..., None]).squeeze(-1) * mask, mask
