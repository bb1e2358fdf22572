"""Mixture-of-experts feed-forward: routing, balancing, dropless grouped dispatch, integration."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmkit.errors import LLMKitError
from llmkit.model.config import ModelConfig, MoEConfig
from llmkit.model.generation import SamplingConfig, generate
from llmkit.model.lora import LoRAConfig, apply_lora, lora_layers, merge_lora
from llmkit.model.moe import (
    MoEFeedForward,
    end_of_step,
    expert_counts,
    expert_utilization,
    grouped_linear,
    load_balance_std,
    max_min_load,
    moe_layers,
    router_z_loss,
    scale_balancing_loss,
    switch_aux_loss,
)
from llmkit.model.transformer import Transformer


def config(n_streams: int = 1, **moe) -> ModelConfig:
    settings = {"n_experts": 4, "top_k": 2, "expert_dim": 16, **moe}
    return ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=64,
                       n_streams=n_streams, moe=settings)


def layer(seed: int = 0, **moe) -> MoEFeedForward:
    torch.manual_seed(seed)
    module = MoEFeedForward(config(**moe))
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return module


def naive(module: MoEFeedForward, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """sum_k w_k FFN_{e_k}(h), token by token and expert by expert."""
    e = module.experts
    rows = []
    for t in range(h.size(0)):
        acc = torch.zeros_like(h[t])
        for w, k in zip(weights[t], experts[t], strict=True):
            gate, up, down = e.gate_proj.weight[k], e.up_proj.weight[k], e.down_proj.weight[k]
            acc = acc + w * (down @ (torch.nn.functional.silu(gate @ h[t]) * (up @ h[t])))
        rows.append(acc)
    return torch.stack(rows)


def test_the_switch_router_picks_the_top_k_and_weights_them_by_renormalised_score():
    module = layer()
    h = torch.randn(12, 32)
    weights, experts, _ = module.router(h, None)
    scores = module.router.gate(h).softmax(-1)
    assert torch.equal(experts, scores.topk(2, -1).indices)
    expected = scores.gather(-1, experts)
    torch.testing.assert_close(weights, expected / expected.sum(-1, keepdim=True))
    sigmoid = layer(score="sigmoid")
    weights, experts, _ = sigmoid.router(h, None)
    assert torch.equal(experts, sigmoid.router.gate(h).sigmoid().topk(2, -1).indices)
    torch.testing.assert_close(weights.sum(-1), torch.ones(12))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_a_top_1_switch_router_weights_by_the_score_and_learns_from_the_task_loss(score):
    """Renormalised, a single expert's weight is s / s = 1: the router's gradient from the task was
    1.8e-7 at top-1 against 1.46 at top-2 (Switch Transformer weights by the score itself)."""
    module = layer(top_k=1, score=score, aux_loss_weight=0.0)
    h = torch.randn(12, 32)
    weights, experts, _ = module.router(h, None)
    logits = module.router.gate(h)
    scores = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    torch.testing.assert_close(weights, scores.gather(-1, experts))
    module(h, None)[0].square().sum().backward()
    assert module.router.gate.weight.grad.norm() > 1e-2


def test_the_router_chooses_on_fp32_logits_under_bf16_autocast():
    module = layer(n_experts=16, score="sigmoid")
    torch.nn.init.normal_(module.router.gate.weight, std=0.02)  # the init: close scores
    h = torch.randn(4096, 32)
    with torch.autocast("cpu", torch.bfloat16):
        weights, experts, _ = module.router(h, None)
    assert weights.dtype == torch.float32
    assert torch.equal(experts, module.router(h, None)[1])  # a bf16 gate chose other experts for 1% of them


@pytest.mark.parametrize("router", ["hash", "switch"])
def test_a_padded_training_forward_balances_and_counts_only_its_real_tokens(router):
    """Fine-tuning's padded batches (continuation_logits) routed their padding too: 240 assignments
    counted for 128 real ones, all the pads on two experts, and the pads in the balancing loss."""
    from llmkit.model.generation import continuation_logits

    torch.manual_seed(0)
    model = Transformer(config(router=router, n_experts=8, z_loss_weight=0.0 if router == "hash" else 1e-3)).train()
    contexts, continuations = [list(range(10, 40)), [5, 6]], [[7, 8], list(range(40, 62))]
    continuation_logits(model, contexts, continuations)
    padded = [layer.router.load.clone() for layer in moe_layers(model)]
    for layer in moe_layers(model):
        layer.router.load.zero_()
    for context, continuation in zip(contexts, continuations, strict=True):  # each row alone: no padding
        model(torch.tensor([context + continuation]))
    assert [layer.router.load.tolist() for layer in moe_layers(model)] == [load.tolist() for load in padded]
    assert padded[0].sum() == 2 * (32 + 24)


def test_the_balancing_losses_over_real_tokens_are_those_of_the_real_tokens_alone():
    torch.manual_seed(0)
    logits = torch.randn(10, 4)
    probs, experts = logits.softmax(-1), logits.topk(2, -1).indices
    real = torch.tensor([True] * 6 + [False] * 4)
    assert switch_aux_loss(probs, experts, 4, real).item() == pytest.approx(
        switch_aux_loss(probs[real], experts[real], 4).item())
    assert router_z_loss(logits, real).item() == pytest.approx(router_z_loss(logits[real]).item())
    assert expert_counts(experts, 4, real).tolist() == expert_counts(experts[real], 4).tolist()


def test_the_hash_router_is_a_fixed_function_of_the_token_with_at_most_two_distinct_experts():
    module = layer(router="hash", n_experts=8)
    assert not any(name.startswith("router.") for name, _ in module.named_parameters())  # nothing learned
    ids = torch.arange(64)
    a = module.router.hash_experts(ids)
    b = module.router.hash_experts(ids.flip(0)).flip(0)
    assert torch.equal(a, b) and a.shape == (64, 2) and (a[:, 0] != a[:, 1]).all()
    assert len(torch.unique(a)) == 8  # the hash spreads tokens over every expert
    weights, experts, loss = module.router(torch.randn(64, 32), ids)
    assert torch.equal(experts, a) and (weights == 0.5).all() and loss.item() == 0.0
    with pytest.raises(Exception, match="moe.top_k must be 1 or 2"):
        MoEConfig(n_experts=8, top_k=3, router="hash")
    for ignored in ({"bias_update_rate": 1e-3}, {"z_loss_weight": 1e-3}):  # it would silently do nothing
        with pytest.raises(LLMKitError, match="the hash router has no learned gate to balance: moe.bias_update_rate "
                                              "and z_loss_weight must be 0 with it"):
            MoEConfig(n_experts=8, router="hash", **ignored)


def test_the_aux_loss_is_the_switch_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.6, 0.2, 0.1], [0.5, 0.1, 0.1, 0.3]])
    experts = torch.tensor([[0, 1], [1, 2], [0, 3]])
    f = torch.tensor([2, 2, 1, 1]) / 6  # assignments per expert over the 6 (token, slot) pairs
    p = probs.mean(0)
    assert switch_aux_loss(probs, experts, 4).item() == pytest.approx(4 * float((f * p).sum()))
    uniform = torch.full((8, 4), 0.25)
    assert switch_aux_loss(uniform, torch.arange(16).reshape(8, 2) % 4, 4).item() == pytest.approx(1.0)


def test_the_aux_loss_gradient_reaches_the_router_and_its_value_is_kept():
    module = layer(aux_loss_weight=0.5)
    h = torch.randn(10, 32, requires_grad=True)
    (module(h[None]) * 0).sum().backward()  # the only gradient is the balancing loss's
    grad = module.router.gate.weight.grad.clone()
    module.zero_grad()
    logits = module.router.gate(h.detach())
    experts = logits.softmax(-1).topk(2, -1).indices
    (0.5 * switch_aux_loss(logits.softmax(-1), experts, 4)).backward()
    torch.testing.assert_close(grad, module.router.gate.weight.grad)
    assert module.aux_loss.item() == pytest.approx(0.5 * switch_aux_loss(logits.softmax(-1), experts, 4).item())
    # the module weighs it as it weighs its cross-entropy: 1/accumulation for a mean, the tokens for a sum
    for scale in (0.25, 37.0, 0.0):
        module.zero_grad()
        scale_balancing_loss(module, scale)
        (module(h[None]) * 0).sum().backward()
        torch.testing.assert_close(module.router.gate.weight.grad, scale * grad)


def test_aux_loss_free_balancing_evens_out_a_skewed_router():
    """DeepSeek-V3's sign update with sigmoid scores, no auxiliary loss and no training: the bias
    alone takes a router that sends (nearly) every token to expert 0 to an even load."""
    module = layer(bias_update_rate=0.01, aux_loss_weight=0.0, score="sigmoid")
    torch.manual_seed(1)
    favourite = module.router.gate.weight[0].detach()
    h = torch.randn(256, 32) + 3 * favourite / favourite.norm()  # expert 0 scores highest for most tokens
    loads = []
    for _ in range(150):
        with torch.no_grad():
            module(h[None])
        module.router.add_routed_to_load()  # what the block does after its forward
        end_of_step(module)
        loads.append(load_balance_std(module.router.last_load).item())
    assert loads[0] > 0.13  # expert 0 in almost every token's top 2: shares near 1/2, 1/6, 1/6, 1/6
    assert sum(loads[-20:]) / 20 < 0.03  # near even (a sign update keeps a small oscillation)
    assert module.router.bias[0] < 0 < module.router.bias[1:].min()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_dispatch_equals_a_per_expert_loop_in_values_and_gradients(dtype):
    """float32 takes the matmul-per-expert path, bfloat16 torch._grouped_mm (on the CPU too)."""
    module = layer(n_experts=8, expert_dim=16).to(dtype)
    h = torch.randn(20, 32, dtype=dtype, requires_grad=True)
    weights, experts, _ = module.router(h.float().to(dtype), None)
    weights = weights.detach()
    out = module.experts(h, weights, experts)
    ref_h = h.detach().float().requires_grad_(True)
    ref_module = layer(n_experts=8, expert_dim=16)
    ref_module.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
    ref = naive(ref_module, ref_h, weights, experts)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.05}
    torch.testing.assert_close(out.float(), ref, **tol)
    g = torch.randn_like(ref)
    (out.float() * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(h.grad.float(), ref_h.grad, **tol)
    for name in ("gate_proj", "up_proj", "down_proj"):
        got = getattr(module.experts, name).weight.grad.float()
        torch.testing.assert_close(got, getattr(ref_module.experts, name).weight.grad, **tol)


def test_dropless_dispatch_keeps_every_token_even_when_all_pick_one_expert():
    module = layer(n_experts=4, top_k=1)
    h = torch.randn(9, 32)
    experts = torch.zeros(9, 1, dtype=torch.long)
    weights = torch.ones(9, 1)
    torch.testing.assert_close(module.experts(h, weights, experts), naive(module, h, weights, experts))
    assert expert_counts(experts, 4).tolist() == [9, 0, 0, 0]


def test_metrics_as_functions():
    counts = torch.tensor([4, 4, 4, 4])
    assert load_balance_std(counts).item() == 0.0
    assert expert_utilization(torch.tensor([6, 2, 0, 0])).tolist() == [0.75, 0.25, 0.0, 0.0]
    assert max_min_load(torch.tensor([6, 2, 0, 0])).item() == 6.0 and max_min_load(torch.tensor([6, 2, 3])) == 3.0
    assert load_balance_std(torch.tensor([8, 0, 0, 0])).item() == pytest.approx(torch.tensor(
        [0.75, -0.25, -0.25, -0.25]).square().mean().sqrt().item())


def test_end_of_step_reports_the_step_and_resets_the_loads():
    model = Transformer(config(router="switch"))
    assert end_of_step(model) == {}  # nothing routed yet
    x = torch.randint(0, 64, (2, 16))
    model(x)
    metrics = end_of_step(model)
    assert set(metrics) == {"moe/load_std", "moe/max_min_load", "moe/aux_loss"}
    for moe in moe_layers(model):
        assert moe.router.last_load.sum().item() == 2 * 16 * 2 and moe.router.load.sum().item() == 0
    model.eval()(x)  # validation and generation run in eval mode: not part of a training step's load
    assert end_of_step(model) == {}


@pytest.mark.parametrize("n_streams", [1, 4])
@pytest.mark.parametrize("router", ["switch", "hash"])
def test_cached_generation_equals_the_full_forward(n_streams, router):
    torch.manual_seed(0)
    model = Transformer(config(n_streams, router=router, n_shared=1)).eval()
    prompts = [[3, 5, 7, 9], [11, 2]]
    out = generate(model, prompts, SamplingConfig(max_new_tokens=6, temperature=0), eos_id=None)
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(6):
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out.tokens[row].tolist() == seq[len(prompt):]


def test_layers_every_and_first_dense_and_active_parameters():
    cfg = config(every=2, first_dense=1)
    cfg.n_layers = 4
    model = Transformer(ModelConfig.from_dict(cfg.to_dict()))
    assert [b.uses_moe for b in model.blocks] == [False, True, False, True]
    routed = sum(p.numel() for b in model.blocks if b.uses_moe for p in b.mlp.experts.parameters())
    assert model.num_params() - model.active_params() == routed // 2  # top 2 of 4 experts work per token
    assert model.flops_per_token(16) == 6 * model.active_params(non_embedding=True) + 12 * 4 * 32 * 16


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = config(n_streams=2, n_shared=1)
        cfg.gradient_checkpointing = checkpointing
        model = Transformer(cfg).train()
        x = torch.randint(0, 64, (2, 16))
        model.loss(x[:, :-1], x[:, 1:]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_the_router_bias_is_saved_with_the_weights():
    model = Transformer(config(bias_update_rate=0.1))
    model.blocks[0].mlp.router.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    again = Transformer(config(bias_update_rate=0.1))
    again.load_state_dict(model.state_dict())
    assert again.blocks[0].mlp.router.bias.tolist() == pytest.approx([0.1, -0.2, 0.3, 0.0])


def test_lora_targets_the_expert_projections_by_name_and_merges_exactly():
    torch.manual_seed(0)
    model = Transformer(config(n_shared=1)).eval()
    names = apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=["up_proj", "down_proj"]))
    assert "blocks.0.mlp.experts.up_proj" in names and "blocks.0.mlp.shared.up_proj" in names
    assert lora_layers(model)["blocks.0.mlp.experts.up_proj"].lora_A.shape == (4, 2, 32)
    with torch.no_grad():
        for layer_ in lora_layers(model).values():
            layer_.lora_B.normal_(0, 0.2)
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        adapted = model(x)
        merge_lora(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


def test_moe_with_mhc_compiles_without_graph_breaks_under_bf16_autocast():
    """bf16 autocast is how GPUs train (bf16-mixed): the experts then run through torch._grouped_mm,
    which the compiler traces as one op; float32 takes the per-expert path, one graph break per layer."""
    torch.manual_seed(0)
    model = Transformer(config(n_streams=4, n_shared=1)).train()
    block = model.blocks[0]
    x = torch.randn(2, 16, 4, 32)
    cos, sin = model.rope_cos[:16], model.rope_sin[:16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(block)(x, cos, sin, None, None, None, torch.randint(0, 64, (2, 16)))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_pretraining_an_moe_model_logs_its_balance_moves_the_biases_and_draws_histograms(shards, tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llmkit.callbacks import MoEMonitor
    from llmkit.data.datamodule import PackedDataModule
    from llmkit.modules.pretrain import PretrainModule
    from tests.conftest import VOCAB_SIZE

    cfg = config(n_streams=2, n_shared=1, bias_update_rate=0.01, score="sigmoid")
    cfg.vocab_size = VOCAB_SIZE
    module = PretrainModule(config=ModelConfig.from_dict(cfg.to_dict()), optim={"lr": 1e-3, "warmup_steps": 1})
    logger = TensorBoardLogger(tmp_path, name="moe")
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[MoEMonitor(every_n_steps=1)])
    trainer.fit(module, PackedDataModule(train_files=[str(shards["train"])], seq_len=32, batch_size=2,
                                         vocab_size=VOCAB_SIZE))
    biases = [layer.router.bias for layer in moe_layers(module.model)]
    assert all(b.abs().sum() > 0 for b in biases)  # aux-loss-free balancing moved them between the steps
    events = EventAccumulator(str(logger.log_dir), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    scalars, histograms = events.Tags()["scalars"], events.Tags()["histograms"]
    assert {"moe/load_std", "moe/max_min_load", "moe/aux_loss", "moe/L0/load_std"} <= set(scalars)
    assert {"moe/L0/utilization", "moe/L1/utilization"} <= set(histograms)
    last = events.Histograms("moe/L0/utilization")[-1].histogram_value
    assert len(last.bucket) == 4 and sum(last.bucket) == 2 * 32 * 2  # every (token, slot) assignment of a step


def test_the_balance_is_taken_after_the_step_under_checkpointing_and_accumulation(shards, tmp_path):
    """Lightning zeroes the gradients between a step's first forward and its backward: the biases
    moved there changed the routing a checkpointed block recomputed (CheckpointError), and under
    accumulation the step's loads were read one micro-batch into the next window."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from llmkit.callbacks import MoEMonitor
    from llmkit.data.datamodule import PackedDataModule
    from llmkit.modules.pretrain import PretrainModule
    from tests.conftest import VOCAB_SIZE

    cfg = config(bias_update_rate=0.01)
    cfg.vocab_size, cfg.gradient_checkpointing = VOCAB_SIZE, True
    module = PretrainModule(config=ModelConfig.from_dict(cfg.to_dict()), optim={"lr": 1e-3, "warmup_steps": 1})
    logger = CSVLogger(tmp_path, name="moe")
    trainer = L.Trainer(accelerator="cpu", max_steps=3, accumulate_grad_batches=2, logger=logger, log_every_n_steps=1,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[MoEMonitor(every_n_steps=1)])
    trainer.fit(module, PackedDataModule(train_files=[str(shards["train"])], seq_len=32, batch_size=2,
                                         vocab_size=VOCAB_SIZE))
    assert trainer.global_step == 3
    rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").open()))
    worst = {int(r["step"]): float(r["moe/max_min_load"]) for r in rows if r.get("moe/max_min_load")}
    per_layer = {int(r["step"]): max(float(r["moe/L0/max_min_load"]), float(r["moe/L1/max_min_load"]))
                 for r in rows if r.get("moe/L0/max_min_load")}
    # the module's worst layer and the monitor's layers describe the same two micro-batches of each step
    assert sorted(worst) == sorted(per_layer) == [0, 1, 2]
    assert all(worst[step] == pytest.approx(per_layer[step]) for step in worst)
    for layer in moe_layers(module.model):
        assert layer.router.last_load.sum() == 2 * (2 * 32) * 2  # micro-batches x tokens x top_k
        assert layer.aux_scale == 0.5  # the balancing loss is divided by the accumulation, as the loss is


def test_fine_tuning_weighs_the_balancing_loss_by_its_loss_tokens_and_ttt_not_at_all(tmp_path, tokenizer_path):
    """SFT and SDFT back-propagate a loss summed over tokens, divided by the step's tokens after
    backward: a balancing loss sent in with weight 1 ended up divided by the tokens too. TTT trains
    LoRA factors under frozen routers, where it would only push the layers below."""
    from llmkit.data.examples import Example
    from llmkit.modules.sdft import SDFTModule
    from llmkit.modules.sft import SFTModule
    from llmkit.modules.ttt_discover import TTTDiscoverModule
    from tests.conftest import VOCAB_SIZE

    cfg = config()
    cfg.vocab_size, cfg.max_seq_len = VOCAB_SIZE, 256  # room for SDFT's teacher prompt
    base = tmp_path / "base.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in Transformer(cfg).state_dict().items()},
                "hyper_parameters": {"config": cfg.to_dict()}}, base)
    common = {"init_ckpt": str(base), "tokenizer": str(tokenizer_path)}
    batch = [Example("the cat", "sat on the mat", source="a:1"), Example("a dog", "ran", source="a:2")]
    sft = SFTModule(**common)
    _, count = sft.loss_sum(batch, "train", 0)
    assert [float(layer.aux_scale) for layer in moe_layers(sft.model)] == [float(count)] * 2
    sdft = SDFTModule(**common, sdft={"max_new_tokens": 6, "skip_first": 1})
    sdft.trainer = None
    _, count = sdft.loss_sum(batch, "val", 0)
    assert [float(layer.aux_scale) for layer in moe_layers(sdft.model)] == [float(count)] * 2
    ttt = TTTDiscoverModule(**common, lora={"rank": 2, "alpha": 4.0})
    ttt.configure_model()
    assert [float(layer.aux_scale) for layer in moe_layers(ttt.model)] == [0.0, 0.0]


def test_the_monitor_names_a_layer_by_its_block():
    """moe/L0 was the first MoE layer, whatever block it sat in: with first_dense 1 it was block 1's."""
    from types import SimpleNamespace

    from llmkit.callbacks import MoEMonitor

    model = Transformer(replace(config(), n_layers=3, moe=replace(config().moe, first_dense=1))).train()
    model(torch.randint(0, 64, (2, 8)))
    logged = {}
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.update(metrics))
    trainer = SimpleNamespace(global_step=1, is_global_zero=True, loggers=[logger])
    MoEMonitor(every_n_steps=1).on_train_batch_end(trainer, SimpleNamespace(model=model), None, None, 0)
    assert sorted(logged) == ["moe/L1/load_std", "moe/L1/max_min_load", "moe/L2/load_std", "moe/L2/max_min_load"]


def test_the_mhc_monitor_counts_no_tokens_in_the_load_and_the_moe_monitor_resumes_past_its_last_step():
    """MHCMonitor's forward ran in training mode: its tokens joined the next step's load (the bias update and the
    moe/* metrics). A resume inside an accumulation window logged the last step's moe/L* points again."""
    from types import SimpleNamespace

    from llmkit.callbacks import MHCMonitor, MoEMonitor

    model = Transformer(config(n_streams=4, bias_update_rate=0.01)).train()
    MHCMonitor(every_n_steps=1).read_mappings(model, torch.randint(0, 64, (8,)))
    assert all(not layer.router.load.any() for layer in moe_layers(model)) and model.training

    model(torch.randint(0, 64, (2, 8)))  # a micro-batch of the step the run was saved inside
    logged = []
    trainer = SimpleNamespace(global_step=5, is_global_zero=True,
                              loggers=[SimpleNamespace(log_metrics=lambda metrics, step: logged.append(step))])
    monitor = MoEMonitor(every_n_steps=1)
    monitor.on_train_batch_end(trainer, SimpleNamespace(model=model), None, None, 0)
    resumed = MoEMonitor(every_n_steps=1)
    resumed.load_state_dict(monitor.state_dict())
    resumed.on_train_batch_end(trainer, SimpleNamespace(model=model), None, None, 0)
    assert logged == [4]


def test_an_moe_model_upcycles_to_mhc_and_exports_as_an_llmkit_directory(tmp_path):
    from llmkit.cli import main
    from llmkit.model.checkpoint import load_backbone, write_backbone_checkpoint
    from llmkit.model.upcycle import upcycle_state

    torch.manual_seed(0)
    dense = Transformer(config(n_shared=1)).eval()
    x = torch.randint(0, 64, (2, 12))
    cfg, state = upcycle_state(dense.config, dense.state_dict(), 4)
    mhc = Transformer(cfg).eval()
    mhc.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(mhc(x), dense(x), atol=1e-5, rtol=1e-5)
    write_backbone_checkpoint(tmp_path / "moe.ckpt", dense.config, dense.state_dict())
    assert main(["convert", "to-hf", "--ckpt", str(tmp_path / "moe.ckpt"), "--out", str(tmp_path / "out")]) == 0
    with torch.no_grad():
        assert torch.equal(load_backbone(tmp_path / "out")(x), dense(x))


def test_the_per_expert_fallback_under_torch_compile_does_not_recompile_for_new_expert_loads():
    """fp32 (no grouped kernel): each step routes other row counts to the experts; traced, the
    fallback specialised on them and recompiled up to dynamo's limit (then ran eager, warning)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    weight = torch.randn(4, 8, 16)
    compiled = torch.compile(lambda x, ends: grouped_linear(x, weight, ends) * 2)
    for step in range(12):
        counts = torch.tensor([step * 3 % 5 + 1, 2, step * 7 % 4 + 1, 3])
        x = torch.randn(int(counts.sum()), 16)
        rows = torch.split(x, counts.tolist())
        expected = torch.cat([r @ w.t() for r, w in zip(rows, weight, strict=True)]) * 2
        torch.testing.assert_close(compiled(x, counts.cumsum(0)), expected)
    assert counters["stats"]["unique_graphs"] <= 2  # before and after the eager fallback; 8 (the limit) before
