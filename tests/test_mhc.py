"""mHC invariants (arXiv 2512.24880, Eq. 3-9): Sinkhorn projection, initial mappings, mean preservation."""

import math

import pytest
import torch

from llmkit.errors import LLMKitError
from llmkit.model.config import MHCConfig, ModelConfig
from llmkit.model.mhc import MHCMapping, MHCResidual, finish
from llmkit.model.sinkhorn import sinkhorn_knopp

# 20 Sinkhorn iterations end with a row normalisation, so rows sum to 1 up to float error.
# Columns converge geometrically and how far depends on the spread of the logits; measured
# over 10,000 random 4x4 matrices: std 1 -> max error 1.5e-3 (mean 2e-7); std 2 -> 3.4e-2;
# std 4 -> 6.7e-2 (docs/math.md). The tests state those tolerances.
ROW_TOL = 1e-5
COL_TOL_STD1 = 2e-3


def small_config(n: int = 4, **mhc) -> ModelConfig:
    return ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_seq_len=64,
                       n_streams=n, mhc=MHCConfig(**mhc))


def test_sinkhorn_is_doubly_stochastic():
    torch.manual_seed(0)
    logits = torch.randn(100, 100, 4, 4)
    h = sinkhorn_knopp(logits, iters=20, clamp=15.0, eps=1e-8)
    assert h.dtype == torch.float32
    assert (h >= 0).all()
    assert (h.sum(-1) - 1).abs().max() < ROW_TOL
    col_err = (h.sum(-2) - 1).abs()
    assert col_err.max() < COL_TOL_STD1
    assert col_err.mean() < 1e-5


def test_more_iterations_tighten_the_columns():
    torch.manual_seed(0)
    logits = 3 * torch.randn(1000, 4, 4)
    errs = [(sinkhorn_knopp(logits, it, 15.0, 1e-8).sum(-2) - 1).abs().mean().item() for it in (5, 20, 100)]
    assert errs[0] > errs[1] > errs[2]


def test_sinkhorn_handles_extreme_logits_without_nan():
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4]])
    h = sinkhorn_knopp(logits, iters=20, clamp=15.0, eps=1e-8)
    assert torch.isfinite(h).all()
    assert torch.allclose(h, torch.eye(2), atol=1e-5)


def test_sinkhorn_runs_in_fp32_for_bf16_input():
    logits = torch.randn(3, 4, 4).bfloat16()
    h = sinkhorn_knopp(logits, iters=20, clamp=15.0, eps=1e-8)
    assert h.dtype == torch.float32
    assert torch.allclose(h.sum(-1), torch.ones(3, 4), atol=ROW_TOL)


@pytest.mark.parametrize("n", [2, 4])
def test_initial_mappings_average_the_streams_and_start_h_res_near_the_identity(n):
    mapping = MHCMapping(small_config(n))
    x = torch.randn(2, 5, n, 32)
    _, _, h_pre, h_post, h_res = mapping(x)  # an Entry: (x, u, H_pre, H_post, H_res)
    # b_pre = logit(1/n), b_post = logit(1/2n); the dynamic term is alpha=0.01 times O(1).
    assert torch.allclose(h_pre.sum(-1), torch.ones(2, 5), atol=0.05)
    assert torch.allclose(h_post.sum(-1), torch.ones(2, 5), atol=0.05)
    assert torch.allclose(h_pre, torch.full_like(h_pre, 1 / n), atol=0.02)
    # b_res = +2 diagonal / -2 off-diagonal: H_res starts close to the identity.
    diag = h_res.diagonal(dim1=-2, dim2=-1)
    expected = math.exp(2) / (math.exp(2) + (n - 1) * math.exp(-2))
    assert torch.allclose(diag, torch.full_like(diag, expected), atol=0.02)
    assert (diag > 0.85).all()


def test_copy_post_init_starts_h_post_at_one_per_stream():
    mapping = MHCMapping(small_config(4, post_init="copy"))
    h_post = mapping(torch.randn(2, 3, 4, 32)).h_post
    assert torch.allclose(h_post, torch.ones_like(h_post), atol=0.02)


@pytest.mark.parametrize("old, new", [("handoff", "split"), ("hc", "copy")])
def test_the_earlier_post_init_names_still_load_with_a_deprecation_warning(old, new):
    """Configs and checkpoints written with the earlier names build the same model, and say what to write instead."""
    with pytest.warns(FutureWarning, match=f"mhc.post_init '{old}' is deprecated: use '{new}'"):
        config = ModelConfig.from_dict(small_config(4).to_dict() | {"mhc": {"post_init": old}})
    assert config.mhc.post_init == new
    torch.manual_seed(0)
    renamed = MHCMapping(config)
    torch.manual_seed(0)
    assert torch.equal(renamed.b_post, MHCMapping(small_config(4, post_init=new)).b_post)
    with pytest.raises(LLMKitError, match="mhc.post_init must be 'split' or 'copy', got 'unit'"):
        MHCConfig(post_init="unit")


@pytest.mark.parametrize("alpha_init", [0.01, 1.0])
def test_h_res_preserves_the_stream_mean(alpha_init):
    """mean_n(H_res X) = mean_n(X) exactly when columns sum to 1; the error is bounded by
    max|colsum - 1| * max|X|, and is tiny at the default init."""
    torch.manual_seed(0)
    mapping = MHCMapping(small_config(4, alpha_init=alpha_init))
    x = torch.randn(2, 7, 4, 32)
    h_res = mapping(x).h_res
    mixed = torch.einsum("btnm,btmc->btnc", h_res, x)
    err = (mixed.mean(dim=2) - x.mean(dim=2)).abs().max()
    bound = (h_res.sum(-2) - 1).abs().max() * x.abs().max()
    assert err <= bound + 1e-6
    assert err < (1e-4 if alpha_init == 0.01 else 1e-2)


def test_residual_output_is_h_res_x_plus_h_post_times_f():
    torch.manual_seed(0)
    res = MHCResidual(small_config(4))
    x = torch.randn(2, 3, 4, 32)
    f = torch.nn.Linear(32, 32)
    pending = res(x, f)  # the write-back is left to the next sublayer's mapping, or finish
    _, u, h_pre, h_post, h_res = res.mapping(x)
    x_in = (h_pre.unsqueeze(-1) * x).sum(2)
    assert torch.equal(pending.x, x) and torch.allclose(u, x_in, atol=1e-6)
    expected = h_res @ x + h_post.unsqueeze(-1) * f(x_in).unsqueeze(2)
    assert torch.allclose(finish(pending, True), expected, atol=1e-5)
    assert torch.allclose(res.mapping(pending).x, expected, atol=1e-5)  # the next mapping's stream
