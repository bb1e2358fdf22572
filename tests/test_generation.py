"""KV-cached batched generation and continuation scoring."""

import contextlib
import gc
import os
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmkit.errors import LLMKitError
from llmkit.model import generation
from llmkit.model.config import ModelConfig
from llmkit.model.generation import (
    Generation,
    SamplingConfig,
    continuation_logits,
    generate,
    left_pad,
    padded_attention_mask,
    sample_tokens,
    sequence_logprobs,
)
from llmkit.model.kv_cache import KVCache
from llmkit.model.lora import LoRAConfig, apply_lora
from llmkit.model.transformer import Transformer

V = 97
# fp32 on CPU: cached and full forwards differ only in summation order; measured max
# |diff| ~1e-6 on these models, asserted at 1e-4.
ATOL = 1e-4


def model_for(n_streams: int, n_kv_heads: int = 4, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=V, n_layers=2, d_model=32, n_heads=4, n_kv_heads=n_kv_heads, d_ff=64,
                         max_seq_len=64, n_streams=n_streams)
    return Transformer(config).eval()


PROMPTS = [[5, 17, 3, 44, 9, 12, 80], [7], [60, 61, 62, 63]]


@pytest.mark.parametrize("n_streams", [1, 4])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_cached_decoding_matches_a_full_forward(n_streams, n_kv_heads):
    """Prefill left-padded prompts, then feed 6 known tokens one at a time through the cache:
    every step's logits equal the full forward over that row's unpadded tokens."""
    model = model_for(n_streams, n_kv_heads)
    follow = torch.randint(0, V, (len(PROMPTS), 6), generator=torch.Generator().manual_seed(1))
    ids, pad = left_pad(PROMPTS, pad_id=0, device=torch.device("cpu"))
    B, P = ids.shape
    S = P + follow.size(1)
    cache = KVCache(model.config, B, S, torch.device("cpu"), torch.float32)
    cols = torch.arange(P)
    with torch.no_grad():
        positions = (cols - pad[:, None]).clamp(min=0)
        steps = [model(ids, positions, padded_attention_mask(pad, cols, S), cache, cols)[:, -1]]
        for t in range(follow.size(1) - 1):
            slot = torch.tensor([P + t])
            steps.append(model(follow[:, t : t + 1], slot - pad[:, None], padded_attention_mask(pad, slot, S),
                               cache, slot)[:, -1])
        for row, prompt in enumerate(PROMPTS):
            full = model(torch.tensor([prompt + follow[row].tolist()]))[0]
            for t, logits in enumerate(steps):
                assert torch.allclose(logits[row], full[len(prompt) - 1 + t], atol=ATOL), (row, t)


@pytest.mark.parametrize("n_streams", [1, 4])
def test_greedy_batch_equals_each_prompt_alone(n_streams):
    model = model_for(n_streams)
    config = SamplingConfig(max_new_tokens=12, temperature=0)
    batch = generate(model, PROMPTS, config, eos_id=None)
    assert batch.tokens.shape == (3, 12) and bool(batch.mask.all())
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], config, eos_id=None)
        assert torch.equal(batch.tokens[row], alone.tokens[0])
        assert torch.allclose(batch.logprobs[row], alone.logprobs[0], atol=ATOL)


def test_greedy_follows_the_argmax_of_a_full_forward():
    model = model_for(4)
    out = generate(model, [PROMPTS[0]], SamplingConfig(max_new_tokens=5, temperature=0), eos_id=None)
    seq = list(PROMPTS[0])
    for _ in range(5):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out.tokens[0].tolist() == seq[len(PROMPTS[0]) :]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_the_scoring_function(temperature):
    model = model_for(4)
    config = SamplingConfig(max_new_tokens=10, temperature=temperature, top_k=20, top_p=0.9, seed=3)
    out = generate(model, PROMPTS, config, eos_id=11)
    continuations = [row[mask].tolist() for row, mask in zip(out.tokens, out.mask, strict=True)]
    scored, mask = sequence_logprobs(model, PROMPTS, continuations, temperature=temperature)
    width = mask.size(1)
    assert torch.equal(mask, out.mask[:, :width])
    assert torch.allclose(scored[mask], out.logprobs[:, :width][out.mask[:, :width]], atol=ATOL)


def test_rows_stop_at_eos_independently_and_eos_is_kept():
    model = model_for(4)
    config = SamplingConfig(max_new_tokens=8, temperature=0)
    free = generate(model, PROMPTS, config, eos_id=None)
    eos = int(free.tokens[0, 2])
    out = generate(model, PROMPTS, config, eos_id=eos)
    first = (free.tokens[0] == eos).nonzero()[0].item()
    assert out.mask[0, : first + 1].all() and not out.mask[0, first + 1 :].any()
    assert out.tokens[0, first] == eos
    assert (out.tokens[0, first + 1 :] == 0).all() and (out.logprobs[0, first + 1 :] == 0).all()
    for row in range(3):  # every row matches the free run up to its own first eos
        hits = (free.tokens[row] == eos).nonzero()
        stop = hits[0].item() + 1 if len(hits) else out.tokens.size(1)
        assert torch.equal(out.tokens[row, :stop], free.tokens[row, :stop])


def test_rows_stop_at_the_first_of_several_stop_ids():
    model = model_for(4)
    config = SamplingConfig(max_new_tokens=8, temperature=0)
    free = generate(model, PROMPTS, config, eos_id=None)
    stops = (int(free.tokens[0, 5]), int(free.tokens[1, 2]))
    out = generate(model, PROMPTS, config, eos_id=stops)
    for row in range(len(PROMPTS)):
        hits = torch.isin(free.tokens[row], torch.tensor(stops)).nonzero()
        stop = hits[0].item() + 1 if len(hits) else free.tokens.size(1)
        assert out.mask[row].sum().item() == stop
        assert torch.equal(out.tokens[row, :stop], free.tokens[row, :stop])


def test_reading_the_stop_check_every_few_steps_gives_the_same_generation(monkeypatch):
    """On CUDA the host reads whether every row has stopped only every few steps (a read waits for
    the GPU): the steps run after the batch stopped are cut off, so the result is the same."""
    model = model_for(4)
    config = SamplingConfig(max_new_tokens=12, temperature=0)
    free = generate(model, PROMPTS, config, eos_id=None)
    stops = (int(free.tokens[0, 1]), int(free.tokens[2, 2]))
    last_stop = max(int(torch.isin(row, torch.tensor(stops)).nonzero()[0]) for row in free.tokens)
    assert last_stop < 4  # so the batch stops before the first read at step 5
    forwards = []
    model.lm_head.register_forward_hook(lambda *_: forwards.append(1))
    every_step = generate(model, PROMPTS, config, eos_id=stops)
    assert len(forwards) == 1 + last_stop  # the prefill, then one decode step per token up to the stop
    monkeypatch.setitem(generation.STOP_CHECK_INTERVAL, "cpu", 5)
    every_fifth = generate(model, PROMPTS, config, eos_id=stops)
    assert len(forwards) - (1 + last_stop) == 5  # the prefill and 4 decode steps: it ran on to step 5
    for field in ("tokens", "mask", "logprobs"):
        assert torch.equal(getattr(every_fifth, field), getattr(every_step, field))
    assert every_step.tokens.size(1) == last_stop + 1


def test_decode_steps_make_no_tensors_from_host_data():
    """A tensor built from Python numbers on a GPU is a host-to-device copy that waits for the
    GPU: a decode step makes none, so the host can queue steps ahead (seen here as lift_fresh)."""

    class LiftCounter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten.lift_fresh.default
            return func(*args, **(kwargs or {}))

    def lifts(max_new_tokens: int) -> int:
        with LiftCounter() as counter:
            generate(model_for(4), PROMPTS, SamplingConfig(max_new_tokens=max_new_tokens, seed=0),
                     eos_id=V + 1)  # a stop id never sampled: every step runs, stop check included
        return counter.count

    assert lifts(12) == lifts(2) > 0


def test_seeded_sampling_is_reproducible():
    model = model_for(4)
    a = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, seed=5), eos_id=None)
    b = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, seed=5), eos_id=None)
    c = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, seed=6), eos_id=None)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_top_k_and_top_p_never_leave_the_allowed_set():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    gen = torch.Generator().manual_seed(0)
    topk = set()
    for _ in range(300):
        tokens, _ = sample_tokens(logits, SamplingConfig(top_k=5), gen)
        topk |= {(r, t) for r, t in enumerate(tokens.tolist())}
    allowed_k = {(r, t) for r in range(4) for t in torch.topk(logits[r], 5).indices.tolist()}
    assert topk <= allowed_k and len(topk) > 4

    probs = logits.softmax(-1)
    allowed_p = set()
    for r in range(4):  # the smallest set of most likely tokens whose mass reaches 0.6
        mass = 0.0
        for t in probs[r].argsort(descending=True).tolist():
            allowed_p.add((r, t))
            mass += probs[r, t].item()
            if mass >= 0.6:
                break
    seen = set()
    for _ in range(300):
        tokens, _ = sample_tokens(logits, SamplingConfig(top_p=0.6), gen)
        seen |= {(r, t) for r, t in enumerate(tokens.tolist())}
    assert seen <= allowed_p and len(seen) > 4


def test_sampled_logprobs_are_the_tempered_distribution_before_truncation():
    logits = torch.randn(3, 20)
    tokens, logprobs = sample_tokens(logits, SamplingConfig(temperature=0.5, top_k=3), torch.Generator().manual_seed(0))
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.allclose(logprobs, expected)


def test_scoring_is_differentiable_and_ignores_padding():
    model = model_for(4)
    model.train()
    scored, mask = sequence_logprobs(model, [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]])
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    assert scored[0, 2] == 0
    scored.sum().backward()
    assert model.tok_emb.weight.grad is not None
    alone, _ = sequence_logprobs(model, [[4]], [[7, 8, 9]])
    assert torch.allclose(alone[0], scored[1], atol=ATOL)


def test_rows_that_each_fit_the_window_score_together_whatever_their_mix():
    """One row with a long context, one with a long continuation: 40 + 40 columns, more than the
    window of 64, though each row (40 + 3, 3 + 40) fits. Each row scores as it does alone."""
    model = model_for(4)
    contexts, continuations = [list(range(1, 41)), [7, 8, 9]], [[5, 6, 7], list(range(10, 50))]
    scored, mask = sequence_logprobs(model, contexts, continuations)
    for row in range(2):
        alone, _ = sequence_logprobs(model, contexts[row : row + 1], continuations[row : row + 1])
        n = len(continuations[row])
        assert mask[row].sum() == n and torch.allclose(alone[0, :n], scored[row, :n], atol=ATOL)
    with pytest.raises(LLMKitError, match=r"^row 1: context \(30\) \+ continuation \(40\) tokens exceed the model's "
                                          r"max_seq_len 64"):
        sequence_logprobs(model, [[1], [2] * 30], [[3], list(range(10, 50))])


def test_bad_inputs_are_clear_errors():
    model = model_for(1)
    with pytest.raises(LLMKitError, match="context window max_seq_len 64"):
        generate(model, [[1] * 60], SamplingConfig(max_new_tokens=10), eos_id=None)
    with pytest.raises(LLMKitError, match="at least one token"):
        generate(model, [[1, 2], []], SamplingConfig(max_new_tokens=2), eos_id=None)
    with pytest.raises(LLMKitError, match="top_p"):
        SamplingConfig(top_p=1.5)


@pytest.mark.slow
def test_compiled_decode_step_matches_eager():
    model = model_for(4)
    eager = generate(model, PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0), eos_id=None)
    compiled = generate(model, PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0, compile=True), eos_id=None)
    assert torch.equal(eager.tokens, compiled.tokens)
    assert torch.allclose(eager.logprobs, compiled.logprobs, atol=ATOL)


DEEP_DECODE = """
import logging, sys, time, torch
from dataclasses import replace
from llmkit.model.config import ModelConfig
from llmkit.model.generation import SamplingConfig, generate
from llmkit.model.transformer import Transformer
torch._logging.set_logs(inductor=logging.INFO)  # what TORCH_LOGS=inductor asks (torch <= 2.11 formats it anyway)
config = replace(ModelConfig(vocab_size=64, d_model=32, n_layers=5, n_heads=2, max_seq_len=64), n_streams=4)
torch.manual_seed(0)
generate(Transformer(config).eval(), [[1, 2, 3]], SamplingConfig(max_new_tokens=2, compile=True), eos_id=None)
print("decoded")
"""


def test_a_compiled_decode_step_of_many_mhc_sublayers_lowers_without_describing_the_ops(tmp_path):
    """The decode step is one graph of every sublayer: inductor's implicit fallback describes each
    new op's arguments, IR text that grows exponentially with depth (torch 2.11 on an H200 never
    finished lowering the 120m n = 4 step; here 4 layers took 82 s). Named as allowed fallbacks
    (mhc_ops.allow_inductor_fallbacks), 5 layers compile with INFO logs in seconds."""
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    env.pop("TORCH_LOGS", None)
    done = subprocess.run([sys.executable, "-c", DEEP_DECODE], env=env, capture_output=True, text=True, timeout=150,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and "decoded" in done.stdout, done.stderr[-2000:]
    assert "implicit fallback" not in done.stderr


def frozen_model(path: str, lora_targets: list[str] | None = None, **overrides) -> Transformer:
    """A small model from a configs/model YAML, every parameter frozen (autocast caches no casts
    of those: without held weights, every decode step would cast each one again)."""
    torch.manual_seed(0)
    config = replace(ModelConfig.from_yaml(f"configs/model/{path}"), vocab_size=V, n_layers=2, **overrides)
    model = Transformer(config).eval()
    if lora_targets:
        apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=lora_targets))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)  # B starts at zero: make the adapters count
    return model.requires_grad_(False)


MATMUL_MODELS = {
    "dense": ("tiny.yaml", None, {"n_streams": 1}),
    "mhc": ("tiny.yaml", None, {}),
    "tied": ("tiny.yaml", None, {"tie_embeddings": True}),
    "moe": ("moe_tiny.yaml", ["gate_proj", "down_proj"], {}),
    "mla_lora": ("mla_tiny.yaml", ["q_proj", "kv_b_proj", "o_proj", "phi"], {}),
}


class CastCounter(TorchDispatchMode):
    """Counts the casts (``aten._to_copy``) whose source is one of the given tensors' storage."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.sources = {t.data_ptr() for t in tensors}
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.sources:
            self.casts += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", MATMUL_MODELS)
def test_autocast_sampling_casts_the_matmul_weights_once_for_the_same_samples(kind, monkeypatch):
    """Under autocast, generate holds the matmul-only weights in bf16 while it runs: the decode
    steps never cast them (without that, every step casts each one), the samples and log-probs
    are bit-identical, and afterwards every module holds its own fp32 parameter again."""
    path, targets, overrides = MATMUL_MODELS[kind]
    model = frozen_model(path, targets, **overrides)
    params = dict(model.named_parameters())
    snapshot = {name: p.clone() for name, p in params.items()}
    held = [getattr(module, name) for module, name in model.matmul_only_params()]
    sampling = SamplingConfig(max_new_tokens=5, temperature=1.0, top_k=20, seed=0)

    def sample() -> tuple[Generation, int]:
        with torch.autocast("cpu", dtype=torch.bfloat16), CastCounter(held) as counter:
            return generate(model, PROMPTS, sampling, eos_id=None), counter.casts

    once, casts_once = sample()
    monkeypatch.setattr(generation, "matmul_weights_in_autocast_dtype", lambda *_: contextlib.nullcontext())
    every_step, casts_every_step = sample()
    assert casts_once == len(held)  # each weight once, when generate starts
    assert casts_every_step >= len(held) * sampling.max_new_tokens  # prefill + 4 decode steps, each casting all
    assert torch.equal(once.tokens, every_step.tokens)
    assert torch.equal(once.logprobs, every_step.logprobs)
    for name, p in model.named_parameters():  # the very same Parameter objects, unchanged
        assert p is params[name] and p.dtype == torch.float32 and torch.equal(p, snapshot[name]), name


def test_the_matmul_only_params_leave_out_what_is_read_directly_or_shared():
    """phi (the mHC ops read it), MLA's kv_b_proj (the absorbed decode adds LoRA to it), the
    router's gate (fp32 outside autocast) and a tied lm_head (the embedding) are left out; every
    other projection and expert weight, and LoRA's factors, are in."""
    model = frozen_model("mla_tiny.yaml", ["q_proj", "kv_b_proj", "phi", "gate_proj"], tie_embeddings=True,
                         moe=ModelConfig.from_yaml("configs/model/moe_tiny.yaml").moe)
    names = {f"{owner}.{key}" for owner, module in model.named_modules()
             for m, key in model.matmul_only_params() if m is module}
    prefix = "blocks.1."
    assert {n.removeprefix(prefix) for n in names if n.startswith(prefix)} == {
        "attn.q_proj.weight", "attn.q_proj.lora_A", "attn.q_proj.lora_B", "attn.kv_a_proj_with_mqa.weight",
        "attn.o_proj.weight",
        "mlp.experts.gate_proj.weight", "mlp.experts.gate_proj.lora_A", "mlp.experts.gate_proj.lora_B",
        "mlp.experts.up_proj.weight", "mlp.experts.down_proj.weight",
        "mlp.shared.gate_proj.weight", "mlp.shared.gate_proj.lora_A", "mlp.shared.gate_proj.lora_B",
        "mlp.shared.up_proj.weight", "mlp.shared.down_proj.weight",
    }
    assert not any(n.startswith(("lm_head", "tok_emb")) for n in names)


def test_sampling_that_fails_gives_the_modules_their_own_parameters_back():
    model = frozen_model("tiny.yaml")
    params = dict(model.named_parameters())
    calls = 0

    def fail_on_the_third_forward(module, inputs, output):
        nonlocal calls
        calls += 1
        assert module.weight.dtype == torch.bfloat16  # held in bf16 while sampling
        if calls == 3:
            raise RuntimeError("interrupted")

    model.lm_head.register_forward_hook(fail_on_the_third_forward)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="interrupted"):
        generate(model, PROMPTS, SamplingConfig(max_new_tokens=5), eos_id=None)
    assert all(p is params[name] and p.dtype == torch.float32 for name, p in model.named_parameters())


def assert_greedy_to_within_rounding(model: Transformer, prompts: list[list[int]], tokens: torch.Tensor,
                                     rel_tol: float = 0.02) -> None:
    """Every token is the argmax of the model's current logits for its prefix, to within rounding:
    its logit in one teacher-forced forward is at most ``rel_tol`` of its row's logit range below
    the largest. Under bf16 autocast logits tie exactly often enough that two correct greedy
    decodes (eager and compiled) part at a tie, so token equality would test rounding; a decode
    that used other weights picks tokens far down the range."""
    with torch.no_grad():
        logits, targets, _ = continuation_logits(model, prompts, tokens.tolist())
    logits = logits.float()
    deficit = logits.max(-1).values - logits.gather(-1, targets[..., None]).squeeze(-1)
    assert (deficit <= rel_tol * (logits.max(-1).values - logits.min(-1).values)).all(), deficit


def compiled_autocast_samples_across_a_weight_change(model: Transformer, prompts: list[list[int]],
                                                     max_new_tokens: int) -> list[tuple[torch.Tensor, int]]:
    """Greedy samples of the compiled decode under bf16 autocast, each checked greedy for the
    current weights (:func:`assert_greedy_to_within_rounding`), before and after the LM head is
    negated (as weights change between an SDFT or TTT-Discover step's generate calls); with
    dynamo's graph count after each compiled call."""
    device = next(model.parameters()).device
    compiled = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0, compile=True)
    torch._dynamo.reset()
    results = []
    for _ in range(2):
        # a context per round: autocast caches its bf16 casts of the weights until the outermost exits
        with torch.autocast(device.type, dtype=torch.bfloat16):
            tokens = generate(model, prompts, compiled, eos_id=None).tokens
            assert_greedy_to_within_rounding(model, prompts, tokens)
        results.append((tokens, torch._dynamo.utils.counters["stats"]["unique_graphs"]))
        with torch.no_grad():
            model.lm_head.weight.neg_()  # greedy now picks what was least likely
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return results


@pytest.mark.slow
def test_compiled_autocast_decode_samples_the_current_weights_without_recompiling():
    """Under autocast each compiled generate call rewrites the bf16 copies of the weights it keeps:
    the compiled decode step samples greedily for the current weights, follows them when they
    change between calls and reuses its graph."""
    (before, graphs_before), (after, graphs_after) = compiled_autocast_samples_across_a_weight_change(
        model_for(4), PROMPTS, max_new_tokens=6)
    assert not torch.equal(before, after)
    assert graphs_before == graphs_after


@pytest.mark.slow
def test_a_compiled_decode_step_reads_the_cache_once_and_writes_only_its_new_slot():
    """The traffic of a compiled decode step, by inductor's count of its kernels' bytes, grows with
    the cache by one read of it (attention's), not by copies: with one [n_layers, ...] buffer per
    name, each layer's write into its view became a scatter into a new copy of the whole buffer,
    copied back at the step's end, about 10 times the cache's bytes per step."""
    from torch._inductor import metrics

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=V, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=256)
    model = Transformer(config).eval()
    step_bytes, cache_bytes = [], []
    torch._logging.set_logs(inductor_metrics=True)  # inductor counts the bytes only with its metrics log on
    try:
        for prompt_len in (3, 70):  # padded to 64 and 128 columns: caches of 66 and 130 slots
            torch._dynamo.reset()
            metrics.reset()
            generate(model, [[1] * prompt_len] * 8, SamplingConfig(max_new_tokens=2, temperature=0, compile=True),
                     eos_id=None)
            step_bytes.append(metrics.num_bytes_accessed)
            cache = generation._compiled_decode_buffers[model].cache
            cache_bytes.append(sum(b.numel() * b.element_size() for b in cache.buffers()))
    finally:
        torch._logging.set_logs()
        torch._dynamo.reset()
    grown = (step_bytes[1] - step_bytes[0]) / (cache_bytes[1] - cache_bytes[0])
    assert 0.9 < grown < 1.5, grown


@pytest.mark.slow
def test_compiled_calls_reuse_the_kv_cache_and_the_bf16_weights_at_their_addresses():
    """A CUDA graph reads the KV cache and the held bf16 weights where it was recorded, so
    consecutive compiled calls on a model reuse them: the cache zeroed (what a call leaves in it
    is never read by the next), the weights rewritten. A new batch shape gets a new cache; eager
    calls keep nothing, and what is kept does not keep the model alive."""
    model = model_for(4)
    lm_head_seen = []
    model.lm_head.register_forward_pre_hook(lambda module, _: lm_head_seen.append(module.weight.data_ptr()))
    greedy = SamplingConfig(max_new_tokens=4, temperature=0)
    compiled = replace(greedy, compile=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = generate(model, PROMPTS, greedy, eos_id=None)
        assert model not in generation._compiled_decode_buffers
        lm_head_seen.clear()
        first = generate(model, PROMPTS, compiled, eos_id=None)
        kept = generation._compiled_decode_buffers[model]
        cache, cache_addresses = kept.cache, [b.data_ptr() for b in kept.cache.buffers()]
        for b in cache.buffers():
            b.fill_(float("nan"))
        second = generate(model, PROMPTS, compiled, eos_id=None)
        assert kept.cache is cache and [b.data_ptr() for b in cache.buffers()] == cache_addresses
        assert len(set(lm_head_seen)) == 1 and lm_head_seen[0] != model.lm_head.weight.data_ptr()
        assert torch.equal(first.tokens, eager.tokens) and torch.equal(second.tokens, eager.tokens)
        assert torch.equal(second.logprobs, first.logprobs)
        generate(model, PROMPTS[:2], compiled, eos_id=None)
        assert kept.cache is not cache and kept.cache.k_0.size(0) == 2
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
