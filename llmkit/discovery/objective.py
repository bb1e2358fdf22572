"""The entropic objective of TTT-Discover (arXiv 2601.16175; docs/math.md maps each equation here).

For one start state s and K rollouts a_1..a_K with rewards r_1..r_K the objective is

    J_beta(theta) = log E_{a ~ pi_theta(.|s)} exp(beta(s) R(s, a))

whose gradient is a REINFORCE gradient weighted by w_beta(a) = exp(beta R(a)) / E exp(beta R),
with the constant baseline -1: A = w - 1.
The pieces, in the order a training step uses them:

    solve_beta            beta(s) such that KL(q_beta || uniform) = ln 2 over the K rollouts (paper Appendix A.1)
    beta_summary          a step's betas in two numbers: their median and how many hit the cap
    loo_advantages        A_i = w_i - 1 with a leave-one-out estimate of E exp(beta R) (Appendix A.1)
    kl_shaped_advantages  A - lam log(pi_theta / pi_theta0) on every action token
    entropic_policy_loss  the surrogate -sum_t A_t log pi_theta(a_t), summed, with the token count

Everything is computed in float64; advantages are plain numbers (detached) by the time they
reach the loss, so the only gradient is the one of log pi_theta.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import torch

from llmkit.errors import LLMKitError

# Added to the leave-one-out normaliser, as in the official code: it only matters when every
# other rollout has weight ~0, where it caps the advantage of the best one near 1e12.
_LOO_EPS = 1e-12

BETA_MAX = 1e6
"""The cap of the adaptive beta: a group whose KL target is out of reach (ties at the best, K = 2,
a tiny spread) gets it (:func:`solve_beta`)."""


def _rewards(rewards: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """The K rewards of one group as a float64 vector, checked: K >= 2 and all finite. A list is
    read as float64 (``as_tensor``'s default, float32, made 1e39 inf and close rewards ties)."""
    r = (rewards.detach() if isinstance(rewards, torch.Tensor) else torch.as_tensor(rewards, dtype=torch.float64))
    r = r.to(torch.float64)
    if r.dim() != 1:
        raise LLMKitError(f"rewards must be a vector of the K rollouts of one start state, got shape {tuple(r.shape)}")
    if r.numel() < 2:
        raise LLMKitError(
            f"the entropic objective needs K >= 2 rollouts per start state (got {r.numel()}): with one rollout "
            "there is nothing to compare it with; sample more rollouts per start state"
        )
    finite = torch.isfinite(r)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise LLMKitError(
            f"reward {i} of {r.numel()} is {r[i].item()}: the entropic weights need finite rewards; "
            "fix the reward function (score invalid outputs with a finite value such as 0)"
        )
    return r


def _kl_to_uniform(spread: torch.Tensor, beta: float) -> float:
    """KL(q_beta || u) = sum_n q(n) log q(n) + log K for q = softmax(beta * spread) (A4)."""
    q = torch.softmax(beta * spread, dim=0)
    return float(torch.xlogy(q, q).sum()) + math.log(spread.numel())


def solve_beta(
    rewards: torch.Tensor | Sequence[float], target_kl: float = math.log(2), beta_max: float = BETA_MAX, iters: int = 60
) -> float:
    """The adaptive beta of one group of K rollouts from the same start state (§5, A4, F6).

    With q_beta(n) = exp(beta (r_n - max r)) / sum_m exp(beta (r_m - max r)), return the beta
    at which KL(q_beta || uniform) = ``target_kl`` (the paper's gamma = ln 2). The KL is 0 at
    beta = 0 and increases with beta towards log(K / m), m the number of rollouts tied at the
    best reward (F6), so the root is bracketed by [0, 1], the upper end doubled until the KL
    reaches the target (at most up to ``beta_max``), then bisected ``iters`` times.

    Identical rewards return 0.0 (uniform q, no preference signal: all advantages are 0).
    When the target cannot be reached, that is ``target_kl >= log(K / m)``, or not below
    ``beta_max`` (rewards spread too little), the cap ``beta_max`` is returned. In particular,
    with K = 2 distinct rewards and the default target, KL(q || u) < ln 2 = ln K for every
    finite beta: the answer is always ``beta_max``, q is then one-hot and the leave-one-out
    advantage of the better rollout is ~1 / 1e-12 (see ``loo_advantages``); use K >= 3.

    beta is scale-free: beta(c r) = beta(r) / c for c > 0 (only beta times the spread matters).
    """
    if not (math.isfinite(target_kl) and target_kl > 0):
        raise LLMKitError(f"target_kl must be a positive number (the paper uses ln 2), got {target_kl}")
    if not (math.isfinite(beta_max) and beta_max > 0):
        raise LLMKitError(f"beta_max must be a positive number, got {beta_max}")
    if iters < 1:
        raise LLMKitError(f"iters (bisection steps) must be >= 1, got {iters}")
    r = _rewards(rewards).cpu()
    spread = r - r.max()
    if bool((spread == 0).all()):
        return 0.0
    tied_at_best = int((spread == 0).sum())
    if target_kl >= math.log(r.numel() / tied_at_best):
        return beta_max
    lo, hi = 0.0, min(1.0, beta_max)
    while _kl_to_uniform(spread, hi) < target_kl:
        if hi >= beta_max:
            return beta_max
        lo, hi = hi, min(2.0 * hi, beta_max)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if _kl_to_uniform(spread, mid) < target_kl:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def beta_summary(betas: Sequence[float]) -> dict[str, float]:
    """The betas of a step's groups as ``beta``, their median, and ``beta_capped``, how many are at
    :data:`BETA_MAX`: one capped group would make a mean of 1e6 / groups whatever the others are."""
    return {"beta": statistics.median(betas), "beta_capped": float(sum(b >= BETA_MAX for b in betas))}


def loo_advantages(rewards: torch.Tensor | Sequence[float], beta: float) -> torch.Tensor:
    """Leave-one-out entropic advantages A [K] (float64) of one group of K rollouts (§6, F5).

    e_i = exp(beta (r_i - max r)) and A_i = e_i / ((sum_j e_j - e_i) / (K - 1) + 1e-12) - 1:
    the weight w_beta = exp(beta R) / E exp(beta R) of Eq. (2) with the normaliser estimated
    from the other K - 1 rollouts, minus the baseline 1 (A3.1). The 1e-12 follows the
    official code. beta = 0 or identical rewards give exactly 0 everywhere (F5: no preference,
    no update). A is increasing in the reward: the best rollout gets the largest advantage
    (positive), the worst a negative one. Returned on the device of ``rewards``.
    """
    if not (math.isfinite(beta) and beta >= 0):
        raise LLMKitError(f"beta must be a finite number >= 0 (see solve_beta), got {beta}")
    r = _rewards(rewards)
    if beta == 0 or bool((r == r[0]).all()):
        return torch.zeros_like(r)
    e = torch.exp(beta * (r - r.max()))
    others = (e.sum() - e) / (r.numel() - 1)
    return e / (others + _LOO_EPS) - 1


def _check_tokens(name: str, tensor: torch.Tensor, shape: torch.Size) -> None:
    if tensor.shape != shape:
        raise LLMKitError(f"{name} must have the shape [B, L] = {tuple(shape)} of mask, got {tuple(tensor.shape)}")


def _per_token(advantages: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Rollout advantages [B] broadcast over tokens [B, L], or per-token ones [B, L] kept, detached, float64."""
    a = advantages.detach().to(torch.float64)
    if a.shape == shape[:1]:
        return a.unsqueeze(1).expand(shape)
    if a.shape == shape:
        return a
    raise LLMKitError(
        f"advantages must have shape [B] = {tuple(shape[:1])} (one per rollout) or [B, L] = {tuple(shape)} "
        f"(one per token), got {tuple(a.shape)}"
    )


def kl_shaped_advantages(
    advantages: torch.Tensor,
    logp_sample: torch.Tensor,
    logp_base: torch.Tensor,
    mask: torch.Tensor,
    lam: float,
    center: bool = False,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-token advantages [B, L] (float64, detached) shaped towards the base model (§4).

    ``advantages`` [B] holds one A per rollout (``loo_advantages``); ``logp_sample`` and
    ``logp_base`` [B, L] are the log-probabilities of the sampled action tokens under the policy
    being trained and under the frozen base model pi_theta0; ``mask`` [B, L] is True on real
    action tokens. With d_t = logp_sample_t - logp_base_t:

        center=False  A_t = A - lam d_t                 (§4: A = w - 1 - lam log(pi_theta / pi_theta0))
        center=True   A_t = A + lam (mean(d) - d_t)     (the official code; mean over the real tokens
                                                         of the whole batch, so the shaping only
                                                         reorders tokens and adds no net drift)

    Padding positions are 0. Nothing here carries a gradient: the shaped A is a fixed weight.
    When the batch is split over processes (DDP), ``reduce`` sums a tensor over all of them (the
    strategy's all-reduce), so ``mean(d)`` is over every process's real tokens; None: this is the
    whole batch.
    """
    if not (math.isfinite(lam) and lam >= 0):
        raise LLMKitError(f"lam (the KL shaping coefficient) must be a finite number >= 0, got {lam}")
    mask = mask.bool()
    _check_tokens("logp_sample", logp_sample, mask.shape)
    _check_tokens("logp_base", logp_base, mask.shape)
    a = _per_token(advantages, mask.shape)
    d = torch.where(mask, logp_sample.detach().to(torch.float64) - logp_base.detach().to(torch.float64), 0.0)
    if center:
        totals = torch.stack([d.sum(), mask.sum().to(d.dtype)])
        if reduce is not None:
            totals = reduce(totals)
        d = d - totals[0] / totals[1].clamp(min=1)
    return torch.where(mask, a - lam * d, 0.0)


def entropic_policy_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over real tokens of -A_t log pi_theta(a_t), their number): the REINFORCE surrogate of §4.

    ``logprobs`` [B, L] are the policy's log-probabilities of the sampled action tokens (with
    gradient), ``mask`` [B, L] is True on real action tokens, ``advantages`` is [B] (the same A
    on every action token of a rollout, e.g. ``loo_advantages``) or [B, L] (e.g.
    ``kl_shaped_advantages``); it is detached, so d(loss_sum)/d logprobs_t = -A_t on real tokens
    and 0 on padding. With one A per rollout, sum_t A log pi(a_t) = A log pi(a), the summed
    log-probability of §4. Returning the sum (float64) and the count lets a caller divide by the
    real tokens of all micro-batches of a step, as with ``distill_loss_sum``.
    """
    mask = mask.bool()
    _check_tokens("logprobs", logprobs, mask.shape)
    a = _per_token(advantages, mask.shape)
    return torch.where(mask, -a * logprobs.to(torch.float64), 0.0).sum(), mask.sum()
