"""The TTT-Discover entropic objective (arXiv 2601.16175) against direct float64 computations."""

import math

import pytest
import torch

from llmkit.discovery.objective import (
    beta_summary,
    entropic_policy_loss,
    kl_shaped_advantages,
    loo_advantages,
    solve_beta,
)
from llmkit.errors import LLMKitError


def kl_to_uniform(rewards: torch.Tensor, beta: float) -> float:
    """KL(q_beta || u) written out from A4: sum_n q log(q / (1/N))."""
    r = rewards.double()
    w = torch.exp(beta * (r - r.max()))
    q = w / w.sum()
    q = q[q > 0]
    return float((q * torch.log(q * len(r))).sum())


def loo_loop(rewards: list[float], beta: float) -> list[float]:
    """The LOO advantages of §6 one rollout at a time, summing the other weights explicitly."""
    best = max(rewards)
    w = [math.exp(beta * (r - best)) for r in rewards]
    out = []
    for i, w_i in enumerate(w):
        others = sum(w_j for j, w_j in enumerate(w) if j != i) / (len(w) - 1)
        out.append(w_i / (others + 1e-12) - 1)
    return out


def test_beta_is_zero_for_identical_rewards():
    assert solve_beta([0.7] * 5) == 0.0
    assert solve_beta(torch.full((64,), -3.0)) == 0.0


@pytest.mark.parametrize("k,seed", [(4, 0), (4, 1), (8, 2), (8, 3), (64, 4), (64, 5)])
def test_solved_beta_reaches_the_target_kl(k, seed):
    rewards = torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    beta = solve_beta(rewards)
    assert beta > 0
    assert kl_to_uniform(rewards, beta) == pytest.approx(math.log(2), abs=1e-6)
    assert kl_to_uniform(rewards, 0.9 * beta) < math.log(2) < kl_to_uniform(rewards, 1.1 * beta)


def test_solved_beta_reaches_a_custom_target():
    rewards = torch.tensor([0.0, 0.1, 0.5, 2.0, 2.5, 3.0])
    beta = solve_beta(rewards, target_kl=0.3)
    assert kl_to_uniform(rewards, beta) == pytest.approx(0.3, abs=1e-6)


@pytest.mark.parametrize("c", [2.0, 10.0, 1000.0])
def test_beta_times_the_reward_spread_is_invariant(c):
    rewards = torch.tensor([0.2, 0.5, 0.1, 0.9, 0.4, 0.35, 0.8, 0.05], dtype=torch.float64)
    beta = solve_beta(rewards)
    scaled = solve_beta(rewards * c + 7.0)  # a shift changes nothing either
    assert scaled < beta
    assert scaled == pytest.approx(beta / c, rel=1e-9)


def test_two_rollouts_return_the_cap():
    assert solve_beta([0.0, 1.0]) == 1e6
    assert solve_beta([0.0, 1.0], beta_max=50.0) == 50.0
    # three rollouts, two tied at the best: the KL tends to ln(3/2) < ln 2, never the target
    assert solve_beta([1.0, 1.0, 0.0]) == 1e6


def test_a_steps_betas_are_summarised_by_their_median_and_the_capped_count():
    # the mean of these is ~333,000, whatever the two solvable groups say
    assert beta_summary([0.5, solve_beta([1.0, 1.0, 0.0]), 2.0]) == {"beta": 2.0, "beta_capped": 1.0}
    assert beta_summary([3.0]) == {"beta": 3.0, "beta_capped": 0.0}


def test_a_too_small_spread_returns_the_cap():
    assert solve_beta([0.0, 1e-9, 2e-9, 3e-9]) == 1e6


def test_rewards_given_as_a_list_keep_float64():
    """A list was read as float32: 0.5 + 1e-9 steps became ties (beta 0, not the cap), close
    rewards got equal advantages, and a finite 1e39 became inf."""
    assert solve_beta([0.5, 0.5 + 1e-9, 0.5 + 2e-9, 0.5 + 3e-9]) == 1e6
    rewards = [0.66541230, 0.66541233, 0.66541236, 0.6654]
    beta = solve_beta(rewards)
    assert torch.equal(loo_advantages(rewards, beta), loo_advantages(torch.tensor(rewards, dtype=torch.float64), beta))
    assert loo_advantages(rewards, beta)[0] != loo_advantages(rewards, beta)[1]
    assert torch.isfinite(loo_advantages([1e39, 2e39, 3e39], solve_beta([1e39, 2e39, 3e39]))).all()


def test_one_rollout_is_refused():
    with pytest.raises(LLMKitError, match="K >= 2"):
        solve_beta([1.0])
    with pytest.raises(LLMKitError, match="K >= 2"):
        loo_advantages([1.0], 1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rewards_are_refused_by_index(bad):
    with pytest.raises(LLMKitError, match="reward 2 of 4"):
        solve_beta([0.0, 1.0, bad, 3.0])
    with pytest.raises(LLMKitError, match="reward 2 of 4"):
        loo_advantages([0.0, 1.0, bad, 3.0], 1.0)


@pytest.mark.parametrize("k,seed", [(3, 0), (8, 1), (64, 2)])
def test_loo_advantages_match_a_direct_loop(k, seed):
    rewards = torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for beta in (0.3, solve_beta(rewards), 5.0):
        got = loo_advantages(rewards, beta)
        assert got.dtype == torch.float64 and got.shape == (k,)
        expected = torch.tensor(loo_loop(rewards.tolist(), beta), dtype=torch.float64)
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_loo_advantages_hand_computed():
    # beta = ln 2, rewards 0, 1, 2 -> e = 1/4, 1/2, 1; others' means 3/4, 5/8, 3/8
    got = loo_advantages([0.0, 1.0, 2.0], math.log(2))
    expected = torch.tensor([(1 / 4) / (3 / 4) - 1, (1 / 2) / (5 / 8) - 1, 1 / (3 / 8) - 1], dtype=torch.float64)
    assert torch.allclose(got, expected, atol=1e-10)


def test_loo_advantages_are_exactly_zero_without_preference():
    assert torch.equal(loo_advantages([0.4] * 6, 3.0), torch.zeros(6, dtype=torch.float64))
    assert torch.equal(loo_advantages([0.1, 0.5, 0.9], 0.0), torch.zeros(3, dtype=torch.float64))


def test_loo_advantages_rank_the_rollouts():
    rewards = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.4, 0.6])
    adv = loo_advantages(rewards, solve_beta(rewards))
    # F5: the best rollout gets the largest (positive) advantage, the worst a negative one
    assert int(adv.argmax()) == int(rewards.argmax())
    assert int(adv.argmin()) == int(rewards.argmin())
    assert adv.max() > 0 > adv.min()
    assert torch.equal(adv.argsort(), rewards.argsort())
    # the weights w = A + 1 are positive and average near 1 (w estimates exp(beta R) / E exp(beta R))
    assert (adv > -1).all()
    assert 0.5 < float((adv + 1).mean()) < 2.0


def test_loo_advantage_of_the_better_of_two_rollouts_at_the_cap():
    adv = loo_advantages([0.0, 1.0], solve_beta([0.0, 1.0]))
    assert adv[0] == -1.0
    assert adv[1] == pytest.approx(1e12, rel=1e-6)


def test_negative_beta_is_refused():
    with pytest.raises(LLMKitError, match="beta"):
        loo_advantages([0.0, 1.0, 2.0], -1.0)


def shaping_example():
    advantages = torch.tensor([1.0, -0.5])
    logp_sample = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, float("nan")]])
    logp_base = torch.tensor([[-1.5, -1.0, -0.5], [-0.4, -2.0, -1.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return advantages, logp_sample, logp_base, mask


def test_kl_shaping_hand_computed():
    advantages, logp_sample, logp_base, mask = shaping_example()
    # d = [[0.5, -1.0, 0.0], [0.2, -1.0, masked]], lam = 0.1
    got = kl_shaped_advantages(advantages, logp_sample, logp_base, mask, lam=0.1)
    expected = torch.tensor([[0.95, 1.1, 1.0], [-0.52, -0.4, 0.0]], dtype=torch.float64)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, atol=1e-7)


def test_centred_kl_shaping_hand_computed():
    advantages, logp_sample, logp_base, mask = shaping_example()
    # mean of d over the 5 real tokens = (0.5 - 1 + 0 + 0.2 - 1) / 5 = -0.26
    got = kl_shaped_advantages(advantages, logp_sample, logp_base, mask, lam=0.1, center=True)
    d = torch.tensor([[0.5, -1.0, 0.0], [0.2, -1.0, 0.0]], dtype=torch.float64)
    expected = torch.tensor([[1.0], [-0.5]], dtype=torch.float64) + 0.1 * (-0.26 - d)
    expected[1, 2] = 0.0
    assert torch.allclose(got, expected, atol=1e-7)
    # centring removes the net shift: the shaping terms sum to zero over the real tokens
    shift = got - torch.tensor([[1.0], [-0.5]], dtype=torch.float64)
    assert float(shift[mask].sum()) == pytest.approx(0.0, abs=1e-12)


def test_kl_shaping_masks_padding_and_carries_no_gradient():
    advantages, logp_sample, logp_base, mask = shaping_example()
    logp_sample = logp_sample.clone().requires_grad_()
    for center in (False, True):
        got = kl_shaped_advantages(advantages, logp_sample, logp_base, mask, lam=0.5, center=center)
        assert got[1, 2] == 0.0
        assert torch.isfinite(got).all()
        assert not got.requires_grad
    assert torch.equal(
        kl_shaped_advantages(advantages, logp_sample, logp_base, mask, lam=0.0),
        torch.where(mask, advantages.double().unsqueeze(1), 0.0),
    )


def test_kl_shaping_checks_shapes():
    advantages, logp_sample, logp_base, mask = shaping_example()
    with pytest.raises(LLMKitError, match="logp_base"):
        kl_shaped_advantages(advantages, logp_sample, logp_base[:, :2], mask, lam=0.1)
    with pytest.raises(LLMKitError, match="advantages"):
        kl_shaped_advantages(advantages[:1], logp_sample, logp_base, mask, lam=0.1)


@pytest.mark.parametrize("per_token", [False, True])
def test_policy_loss_gradient_is_minus_the_advantage(per_token):
    torch.manual_seed(0)
    logprobs = (-torch.rand(3, 4) * 3).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    advantages = torch.tensor([0.7, -0.3, 2.0], requires_grad=True)
    per_token_adv = advantages.detach().unsqueeze(1).expand(3, 4)
    if per_token:
        per_token_adv = per_token_adv + torch.randn(3, 4)
        advantages = per_token_adv.clone().requires_grad_()
    loss_sum, count = entropic_policy_loss(logprobs, mask, advantages)
    assert int(count) == 7
    expected = -(per_token_adv.double() * logprobs.detach().double())[mask].sum()
    assert loss_sum.item() == pytest.approx(float(expected), rel=1e-12)
    loss_sum.backward()
    assert torch.allclose(logprobs.grad, torch.where(mask, -per_token_adv, 0.0))
    assert advantages.grad is None  # the advantages are fixed weights


def test_policy_loss_ignores_non_finite_padding():
    logprobs = torch.tensor([[-1.0, float("-inf")], [-2.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[True, False], [True, False]])
    loss_sum, count = entropic_policy_loss(logprobs, mask, torch.tensor([1.0, 0.5]))
    assert loss_sum.item() == pytest.approx(1.0 + 1.0)
    loss_sum.backward()
    assert torch.equal(logprobs.grad, torch.tensor([[-1.0, 0.0], [-0.5, 0.0]]))
    assert int(count) == 2
