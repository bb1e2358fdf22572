"""FSDP for the backbone (llmkit.callbacks.BlockFSDPStrategy; docs/scaling_out.md).

FSDP shards over CUDA GPUs only, so on a CPU machine these tests check what does not need one:
``configure_model`` on the meta device, the wrap policy, the mixed-precision settings, the
config, and the refusals. The sharded checkpoint format is read back in
tests/test_distributed.py (written by two CPU processes the way FSDP writes it). The GPU test
runs a real one-GPU FSDP fit where CUDA is available; it does not go through the CLI.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.plugins.precision import FSDPPrecision

from llmkit.callbacks import AtomicCheckpointIO, BlockFSDPStrategy, Checkpoint, MHCMonitor, RegressionGate
from llmkit.data.datamodule import PackedDataModule
from llmkit.errors import LLMKitError
from llmkit.eval.report import EvalConfig
from llmkit.model.checkpoint import is_sharded_checkpoint, load_backbone
from llmkit.model.config import ModelConfig
from llmkit.model.generation import SamplingConfig, generate
from llmkit.model.transformer import Block, Transformer
from llmkit.modules.pretrain import PretrainModule
from llmkit.modules.sft import SFTModule
from llmkit.modules.ttt_discover import TTTDiscoverModule
from llmkit.optim import OptimConfig
from tests.conftest import VOCAB_SIZE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ModelConfig(vocab_size=VOCAB_SIZE, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=512, n_streams=2)


def test_the_900m_backbone_builds_on_the_meta_device_with_one_fsdp_unit_per_block():
    """``configure_model`` under ``torch.device("meta")`` allocates no storage, even at 900M
    parameters; the strategy's policy makes each Block an FSDP unit and leaves the rest (embeddings,
    stream embedding, final norm, LM head) to the root; each Block checkpoints its own activations,
    and the strategy adds no second checkpoint wrapper."""
    module = PretrainModule(ModelConfig.from_yaml(CONFIGS / "model" / "900m.yaml"))
    assert module.model is None and module.vocab_size == 32000  # what the CLI links, before any model
    with torch.device("meta"):
        module.configure_model()
    tensors = [*module.model.parameters(), *module.model.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    assert 0.8e9 < module.model.num_params() < 1.1e9
    assert module.flops_per_token(1024) == module.model.flops_per_token(1024)

    strategy = BlockFSDPStrategy()
    units = strategy.kwargs["auto_wrap_policy"]._run_policy(module, ignored_modules=set(), root_kwargs={})
    assert set(units) == set(module.model.blocks)  # the root, which FSDP wraps around the module, keeps the rest
    assert all(isinstance(unit, Block) for unit in units) and len(units) == 16
    in_blocks = sum(p.numel() for block in module.model.blocks for p in block.parameters())
    assert in_blocks / module.model.num_params() > 0.85  # what FSDP shards block by block
    assert strategy._activation_checkpointing_kwargs == {}
    assert all(block.config.gradient_checkpointing for block in module.model.blocks)
    assert strategy._state_dict_type == "sharded" and strategy.kwargs["use_orig_params"]


def test_fsdp_wraps_an_mhc_block(tmp_path):
    """FSDP refuses 0-d parameters (an H200 run of the GPU test below stopped at the mHC alphas);
    the check runs when a unit is wrapped, which a one-process gloo group does on a CPU."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    block = Transformer(TINY).blocks[0]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with pytest.warns(UserWarning, match="NO_SHARD"):  # one rank: nothing to shard
            wrapped = FullyShardedDataParallel(block, device_id=torch.device("cpu"), use_orig_params=True)
    finally:
        dist.destroy_process_group()
    names = {name.rpartition(".")[2] for name, _ in wrapped.named_parameters()}
    assert names >= {"alpha_pre", "alpha_post", "alpha_res"}


def test_under_mixed_precision_parameters_and_buffers_stay_fp32():
    """mHC's alphas and biases and the RoPE tables keep fp32 as on one GPU; autocast computes in bf16."""
    strategy = BlockFSDPStrategy()
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    mixed = strategy.mixed_precision_config
    assert (mixed.param_dtype, mixed.reduce_dtype, mixed.buffer_dtype) == (torch.float32,) * 3
    strategy.precision_plugin = FSDPPrecision("bf16-true")
    with pytest.warns(UserWarning, match="lower precision"):
        assert strategy.mixed_precision_config.param_dtype == torch.bfloat16  # -true: Lightning's, as asked


def test_without_cuda_the_strategy_stops_at_once_with_one_line(shards, tmp_path):
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=BlockFSDPStrategy(), max_steps=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    data = PackedDataModule(train_files=[str(shards["train"])], seq_len=16, batch_size=2, vocab_size=VOCAB_SIZE)
    with pytest.raises(LLMKitError, match=r"^BlockFSDPStrategy shards the backbone over CUDA GPUs, and this run is on "
                                          r"cpu: set trainer.accelerator: gpu, or use trainer.strategy: ddp"):
        trainer.fit(PretrainModule(TINY), data)


def test_what_runs_the_whole_backbone_outside_the_forward_refuses_a_sharded_strategy(tokenizer_path, tmp_path):
    """SFT/SDFT and TTT-Discover sample, score and evaluate the backbone in their steps, and the
    regression gate evaluates it between steps: they scale out with DDP. Muon needs whole
    matrices: PretrainModule refuses it under FSDP."""
    base = tmp_path / "base.ckpt"
    state = {f"model.{k}": v for k, v in Transformer(TINY).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"config": TINY.to_dict()}}, base)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=BlockFSDPStrategy(), max_steps=1, logger=False)
    common = {"init_ckpt": str(base), "tokenizer": str(tokenizer_path)}
    for module in (SFTModule(**common), TTTDiscoverModule(**common, lora={"rank": 2, "alpha": 4.0})):
        module.trainer = trainer
        with pytest.raises(LLMKitError, match=rf"^{type(module).__name__} runs on one device or under DDP "
                                              r"\(trainer.strategy: ddp\), not BlockFSDPStrategy"):
            module.setup("fit")
    gate = RegressionGate(evaluation=EvalConfig(ppl_files=["x.bin"]))
    with pytest.raises(LLMKitError, match=r"^RegressionGate runs on one device or under DDP"):
        gate.setup(trainer, SFTModule(**common), "fit")
    muon = PretrainModule(TINY, OptimConfig(name="muon"))
    muon.configure_model()
    muon.trainer = trainer
    with pytest.raises(LLMKitError, match="optim.name: muon orthogonalises whole weight matrices"):
        muon.configure_optimizers()


def test_the_fsdp_config_parses_and_keeps_the_single_gpu_recipe(capsys):
    pytest.importorskip("jsonargparse")
    from llmkit.cli import main

    printed = {}
    for name in ("900m_fsdp", "900m_gpu"):
        with pytest.raises(SystemExit) as exit_info:
            main(["pretrain", "fit", "--config", str(CONFIGS / "pretrain" / f"{name}.yaml"), "--print_config"])
        assert exit_info.value.code == 0
        printed[name] = yaml.safe_load(capsys.readouterr().out)
    fsdp, gpu = printed["900m_fsdp"], printed["900m_gpu"]
    assert fsdp["trainer"]["strategy"] == {"class_path": "llmkit.callbacks.BlockFSDPStrategy", "init_args": {
        "sharding_strategy": "FULL_SHARD", "state_dict_type": "sharded", "cpu_offload": False, "device_mesh": None}}
    assert fsdp["model"] == gpu["model"]
    windows = {name: p["data"]["batch_size"] * p["trainer"]["devices"] * p["trainer"]["accumulate_grad_batches"]
               for name, p in printed.items()}
    assert windows == {"900m_fsdp": 16, "900m_gpu": 16}  # the same optimizer steps: lr and max_steps carry over


@pytest.mark.gpu
def test_one_gpu_fsdp_fit_checkpoints_shards_that_validate_and_generate_anywhere(shards, tmp_path):
    """A real FSDP run on one GPU: Blocks wrapped, mHC monitored through the root FSDP module, the
    global norm clipped, a sharded checkpoint folder that a plain (non-FSDP) Trainer validates to
    the same loss and that ``load_backbone`` turns into a model that generates."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB_SIZE, n_layers=2, d_model=64, n_heads=4, d_ff=128, max_seq_len=64,
                         n_streams=2, gradient_checkpointing=True)
    data = PackedDataModule(train_files=[str(shards["train"])], val_files=[str(shards["val"])], seq_len=32,
                            batch_size=8, val_windows=8, vocab_size=VOCAB_SIZE)
    monitor = MHCMonitor(every_n_steps=2)
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=BlockFSDPStrategy(), precision="bf16-mixed",
                        max_steps=6, gradient_clip_val=1.0, logger=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, limit_val_batches=0, plugins=[AtomicCheckpointIO()],
                        callbacks=[monitor, Checkpoint(dirpath=tmp_path / "ckpt", save_top_k=0)])
    module = PretrainModule(config, OptimConfig(lr=3e-3, warmup_steps=2))
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 6 and torch.isfinite(trainer.logged_metrics["train/loss"])
    assert all(isinstance(block, FullyShardedDataParallel) for block in module.model.blocks)
    assert monitor.last_step == 4 and monitor.last_stats["mhc/composite/fwd_gain"] > 0  # steps 0, 2, 4
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert is_sharded_checkpoint(ckpt)

    evaluate = {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed", "logger": False,
                "enable_progress_bar": False}
    fsdp_loss = L.Trainer(strategy=BlockFSDPStrategy(), **evaluate).validate(
        PretrainModule(config), datamodule=data, ckpt_path=ckpt, verbose=False)[0]["val/loss"]
    plain_loss = L.Trainer(plugins=[AtomicCheckpointIO()], **evaluate).validate(
        PretrainModule(config), datamodule=data, ckpt_path=ckpt, verbose=False)[0]["val/loss"]
    assert plain_loss == pytest.approx(fsdp_loss, rel=1e-3)
    model = load_backbone(ckpt, "cuda")
    out = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=4, temperature=0), eos_id=None)
    assert out.tokens.shape == (1, 4)
