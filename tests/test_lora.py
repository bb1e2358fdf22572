"""LoRA: exact identity at init, frozen base, adapter files, merge/unmerge, the disabled base, fingerprints."""

import math
import re

import pytest
import torch
from torch import nn

from llmkit.errors import LLMKitError
from llmkit.model.config import ModelConfig
from llmkit.model.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    base_fingerprint,
    disable_lora,
    load_lora,
    lora_layers,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    read_lora,
    save_lora,
    unmerge_lora,
)
from llmkit.model.transformer import Transformer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPECTED_NAMES = sorted(
    f"blocks.{i}.{sub}.{t}" for i in range(2) for sub, ts in (("attn", TARGETS[:4]), ("mlp", TARGETS[4:])) for t in ts
)


def tiny(n_streams: int = 4, **kw) -> ModelConfig:
    base = dict(vocab_size=97, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=64, n_streams=n_streams)
    return ModelConfig(**{**base, **kw})


def base_model(seed: int = 0, n_streams: int = 4, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(n_streams, **kw)).eval()


def tokens(seed: int = 0, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B so that the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))


def adapted(seed: int = 0, config: LoRAConfig | None = None, **kw) -> Transformer:
    model = base_model(seed, **kw)
    apply_lora(model, config or LoRAConfig(rank=4, alpha=8.0))
    randomize_b(model)
    return model


@pytest.mark.parametrize("n", [1, 4])
def test_fresh_lora_is_exactly_the_base_model(n):
    model = base_model(n_streams=n)
    idx = tokens()
    base_logits = model(idx)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    names = apply_lora(model, LoRAConfig())

    assert names == EXPECTED_NAMES and len(names) == 14
    assert torch.equal(model(idx), base_logits)
    assert type(model.lm_head) is nn.Linear
    if n > 1:
        for block in model.blocks:
            assert type(block.attn_res.mapping.phi) is nn.Linear and type(block.mlp_res.mapping.phi) is nn.Linear
    lora_keys = {f"{name}.{ab}" for name in names for ab in ("lora_A", "lora_B")}
    assert set(model.state_dict()) == set(base_state) | lora_keys
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    assert set(missing) == lora_keys and unexpected == []
    layer = model.blocks[0].attn.q_proj
    assert layer.lora_A.shape == (16, 32) and layer.lora_B.shape == (32, 16) and layer.scale == 2.0
    assert not torch.equal(layer.lora_A, torch.zeros_like(layer.lora_A)) and layer.lora_A.abs().max() <= 32**-0.5
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


def test_from_linear_shares_the_base_parameters():
    linear = nn.Linear(8, 6, bias=True)
    layer = LoRALinear.from_linear(linear, LoRAConfig(rank=2))
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), linear(x))
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]


def test_targets_select_layers_by_last_name_component():
    model = base_model()
    assert apply_lora(model, LoRAConfig(targets=["q_proj"])) == ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]
    assert list(lora_layers(model)) == ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]
    assert type(model.blocks[0].attn.k_proj) is nn.Linear and type(model.blocks[0].mlp.up_proj) is nn.Linear

    explicit = base_model()
    assert len(apply_lora(explicit, LoRAConfig(targets=["phi"]))) == 4  # 2 blocks x (attn_res, mlp_res)


def test_apply_lora_errors():
    with pytest.raises(LLMKitError, match=r"\['qproj'\].*blocks\.0\.attn\.q_proj"):
        apply_lora(base_model(), LoRAConfig(targets=["qproj"]))
    model = base_model()
    apply_lora(model, LoRAConfig())
    with pytest.raises(LLMKitError, match="already has 14 LoRA layers"):
        apply_lora(model, LoRAConfig())
    with pytest.raises(LLMKitError, match="lm_head.*tok_emb.weight"):
        apply_lora(base_model(tie_embeddings=True), LoRAConfig(targets=["lm_head"]))


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"rank": 0}, "rank"), ({"dropout": 1.0}, "dropout"), ({"targets": []}, "targets"), ({"alpha": -1.0}, "alpha")],
)
def test_invalid_config_is_rejected(kw, message):
    with pytest.raises(LLMKitError, match=message):
        LoRAConfig(**kw)


def test_config_dict_round_trip():
    config = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=["q_proj", "v_proj"])
    assert config.scale == 2.0
    assert LoRAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(LLMKitError, match="unknown LoRA config keys"):
        LoRAConfig.from_dict({"r": 4})
    with pytest.raises(LLMKitError, match="^LoRA config key targets: expected a list of str, got 'q_proj'$"):
        LoRAConfig.from_dict({"targets": "q_proj"})  # said "expected str, got 'q_proj'"
    with pytest.raises(LLMKitError, match="^LoRA config key rank: expected int, got '1e3'$"):  # no float hint
        LoRAConfig.from_dict({"rank": "1e3"})


def test_one_step_trains_only_lora():
    torch.manual_seed(0)
    model = Transformer(tiny()).train()
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    n_trainable = mark_only_lora_trainable(model)
    assert n_trainable == 2 * 4 * ((32 + 32) * 4 + (32 + 64) * 3)  # 2 layers, rank 4, r (in + out) per layer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = tokens(shape=(4, 17))
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    opt.step()

    for name, layer in lora_layers(model).items():
        assert not torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B)), name
    after = model.state_dict()
    for key, value in before.items():
        if not key.endswith((".lora_A", ".lora_B")):
            assert torch.equal(after[key], value), key
    for name, p in model.named_parameters():
        if not name.endswith((".lora_A", ".lora_B")):
            assert p.grad is None and not p.requires_grad, name


def test_save_then_load_into_a_fresh_model_reproduces_the_logits(tmp_path):
    config = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=["q_proj", "v_proj", "down_proj"])
    model = adapted(config=config)
    base_sha = base_fingerprint(model)
    idx = tokens()
    expected = model(idx)
    path = save_lora(model, tmp_path / "adapter.safetensors", config, base_sha)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind

    tensors, read_config, metadata = read_lora(path)
    assert read_config == config
    assert metadata == {
        "format": "llmkit-lora-v1",
        "config": metadata["config"],
        "base_sha256": base_sha,
        "n_layers_adapted": "6",
    }
    assert set(tensors) == set(lora_state_dict(model))

    torch.manual_seed(123)  # another init, then the same base weights
    fresh = Transformer(tiny()).eval()
    fresh.load_state_dict(base_model().state_dict())
    assert load_lora(fresh, path, expected_base_sha256=base_fingerprint(fresh)) == config
    assert len(lora_layers(fresh)) == 6
    assert torch.equal(fresh(idx), expected)

    already = base_model()
    apply_lora(already, config)
    load_lora(already, path)
    assert torch.equal(already(idx), expected)


def test_adapter_for_another_base_is_rejected(tmp_path):
    model = adapted()
    path = save_lora(model, tmp_path / "a.safetensors", LoRAConfig(rank=4, alpha=8.0), base_fingerprint(model))
    other = base_model(seed=1)
    other_sha = base_fingerprint(other)
    message = f"trained on base model {base_fingerprint(model)[:12]} but this base is {other_sha[:12]}"
    with pytest.raises(LLMKitError, match=message):
        load_lora(other, path, expected_base_sha256=other_sha)
    assert lora_layers(other) == {}  # left unchanged


def test_rank_mismatch_names_both_ranks(tmp_path):
    rank8 = adapted(config=LoRAConfig(rank=8))
    path = save_lora(rank8, tmp_path / "r8.safetensors", LoRAConfig(rank=8), base_fingerprint(rank8))
    rank4 = adapted(config=LoRAConfig(rank=4))
    with pytest.raises(LLMKitError, match="rank 8.*rank 4"):
        load_lora(rank4, path)


def test_adapter_for_another_shape_names_the_key(tmp_path):
    wide = adapted(d_model=48)
    path = save_lora(wide, tmp_path / "wide.safetensors", LoRAConfig(rank=4, alpha=8.0), base_fingerprint(wide))
    narrow = base_model()
    with pytest.raises(LLMKitError, match=r"blocks\.0\.attn\.k_proj\.lora_A has shape \(4, 48\).*needs \(4, 32\)"):
        load_lora(narrow, path)
    assert lora_layers(narrow) == {}


def test_unreadable_adapter_files_name_the_path(tmp_path):
    model = base_model()
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(LLMKitError, match=re.escape(str(missing)) + " does not exist; pass a TTT-Discover run's "
                                          r"adapters/step_N\.safetensors, or a file written by llmkit\.model"):
        load_lora(model, missing)  # where adapters come from, in words a CLI user knows
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(LLMKitError, match=re.escape(str(garbage)) + ".*not a safetensors file"):
        read_lora(garbage)
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(LLMKitError, match=re.escape(str(plain)) + ".*llmkit-lora-v1"):
        read_lora(plain)


def test_an_adapter_holding_nan_is_refused_naming_its_tensor(tmp_path):
    """A damaged adapter loaded, merged (`llmkit lora merge` wrote a NaN checkpoint, rc 0) and sampled from."""
    model = adapted()
    path = save_lora(model, tmp_path / "a.safetensors", LoRAConfig(rank=4, alpha=8.0), base_fingerprint(model))
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["blocks.1.mlp.up_proj.lora_B"][0, 0] = math.inf
    save_file(tensors, str(path), metadata=metadata)
    message = f"LoRA adapter {path}: blocks.1.mlp.up_proj.lora_B holds NaN or infinite values; the file is damaged " \
              "or its run diverged: pass an earlier adapter"
    with pytest.raises(LLMKitError, match=f"^{re.escape(message)}$"):
        load_lora(base_model(), path)


def test_save_refuses_models_it_cannot_describe(tmp_path):
    path = tmp_path / "a.safetensors"
    base = base_model()
    with pytest.raises(LLMKitError, match="no LoRA layers"):
        save_lora(base, path, LoRAConfig(), base_fingerprint(base))
    model = adapted()
    sha = base_fingerprint(model)
    with pytest.raises(LLMKitError, match="rank 16.*rank 4"):
        save_lora(model, path, LoRAConfig(), sha)
    merge_lora(model)
    with pytest.raises(LLMKitError, match="merged"):
        save_lora(model, path, LoRAConfig(rank=4, alpha=8.0), sha)
    assert not path.exists()


@pytest.mark.parametrize("n", [1, 4])
def test_merge_and_unmerge(n):
    base = base_model(n_streams=n)
    idx = tokens()
    base_logits = base(idx)
    model = adapted(n_streams=n)
    wrapped = model(idx)
    assert (wrapped - base_logits).abs().max() > 1e-3  # the adapter matters
    weights = {name: layer.weight.detach().clone() for name, layer in lora_layers(model).items()}

    merge_lora(model)
    merged_weights = {name: layer.weight.detach().clone() for name, layer in lora_layers(model).items()}
    # W0 + s B A folded in fp32 differs from W0 x + s B (A x) by float rounding only (~1e-7 here): 1e-5 on logits < 1.
    assert torch.allclose(model(idx), wrapped, atol=1e-5)
    assert all(layer.merged for layer in lora_layers(model).values())
    merge_lora(model)  # already merged: no-op
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.weight, merged_weights[name]), name
        assert not torch.equal(layer.weight, weights[name]), name

    unmerge_lora(model)
    unmerge_lora(model)  # already unmerged: no-op
    for name, layer in lora_layers(model).items():
        assert torch.allclose(layer.weight, weights[name], atol=1e-6), name  # float32 rounding, not bit-exact
    assert torch.allclose(model(idx), wrapped, atol=1e-5)


def test_disable_lora_gives_the_base_logits_exactly():
    model = base_model()
    idx = tokens()
    base_logits = model(idx)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    randomize_b(model)
    wrapped = model(idx)
    assert not torch.equal(wrapped, base_logits)

    with disable_lora(model):
        assert torch.equal(model(idx), base_logits)
        with disable_lora(model):
            pass
        assert not any(layer.enabled for layer in lora_layers(model).values())  # inner exit restores "disabled"
    assert all(layer.enabled for layer in lora_layers(model).values())
    assert torch.equal(model(idx), wrapped)

    with pytest.raises(RuntimeError, match="boom"), disable_lora(model):
        raise RuntimeError("boom")
    assert all(layer.enabled for layer in lora_layers(model).values())

    merge_lora(model)
    with pytest.raises(LLMKitError, match="merged.*unmerge_lora"), disable_lora(model):
        pass


def test_base_fingerprint_identifies_the_base_weights(tmp_path):
    a = base_model()
    torch.manual_seed(7)
    b = Transformer(tiny())
    assert base_fingerprint(a) != base_fingerprint(b)
    b.load_state_dict(a.state_dict())
    assert base_fingerprint(b) == base_fingerprint(a)

    torch.save(a.state_dict(), tmp_path / "base.pt")
    c = base_model(seed=3)
    c.load_state_dict(torch.load(tmp_path / "base.pt", weights_only=True))
    assert base_fingerprint(c) == base_fingerprint(a)

    apply_lora(c, LoRAConfig())
    randomize_b(c)
    assert base_fingerprint(c) == base_fingerprint(a)  # adapters are not part of the base

    with torch.no_grad():
        c.blocks[1].mlp.up_proj.weight[3, 5] += 1e-3
    assert base_fingerprint(c) != base_fingerprint(a)

    merge_lora(c)
    with pytest.raises(LLMKitError, match="merged"):
        base_fingerprint(c)


@pytest.mark.parametrize("n", [1, 4])
def test_lora_gradients_flow_through_gradient_checkpointing(n):
    grads = []
    for checkpointing in (False, True):
        model = adapted(n_streams=n, gradient_checkpointing=checkpointing).train()
        mark_only_lora_trainable(model)
        idx = tokens(shape=(2, 13))
        model.loss(idx[:, :-1], idx[:, 1:]).backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    plain, ckpt = grads
    assert set(ckpt) == set(lora_state_dict(model)) and len(ckpt) == 28
    for name, grad in ckpt.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name
        assert torch.allclose(grad, plain[name], atol=1e-6), name


def test_lora_on_the_mhc_projection_phi_changes_the_mapping_trains_and_merges():
    """targets: [phi] adapts the mHC mapping's projection: the op reads phi's weight, so the adapter's
    term must be added to the projection (it was silently dropped once)."""
    base = base_model()
    idx = tokens()
    model = adapted(config=LoRAConfig(rank=2, alpha=4.0, targets=["phi"]))
    with torch.no_grad():  # alpha_init 0.01 would scale the adapter's effect on the mapping down 100x
        for m in (base, model):
            for name, p in m.named_parameters():
                if ".alpha_" in name:
                    p.fill_(1.0)
    layers = lora_layers(model)
    assert sorted(layers) == [f"blocks.{i}.{r}_res.mapping.phi" for i in range(2) for r in ("attn", "mlp")]
    wrapped = model(idx)
    assert (wrapped - base(idx)).abs().max() > 1e-3  # the adapter matters
    with disable_lora(model):
        assert torch.equal(model(idx), base(idx))

    model.train()
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    for name, layer in layers.items():
        assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().max() > 0, name
        assert layer.lora_B.grad.abs().max() > 0, name
    model.eval()
    merge_lora(model)
    assert torch.allclose(model(idx), wrapped, atol=1e-5)
