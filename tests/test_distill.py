"""SDFT divergences against a direct float64 computation, and where gradients flow."""

import pytest
import torch

from llmkit.modules.distill import distill_loss_sum, token_divergence


def direct(student: torch.Tensor, teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    """The textbook formulas in float64, written out independently."""
    p_s, p_t = student.double().softmax(-1), teacher.double().softmax(-1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if alpha == 1:
        return kl(p_s, p_t)
    if alpha == 0:
        return kl(p_t, p_s)
    m = alpha * p_t + (1 - alpha) * p_s
    return alpha * kl(p_t, m) + (1 - alpha) * kl(p_s, m)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.1])
def test_divergence_equals_a_float64_computation(alpha):
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 50) * 2, torch.randn(3, 5, 50) * 2
    got = token_divergence(student, teacher, alpha)
    assert got.shape == (3, 5)
    assert torch.allclose(got.double(), direct(student, teacher, alpha), rtol=1e-5, atol=1e-6)
    assert (got > 0).all()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_divergence_is_zero_when_teacher_equals_student(alpha):
    logits = torch.randn(2, 4, 30)
    assert torch.allclose(token_divergence(logits, logits.clone(), alpha), torch.zeros(2, 4), atol=1e-6)


def test_jsd_tends_to_the_kls_at_the_ends_after_rescaling():
    torch.manual_seed(1)
    s, t = torch.randn(4, 20), torch.randn(4, 20)
    fwd, rev = token_divergence(s, t, 0.0), token_divergence(s, t, 1.0)
    assert torch.allclose(token_divergence(s, t, 1e-4) / 1e-4, fwd, rtol=1e-2)
    assert torch.allclose(token_divergence(s, t, 1 - 1e-4) / 1e-4, rev, rtol=1e-2)


def test_top_k_restricts_to_the_students_top_tokens_renormalised():
    torch.manual_seed(2)
    s, t = torch.randn(2, 40), torch.randn(2, 40)
    index = s.topk(5, dim=-1).indices
    expected = direct(s.gather(-1, index), t.gather(-1, index), 1.0)
    assert torch.allclose(token_divergence(s, t, 1.0, top_k=5).double(), expected, rtol=1e-5)


def test_masked_positions_get_no_gradient_eos_does_and_the_teacher_none():
    torch.manual_seed(3)
    student = torch.randn(2, 6, 25, requires_grad=True)
    teacher = torch.randn(2, 6, 25, requires_grad=True)
    # row 0: 4 real tokens, the last one EOS; row 1: 6 real tokens
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    total, n = distill_loss_sum(student, teacher, mask, alpha=1.0)
    (total / n).backward()
    assert n == 10
    grad_norm = student.grad.norm(dim=-1)
    assert (grad_norm[0, 4:] == 0).all()  # padding
    assert (grad_norm[mask] > 0).all()  # every real token, the EOS at row 0 position 3 included
    assert teacher.grad is None


def test_skip_first_and_per_token_normalisation_under_accumulation():
    torch.manual_seed(4)
    s, t = torch.randn(4, 7, 10), torch.randn(4, 7, 10)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[1, 5:] = False
    total, n = distill_loss_sum(s, t, mask, skip_first=3)
    expected_mask = mask.clone()
    expected_mask[:, :3] = False
    assert n == expected_mask.sum()
    assert torch.allclose(total, token_divergence(s, t)[expected_mask].sum())
    # two micro-batches of unequal token counts give the same per-token loss as one batch
    a_sum, a_n = distill_loss_sum(s[:1], t[:1], mask[:1])
    b_sum, b_n = distill_loss_sum(s[1:], t[1:], mask[1:])
    whole_sum, whole_n = distill_loss_sum(s, t, mask)
    assert torch.allclose((a_sum + b_sum) / (a_n + b_n), whole_sum / whole_n)


def test_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        token_divergence(torch.zeros(1, 3), torch.zeros(1, 3), 1.5)
