"""GPU runs of the pretraining path (skipped without CUDA): bf16-mixed, compiled blocks,
activation checkpointing, n=1 and n=4, through the real Trainer."""

import contextlib
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch

from llmkit.data.datamodule import PackedDataModule
from llmkit.model.config import MHCConfig, ModelConfig
from llmkit.modules.pretrain import PretrainModule
from llmkit.optim import OptimConfig
from tests.conftest import VOCAB_SIZE
from tests.mhc_oracle import op_params


@pytest.fixture(autouse=True)
def fresh_compile_state() -> None:
    """Each test compiles from scratch: dynamo's graphs (kept per function, counted against its
    recompile limit: docs/performance.md) and inductor's recorded CUDA graphs are process-wide, so
    without this a test would find those of the tests before it."""
    torch._dynamo.reset()


@contextlib.contextmanager
def dynamo_recompiles() -> Iterator[list[str]]:
    """What dynamo logs while the block runs: why it recompiles a function, and its warning when a
    function reaches ``recompile_limit`` (past it, that function runs eagerly)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("torch._dynamo")
    torch._logging.set_logs(recompiles=True)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()


@pytest.mark.gpu
@pytest.mark.parametrize(("n_streams", "mode"), [(1, "default"), (4, "default"), (4, "reduce-overhead")])
def test_bf16_compiled_checkpointed_training_learns_on_gpu(shards, tmp_path, n_streams, mode):
    """Validate, fit with activation checkpointing, validate, the blocks compiled; in reduce-overhead
    mode replayed as CUDA graphs, which inductor must not skip and whose outputs the validations'
    forwards copy between blocks (Transformer.compile_blocks; the modules do not offer the mode
    until this passes on a GPU)."""
    from torch._dynamo.utils import counters

    skipped = counters["inductor"]["cudagraph_skips"]
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB_SIZE, n_layers=2, d_model=128, n_heads=4, d_ff=256, max_seq_len=128,
                         n_streams=n_streams, gradient_checkpointing=True)
    module = PretrainModule(config, OptimConfig(lr=3e-3, warmup_steps=5), compile=mode == "default")
    if mode != "default":
        module.configure_model()
        module.model.compile_blocks(mode)
    dm = PackedDataModule(train_files=[str(shards["train"])], val_files=[str(shards["val"])], seq_len=64,
                          batch_size=16, val_windows=16)
    trainer = L.Trainer(max_steps=60, accelerator="gpu", devices=1, precision="bf16-mixed", gradient_clip_val=1.0,
                        default_root_dir=tmp_path, enable_progress_bar=False, num_sanity_val_steps=0,
                        val_check_interval=60, check_val_every_n_epoch=None, enable_checkpointing=False,
                        logger=False)
    with dynamo_recompiles() as logged:
        before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
        trainer.fit(module, datamodule=dm)
        after = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    assert after < before - 2.0
    # a block graph per stream type (mHC: first block, the others) and grad mode (validate's inference
    # mode, fit's training and its no-grad validation): 6 on the CPU. On an H200 the blocks once went
    # past the limit of 8 and ran eagerly: n = 1's 3 graphs, from the test before, were still cached
    # (the same flow on the CPU, n = 1 then n = 4 in one process, does the same): fresh_compile_state
    assert not any("recompile_limit" in m for m in logged), "\n".join(logged)
    assert counters["inductor"]["cudagraph_skips"] == skipped


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_mhc_ops_match_the_oracle_on_gpu(checkpointing, monkeypatch):
    """Compiled blocks running the mHC custom ops' Triton kernels against the eager equation-literal
    oracle (tests/mhc_oracle.py): fp32 within 1e-5 (TF32 off), bf16-mixed within the CPU-measured
    bf16 tolerances (tests/test_mhc_ops.py)."""
    from llmkit.model.config import MHCConfig
    from llmkit.model.transformer import Transformer
    from tests.mhc_oracle import literal_mhc

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB_SIZE, n_layers=3, d_model=128, n_heads=4, d_ff=256,
                                    max_seq_len=128, n_streams=4, gradient_checkpointing=checkpointing,
                                    mhc=MHCConfig(alpha_init=0.5))).cuda()
    idx = torch.randint(0, VOCAB_SIZE, (4, 65), device="cuda")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)

    def loss_and_grads(autocast: bool) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    with literal_mhc():
        oracle = {autocast: loss_and_grads(autocast) for autocast in (False, True)}
    model.compile_blocks()
    for autocast, loss_tol, grad_tol in ((False, 1e-5, 1e-5), (True, 1e-4, 2e-2)):
        (loss_o, grads_o), (loss, grads) = oracle[autocast], loss_and_grads(autocast)
        assert abs(loss - loss_o) <= loss_tol * loss_o
        assert ((grads - grads_o).norm() / grads_o.norm()).item() <= grad_tol


@pytest.mark.gpu
@pytest.mark.parametrize(("fused", "m"), [(False, 4096), (True, 4096), (False, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_triton_kernel_matches_the_ops_pytorch_code_on_gpu(dtype, fused, m, monkeypatch):
    """Each mHC op and its backward, Triton (use_triton=True) against the same op's PyTorch code,
    at a training shape (n = 4, C = 768, 4096 tokens) with peaked H_res logits: mhc_enter, then
    mhc_boundary on its pending stream (with a LoRA-like update on the first projection), then
    mhc_apply; ``fused``: mhc_boundary's write-back and projection in one kernel (APPLY_PROJECT_FUSED).
    At 64 tokens (a decode step's) the two ops' forwards are the entry kernel (ENTRY_ONE_KERNEL_TOKENS)."""
    from llmkit.model import mhc_ops, mhc_triton

    monkeypatch.setattr(mhc_triton, "APPLY_PROJECT_FUSED", fused)
    monkeypatch.setattr(mhc_triton, "PROJECT_FWD_PROGRAMS", 64)  # 4096 tokens count as a training shape
    assert (m <= mhc_triton.ENTRY_ONE_KERNEL_TOKENS) == (m == 64)
    torch.manual_seed(0)
    n, c = 4, 768
    p = 2 * n + n * n
    x = torch.randn(m, n, c, device="cuda").to(dtype)
    y = torch.randn(m, c, device="cuda").to(dtype)
    phi = 0.02 * torch.randn(p, n * c, device="cuda")
    update = 0.1 * torch.randn(m, p, device="cuda")
    alpha = torch.tensor([0.7, -0.4, 1.3], device="cuda")
    bias = torch.randn(p, device="cuda")
    bias[2 * n], bias[2 * n + 1] = 40.0, -40.0

    def run(use_triton: bool) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in (x, y, phi, update, alpha, bias)]
        lx, ly, lphi, lupdate, lalpha, lbias = leaves
        settings = (20, 15.0, 1e-8, 1e-6, use_triton, mhc_ops.SOURCE_HASH)
        weights = (lphi, *op_params(lalpha, lbias))
        u, _, h_post, h_res, _, _ = mhc_ops.mhc_enter(lx, lupdate, *weights, *settings)
        x1, u1, h_pre1, h_post1, h_res1, _, _ = mhc_ops.mhc_boundary(lx, ly + u, h_post, h_res, *weights, *settings)
        out = mhc_ops.mhc_apply(x1, ly + u1, h_post1, h_res1, use_triton, mhc_ops.SOURCE_HASH)
        torch.manual_seed(1)
        (out.float() * torch.randn_like(out, dtype=torch.float32)).sum().backward()
        return [h_pre1, h_post1, h_res1, x1, out] + [leaf.grad for leaf in leaves]

    names = ["h_pre", "h_post", "h_res", "x1", "out", "grad_x", "grad_y", "grad_phi", "grad_update", "grad_alpha",
             "grad_bias"]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(names, run(True), run(False), strict=True):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() <= tol, name


DECODE_PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]


def decode_model(**overrides):
    """The seeded 2-layer mHC (n = 4) model the decode tests sample from, on the GPU, in eval mode."""
    from llmkit.model.transformer import Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=VOCAB_SIZE, n_layers=2, d_model=128, n_heads=4, d_ff=256,
                                   max_seq_len=128, n_streams=4, **overrides)).cuda().eval()


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["auto", "torch"])
def test_compiled_cached_decode_with_the_mhc_ops_equals_eager_greedy_decode(implementation):
    """The compiled decode step is a CUDA graph: the ops (Triton kernels, or their PyTorch code with
    mhc.implementation: torch) must run inside its capture."""
    from llmkit.model.generation import SamplingConfig, generate

    model, prompts = decode_model(mhc=MHCConfig(implementation=implementation)), DECODE_PROMPTS
    eager = generate(model, prompts, SamplingConfig(max_new_tokens=16, temperature=0.0), eos_id=None)
    compiled = generate(model, prompts, SamplingConfig(max_new_tokens=16, temperature=0.0, compile=True), eos_id=None)
    assert torch.equal(compiled.tokens, eager.tokens)


@pytest.mark.gpu
def test_compiled_autocast_decode_samples_the_current_weights_on_gpu():
    """Under bf16 autocast a compiled generate call rewrites the bf16 weight copies it keeps, static
    inputs of the decode step's CUDA graph: its greedy tokens must be the current weights' (to
    within bf16 rounding), when the weights change between calls too (as after an optimizer step)."""
    from tests.test_generation import compiled_autocast_samples_across_a_weight_change

    (before, _), (after, _) = compiled_autocast_samples_across_a_weight_change(
        decode_model(bf16_residual=True), DECODE_PROMPTS, max_new_tokens=16)
    assert not torch.equal(before, after)


@pytest.mark.gpu
def test_compiled_generate_calls_replay_the_cuda_graph_they_recorded(monkeypatch):
    """Between the compiled generate calls of a training run the weights change in place (an
    optimizer step) while the call keeps its KV cache and bf16 weight copies: after the first
    calls have compiled and recorded, later ones replay and record nothing."""
    from torch._inductor import cudagraph_trees, cudagraph_utils

    from llmkit.model.generation import SamplingConfig, generate

    recordings, skips = [], []
    record = cudagraph_trees.CUDAGraphTreeManager.record_function
    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function",
                        lambda self, *args, **kwargs: recordings.append(1) or record(self, *args, **kwargs))
    # inductor says why it skips CUDA graphs ("skipping cudagraphs due to ...") through this logger
    monkeypatch.setattr(cudagraph_utils.cudagraphs_log, "warning", lambda msg, *args, **kwargs: skips.append(msg))
    model, prompts = decode_model(bf16_residual=True), DECODE_PROMPTS
    config = SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=20, seed=0, compile=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):  # compile, warm up, record
            generate(model, prompts, config, eos_id=None)
        assert recordings, f"no CUDA graph was recorded; inductor: {skips or 'no skip reason logged'}"
        recorded = len(recordings)
        for _ in range(3):
            with torch.no_grad():
                model.lm_head.weight.mul_(1.5)
            generate(model, prompts, config, eos_id=None)
        assert len(recordings) == recorded


@pytest.mark.gpu
def test_decode_steps_never_wait_for_the_gpu():
    """A host read of a CUDA tensor (or a copy from host data) waits for the GPU and stops the host
    from queuing steps ahead. A generate call's number of such waits must not grow with its length,
    but for the read of whether every row has stopped, once every STOP_CHECK_INTERVAL steps."""
    from llmkit.model.generation import STOP_CHECK_INTERVAL, SamplingConfig, generate

    model, prompts = decode_model(), DECODE_PROMPTS

    def waits(max_new_tokens: int, eos_id: int | None) -> Counter[str]:
        """Where (file:line) the second of two equal calls waited, and how often."""
        config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_k=20, top_p=0.9, seed=0)
        generate(model, prompts, config, eos_id=eos_id)  # warm up
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                generate(model, prompts, config, eos_id=eos_id)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchronizing" in str(w.message))

    # The first count in a process is not compared: on an H200 (torch 2.11) it held one wait more, at
    # torch/cuda/__init__.py:1270, inside torch (with one warm-up call or two), and the next count did not.
    waits(8, None)
    short, long = waits(8, None), waits(40, None)
    assert long == short, f"waits at 40 tokens {dict(long)}, at 8 {dict(short)}"
    never = VOCAB_SIZE + 1  # a stop id no row samples: every call runs to its length
    short, long = waits(8, never), waits(40, never)
    checks = (40 - 8) // STOP_CHECK_INTERVAL["cuda"]
    assert long.total() - short.total() == checks, f"waits at 40 tokens {dict(long)}, at 8 {dict(short)}"


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
