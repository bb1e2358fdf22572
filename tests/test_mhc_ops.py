"""The mHC custom ops (llmkit/model/mhc_ops.py, their PyTorch code) against the equation-literal
oracle (tests/mhc_oracle.py): values, every gradient, opcheck, saved state, precision, compiled
blocks and activation checkpointing. The Triton kernels behind the same ops are tested under the
interpreter in tests/test_mhc_triton.py.

Tolerances (CPU, 2-layer n=4 model with alpha = 0.5 so the dynamic mappings matter):
- fp64: the same math; every gradient agrees to 1e-10 relative.
- fp32: logits and the whole gradient vector agree to 1e-5 relative. Small scalar gradients
  (alpha_*, b_*) are sums with cancellation, so per tensor the ops' error against the fp64 truth
  must stay within 1e-5 |g| + 5x the oracle's own fp32 error.
- bf16 autocast: loss within 1e-4 relative, the gradient vector within 2e-2: the projection
  runs on the raw stream (fp32 accumulation) vs the oracle's bf16 matmul of the normalised one.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from llmkit.model import mhc_ops
from llmkit.model.config import MHCConfig, ModelConfig
from llmkit.model.mhc import MHCResidual
from llmkit.model.sinkhorn import sinkhorn_knopp, sinkhorn_knopp_backward
from llmkit.model.transformer import Transformer
from llmkit.profiling import saved_activation_bytes
from tests.mhc_oracle import literal_mapping, literal_mhc, loss_and_grads

VOCAB = 97


def config(n: int = 4, **kwargs) -> ModelConfig:
    shape = dict(vocab_size=VOCAB, n_layers=2, d_model=64, n_heads=4, d_ff=128, max_seq_len=64, n_streams=n)
    return ModelConfig(**{**shape, **kwargs}, mhc=MHCConfig(alpha_init=0.5))


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


@pytest.mark.parametrize("iters", [1, 20])
def test_sinkhorn_backward_matches_autograd_through_the_unrolled_loop(iters):
    logits = sinkhorn_logits()
    upstream = torch.randn_like(logits)
    a = logits.clone().requires_grad_()
    (sinkhorn_knopp(a, iters, 15.0, 1e-8) * upstream).sum().backward()
    grad = sinkhorn_knopp_backward(upstream, logits, iters, 15.0, 1e-8)
    assert a.grad[0, 0, 0, 0] == 0 and grad[0, 0, 0, 0] == 0
    assert grad[0, 0, 1, 2] != 0
    torch.testing.assert_close(grad, a.grad, rtol=1e-5, atol=1e-6)


# --- the ops, one by one ------------------------------------------------------------------------

def op_inputs(dtype: torch.dtype, n: int = 4, m: int = 11, c: int = 6, peaked: bool = False) -> dict:
    """Random inputs for every op; ``peaked`` pushes some H_res logits past the clamp."""
    torch.manual_seed(0)
    p = 2 * n + n * n
    acc = mhc_ops.accumulate_dtype(torch.empty(0, dtype=dtype))
    bias = torch.randn(p, dtype=acc)
    if peaked:
        bias[2 * n] = 40.0
        bias[2 * n + 1] = -40.0
    return dict(
        x=torch.randn(m, n, c, dtype=dtype), y=torch.randn(m, c, dtype=dtype), phi=torch.randn(p, n * c, dtype=acc),
        alpha=torch.tensor([0.7, -0.4, 1.3], dtype=acc), bias=bias,
        h_pre=torch.rand(m, n, dtype=acc), h_post=2 * torch.rand(m, n, dtype=acc), h_res=torch.rand(m, n, n, dtype=acc),
    )


def coefficient_args(t: dict, n: int = 4) -> tuple:
    proj, sumsq = mhc_ops.mhc_project(t["x"].flatten(1), t["phi"], False)
    return proj, sumsq, t["alpha"], t["bias"], n, t["x"][0].numel(), 20, 15.0, 1e-8, 1e-6, False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_every_op_passes_opcheck(dtype):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of each op."""
    t = op_inputs(dtype)
    for name in ("x", "y", "phi", "alpha", "bias", "h_pre", "h_post", "h_res"):
        t[name].requires_grad_(t[name].is_floating_point())
    proj, sumsq, *rest = coefficient_args(t)
    cases = [
        (mhc_ops.mhc_project, (t["x"].flatten(1), t["phi"], False)),
        (mhc_ops.mhc_coefficients, (proj.detach().requires_grad_(), sumsq.detach().requires_grad_(), *rest)),
        (mhc_ops.mhc_pre, (t["x"], t["h_pre"], False)),
        (mhc_ops.mhc_apply, (t["x"], t["y"], t["h_post"], t["h_res"], False)),
    ]
    for op, args in cases:
        # Sinkhorn's gradient from finite differences is too coarse outside fp64; autograd's is checked below.
        tests = None if dtype == torch.float64 else ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
        torch.library.opcheck(op, args, test_utils=tests) if tests else torch.library.opcheck(op, args)


@pytest.mark.parametrize("peaked", [False, True])
def test_the_mapping_ops_give_the_oracles_values_and_gradients_in_float64(peaked):
    """project + coefficients against Eq. 7-9 as written, with autograd through the unrolled Sinkhorn."""
    t = op_inputs(torch.float64, peaked=peaked)
    n, c = 4, t["x"].size(-1)
    leaves = [t[k].clone().requires_grad_() for k in ("x", "phi", "alpha", "bias")]
    x, phi, alpha, bias = leaves
    proj, sumsq = mhc_ops.mhc_project(x.flatten(1), phi, False)
    ops = mhc_ops.mhc_coefficients(proj, sumsq, alpha, bias, n, n * c, 20, 15.0, 1e-8, 1e-6, False)

    ox, ophi, oalpha, obias = [t[k].clone().requires_grad_() for k in ("x", "phi", "alpha", "bias")]
    xf = ox.flatten(1)
    d = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)) @ ophi.T
    logits = oalpha.repeat_interleave(torch.tensor([n, n, n * n])) * d + obias
    oracle = (torch.sigmoid(logits[:, :n]), 2 * torch.sigmoid(logits[:, n:2 * n]),
              sinkhorn_knopp(logits[:, 2 * n:].reshape(-1, n, n), 20, 15.0, 1e-8))
    upstream = [torch.randn_like(h) for h in oracle]
    for h, o in zip(ops, oracle, strict=True):
        torch.testing.assert_close(h, o, rtol=1e-12, atol=1e-14)
    grads = torch.autograd.grad(ops, leaves, upstream)
    expected = torch.autograd.grad(oracle, (ox, ophi, oalpha, obias), upstream)
    for name, g, e in zip(("x", "phi", "alpha", "bias"), grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12, msg=name)
    if peaked:  # logits far past the clamp pass no gradient to their bias
        assert grads[3][2 * n] == 0 and grads[3][2 * n + 1] == 0


def test_the_stream_ops_give_the_einsums_and_their_gradients_in_float64():
    t = op_inputs(torch.float64)
    leaves = [t[k].clone().requires_grad_() for k in ("x", "y", "h_pre", "h_post", "h_res")]
    x, y, h_pre, h_post, h_res = leaves
    pre = mhc_ops.mhc_pre(x, h_pre, False)
    applied = mhc_ops.mhc_apply(x, y, h_post, h_res, False)
    torch.testing.assert_close(pre, torch.einsum("mn,mnc->mc", h_pre, x), rtol=1e-12, atol=1e-14)
    expected = torch.einsum("min,mnc->mic", h_res, x) + h_post[..., None] * y[:, None, :]
    torch.testing.assert_close(applied, expected, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda *a: mhc_ops.mhc_pre(a[0], a[2], False), leaves[:3])
    assert torch.autograd.gradcheck(lambda *a: mhc_ops.mhc_apply(*a[:2], *a[3:], False), leaves)


def test_the_coefficients_are_float32_and_the_stream_ops_compute_in_float32_on_a_bf16_stream():
    """Issue 15 item 5: under bf16 autocast on a bf16 stream H_pre, H_post and H_res are fp32 and
    agree with the fp64 oracle to fp32 accuracy (the old eager path cast them to bf16: H_res rows
    off by 1.7e-3, sum(H_pre) by 3e-3), and H_pre X is an fp32 sum rounded once to bf16."""
    torch.manual_seed(0)
    residual = MHCResidual(ModelConfig(vocab_size=VOCAB, n_layers=1, d_model=64, n_heads=4, d_ff=128, n_streams=4))
    x = torch.randn(3, 5, 4, 64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h_pre, h_post, h_res = residual.mapping(x)
    assert h_pre.dtype == h_post.dtype == h_res.dtype == torch.float32
    with torch.no_grad():
        oracle = literal_mapping(residual.double().mapping, x.double())
    for h, o in zip((h_pre, h_post, h_res), oracle, strict=True):
        torch.testing.assert_close(h.double(), o, rtol=0, atol=2e-6)
    torch.testing.assert_close(h_res.sum(-1), torch.ones(3, 5, 4), rtol=0, atol=1e-6)
    streams = x.reshape(-1, 4, 64)
    pre = mhc_ops.mhc_pre(streams, h_pre.reshape(-1, 4), False)
    assert pre.dtype == torch.bfloat16
    assert torch.equal(pre, torch.einsum("mn,mnc->mc", h_pre.reshape(-1, 4), streams.float()).to(torch.bfloat16))


def test_a_residual_saves_the_stream_its_output_and_order_n_squared_floats_per_token():
    """Issue 15 item 3: backward keeps X, y and O(n^2) fp32 per token, nothing per Sinkhorn iteration."""
    torch.manual_seed(0)
    n, c, m = 4, 64, 40
    residual = MHCResidual(ModelConfig(vocab_size=VOCAB, n_layers=1, d_model=c, n_heads=4, d_ff=128, n_streams=n))
    x = torch.randn(2, m // 2, n, c, requires_grad=True)
    y_bytes = m * c * 4

    def forward() -> None:
        residual(x, lambda t: t * 2.0)  # a sublayer that saves nothing itself

    saved = saved_activation_bytes(residual, forward)
    per_token_floats = (2 * n + n * n) + 1 + n + n + n * n  # proj, sumsq, H_pre, H_post, H_res
    budget = x.numel() * 4 + y_bytes + m * per_token_floats * 4 + 64 * 4  # + alpha and bias
    assert saved <= budget, (saved, budget)
    assert saved >= x.numel() * 4 + y_bytes


# --- the model: ops against the oracle ----------------------------------------------------------

@pytest.mark.parametrize("n", [2, 4])
def test_the_model_is_the_oracles_math_in_float64(n):
    torch.manual_seed(n)
    model = Transformer(config(n)).double()
    idx = torch.randint(0, VOCAB, (2, 17))
    logits, grads = loss_and_grads(model, idx, VOCAB)
    with literal_mhc():
        logits_o, grads_o = loss_and_grads(model, idx, VOCAB)
    assert rel(logits, logits_o) < 1e-12
    for (name, _), g, g_o in zip(model.named_parameters(), grads, grads_o, strict=True):
        assert rel(g, g_o) < 1e-10, name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_model_matches_the_oracle_in_float32(seed):
    torch.manual_seed(seed)
    model = Transformer(config())
    truth = Transformer(config()).double()
    truth.load_state_dict(model.state_dict())
    idx = torch.randint(0, VOCAB, (2, 17))
    logits, grads = loss_and_grads(model, idx, VOCAB)
    with literal_mhc():
        logits_o, grads_o = loss_and_grads(model, idx, VOCAB)
        _, grads_64 = loss_and_grads(truth, idx, VOCAB)
    assert rel(logits, logits_o) < 1e-5
    assert rel(flat(grads), flat(grads_o)) < 1e-5
    for (name, _), g, g_o, g_64 in zip(model.named_parameters(), grads, grads_o, grads_64, strict=True):
        assert (g - g_64).norm() <= 1e-5 * g_64.norm() + 5 * (g_o - g_64).norm(), name


def test_the_model_matches_the_oracle_under_bf16_autocast():
    torch.manual_seed(0)
    model = Transformer(config())
    idx = torch.randint(0, VOCAB, (4, 33))
    losses, grads = [], []
    for literal in (False, True):
        model.zero_grad()
        with literal_mhc() if literal else torch.autocast("cpu", enabled=False):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model.loss(idx[:, :-1], idx[:, 1:])
            loss.backward()
        losses.append(loss.item())
        grads.append(flat([p.grad.clone() for p in model.parameters()]))
    assert abs(losses[0] - losses[1]) < 1e-4 * losses[1]
    assert rel(grads[0], grads[1]) < 2e-2


def test_implementation_torch_is_the_same_math_and_old_values_still_load():
    torch.manual_seed(0)
    auto = Transformer(config())
    with pytest.warns(FutureWarning, match="mhc.implementation 'reference' is gone"):
        old = MHCConfig(implementation="reference")
    assert old.implementation == "auto"
    forced = Transformer(config())
    forced.config.mhc.implementation = "torch"
    forced.load_state_dict(auto.state_dict())
    idx = torch.randint(0, VOCAB, (2, 17))
    assert torch.equal(auto(idx), forced(idx))  # no Triton on a CPU tensor: the same PyTorch code


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = Transformer(config())
    checkpointed = Transformer(config(gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    idx = torch.randint(0, VOCAB, (2, 17))
    _, grads_plain = loss_and_grads(plain, idx, VOCAB)
    _, grads_ckpt = loss_and_grads(checkpointed, idx, VOCAB)
    for (name, _), a, b in zip(plain.named_parameters(), grads_plain, grads_ckpt, strict=True):
        assert torch.equal(a, b), name


def traced_graph(n: int) -> torch.fx.Graph:
    """The FX graph dynamo captures for one block's forward (no graph break allowed)."""
    torch.manual_seed(0)
    model = Transformer(config(n, n_layers=1))
    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    x = torch.randn(2, 8, n, 64) if n > 1 else torch.randn(2, 8, 64)
    torch.compile(model.blocks[0], backend=keep, fullgraph=True)(
        x, model.rope_cos[:8], model.rope_sin[:8], None, None, None, None)
    torch._dynamo.reset()
    assert len(graphs) == 1
    return graphs[0].graph


def test_a_compiled_block_traces_the_ops_as_a_handful_of_nodes():
    """Before the custom ops an n=4 block traced 252 more FX nodes than the dense one (the 20
    Sinkhorn iterations and the H math, ~140 GPU kernels per sublayer); now each sublayer's mHC
    math is 4 opaque ops, plus views, tuple indexing and the stacking of alpha and b (52 nodes
    per block in all, measured)."""
    dense, mhc = traced_graph(1), traced_graph(4)
    ops = [node.target for node in mhc.nodes if "llmkit" in str(node.target)]
    assert len(ops) == 8 and {str(op) for op in ops} == {
        f"llmkit.mhc_{name}.default" for name in ("project", "coefficients", "pre", "apply")}
    extra = len(mhc.nodes) - len(dense.nodes)
    assert extra <= 60, extra


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_match_the_oracle_and_compile_once(checkpointing):
    """torch.compile (inductor, C++ on CPU) of each block, with and without the checkpoint traced
    inside the block: same outputs and gradients as the eager oracle, one graph for all three
    blocks, no graph break."""
    torch.manual_seed(0)
    model = Transformer(config(n_layers=3, gradient_checkpointing=checkpointing))
    idx = torch.randint(0, VOCAB, (2, 17))
    with literal_mhc():
        logits_o, grads_o = loss_and_grads(model, idx, VOCAB)
    torch._dynamo.reset()
    counters.clear()
    model.compile_blocks()
    logits_c, grads_c = loss_and_grads(model, idx, VOCAB)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert rel(logits_c, logits_o) < 1e-5
    assert rel(flat(grads_c), flat(grads_o)) < 1e-5
    torch._dynamo.reset()


def stream_dtype(model: Transformer, idx: torch.Tensor) -> torch.dtype:
    """The residual stream's dtype after the last block (the final norm's input), under bf16 autocast."""
    seen = []
    handle = model.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.loss(idx[:, :-1], idx[:, 1:]).backward()
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("bf16_residual", [False, True])
def test_residual_stream_dtype_under_autocast_is_the_configured_one(n, bf16_residual):
    """fp32 by default (the ops keep the stream's dtype under autocast), bf16 with bf16_residual."""
    torch.manual_seed(0)
    model = Transformer(config(n, bf16_residual=bf16_residual))
    expected = torch.bfloat16 if bf16_residual else torch.float32
    assert stream_dtype(model, torch.randint(0, VOCAB, (2, 17))) == expected


@pytest.mark.slow
@pytest.mark.parametrize("bf16_residual", [False, True])
def test_compiled_blocks_keep_the_configured_stream_dtype(bf16_residual):
    torch.manual_seed(0)
    model = Transformer(config(bf16_residual=bf16_residual))
    torch._dynamo.reset()
    model.compile_blocks()
    expected = torch.bfloat16 if bf16_residual else torch.float32
    assert stream_dtype(model, torch.randint(0, VOCAB, (2, 17))) == expected
    torch._dynamo.reset()


def test_bf16_residual_does_nothing_without_autocast():
    torch.manual_seed(0)
    plain = Transformer(config())
    flagged = Transformer(config(bf16_residual=True))
    flagged.load_state_dict(plain.state_dict())
    idx = torch.randint(0, VOCAB, (2, 17))
    logits_plain, grads_plain = loss_and_grads(plain, idx, VOCAB)
    logits_flagged, grads_flagged = loss_and_grads(flagged, idx, VOCAB)
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
    fp32_stream = Transformer(config())
    bf16_stream = Transformer(config(bf16_residual=True))
    idx = torch.randint(0, VOCAB, (4, 65))
    assert saved_bytes(bf16_stream, idx) < 0.85 * saved_bytes(fp32_stream, idx)
