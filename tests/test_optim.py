"""Muon for the hidden weight matrices, AdamW for the rest, as one optimizer under Lightning."""

from __future__ import annotations

import copy
import re

import lightning as L
import pytest
import torch

from llmkit.callbacks import AtomicCheckpointIO, Checkpoint
from llmkit.data.datamodule import PackedDataModule
from llmkit.errors import LLMKitError
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.modules.pretrain import PretrainModule
from llmkit.optim import MuonAdamW, OptimConfig, WarmupCosine, build_optimizer
from tests.conftest import VOCAB_SIZE

CONFIG = ModelConfig(vocab_size=VOCAB_SIZE, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=64, n_streams=2)
MUON = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, warmup_steps=2, min_lr_ratio=0.5, weight_decay=0.1)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = Transformer(CONFIG)
    optimizer, split = build_optimizer(model.param_groups(0.1), MUON)
    assert isinstance(optimizer, MuonAdamW)
    hidden = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in hidden}
    assert names == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2
                     and ".mapping." not in n}
    others = {id(p) for g in optimizer.adamw.param_groups for p in g["params"]}
    assert hidden.isdisjoint(others) and len(hidden) + len(others) == len(list(model.parameters()))
    n_hidden = sum(p.numel() for g in optimizer.muon.param_groups for p in g["params"])
    assert split.startswith(f"optimizer: Muon (lr 0.02, weight decay 0) on 14 tensors ({n_hidden / 1e6:.2f}M "
                            "parameters)")
    with pytest.raises(LLMKitError, match="optim.name must be 'adamw' or 'muon'"):
        OptimConfig(name="sgd")


@pytest.mark.parametrize(("values", "says"), [
    ({"betas": (1.5, 0.9)}, "optim.betas[0] must be in [0, 1), got 1.5"),
    ({"muon_momentum": 5.0}, "optim.muon_momentum must be in [0, 1), got 5.0"),
    ({"eps": -1.0}, "optim.eps must be > 0, got -1.0"),
    ({"decay_steps": -5}, "optim.decay_steps must be >= 1 (or null: the Trainer's steps), got -5"),
])
def test_an_optimizer_setting_out_of_its_range_is_refused(values, says):
    with pytest.raises(LLMKitError, match=re.escape(says)):
        OptimConfig(**values)


def test_one_step_is_exactly_a_muon_step_and_an_adamw_step():
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    twin = copy.deepcopy(model)
    idx = torch.randint(0, VOCAB_SIZE, (2, 16))
    for m in (model, twin):
        m.loss(idx[:, :-1], idx[:, 1:]).backward()
    optimizer, _ = build_optimizer(model.param_groups(0.1), MUON)
    optimizer.step()
    hidden, matrices, rest = twin.param_groups(0.1)
    torch.optim.Muon(hidden["params"], lr=0.02, weight_decay=0.0, momentum=0.95).step()
    torch.optim.AdamW([matrices, rest], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=True).step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name


def fit(tmp_path, max_steps: int, optim: OptimConfig, ckpt_path=None, callbacks_extra=(),
        **trainer_kw) -> tuple[PretrainModule, L.Trainer]:
    L.seed_everything(0, verbose=False)
    module = PretrainModule(CONFIG, optim)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                        callbacks=[Checkpoint(dirpath=tmp_path, every_n_train_steps=100), *callbacks_extra],
                        **trainer_kw)
    data = PackedDataModule(train_files=[str(shards_path["train"])], seq_len=32, batch_size=4, vocab_size=VOCAB_SIZE)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


shards_path: dict = {}


@pytest.fixture(autouse=True)
def _shards(shards):
    shards_path.update(shards)


def test_muon_trains_under_bf16_mixed_accumulation_clipping_and_a_fused_adamw(tmp_path, caplog):
    with caplog.at_level("INFO"):
        module, trainer = fit(tmp_path, 3, OptimConfig(**{**MUON.__dict__, "implementation": "fused"}),
                              precision="bf16-mixed", accumulate_grad_batches=2, gradient_clip_val=0.5)
    assert trainer.global_step == 3 and "optimizer: Muon (lr 0.02" in caplog.text
    assert torch.isfinite(trainer.logged_metrics["train/loss"])
    optimizer = trainer.optimizers[0]
    multiplier = WarmupCosine(2, 3, 0.5)(3)
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.02 * multiplier)  # one schedule scales both
    assert optimizer.adamw.param_groups[0]["lr"] == pytest.approx(1e-3 * multiplier)
    # each optimizer's rate is logged under its own name (train/lr was Muon's, and AdamW's was not logged)
    step_3 = WarmupCosine(2, 3, 0.5)(2)  # logged in step 3, before the scheduler moves on
    assert trainer.logged_metrics["train/lr"] == pytest.approx(1e-3 * step_3)
    assert trainer.logged_metrics["train/muon_lr"] == pytest.approx(0.02 * step_3)


def test_a_resumed_muon_run_equals_an_uninterrupted_one(tmp_path):
    optim = OptimConfig(**{**MUON.__dict__, "decay_steps": 4})  # one schedule for both runs
    straight, _ = fit(tmp_path / "straight", 4, optim)
    fit(tmp_path / "first", 2, optim)
    resumed, _ = fit(tmp_path / "resumed", 4, optim, ckpt_path=tmp_path / "first" / "last.ckpt")
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name  # the Muon momentum and the AdamW moments were restored


def test_a_resume_trains_with_the_optimizer_settings_it_is_given(tmp_path):
    """Lightning's restore of the optimizer and scheduler state brought back the old run's lr,
    weight decay and schedule base: a resume with other settings trained at the old ones."""
    fit(tmp_path / "first", 2, OptimConfig(**{**MUON.__dict__, "decay_steps": 6}))
    changed = OptimConfig(**{**MUON.__dict__, "decay_steps": 6, "lr": 1e-4, "muon_lr": 1e-3, "weight_decay": 0.0,
                             "muon_momentum": 0.9, "betas": (0.8, 0.9)})
    _, trainer = fit(tmp_path / "resumed", 3, changed, ckpt_path=tmp_path / "first" / "last.ckpt")
    optimizer, scheduler = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
    scale = WarmupCosine(changed.warmup_steps, 6, changed.min_lr_ratio)(3)  # after step 3
    assert [g["lr"] for g in optimizer.muon.param_groups] == [pytest.approx(1e-3 * scale)]
    assert [g["momentum"] for g in optimizer.muon.param_groups] == [0.9]
    assert [g["lr"] for g in optimizer.adamw.param_groups] == [pytest.approx(1e-4 * scale)] * 2
    assert [g["weight_decay"] for g in optimizer.adamw.param_groups] == [0.0, 0.0]
    assert {g["betas"] for g in optimizer.adamw.param_groups} == {(0.8, 0.9)}
    assert scheduler.base_lrs == [1e-3, 1e-4, 1e-4] and scheduler.last_epoch == 3


@pytest.mark.parametrize(("first", "then", "says"), [
    ("adamw", "muon", "holds the state of AdamW, and this run builds Muon with AdamW"),
    ("muon", "adamw", "holds the state of Muon with AdamW, and this run builds AdamW"),
])
def test_a_resume_with_another_optimizer_is_one_line(tmp_path, first, then, says):
    fit(tmp_path / "first", 1, OptimConfig(**{**MUON.__dict__, "name": first}))
    with pytest.raises(LLMKitError, match=f"^optim.name: the checkpoint .*last.ckpt {says}: resume with the run's"):
        fit(tmp_path / "resumed", 2, OptimConfig(**{**MUON.__dict__, "name": then}),
            ckpt_path=tmp_path / "first" / "last.ckpt")


def test_with_nothing_for_muon_it_is_adamw_and_says_so():
    model = Transformer(CONFIG).requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    optimizer, split = build_optimizer(model.param_groups(0.1), MUON)
    assert isinstance(optimizer, torch.optim.AdamW) and "(Muon has no hidden matrix to train here)" in split


def test_fine_tuning_lowers_muons_lr_with_adamws():
    """The fine-tuning defaults kept pretraining's muon_lr 0.02 beside lr 2e-5: one Muon step moved
    the hidden matrices 55 times as far as an AdamW step."""
    from llmkit.modules.finetune import FineTuneOptimConfig

    pretraining, fine_tuning = OptimConfig(), FineTuneOptimConfig()
    assert fine_tuning.lr < pretraining.lr
    assert fine_tuning.muon_lr / fine_tuning.lr == pytest.approx(pretraining.muon_lr / pretraining.lr, rel=0.03)


class WeightsDigest(L.Callback):
    """Each rank's sum of every weight after training, gathered on rank 0 into a file."""

    def __init__(self, path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        digest = torch.stack([p.detach().double().sum() for p in pl_module.parameters()]).sum().reshape(1)
        gathered = trainer.strategy.all_gather(digest)
        if trainer.is_global_zero:
            torch.save(gathered.reshape(-1), self.path)


@pytest.mark.slow
def test_muon_under_ddp_keeps_every_rank_identical(tmp_path):
    """Two CPU processes (gloo): DDP averages the gradients, Muon orthogonalises the same update on each rank."""
    digest = tmp_path / "digest.pt"
    module, trainer = fit(tmp_path, 3, MUON, strategy="ddp_spawn", devices=2, callbacks_extra=[WeightsDigest(digest)])
    per_rank = torch.load(digest)
    assert per_rank.numel() == 2 and torch.equal(per_rank[0], per_rank[1])


def test_every_module_takes_muon(tmp_path, tokenizer_path):
    from llmkit.modules.sft import SFTModule
    from llmkit.modules.ttt_discover import TTTDiscoverModule

    base = tmp_path / "base.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in Transformer(CONFIG).state_dict().items()},
                "hyper_parameters": {"config": CONFIG.to_dict()}}, base)
    common = {"init_ckpt": str(base), "tokenizer": str(tokenizer_path), "optim": {"name": "muon"}}
    for module in (SFTModule(**common), TTTDiscoverModule(**common, lora={"rank": 2, "alpha": 4.0})):
        module.trainer = L.Trainer(max_steps=10, logger=False)
        optimizer = module.configure_optimizers()["optimizer"]
        # SFT trains every weight: Muon takes the hidden matrices; TTT trains LoRA factors only: AdamW alone
        assert isinstance(optimizer, MuonAdamW if isinstance(module, SFTModule) else torch.optim.AdamW)


def accumulator_module(weight: torch.nn.Parameter, optimizer: torch.optim.Optimizer, scheduler):
    """The little of a LightningModule :class:`TokenMeanAccumulator` uses, on one process."""
    from types import SimpleNamespace

    return SimpleNamespace(
        device=torch.device("cpu"), global_step=0, parameters=lambda: [weight], manual_backward=lambda l: l.backward(),
        optimizers=lambda: optimizer, lr_schedulers=lambda: scheduler,
        trainer=SimpleNamespace(world_size=1, strategy=SimpleNamespace(reduce=lambda t, reduce_op: t),
                                precision="32-true"))


def test_the_accumulator_reports_the_lr_it_stepped_with_and_stops_a_run_that_never_steps():
    from llmkit.optim import MAX_EMPTY_WINDOWS, TokenMeanAccumulator

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    accumulator = TokenMeanAccumulator(accumulator_module(weight, optimizer, scheduler))
    stats = accumulator.backward((weight * 2).sum(), 2)
    assert stats.lrs == {"train/lr": 1.0} and optimizer.param_groups[0]["lr"] == 0.5  # the step's, not the next's
    for _ in range(MAX_EMPTY_WINDOWS - 1):  # skipped with a warning: no token, no optimizer step
        with pytest.warns(UserWarning, match="no real tokens"):
            assert accumulator.backward((weight * 0).sum(), 0) is None
    with pytest.raises(LLMKitError, match=f"{MAX_EMPTY_WINDOWS} accumulation windows in a row had no real token"):
        accumulator.backward((weight * 0).sum(), 0)
    assert accumulator.backward((weight * 2).sum(), 2).lrs == {"train/lr": 0.5}  # a window with tokens: count again

