"""TTT-Discover: test-time training to discover solutions, with an archive of states reused by PUCT."""

from llmkit.discovery.archive import Archive, State
from llmkit.discovery.env import DiscoveryEnv, load_env, safe_reward, safe_transition
from llmkit.discovery.objective import entropic_policy_loss, kl_shaped_advantages, loo_advantages, solve_beta

__all__ = [
    "Archive",
    "DiscoveryEnv",
    "State",
    "entropic_policy_loss",
    "kl_shaped_advantages",
    "load_env",
    "loo_advantages",
    "safe_reward",
    "safe_transition",
    "solve_beta",
]
