"""GPU runs of the pretraining path (skipped without CUDA): bf16-mixed, compiled blocks,
activation checkpointing, n=1 and n=4, through the real Trainer."""

import lightning as L
import pytest
import torch

from llmkit.data.datamodule import PackedDataModule
from llmkit.model.config import ModelConfig
from llmkit.modules.pretrain import OptimConfig, PretrainModule
from tests.conftest import VOCAB_SIZE


@pytest.mark.gpu
@pytest.mark.parametrize("n_streams", [1, 4])
def test_bf16_compiled_checkpointed_training_learns_on_gpu(shards, tmp_path, n_streams):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB_SIZE, n_layers=2, d_model=128, n_heads=4, d_ff=256, max_seq_len=128,
                         n_streams=n_streams, gradient_checkpointing=True)
    module = PretrainModule(config, OptimConfig(lr=3e-3, warmup_steps=5), compile=True)
    dm = PackedDataModule(train_files=[str(shards["train"])], val_files=[str(shards["val"])], seq_len=64,
                          batch_size=16, val_windows=16)
    trainer = L.Trainer(max_steps=60, accelerator="gpu", devices=1, precision="bf16-mixed", gradient_clip_val=1.0,
                        default_root_dir=tmp_path, enable_progress_bar=False, num_sanity_val_steps=0,
                        val_check_interval=60, check_val_every_n_epoch=None, enable_checkpointing=False,
                        logger=False)
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    assert after < before - 2.0
