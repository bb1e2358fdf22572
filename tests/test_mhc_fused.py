"""The fused mHC path against the reference path (issue 6): Sinkhorn's recomputing backward,
the fused mapping and "apply", per-block compilation and activation checkpointing.

Tolerances (measured over 10 seeds on CPU, 2-layer n=4 model with alpha = 0.5 so the dynamic
mappings matter):
- fp64: both paths are the same math; every gradient agrees to 1e-10 relative.
- fp32: logits and the whole gradient vector agree to 1e-5 relative (measured <= 2e-7). Small
  scalar gradients (alpha_*, b_*) are sums with cancellation, so their fp32 error against the
  fp64 truth is ~1e-5 in *both* paths; per tensor the fused error must stay within
  1e-5 |g| + 5x the reference's own error (measured <= 2.4x).
- bf16 autocast: loss within 1e-4 relative (measured <= 1e-5), the gradient vector within 2e-2
  (measured <= 5e-3): bf16 matmuls on the raw vs the normalised stream round differently.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

from llmkit.model.config import MHCConfig, ModelConfig
from llmkit.model.mhc import apply_mixing, pre_aggregate
from llmkit.model.sinkhorn import sinkhorn_knopp, sinkhorn_knopp_recompute
from llmkit.model.transformer import Transformer
from llmkit.profiling import saved_activation_bytes

VOCAB = 97


def config(implementation: str, n: int = 4, **kwargs) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, n_layers=2, d_model=64, n_heads=4, d_ff=128, max_seq_len=64, n_streams=n,
                       mhc=MHCConfig(implementation=implementation, alpha_init=0.5), **kwargs)


def twin_models(n: int = 4, dtype: torch.dtype = torch.float32, **kwargs) -> tuple[Transformer, Transformer]:
    reference = Transformer(config("reference", n, **kwargs)).to(dtype)
    fused = Transformer(config("fused", n, **kwargs)).to(dtype)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def loss_and_grads(model: Transformer, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = model(idx[:, :-1])
    F.cross_entropy(logits.reshape(-1, VOCAB).to(torch.float64), idx[:, 1:].reshape(-1)).backward()
    return logits.detach().double(), [p.grad.detach().double() for p in model.parameters()]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def sinkhorn_logits() -> torch.Tensor:
    torch.manual_seed(0)
    logits = 3 * torch.randn(6, 7, 4, 4)
    logits[0, 0, 0, 0] = 20.0  # clamped: no gradient flows through this entry
    logits[0, 0, 1, 2] = -15.0  # on the clamp boundary: torch.clamp passes the gradient
    return logits


def test_sinkhorn_recompute_forward_is_the_reference():
    logits = sinkhorn_logits()
    assert torch.equal(sinkhorn_knopp_recompute(logits, 20, 15.0, 1e-8), sinkhorn_knopp(logits, 20, 15.0, 1e-8))


@pytest.mark.parametrize("iters", [1, 20])
def test_sinkhorn_backward_matches_autograd_through_the_unrolled_loop(iters):
    logits = sinkhorn_logits()
    upstream = torch.randn_like(logits)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    (sinkhorn_knopp(a, iters, 15.0, 1e-8) * upstream).sum().backward()
    (sinkhorn_knopp_recompute(b, iters, 15.0, 1e-8) * upstream).sum().backward()
    assert a.grad[0, 0, 0, 0] == 0 and b.grad[0, 0, 0, 0] == 0
    assert b.grad[0, 0, 1, 2] != 0
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)


def test_sinkhorn_backward_passes_gradcheck_in_float64():
    logits = (2 * torch.randn(3, 4, 4, dtype=torch.float64)).requires_grad_()
    # The op computes in fp32 by design, so check it against finite differences at fp32 accuracy.
    assert torch.autograd.gradcheck(
        lambda x: sinkhorn_knopp_recompute(x, 20, 15.0, 1e-8).double(), (logits,), eps=1e-3, atol=1e-3, rtol=1e-2
    )


def test_sinkhorn_recompute_keeps_only_its_input_for_backward():
    """Reference autograd saves every iteration's tensors; the recomputing op saves the logits."""
    logits = torch.randn(8, 16, 4, 4, requires_grad=True)

    def saved(fn) -> list[torch.Size]:
        shapes: list[torch.Size] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
            fn(logits, 20, 15.0, 1e-8)
        return shapes

    assert saved(sinkhorn_knopp_recompute) == [logits.shape]
    assert len(saved(sinkhorn_knopp)) >= 2 * 20


@pytest.mark.parametrize("n", [1, 2, 4])
def test_pre_aggregate_and_apply_mixing_equal_the_einsums(n):
    """The multiply-add forms compiled blocks use (eager blocks keep the einsums)."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, n, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    h_pre, h_post, h_res = torch.rand(2, 3, n, dtype=torch.float64), torch.rand(2, 3, n, dtype=torch.float64), \
        torch.rand(2, 3, n, n, dtype=torch.float64)
    torch.testing.assert_close(pre_aggregate(h_pre, x), torch.einsum("btn,btnc->btc", h_pre, x), rtol=1e-12, atol=0)
    expected = torch.einsum("btnm,btmc->btnc", h_res, x) + h_post[..., None] * y[..., None, :]
    torch.testing.assert_close(apply_mixing(h_res, h_post, x, y), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n", [2, 4])
def test_fused_and_reference_are_the_same_math_in_float64(n):
    torch.manual_seed(n)
    reference, fused = twin_models(n, torch.float64)
    idx = torch.randint(0, VOCAB, (2, 17))
    logits_r, grads_r = loss_and_grads(reference, idx)
    logits_f, grads_f = loss_and_grads(fused, idx)
    assert rel(logits_f, logits_r) < 1e-12
    for (name, _), g_f, g_r in zip(reference.named_parameters(), grads_f, grads_r, strict=True):
        assert rel(g_f, g_r) < 1e-10, name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_matches_reference_in_float32(seed):
    torch.manual_seed(seed)
    reference, fused = twin_models()
    truth = Transformer(config("reference")).double()
    truth.load_state_dict(reference.state_dict())
    idx = torch.randint(0, VOCAB, (2, 17))
    logits_r, grads_r = loss_and_grads(reference, idx)
    logits_f, grads_f = loss_and_grads(fused, idx)
    _, grads_64 = loss_and_grads(truth, idx)
    assert rel(logits_f, logits_r) < 1e-5
    assert rel(flat(grads_f), flat(grads_r)) < 1e-5
    for (name, _), g_f, g_r, g in zip(reference.named_parameters(), grads_f, grads_r, grads_64, strict=True):
        assert (g_f - g).norm() <= 1e-5 * g.norm() + 5 * (g_r - g).norm(), name


def test_fused_matches_reference_under_bf16_autocast():
    torch.manual_seed(0)
    reference, fused = twin_models()
    idx = torch.randint(0, VOCAB, (4, 33))
    losses, grads = [], []
    for model in (reference, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(loss.item())
        grads.append(flat([p.grad for p in model.parameters()]))
    assert abs(losses[1] - losses[0]) < 1e-4 * losses[0]
    assert rel(grads[1], grads[0]) < 2e-2


@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_checkpointing_gives_the_same_gradients(implementation):
    torch.manual_seed(0)
    plain = Transformer(config(implementation))
    checkpointed = Transformer(config(implementation, gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    idx = torch.randint(0, VOCAB, (2, 17))
    _, grads_plain = loss_and_grads(plain, idx)
    _, grads_ckpt = loss_and_grads(checkpointed, idx)
    for (name, _), a, b in zip(plain.named_parameters(), grads_plain, grads_ckpt, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_match_the_eager_reference_and_compile_once(checkpointing):
    """torch.compile (inductor, C++ on CPU) of each block, with and without the checkpoint traced
    inside the block: same outputs and gradients as the eager reference, and one graph for
    all three blocks (compile time does not grow with depth)."""
    torch.manual_seed(0)
    cfg = dict(n_layers=3, gradient_checkpointing=checkpointing)
    reference = Transformer(ModelConfig(**{**config("reference").to_dict(), **cfg}))
    compiled = Transformer(ModelConfig(**{**config("fused").to_dict(), **cfg}))
    compiled.load_state_dict(reference.state_dict())
    torch._dynamo.reset()
    counters.clear()
    compiled.compile_blocks()
    idx = torch.randint(0, VOCAB, (2, 17))
    logits_r, grads_r = loss_and_grads(reference, idx)
    logits_c, grads_c = loss_and_grads(compiled, idx)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert rel(logits_c, logits_r) < 1e-5
    assert rel(flat(grads_c), flat(grads_r)) < 1e-5
    torch._dynamo.reset()


def stream_dtype(model: Transformer, idx: torch.Tensor) -> torch.dtype:
    """The residual stream's dtype after the last block (the final norm's input), under bf16 autocast."""
    seen = []
    handle = model.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.loss(idx[:, :-1], idx[:, 1:]).backward()
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("implementation", ["fused", "reference"])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("bf16_residual", [False, True])
def test_residual_stream_dtype_under_autocast_is_the_configured_one(implementation, n, bf16_residual):
    """fp32 by default (autocast would turn the einsums bf16; they are kept out of it), bf16
    with bf16_residual, in every path."""
    torch.manual_seed(0)
    model = Transformer(config(implementation, n, bf16_residual=bf16_residual))
    expected = torch.bfloat16 if bf16_residual else torch.float32
    assert stream_dtype(model, torch.randint(0, VOCAB, (2, 17))) == expected


@pytest.mark.slow
@pytest.mark.parametrize("bf16_residual", [False, True])
def test_compiled_blocks_keep_the_configured_stream_dtype(bf16_residual):
    torch.manual_seed(0)
    model = Transformer(config("fused", bf16_residual=bf16_residual))
    torch._dynamo.reset()
    model.compile_blocks()
    expected = torch.bfloat16 if bf16_residual else torch.float32
    assert stream_dtype(model, torch.randint(0, VOCAB, (2, 17))) == expected
    torch._dynamo.reset()


def test_bf16_residual_does_nothing_without_autocast():
    torch.manual_seed(0)
    plain = Transformer(config("fused"))
    flagged = Transformer(config("fused", bf16_residual=True))
    flagged.load_state_dict(plain.state_dict())
    idx = torch.randint(0, VOCAB, (2, 17))
    logits_plain, grads_plain = loss_and_grads(plain, idx)
    logits_flagged, grads_flagged = loss_and_grads(flagged, idx)
    assert torch.equal(logits_plain, logits_flagged)
    assert all(torch.equal(a, b) for a, b in zip(grads_plain, grads_flagged, strict=True))


def saved_bytes(model: Transformer, idx: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward under bf16 autocast."""

    def forward() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.loss(idx[:, :-1], idx[:, 1:])

    return saved_activation_bytes(model, forward)


def test_bf16_residual_cuts_the_saved_activations_under_autocast():
    torch.manual_seed(0)
    fp32_stream = Transformer(config("fused"))
    bf16_stream = Transformer(config("fused", bf16_residual=True))
    idx = torch.randint(0, VOCAB, (4, 65))
    assert saved_bytes(bf16_stream, idx) < 0.85 * saved_bytes(fp32_stream, idx)
