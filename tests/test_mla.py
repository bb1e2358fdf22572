"""Multi-head latent attention (attention: mla; llmkit/model/mla.py): the cached decode over the latent
cache (absorbed and not) equals the full forward, the cache is the size the config implies, RoPE
touches only the decoupled key shared by all heads, and MLA trains, compiles, checkpoints and takes
LoRA like the standard attention."""

from pathlib import Path

import pytest
import torch

from llmkit.errors import LLMKitError
from llmkit.model.checkpoint import load_backbone, write_backbone_checkpoint
from llmkit.model.config import MLAConfig, ModelConfig
from llmkit.model.generation import SamplingConfig, generate, left_pad, padded_attention_mask
from llmkit.model.kv_cache import KVCache
from llmkit.model.layers import CausalSelfAttention, rope_cache
from llmkit.model.lora import LoRAConfig, apply_lora, merge_lora
from llmkit.model.mhc import finish
from llmkit.model.mla import MultiHeadLatentAttention
from llmkit.model.transformer import Transformer

V = 97
# fp32 on CPU: cached, absorbed and full forwards differ only in summation order; measured max
# |diff| ~1e-6 on these models, asserted at 1e-4 (1e-5 between the two decode forms).
ATOL = 1e-4
NOPE, ROPE, VDIM, LATENT = 8, 4, 6, 16  # v_head_dim != nope + rope: the unequal-head path is always on
PROMPTS = [[5, 17, 3, 44, 9, 12, 80], [7], [60, 61, 62, 63]]
ROOT = Path(__file__).resolve().parents[1]


def mla_config(n_streams: int = 1, q_lora_rank: int | None = None, v_head_dim: int = VDIM, **kw) -> ModelConfig:
    mla = MLAConfig(kv_lora_rank=LATENT, q_lora_rank=q_lora_rank, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE,
                    v_head_dim=v_head_dim)
    return ModelConfig(vocab_size=V, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=64, n_streams=n_streams,
                       attention="mla", mla=mla, **kw)


def model_for(n_streams: int = 1, q_lora_rank: int | None = None, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(mla_config(n_streams, q_lora_rank, **kw)).eval()


def set_absorb(model: Transformer, absorb: bool) -> Transformer:
    for block in model.blocks:
        block.attn.absorb = absorb
    return model


def cached_steps(model: Transformer, follow: torch.Tensor) -> list[torch.Tensor]:
    """Logits [B, V] of the left-padded PROMPTS' prefill, then of each of ``follow``'s tokens but
    the last fed one at a time through the KV cache."""
    ids, pad = left_pad(PROMPTS, pad_id=0, device=torch.device("cpu"))
    B, P = ids.shape
    S = P + follow.size(1)
    cache = KVCache(model.config, B, S, torch.device("cpu"), torch.float32)
    cols = torch.arange(P)
    positions = (cols - pad[:, None]).clamp(min=0)
    with torch.no_grad():
        steps = [model(ids, positions, padded_attention_mask(pad, cols, S), cache, cols)[:, -1]]
        for t in range(follow.size(1) - 1):
            slot = torch.tensor([P + t])
            steps.append(model(follow[:, t : t + 1], slot - pad[:, None], padded_attention_mask(pad, slot, S),
                               cache, slot)[:, -1])
    return steps


FOLLOW = torch.randint(0, V, (len(PROMPTS), 6), generator=torch.Generator().manual_seed(1))


def test_mla_layers_carry_deepseeks_names():
    full = dict(model_for().blocks[0].attn.named_parameters())
    low = dict(model_for(q_lora_rank=12).blocks[0].attn.named_parameters())
    H = 4
    assert {k: tuple(v.shape) for k, v in full.items()} == {
        "q_proj.weight": (H * (NOPE + ROPE), 32),
        "kv_a_proj_with_mqa.weight": (LATENT + ROPE, 32),
        "kv_a_layernorm.weight": (LATENT,),
        "kv_b_proj.weight": (H * (NOPE + VDIM), LATENT),
        "o_proj.weight": (32, H * VDIM),
    }
    assert {k for k in low if k.startswith("q_")} == {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"}
    assert tuple(low["q_a_proj.weight"].shape) == (12, 32) and tuple(low["q_b_proj.weight"].shape) == (48, 12)
    assert isinstance(Transformer(ModelConfig(vocab_size=V, n_layers=1, d_model=32, n_heads=4, d_ff=64,
                                              max_seq_len=16)).blocks[0].attn, CausalSelfAttention)


@pytest.mark.parametrize("n_streams", [1, 4])
@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_cached_decoding_matches_a_full_forward(n_streams, q_lora_rank, monkeypatch):
    """Prefill left-padded prompts, then feed tokens one at a time through the latent cache: every
    step's logits equal the full forward over that row's unpadded tokens, and every decode step of
    every layer went through the absorbed form."""
    model = model_for(n_streams, q_lora_rank)
    absorbed = []
    original = MultiHeadLatentAttention.absorbed_attention

    def spy(self, *args):
        absorbed.append(args[0].shape)
        return original(self, *args)

    monkeypatch.setattr(MultiHeadLatentAttention, "absorbed_attention", spy)
    steps = cached_steps(model, FOLLOW)
    assert len(absorbed) == model.config.n_layers * (FOLLOW.size(1) - 1)
    for row, prompt in enumerate(PROMPTS):
        full = model(torch.tensor([prompt + FOLLOW[row].tolist()]))[0]
        for t, logits in enumerate(steps):
            torch.testing.assert_close(logits[row], full[len(prompt) - 1 + t], atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_streams", [1, 4])
@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_greedy_generation_follows_the_full_forward_and_rows_match_alone(n_streams, q_lora_rank):
    model = model_for(n_streams, q_lora_rank)
    config = SamplingConfig(max_new_tokens=4, temperature=0)
    batch = generate(model, PROMPTS, config, eos_id=None)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], config, eos_id=None)
        assert torch.equal(batch.tokens[row], alone.tokens[0])
        torch.testing.assert_close(batch.logprobs[row], alone.logprobs[0], atol=ATOL, rtol=0)
        seq = list(prompt)
        for _ in range(4):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert batch.tokens[row].tolist() == seq[len(prompt) :]


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_absorbed_decode_equals_the_non_absorbed_decode(q_lora_rank):
    model = model_for(4, q_lora_rank)
    absorbed = cached_steps(set_absorb(model, True), FOLLOW)
    plain = cached_steps(set_absorb(model, False), FOLLOW)
    for a, b in zip(absorbed, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    config = SamplingConfig(max_new_tokens=8, temperature=0)
    a = generate(set_absorb(model, True), PROMPTS, config, eos_id=None)
    b = generate(set_absorb(model, False), PROMPTS, config, eos_id=None)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    cache = KVCache(config, 1, 1, torch.device("meta"), dtype)
    return sum(b.numel() * b.element_size() for b in cache.buffers())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cache_holds_only_the_latent_and_the_shared_rope_key(dtype):
    config = mla_config()
    cache = KVCache(config, 3, 10, torch.device("cpu"), dtype)
    assert list(dict(cache.named_buffers())) == [f"{name}_{i}" for i in range(config.n_layers)
                                                 for name in ("latent", "k_rope")]
    assert cache.max_len == 10
    latent, k_rope = cache.layer(1)
    assert latent.shape == (3, 10, LATENT) and k_rope.shape == (3, 10, ROPE)
    assert latent is cache.latent_1 and k_rope is cache.k_rope_1  # the buffers: writes go into the cache
    size = torch.finfo(dtype).bits // 8
    assert cache_bytes_per_token(config, dtype) == (LATENT + ROPE) * config.n_layers * size
    mha = ModelConfig(**{**config.to_dict(), "attention": "mha", "mla": {}})
    assert cache_bytes_per_token(mha, dtype) == 2 * 4 * 8 * config.n_layers * size


def test_the_cache_sizes_of_the_docs_table():
    """docs/attention.md: the 350m shape (24 layers, 16 heads of 64) per token in bf16, with MHA, GQA
    (4 KV heads) and MLA at the report's sizes (d_c = 4 d_h = 256, d_h^R = d_h / 2 = 32)."""
    shape = ModelConfig.from_yaml(ROOT / "configs/model/350m.yaml").to_dict()
    mha = ModelConfig(**shape)
    gqa = ModelConfig(**{**shape, "n_kv_heads": 4})
    mla = ModelConfig(**{**shape, "attention": "mla", "mla": MLAConfig(kv_lora_rank=256, qk_nope_head_dim=64,
                                                                        qk_rope_head_dim=32, v_head_dim=64)})
    sizes = [cache_bytes_per_token(c, torch.bfloat16) for c in (mha, gqa, mla)]
    assert sizes == [98304, 24576, 13824]  # 96 KiB, 24 KiB, 13.5 KiB


def test_changing_a_later_token_never_changes_earlier_logits():
    model = model_for(4, 12)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[:, 7] = (ids[:, 7] + 1) % V
    a, b = model(ids), model(changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_rope_rotates_only_the_decoupled_key_which_all_heads_share(monkeypatch):
    """The q and k handed to the attention kernel at positions 0.. and 9..: the non-RoPE halves do
    not depend on the position, the RoPE halves do, and every head's RoPE key is the same."""
    import llmkit.model.mla as mla

    attn = model_for().blocks[0].attn
    seen = []
    monkeypatch.setattr(mla, "attend", lambda q, k, v, mask, backend: seen.append((q, k)) or torch.zeros_like(v))
    x = torch.randn(2, 5, 32)
    cos, sin = rope_cache(32, ROPE, 10000.0)
    with torch.no_grad():
        attn(x, cos[:5], sin[:5])
        attn(x, cos[9:14], sin[9:14])
    (q0, k0), (q9, k9) = seen
    assert q0.shape == k0.shape == (2, 4, 5, NOPE + ROPE)
    assert torch.equal(q0[..., :NOPE], q9[..., :NOPE]) and torch.equal(k0[..., :NOPE], k9[..., :NOPE])
    assert not torch.allclose(q0[..., NOPE:], q9[..., NOPE:]) and not torch.allclose(k0[..., NOPE:], k9[..., NOPE:])
    for k in (k0, k9):
        assert torch.equal(k[..., NOPE:], k[:, :1, :, NOPE:].expand_as(k[..., NOPE:]))
    assert not torch.allclose(k0[:, 0, :, :NOPE], k0[:, 1, :, :NOPE])  # the per-head keys differ
    # RoPE is relative: the scores do not change when every position moves by 9
    torch.testing.assert_close(q0 @ k0.transpose(-1, -2), q9 @ k9.transpose(-1, -2), atol=1e-6, rtol=1e-5)


def loss_and_grads(model: Transformer, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("n_streams", [1, 4])
@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_every_mla_parameter_gets_a_gradient_and_checkpointing_keeps_them(n_streams, q_lora_rank):
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(3))
    model = model_for(n_streams, q_lora_rank).train()
    loss, grads = loss_and_grads(model, ids)
    attn = {n: g for n, g in grads.items() if ".attn." in n}
    assert len(attn) == 2 * (5 if q_lora_rank is None else 7)
    for name, g in attn.items():
        assert g.abs().sum() > 0, name
    checkpointed = Transformer(mla_config(n_streams, q_lora_rank, gradient_checkpointing=True)).train()
    checkpointed.load_state_dict(model.state_dict())
    loss_c, grads_c = loss_and_grads(checkpointed, ids)
    assert torch.equal(loss, loss_c)
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "flash"])
@pytest.mark.parametrize("v_head_dim", [VDIM, 20])
def test_every_cpu_backend_matches_math_with_unequal_head_sizes(backend, v_head_dim):
    """SDPA's flash kernel takes only equal q/k/v head sizes: MLA pads (value narrower, 6 < 12, or
    wider, 20 > 12) and gets math's logits and gradients."""
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(4))
    model = model_for(4, v_head_dim=v_head_dim).train()
    model.config.attention_backend = "math"
    ref, ref_grads = model(ids), loss_and_grads(model, ids)[1]
    model.config.attention_backend = backend
    torch.testing.assert_close(model(ids), ref, atol=2e-5, rtol=1e-4)
    for name, g in loss_and_grads(model, ids)[1].items():
        torch.testing.assert_close(g, ref_grads[name], atol=2e-6, rtol=1e-3)


def test_bf16_autocast_forward_and_cached_decode():
    model = model_for(4, 12)
    ids = torch.tensor([PROMPTS[0] + FOLLOW[0].tolist()])
    ref = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
        steps = cached_steps(model, FOLLOW)
        gen = generate(model, PROMPTS, SamplingConfig(max_new_tokens=4, temperature=0), eos_id=None)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    P = len(PROMPTS[0])
    for t, logits in enumerate(steps):
        assert (logits[0] - out[0, P - 1 + t]).abs().max() < 0.05 * ref.abs().max()
    assert gen.tokens.shape == (3, 4) and torch.isfinite(gen.logprobs).all()


def test_a_block_compiles_without_graph_breaks():
    """Dynamo traces a whole block in one graph (fullgraph=True): training with and without
    gradient checkpointing, a masked prefill into the cache and an absorbed decode step."""
    torch._dynamo.reset()
    for checkpointing in (False, True):
        model = model_for(4, 12, gradient_checkpointing=checkpointing).train()
        block = model.blocks[0]
        compiled = torch.compile(block, fullgraph=True, backend="eager")
        x = torch.randn(2, 9, 4, 32)
        cos, sin = model.rope_cos[:9], model.rope_sin[:9]
        out = compiled(x, cos, sin)
        torch.testing.assert_close(out, block(x, cos, sin))
        finish(out, True).sum().backward()
    model = model_for(4, 12)
    block = model.blocks[0]
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    pad = torch.tensor([0, 3])
    cache = KVCache(model.config, 2, 10, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        cols = torch.arange(9)
        pos = (cols - pad[:, None]).clamp(min=0)
        compiled(torch.randn(2, 9, 4, 32), model.rope_cos[pos], model.rope_sin[pos],
                 padded_attention_mask(pad, cols, 10), cache.layer(0), cols)
        slot = torch.tensor([9])
        x = torch.randn(2, 1, 4, 32)
        args = (x, model.rope_cos[slot - pad[:, None]], model.rope_sin[slot - pad[:, None]],
                padded_attention_mask(pad, slot, 10), cache.layer(0), slot)
        torch.testing.assert_close(compiled(*args), block(*args))
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_blocks_and_compiled_decode_match_eager():
    """Inductor (C++ on CPU): compiled blocks give eager's logits, a compiled decode step eager's tokens."""
    model = model_for(4, 12)
    ids = torch.randint(0, V, (2, 16))
    ref = model(ids)
    eager = generate(model, PROMPTS, SamplingConfig(max_new_tokens=4, temperature=0), eos_id=None)
    torch._dynamo.reset()
    compiled = generate(model, PROMPTS, SamplingConfig(max_new_tokens=4, temperature=0, compile=True), eos_id=None)
    assert torch.equal(eager.tokens, compiled.tokens)
    model.compile_blocks()
    torch.testing.assert_close(model(ids), ref, atol=2e-5, rtol=1e-4)
    torch._dynamo.reset()


def test_a_checkpoint_round_trip_rebuilds_mla(tmp_path):
    model = model_for(4, 12)
    write_backbone_checkpoint(tmp_path / "mla.ckpt", model.config, model.state_dict())
    loaded = load_backbone(tmp_path / "mla.ckpt")
    assert loaded.config.attention == "mla" and loaded.config.mla == model.config.mla
    ids = torch.randint(0, V, (2, 11))
    assert torch.equal(loaded(ids), model(ids))


def test_lora_on_the_mla_projections_decodes_and_merges_exactly():
    model = model_for(4)
    names = apply_lora(model, LoRAConfig(rank=2, targets=["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]))
    assert names == sorted(f"blocks.{i}.attn.{t}" for i in range(2)
                           for t in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)
    steps = cached_steps(model, FOLLOW)  # the absorbed decode reads kv_b_proj's adapted matrix
    for row, prompt in enumerate(PROMPTS):
        full = model(torch.tensor([prompt + FOLLOW[row].tolist()]))[0]
        for t, logits in enumerate(steps):
            torch.testing.assert_close(logits[row], full[len(prompt) - 1 + t], atol=ATOL, rtol=0)
    ids = torch.randint(0, V, (2, 11))
    before = model(ids)
    merge_lora(model)
    torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=0)
    for row, logits in enumerate(cached_steps(model, FOLLOW)[-1]):
        torch.testing.assert_close(logits, steps[-1][row], atol=ATOL, rtol=0)


@pytest.mark.parametrize("setting", [{"n_kv_heads": 2}, {"attention_bias": True}, {"qk_norm": True}])
def test_mha_only_settings_are_refused_in_one_line(setting):
    with pytest.raises(LLMKitError, match=r"^invalid model config: attention: mla .*apply only to attention: mha$"):
        Transformer(mla_config(**setting))


def test_the_mla_tiny_config_loads_and_runs():
    config = ModelConfig.from_yaml(ROOT / "configs/model/mla_tiny.yaml")
    assert config.attention == "mla" and config.rope_dim == config.mla.qk_rope_head_dim == 32
    assert (config.mla.kv_lora_rank, config.mla.q_lora_rank, config.mla.v_head_dim) == (128, None, 64)
    model = Transformer(ModelConfig(**{**config.to_dict(), "vocab_size": V})).eval()
    assert model(torch.randint(0, V, (1, 8))).shape == (1, 8, V)


def test_flops_count_the_latent_heads_query_key_and_value_widths():
    model = Transformer(mla_config())
    c, mla = model.config, model.config.mla
    attention = 6 * c.n_layers * 16 * c.n_heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim + mla.v_head_dim)
    assert model.flops_per_token(16) == 6 * model.num_params(non_embedding=True) + attention
