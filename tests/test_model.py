"""Backbone: shapes, causality, weight-decay groups, checkpointing, and that it learns."""

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmkit.errors import LLMKitError
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer


def tiny(n_streams: int, **kw) -> ModelConfig:
    base = dict(vocab_size=97, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=64, n_streams=n_streams)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("n", [1, 4])
def test_logits_shape_and_dtype(n):
    model = Transformer(tiny(n))
    logits = model(torch.randint(0, 97, (3, 10)))
    assert logits.shape == (3, 10, 97)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_changing_token_t_never_changes_earlier_logits(n, n_kv_heads):
    torch.manual_seed(0)
    model = Transformer(tiny(n, n_kv_heads=n_kv_heads)).eval()
    idx = torch.randint(0, 97, (2, 16))
    t = 9
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 97
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_n_streams_1_is_the_plain_prenorm_residual():
    model = Transformer(tiny(1)).eval()
    idx = torch.randint(0, 97, (2, 8))
    cos, sin = model.rope_cos[:8], model.rope_sin[:8]
    x = model.tok_emb(idx)
    for block in model.blocks:
        x = x + block.attn(block.attn_norm(x), cos, sin)
        x = x + block.mlp(block.mlp_norm(x))
    expected = model.lm_head(model.norm(x))
    assert torch.allclose(model(idx), expected, atol=1e-6)
    assert not any("stream_emb" in name or "_res" in name for name, _ in model.named_parameters())


def test_streams_start_distinct():
    model = Transformer(tiny(4))
    emb = model.stream_emb
    assert emb.shape == (4, 32)
    assert torch.cdist(emb, emb).triu(1)[torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)].min() > 0


def test_weight_decay_only_on_matrices_and_the_hidden_ones_grouped_for_muon():
    model = Transformer(tiny(4))
    hidden, matrices, rest = model.param_groups(0.1)
    assert hidden["hidden_matrices"] and (hidden["weight_decay"], matrices["weight_decay"], rest["weight_decay"]) == (
        0.1, 0.1, 0.0)
    names = {id(p): name for name, p in model.named_parameters()}

    def named(group: dict) -> set[str]:
        return {names[id(p)] for p in group["params"]}

    assert named(hidden) == {f"blocks.{i}.{part}.weight" for i in range(2)
                             for part in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert named(matrices) == {"tok_emb.weight", "lm_head.weight"} | {
        f"blocks.{i}.{res}_res.mapping.phi.weight" for i in range(2) for res in ("attn", "mlp")}
    for name in ("stream_emb", "norm.weight", "blocks.0.attn_res.mapping.b_res",
                 "blocks.0.attn_res.mapping.alpha_pre", "blocks.1.mlp_norm.weight"):
        assert name in named(rest)
    assert sum(len(g["params"]) for g in (hidden, matrices, rest)) == len(list(model.parameters()))


@pytest.mark.parametrize("n", [1, 4])
def test_gradient_checkpointing_gives_the_same_gradients(n):
    torch.manual_seed(0)
    plain = Transformer(tiny(n))
    ckpt = Transformer(tiny(n, gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 97, (2, 12))
    for model in (plain, ckpt):
        model.loss(idx[:, :-1], idx[:, 1:]).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def block_handoffs(model: Transformer) -> list:
    """Per block, filled by forward hooks: (the storage of the stream it was given, of the stream it
    gave): a Pending's X for mHC, the tensor for the dense residual."""
    def storage(stream) -> int:
        return (stream if isinstance(stream, torch.Tensor) else stream.x).untyped_storage().data_ptr()

    calls = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: calls.append((storage(args[0]), storage(out))))
    return calls


def handed_on(calls: list) -> list[tuple[int, int]]:
    """(the storage block i gave, the storage block i + 1 took) for each pair of consecutive blocks in
    :func:`block_handoffs`' calls of one forward."""
    return [(gave, calls[i + 1][0]) for i, (_, gave) in enumerate(calls[:-1])]


@pytest.mark.parametrize("n", [1, 4])
def test_blocks_replaying_cuda_graphs_hand_on_copies_where_no_backward_is_pending(n, monkeypatch):
    """compile_blocks in a mode with CUDA graphs: where no backward is pending (no grad: validation,
    sampling) the forward gives each block a copy of the previous block's output, which the next
    block's graph would otherwise overwrite (PyTorch issue 152887); in training (a backward
    pending) and in modes without CUDA graphs the blocks hand on their outputs themselves. The
    blocks stay eager here (the graphs' overwriting happens only on a GPU: tests/test_gpu.py)."""
    from llmkit.model.transformer import Block

    monkeypatch.setattr(Block, "compile", lambda self, **kw: None)
    torch.manual_seed(0)
    model = Transformer(tiny(n, n_layers=3))
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        expected = model(idx)
    for mode, graphs in ((None, False), ("default", False), ("max-autotune-no-cudagraphs", False),
                         ("reduce-overhead", True), ("max-autotune", True)):
        model.compile_blocks(mode)
        assert model.blocks_replay_cuda_graphs is graphs, mode
    calls = block_handoffs(model)
    with torch.no_grad():
        assert torch.equal(model(idx), expected)
    handed = handed_on(calls)
    assert len(handed) == 2 and all(gave != took for gave, took in handed)  # copies
    calls.clear()
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    assert all(gave == took for gave, took in handed_on(calls))  # training: the outputs themselves
    model.compile_blocks("default")
    calls.clear()
    with torch.no_grad():
        model(idx)
    assert all(gave == took for gave, took in handed_on(calls))


def test_sequence_longer_than_max_seq_len_is_rejected():
    model = Transformer(tiny(1))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_invalid_config_names_every_problem():
    with pytest.raises(LLMKitError, match="n_streams must be >= 1.*divisible by n_heads"):
        ModelConfig(d_model=30, n_heads=4, n_streams=0)


@pytest.mark.parametrize(("values", "says"), [
    ({"n_heads": 0}, "n_heads must be >= 1, got 0"),  # was a ZeroDivisionError
    ({"n_kv_heads": -4}, "n_kv_heads must be >= 1, got -4"),  # was a negative dimension deep in torch
    ({"mhc": {"sinkhorn_iters": 0}}, "mhc.sinkhorn_iters must be >= 1"),  # H_res rows summed to 7.8
    ({"mhc": {"sinkhorn_eps": -1.0}}, "mhc.sinkhorn_eps must be > 0, got -1.0"),
    ({"mhc": {"sinkhorn_clamp": 0.0}}, "mhc.sinkhorn_clamp must be in (0, 80], got 0.0"),
    ({"mhc": {"sinkhorn_clamp": 100.0}}, "mhc.sinkhorn_clamp must be in (0, 80]"),  # H_res and the logits were NaN
    ({"mhc": {"sinkhorn_iter": 3}}, "unknown mhc keys ['sinkhorn_iter']"),  # was a TypeError
    ({"norm_eps": 0.0}, "norm_eps and rope_theta must be > 0"),
    ({"n_streams": 9}, "n_streams must be at most 8"),  # trained on CPU, failed at a GPU's first forward
    ({"moe": {"n_experts": 4, "top_k": 2, "aux_loss_weight": -0.01}}, "moe.aux_loss_weight must be >= 0"),
    ({"moe": {"n_experts": 4, "top_k": 2, "bias_update_rate": math.nan}}, "moe.bias_update_rate must be >= 0"),
    ({"n_layers": 4, "moe": {"n_experts": 4, "top_k": 2, "first_dense": 9}}, "leaves no MoE layer among the 4"),
    ({"attention": "mla", "mla": {"kv_lora_rank": 0, "qk_rope_head_dim": 3}},  # was one message naming neither
     "mla.kv_lora_rank must be >= 1, got 0; mla.qk_rope_head_dim must be even (RoPE rotates pairs), got 3"),
    # a value of another type in a config.json or hparams.yaml: TypeErrors from the checks or from torch
    ({"n_layers": "4"}, "model config key n_layers: expected int, got '4'"),
    ({"d_model": 32.5}, "model config key d_model: expected int, got 32.5"),
    ({"n_streams": None}, "model config key n_streams: expected int, got None"),
    ({"n_kv_heads": "x"}, "model config key n_kv_heads: expected int or null, got 'x'"),
    ({"moe": "yes"}, "model config key moe: expected a mapping, got 'yes'"),
    ({"moe": {"n_experts": "eight"}}, "moe key n_experts: expected int, got 'eight'"),
    ({"norm_eps": "1e-5"}, "model config key norm_eps: expected float, got '1e-5' (YAML reads 1e-5 as text: write "
                           "1.0e-5)"),
])
def test_a_setting_that_would_break_the_model_or_its_math_is_one_clear_error(values, says):
    with pytest.raises(LLMKitError, match=re.escape(says)):
        ModelConfig.from_dict({"vocab_size": 64, "n_layers": 2, "d_model": 32, "n_heads": 4, **values})


def test_an_mla_model_takes_any_head_dim():
    """MLA's heads have their own sizes (mla.*): head_dim, unused, is not held to RoPE's evenness, nor
    d_model to a multiple of n_heads (48 over 5 heads was refused "unless head_dim is set")."""
    config = ModelConfig(vocab_size=64, n_layers=1, d_model=30, n_heads=2, attention="mla")
    assert config.head_dim == 15 and config.rope_dim == config.mla.qk_rope_head_dim
    Transformer(ModelConfig(vocab_size=64, n_layers=1, d_model=48, n_heads=5, d_ff=64, attention="mla"))


def test_a_head_count_that_does_not_divide_d_model_is_one_problem_not_two():
    with pytest.raises(LLMKitError) as e:
        ModelConfig(d_model=256, n_heads=5)
    assert str(e.value) == "invalid model config: d_model (256) must be divisible by n_heads (5) unless head_dim is set"


@pytest.mark.parametrize(("values", "says"), [
    ({"mla": {"kv_lora_rank": 64}}, "mla.kv_lora_rank set, but attention is mha: the mla section is unused"),
    ({"moe": {"top_k": 1, "router": "hash"}},
     "moe.top_k, moe.router set, but moe.n_experts is 0 (a dense model): the moe section is unused"),
])
def test_settings_of_a_section_the_model_does_not_use_are_a_warning(values, says):
    with pytest.warns(UserWarning, match=f"^{re.escape(says)}$"):
        ModelConfig(**values)


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 4])
def test_tiny_model_learns_a_repeated_corpus(n):
    """Loss on a small repeated sequence falls from ~ln(V) to well under 1 nat in 150 steps."""
    torch.manual_seed(0)
    model = Transformer(tiny(n, vocab_size=64))
    seq = torch.randint(0, 64, (1, 33)).repeat(8, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model.loss(seq[:, :-1], seq[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5  # about ln(64) = 4.16 at init
    assert loss.item() < 0.5


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs" / "model").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_model_config_builds_on_the_meta_device(path):
    """Every configs/model/*.yaml parses and builds (on the meta device: no memory), and its
    active parameters never exceed its parameters."""
    config = ModelConfig.from_yaml(path)
    with torch.device("meta"):
        model = Transformer(config)
    assert 0 < model.active_params() <= model.num_params()


def test_a_tied_lm_head_counts_in_the_training_flops_as_an_untied_one_does():
    """The head is a V x C matmul whether it is the embedding or not: MFU and the scaling fits'
    compute axis must not drop 6 V C per token for a tied model."""
    untied = ModelConfig(vocab_size=97, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=64)
    tied = replace(untied, tie_embeddings=True)
    with torch.device("meta"):
        dense, shared = Transformer(untied), Transformer(tied)
    assert shared.num_params() == dense.num_params() - 97 * 32
    assert shared.flops_per_token(64) == dense.flops_per_token(64)
    assert dense.flops_per_token(64) == 6 * dense.num_params(non_embedding=True) + 12 * 2 * 32 * 64


def test_summary_names_the_shape_and_counts_the_parameters():
    from llmkit.model.config import MLAConfig, MoEConfig

    dense = Transformer(ModelConfig(vocab_size=100, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                                    max_seq_len=16, n_streams=1))
    # embedding 100 x 32 and head 32 x 100; a block: q, o 32 x 32, k, v 32 x 16, mlp 3 x 32 x 64, 2 norms
    block = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32
    assert dense.num_params() == 2 * 100 * 32 + 2 * block + 32
    assert dense.summary() == ("2 layers, d_model 32, 4 heads (2 kv), one residual stream; "
                               f"{dense.num_params() / 1e6:.2f}M parameters, {(100 * 32 + 2 * block + 32) / 1e6:.2f}M "
                               "without the embedding")
    moe = Transformer(ModelConfig(vocab_size=100, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=16,
                                  n_streams=2, attention="mla", mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8,
                                                                              qk_rope_head_dim=4, v_head_dim=8),
                                  moe=MoEConfig(n_experts=4, top_k=1, expert_dim=16)))
    active = moe.active_params(non_embedding=True)
    assert active < moe.num_params(non_embedding=True)
    assert moe.summary().startswith("2 layers, d_model 32, 4 heads, latent attention (kv rank 16), MoE 4 experts, "
                                    "top-1, mHC 2 streams; ")
    assert moe.summary().endswith(f", {active / 1e6:.2f}M active per token")
