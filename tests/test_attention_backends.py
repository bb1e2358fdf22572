"""Attention backends: every kernel available on a CPU computes what SDPA's math reference does
(training, grouped-query heads, padded batches, the KV-cached decode, compiled), and those that
cannot run here are refused with one line saying why. The CUDA kernels are checked in test_gpu.py."""

import pytest
import torch

from llmkit.errors import LLMKitError
from llmkit.model.attention_backends import attend, resolve_backend
from llmkit.model.config import BACKENDS, ModelConfig
from llmkit.model.generation import SamplingConfig, generate
from llmkit.model.transformer import Transformer

CPU_BACKENDS = ["auto", "flash", "math"]


def tiny(n_streams: int = 1, n_kv_heads: int | None = None, backend: str = "math") -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=96, n_layers=2, d_model=64, n_heads=4, n_kv_heads=n_kv_heads, d_ff=128,
                         max_seq_len=48, n_streams=n_streams, attention_backend=backend)
    return Transformer(config)


def with_backend(model: Transformer, backend: str) -> Transformer:
    model.config.attention_backend = backend
    return model


def test_every_name_is_resolved_or_refused_on_a_cpu():
    assert resolve_backend("auto", "cpu", torch.float32) == "flash"
    assert resolve_backend("flash", "cpu", torch.bfloat16) == "flash"
    assert resolve_backend("math", "cpu", torch.float32) == "math"
    for name in ("cudnn", "efficient", "flash_attn"):
        with pytest.raises(LLMKitError, match=f"{name} needs a CUDA device .*use auto, flash or math"):
            resolve_backend(name, "cpu", torch.float32)
    assert set(BACKENDS) == {"auto", *CPU_BACKENDS, "cudnn", "efficient", "flash_attn"}


def test_cuda_rules_that_need_no_gpu_to_check():
    assert resolve_backend("auto", "cuda", torch.float32) == "efficient"  # the half-precision kernels cannot take fp32
    for name in ("flash", "cudnn"):
        with pytest.raises(LLMKitError, match=f"{name} needs fp16 or bf16 on CUDA .*bf16-mixed"):
            resolve_backend(name, "cuda", torch.float32)
    assert resolve_backend("auto", "mps", torch.float32) == "math"
    with pytest.raises(LLMKitError, match="flash needs a CPU or CUDA device"):
        resolve_backend("flash", "mps", torch.float32)


def test_flash_attn_without_the_package_says_how_to_install_it(monkeypatch):
    import llmkit.model.attention_backends as backends

    monkeypatch.setattr(backends, "_flash_attn_package", lambda: None)
    backends._resolve.cache_clear()
    try:
        with pytest.raises(LLMKitError, match=r"neither is installed: pip install 'llmkit\[flash\]' or use auto"):
            backends.resolve_backend("flash_attn", "cuda", torch.bfloat16)
    finally:
        backends._resolve.cache_clear()


@pytest.mark.parametrize("returns_lse", [False, True])
def test_the_flash_attn_path_hands_the_package_its_layout_and_gqa(monkeypatch, returns_lse):
    """A stand-in FlashAttention-3 package (causal attention on [B, T, H, D], GQA natively, the
    reference's numbers): ``attend`` gives it that layout and takes its output back, with or
    without the log-sum-exp some versions return; ``auto`` on CUDA in bf16 prefers it."""
    import importlib.machinery
    import sys
    import types

    import llmkit.model.attention_backends as backends

    calls = []

    def flash_attn_func(q, k, v, causal):
        calls.append((q.shape, k.shape, causal))
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, "math").transpose(1, 2)
        return (out, torch.zeros(1)) if returns_lse else out

    fake = types.ModuleType("flash_attn_interface")
    fake.__spec__ = importlib.machinery.ModuleSpec("flash_attn_interface", None)
    fake.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fake)
    backends._resolve.cache_clear()
    try:
        assert backends.resolve_backend("auto", "cuda", torch.bfloat16) == "flash_attn"
    finally:
        backends._resolve.cache_clear()
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    torch.testing.assert_close(attend(q, k, v, None, "flash_attn"), attend(q, k, v, None, "math"))
    assert calls == [((2, 7, 4, 16), (2, 7, 2, 16), True)]


def test_an_unknown_name_is_a_config_error():
    with pytest.raises(LLMKitError, match="attention_backend must be one of auto, flash, cudnn, efficient, math"):
        ModelConfig(attention_backend="sdpa")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("n_streams", "n_kv_heads"), [(1, None), (1, 2), (4, 1)])
def test_training_forward_and_gradients_match_math(backend, n_streams, n_kv_heads):
    ids = torch.randint(0, 96, (3, 40))
    model = tiny(n_streams, n_kv_heads)
    grads = {}
    for name in ("math", backend):
        model.zero_grad()
        logits = with_backend(model, name)(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        grads[name] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    (ref, ref_grads), (out, out_grads) = grads["math"], grads[backend]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for g, g_ref in zip(out_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, g_ref, atol=2e-6, rtol=1e-3)


def test_bf16_autocast_matches_math_within_bf16_rounding():
    ids = torch.randint(0, 96, (2, 32))
    model = tiny(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = with_backend(model, "math")(ids)
        out = with_backend(model, "flash")(ids)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("backend", ["flash", "auto"])
def test_padded_batched_sampling_with_the_kv_cache_matches_math(backend):
    """Prompts of different lengths (left padding: a mask on every call) decoded greedily
    through the KV cache give the same tokens and log-probabilities as math."""
    prompts = [[5, 9, 11, 3, 7, 2, 8], [4, 4], [17, 1, 30, 2]]
    model = tiny(4, 2).eval()
    config = SamplingConfig(max_new_tokens=12, temperature=0.0, seed=0)
    ref = generate(with_backend(model, "math"), prompts, config, eos_id=None)
    out = generate(with_backend(model, backend), prompts, config, eos_id=None)
    assert torch.equal(out.tokens, ref.tokens)
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-5, rtol=1e-4)


def test_an_explicit_mask_is_honoured_by_the_cpu_kernels():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = torch.rand(2, 1, 6, 9) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    ref = attend(q, k, v, mask, "math")
    torch.testing.assert_close(attend(q, k, v, mask, "flash"), ref, atol=1e-5, rtol=1e-4)
    keys = k.repeat_interleave(2, dim=1)
    logits = (q @ keys.transpose(-1, -2) / 4.0).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(ref, logits.softmax(-1) @ v.repeat_interleave(2, dim=1), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compiled_blocks_with_flash_match_eager_math():
    """The backend is resolved while tracing and baked in: the compiled graph runs the same kernel choice."""
    ids = torch.randint(0, 96, (2, 32))
    model = tiny(4, 2)
    ref = with_backend(model, "math")(ids)
    with_backend(model, "flash").compile_blocks()
    torch.testing.assert_close(model(ids), ref, atol=2e-5, rtol=1e-4)
