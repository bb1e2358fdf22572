"""MHCMonitor: its numbers equal a direct computation, through a real training step."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from llmkit.callbacks import MHCMonitor
from llmkit.callbacks.mhc_monitor import mhc_stats
from llmkit.model.config import ModelConfig
from llmkit.modules.pretrain import PretrainModule
from llmkit.optim import OptimConfig


def module(n_layers: int = 2) -> PretrainModule:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, n_layers=n_layers, d_model=16, n_heads=2, d_ff=32, max_seq_len=32, n_streams=4)
    return PretrainModule(config, OptimConfig(lr=0.0, warmup_steps=1, weight_decay=0.0))


def fit_one_step(pl_module: PretrainModule, monitor: MHCMonitor, idx: torch.Tensor) -> None:
    data = DataLoader(TensorDataset(idx, idx), batch_size=len(idx))
    L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    ).fit(pl_module, data)


def test_identity_h_res_gives_unit_gain_and_zero_deviation():
    eye = torch.eye(4).expand(10, 4, 4)
    stats = mhc_stats(
        [
            ("L0.attn", torch.full((10, 4), 0.25), torch.full((10, 4), 0.5), eye),
            ("L0.mlp", torch.full((10, 4), 0.25), torch.full((10, 4), 0.5), eye),
        ]
    )
    assert stats["mhc/composite/fwd_gain"] == pytest.approx(1.0)
    assert stats["mhc/composite/bwd_gain"] == pytest.approx(1.0)
    assert stats["mhc/L0.attn/row_dev"] == 0 and stats["mhc/L0.mlp/col_dev"] == 0
    assert stats["mhc/L0.attn/h_pre"] == pytest.approx(0.25) and stats["mhc/L0.mlp/h_post"] == pytest.approx(0.5)


def test_composite_gain_of_a_non_stochastic_product():
    a = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # row sums 2, 1
    b = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    stats = mhc_stats(
        [("L0.attn", torch.ones(1, 2), torch.ones(1, 2), a), ("L0.mlp", torch.ones(1, 2), torch.ones(1, 2), b)]
    )
    composite = b[0] @ a[0]  # [[2, 1], [0, 1]]: applied a first, then b
    assert stats["mhc/composite/fwd_gain"] == pytest.approx(3.0)
    assert stats["mhc/composite/bwd_gain"] == pytest.approx(composite.abs().sum(0).max().item())
    assert stats["mhc/L0.attn/row_dev"] == pytest.approx(0.5)


def test_monitor_matches_a_direct_computation_after_a_training_step():
    pl_module = module()
    idx = torch.randint(0, 50, (2, 12))
    monitor = MHCMonitor(every_n_steps=1, max_tokens=8)
    fit_one_step(pl_module, monitor, idx)
    mappings, x = [], None
    model = pl_module.model
    with torch.no_grad():  # replay the forward by hand, reading each mapping's input stream
        x = model.tok_emb(idx).unsqueeze(2) + model.stream_emb
        cos, sin = model.rope_cos[:12], model.rope_sin[:12]
        for i, block in enumerate(model.blocks):
            for kind, res, sub in (
                ("attn", block.attn_res, lambda h, b=block: b.attn(b.attn_norm(h), cos, sin)),
                ("mlp", block.mlp_res, lambda h, b=block: b.mlp(b.mlp_norm(h))),
            ):
                entry = res.mapping(x)
                mappings.append((f"L{i}.{kind}", entry.h_pre[0, :8], entry.h_post[0, :8], entry.h_res[0, :8]))
                x = res(x, sub)  # Pending: the next mapping writes it back
    expected = mhc_stats(mappings)
    assert set(monitor.last_stats) == set(expected)
    assert len(expected) == 2 * 2 * 4 + 2
    for key, value in expected.items():
        assert monitor.last_stats[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert 0.99 < monitor.last_stats["mhc/composite/fwd_gain"] < 1.01  # near-identity init


def test_monitor_skips_steps_between_intervals_and_removes_its_hooks():
    pl_module = module()
    monitor = MHCMonitor(every_n_steps=5)
    fit_one_step(pl_module, monitor, torch.randint(0, 50, (2, 12)))
    assert monitor.last_stats and monitor.last_step == 0  # step 0 is logged
    assert all(not m._forward_hooks for m in pl_module.modules())


def test_monitor_logs_each_interval_once_with_gradient_accumulation():
    pl_module = module()
    monitor = MHCMonitor(every_n_steps=2)
    logged = []
    monitor_log = monitor.read_mappings
    monitor.read_mappings = lambda model, idx, forward: logged.append(len(idx)) or monitor_log(model, idx, forward)
    data = DataLoader(TensorDataset(torch.randint(0, 50, (12, 8)), torch.randint(0, 50, (12, 8))), batch_size=2)
    L.Trainer(max_steps=3, accumulate_grad_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor]).fit(pl_module, data)
    assert len(logged) == 2 and monitor.last_step == 2  # steps 0 and 2, each once


def test_monitor_rejects_batches_that_are_not_token_windows():
    from llmkit.errors import LLMKitError

    monitor = MHCMonitor(every_n_steps=1)
    trainer = type("T", (), {"global_step": 1, "is_global_zero": True, "loggers": [],
                             "strategy": type("S", (), {"model": None})()})()
    with pytest.raises(LLMKitError, match="token-window batches"):
        monitor.on_train_batch_end(trainer, module(), None, [{"prompt": "x"}], 0)


def test_a_resumed_monitor_does_not_log_its_last_step_again():
    """Resumed inside an accumulation window, the first micro-batch (which ends no step) logged the step before
    it a second time, from other tokens."""
    logged = []
    logger = type("L", (), {"log_metrics": lambda self, metrics, step: logged.append(step)})()
    trainer = type("T", (), {"global_step": 5, "is_global_zero": True, "strategy": type("S", (), {"model": None})(),
                             "loggers": [logger]})()
    batch = (torch.randint(0, 50, (2, 12)),) * 2
    pl_module = module()
    pl_module.configure_model()
    monitor = MHCMonitor(every_n_steps=1)
    monitor.on_train_batch_end(trainer, pl_module, None, batch, 0)
    resumed = MHCMonitor(every_n_steps=1)
    resumed.load_state_dict(monitor.state_dict())
    resumed.on_train_batch_end(trainer, pl_module, None, batch, 0)
    assert logged == [4]


@pytest.mark.slow
def test_monitor_leaves_compiled_checkpointed_blocks_compiled():
    """Hooks inside the training forward graph-broke a compiled block under activation
    checkpointing (it then ran eagerly); the monitor's own eager forward leaves it compiled: the
    two graphs of an mHC model (the first block, and the blocks whose stream comes in Pending)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, n_layers=2, d_model=16, n_heads=2, d_ff=32, max_seq_len=32, n_streams=4,
                         gradient_checkpointing=True)
    pl_module = PretrainModule(config, OptimConfig(lr=0.0, warmup_steps=1, weight_decay=0.0), compile=True)
    torch._dynamo.reset()
    counters.clear()
    monitor = MHCMonitor(every_n_steps=1, max_tokens=8)
    idx = torch.randint(0, 50, (4, 12))
    data = DataLoader(TensorDataset(idx, idx), batch_size=2)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[monitor]).fit(pl_module, data)
    assert monitor.last_step == 1 and len(monitor.last_stats) == 2 * 2 * 4 + 2
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]
    torch._dynamo.reset()
