"""TTT-Discover: test-time training to discover solutions, with an archive of states reused by PUCT.

The package imports no torch: the reward worker (llmkit/discovery/env.py) imports it with every
environment it unpickles, and starts again after each kill. The objective's functions, which need
torch, are in :mod:`llmkit.discovery.objective`.
"""

from llmkit.discovery.archive import Archive, State
from llmkit.discovery.env import DiscoveryEnv, load_env, safe_reward, safe_transition

__all__ = ["Archive", "DiscoveryEnv", "State", "load_env", "safe_reward", "safe_transition"]
