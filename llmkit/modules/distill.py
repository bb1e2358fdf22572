"""Token-level distillation divergences for SDFT (arXiv 2601.19897; docs/math.md).

At every real completion position t the student distribution p_s = softmax(student logits)
is compared with the teacher's p_t over the full vocabulary, analytically (no sampling):

    alpha = 1      reverse KL   KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)   (llmkit's default)
    alpha = 0      forward KL   KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)   (the SDFT authors' published runs)
    0 < alpha < 1  generalised JSD (GKD, Agarwal et al. 2024) with M = alpha p_t + (1 - alpha) p_s:
                   alpha KL(p_t || M) + (1 - alpha) KL(p_s || M)

The JSD interpolates in gradient, not in value: divided by alpha it tends to the forward KL as
alpha -> 0, divided by (1 - alpha) to the reverse KL as alpha -> 1 (the endpoints are exact).
The teacher never receives gradients (its logits are detached here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, from (finite) log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def token_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """The divergence [...] at every position of logits [..., V] (see the module docstring).

    top_k: compare the two distributions only on the student's k most likely tokens at each
    position, both renormalised there: it bounds memory at large vocabularies (the analytic
    full-vocabulary estimator is top_k=None).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (1 = reverse KL, 0 = forward KL), got {alpha}")
    student = student_logits.float()
    teacher = teacher_logits.detach().float()
    if top_k is not None and top_k < student.size(-1):
        index = student.detach().topk(top_k, dim=-1).indices
        student, teacher = student.gather(-1, index), teacher.gather(-1, index)
    log_s = F.log_softmax(student, dim=-1)
    log_t = F.log_softmax(teacher, dim=-1)
    if alpha == 1.0:
        return _kl(log_s, log_t)
    if alpha == 0.0:
        return _kl(log_t, log_s)
    log_m = torch.logaddexp(log_t + math.log(alpha), log_s + math.log(1 - alpha))
    return alpha * _kl(log_t, log_m) + (1 - alpha) * _kl(log_s, log_m)


def distill_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 1.0,
    top_k: int | None = None,
    skip_first: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the divergence over real completion tokens, their number).

    logits [B, L, V] are aligned with the completion tokens [B, L] (logit t predicts token t); ``mask`` [B, L]
    is True on real tokens, EOS included, False on padding (prompts are never part of L).
    The first ``skip_first`` completion tokens of each row are left out (the official code
    skips 3). Returning the sum and the count lets a caller divide by the number of real
    tokens across all micro-batches of an accumulated step, so the loss is per real token
    however the batch is split.
    """
    mask = mask.bool()
    if skip_first:
        mask = mask & (torch.arange(mask.size(1), device=mask.device) >= skip_first)
    divergence = token_divergence(student_logits, teacher_logits, alpha, top_k)
    return torch.where(mask, divergence, 0.0).sum(), mask.sum()
