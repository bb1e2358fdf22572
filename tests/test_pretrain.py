"""PretrainModule with the real Trainer: schedule, checkpoints, resume, safe loading, errors."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from llmkit.callbacks import TokenThroughput
from llmkit.data.datamodule import PackedDataModule
from llmkit.errors import LLMKitError
from llmkit.model.checkpoint import load_backbone
from llmkit.model.config import ModelConfig
from llmkit.modules.pretrain import PretrainModule
from llmkit.optim import OptimConfig, WarmupCosine
from tests.conftest import VOCAB_SIZE

SEQ_LEN = 32


def model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB_SIZE, n_layers=2, d_model=64, n_heads=4, d_ff=128, max_seq_len=64, n_streams=4)
    return ModelConfig(**{**base, **kw})


def datamodule(shards, vocab_size: int = VOCAB_SIZE) -> PackedDataModule:
    return PackedDataModule(train_files=[str(shards["train"])], val_files=[str(shards["val"])],
                            seq_len=SEQ_LEN, batch_size=8, val_windows=16, vocab_size=vocab_size)


def trainer(tmp_path, max_steps: int, **kw) -> L.Trainer:
    args = dict(max_steps=max_steps, accelerator="cpu", devices=1, default_root_dir=tmp_path,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                log_every_n_steps=1, limit_val_batches=2, val_check_interval=max_steps,
                check_val_every_n_epoch=None, gradient_clip_val=1.0,
                callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    return L.Trainer(**{**args, **kw})


def test_warmup_cosine_schedule():
    s = WarmupCosine(warmup_steps=10, decay_steps=110, min_ratio=0.1)
    assert s(0) == pytest.approx(0.1)
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(110) == pytest.approx(0.1)
    assert s(10_000) == pytest.approx(0.1)


def test_fit_learns_logs_and_checkpoint_restores_the_model_alone(shards, tmp_path):
    torch.manual_seed(0)
    module = PretrainModule(model_config(), OptimConfig(lr=3e-3, warmup_steps=5))
    t = trainer(tmp_path, max_steps=60, callbacks=[TokenThroughput(window_size=2),
                                                     ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    before = t.validate(module, datamodule=datamodule(shards), verbose=False)[0]["val/loss"]
    t.fit(module, datamodule=datamodule(shards))
    logged = dict(t.logged_metrics)
    after = t.validate(module, datamodule=datamodule(shards), verbose=False)[0]["val/loss"]
    assert before > math.log(VOCAB_SIZE) - 0.5
    assert after < before - 2.0
    assert logged["train/tokens"] == 60 * 8 * SEQ_LEN
    assert logged["train/device/items_per_sec"] > 0  # tokens/s from TokenThroughput
    assert logged["val/ppl"] == pytest.approx(math.exp(logged["val/loss"]), rel=1e-5)

    ckpt = tmp_path / "ckpt" / "last.ckpt"
    raw = torch.load(ckpt, weights_only=True)  # plain containers only: safe to load
    assert raw["hyper_parameters"]["config"]["n_streams"] == 4
    model = load_backbone(ckpt)
    idx = torch.randint(0, VOCAB_SIZE, (2, 16))
    module.eval()
    assert torch.allclose(model(idx), module.model(idx), atol=1e-6)


def test_resume_continues_the_step_count_and_tokens(shards, tmp_path):
    module = PretrainModule(model_config(n_streams=1), OptimConfig(warmup_steps=2))
    trainer(tmp_path, max_steps=4).fit(module, datamodule=datamodule(shards))
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    resumed = PretrainModule(model_config(n_streams=1), OptimConfig(warmup_steps=2))
    t = trainer(tmp_path, max_steps=7)
    t.fit(resumed, datamodule=datamodule(shards), ckpt_path=ckpt)
    assert t.global_step == 7
    assert resumed.tokens_seen == 7 * 8 * SEQ_LEN
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 7


def test_non_finite_loss_stops_with_the_step(shards, tmp_path, monkeypatch):
    module = PretrainModule(model_config(), OptimConfig(warmup_steps=2))
    module.configure_model()  # the backbone exists from here; the Trainer keeps it
    real_loss = module.model.loss
    calls = {"n": 0}

    def loss_that_blows_up(x, y):
        calls["n"] += 1
        return real_loss(x, y) * (float("nan") if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(module.model, "loss", loss_that_blows_up)
    with pytest.raises(LLMKitError, match=r"non-finite training loss \(nan\) at global step 2"):
        trainer(tmp_path, max_steps=5).fit(module, datamodule=datamodule(shards))
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()


def test_a_non_finite_validation_loss_stops_the_run_with_the_step(shards, tmp_path, monkeypatch):
    """It was logged (and shown in the bar), and the run failed only at the next training batch."""
    module = PretrainModule(model_config(), OptimConfig(warmup_steps=2))
    module.configure_model()
    real_loss = module.model.loss
    monkeypatch.setattr(module.model, "loss", lambda x, y: real_loss(x, y) * (1.0 if module.training else float("nan")))
    with pytest.raises(LLMKitError, match=r"^non-finite val/loss \(nan\) at global step 2: the weights diverged"):
        trainer(tmp_path, max_steps=4, val_check_interval=2, limit_val_batches=1).fit(module,
                                                                                     datamodule=datamodule(shards))


def test_datamodule_checks_shards_against_the_module_vocab(shards, tmp_path):
    """`llmkit pretrain` links model.vocab_size to data.vocab_size (test_cli checks the link)."""
    module = PretrainModule(model_config(vocab_size=VOCAB_SIZE * 2))
    with pytest.raises(LLMKitError, match=rf"model has vocab_size {VOCAB_SIZE * 2}"):
        trainer(tmp_path, max_steps=1).fit(module, datamodule=datamodule(shards, module.vocab_size))


def test_weight_decay_groups_reach_the_optimizer():
    module = PretrainModule(model_config(), OptimConfig(weight_decay=0.1))
    module.configure_model()
    module.trainer = L.Trainer(max_steps=10, logger=False)
    opt = module.configure_optimizers()["optimizer"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]  # hidden matrices, other matrices, rest
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_bf16_mixed_with_accumulation_and_clipping(shards, tmp_path):
    """Automatic optimisation composes with the Trainer's precision, accumulation and clipping."""
    module = PretrainModule(model_config(), OptimConfig(warmup_steps=1))
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    t = trainer(tmp_path, max_steps=2, precision="bf16-mixed", accumulate_grad_batches=2)
    t.fit(module, datamodule=datamodule(shards))
    assert t.global_step == 2
    assert module.tokens_seen == 4 * 8 * SEQ_LEN  # 2 optimizer steps x 2 micro-batches
    assert torch.isfinite(t.logged_metrics["train/loss"])
    after = module.model.state_dict()
    assert all(after[k].dtype == torch.float32 for k in before)  # master weights stay fp32
    assert not torch.equal(before["tok_emb.weight"], after["tok_emb.weight"])


def test_fused_adamw_under_bf16_mixed_clips_the_global_norm(shards, tmp_path):
    """Lightning's plugin refuses to clip for a fused optimizer; PretrainModule clips it itself."""
    norms = []

    class StepNorms(L.Callback):  # the gradients the optimizer stepped with
        def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if grads:
                norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    module = PretrainModule(model_config(), OptimConfig(warmup_steps=1, implementation="fused"))
    t = trainer(tmp_path, max_steps=2, precision="bf16-mixed", gradient_clip_val=1e-3, logger=False,
                callbacks=[StepNorms()])
    t.fit(module, datamodule=datamodule(shards))
    assert t.optimizers[0].defaults["fused"]
    assert norms and norms == pytest.approx([1e-3] * len(norms), rel=1e-3)


@pytest.mark.slow
def test_compiled_blocks_match_eager(shards, tmp_path):
    torch.manual_seed(0)
    eager = PretrainModule(model_config())
    compiled = PretrainModule(model_config(), compile=True)
    eager.configure_model()
    compiled.configure_model()  # builds and compiles the blocks
    compiled.model.load_state_dict(eager.model.state_dict())
    idx = torch.randint(0, VOCAB_SIZE, (2, SEQ_LEN))
    assert torch.allclose(compiled(idx), eager(idx), atol=1e-4)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoints stay interchangeable


class BatchRecorder(L.Callback):
    def __init__(self) -> None:
        self.firsts: list[list[int]] = []
        self.epochs: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.firsts.append(batch[0][:, 0].tolist())
        self.epochs.append(trainer.current_epoch)


@pytest.mark.parametrize("stop, total", [(3, 7), (7, 12)])  # mid-epoch, and across an epoch boundary
def test_resumed_run_sees_the_same_batches_as_an_uninterrupted_one(shards, tmp_path, stop, total):
    """5 batches per epoch: resuming mid-epoch continues the epoch's order, no replay, no skip."""

    def run(max_steps: int, root, ckpt_path=None) -> list[list[int]]:
        recorder = BatchRecorder()
        dm = PackedDataModule(train_files=[str(shards["train"])], seq_len=SEQ_LEN, batch_size=4,
                              samples_per_epoch=20, seed=3)
        module = PretrainModule(model_config(n_streams=1), OptimConfig(warmup_steps=1))
        t = trainer(root, max_steps=max_steps, limit_val_batches=0,
                    callbacks=[recorder, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)])
        t.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        recorded.append(recorder.epochs)
        return recorder.firsts

    recorded: list[list[int]] = []
    straight = run(total, tmp_path / "straight")
    assert recorded[0] == [step // 5 for step in range(total)]  # no epoch passes without training
    first = run(stop, tmp_path / "split")
    second = run(total, tmp_path / "split", ckpt_path=tmp_path / "split" / "ckpt" / "last.ckpt")
    assert len(straight) == total
    assert first + second == straight
    epochs = [sorted(sum(straight[i : i + 5], [])) for i in range(0, total - total % 5, 5)]
    assert all(e == epochs[0] for e in epochs)  # every epoch trains on all 20 windows
    assert straight[:5] != straight[5:10]  # ... in a new order
