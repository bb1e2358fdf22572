"""GPU runs of the pretraining path (skipped without CUDA): bf16-mixed, compiled blocks,
activation checkpointing, n=1 and n=4, through the real Trainer."""

import lightning as L
import pytest
import torch

from llmkit.data.datamodule import PackedDataModule
from llmkit.model.config import ModelConfig
from llmkit.modules.pretrain import PretrainModule
from llmkit.optim import OptimConfig
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


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_fused_mhc_matches_the_eager_reference_on_gpu(checkpointing, monkeypatch):
    """The Triton kernels torch.compile generates for the fused path (mapping, Sinkhorn and its
    recomputing backward, pre-aggregation, apply) against the eager reference: fp32 within 1e-5
    (TF32 off), bf16-mixed within the CPU-measured bf16 tolerances (tests/test_mhc_fused.py)."""
    from llmkit.model.config import MHCConfig
    from llmkit.model.transformer import Transformer

    def build(implementation: str) -> Transformer:
        return Transformer(ModelConfig(vocab_size=VOCAB_SIZE, n_layers=3, d_model=128, n_heads=4, d_ff=256,
                                       max_seq_len=128, n_streams=4, gradient_checkpointing=checkpointing,
                                       mhc=MHCConfig(implementation=implementation, alpha_init=0.5))).cuda()

    torch.manual_seed(0)
    reference, fused = build("reference"), build("fused")
    fused.load_state_dict(reference.state_dict())
    fused.compile_blocks()
    idx = torch.randint(0, VOCAB_SIZE, (4, 65), device="cuda")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for autocast, loss_tol, grad_tol in ((False, 1e-5, 1e-5), (True, 1e-4, 2e-2)):
        losses, grads = [], []
        for model in (reference, fused):
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = model.loss(idx[:, :-1], idx[:, 1:])
            loss.backward()
            losses.append(loss.item())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert abs(losses[1] - losses[0]) <= loss_tol * losses[0]
        assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() <= grad_tol


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "flash", "cudnn", "efficient", "flash_attn"])
def test_each_cuda_attention_backend_matches_math_in_bf16(backend):
    """Each CUDA kernel against SDPA's math reference in bf16-mixed, with grouped-query heads and
    mHC: the loss and gradients of training, and the padded, KV-cached sampling path."""
    from llmkit.model import attention_backends
    from llmkit.model.generation import SamplingConfig, generate
    from llmkit.model.transformer import Transformer

    if backend == "flash_attn" and attention_backends._flash_attn_package() is None:
        pytest.skip("neither flash_attn nor flash_attn_interface is installed")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB_SIZE, n_layers=2, d_model=256, n_heads=4, n_kv_heads=2,
                                    d_ff=512, max_seq_len=256, n_streams=4)).cuda()
    idx = torch.randint(0, VOCAB_SIZE, (4, 129), device="cuda")
    prompts = [[5, 9, 11, 3, 7, 2, 8], [4, 4], [17, 1, 30, 2]]
    losses, grads, first_logprobs = [], [], []
    for name in ("math", backend):
        model.config.attention_backend = name
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(idx[:, :-1], idx[:, 1:])
            loss.backward()
            sampled = generate(model, prompts, SamplingConfig(max_new_tokens=4, temperature=0.0), eos_id=None)
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        first_logprobs.append(sampled.logprobs[:, 0])
    assert abs(losses[1] - losses[0]) <= 1e-2 * losses[0]
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() <= 5e-2
    torch.testing.assert_close(first_logprobs[1], first_logprobs[0], atol=5e-2, rtol=5e-2)
