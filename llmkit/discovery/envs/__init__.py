"""Discovery environments for TTT-Discover: the toy string target, AC1 and Erdős minimum overlap.

Name one in a config by import path, e.g. ``llmkit.discovery.envs.AutocorrelationEnv``
(:func:`llmkit.discovery.env.load_env`).
"""

from llmkit.discovery.envs.autocorrelation import AutocorrelationEnv
from llmkit.discovery.envs.erdos import ErdosMinOverlapEnv
from llmkit.discovery.envs.string_target import StringTargetEnv

__all__ = ["AutocorrelationEnv", "ErdosMinOverlapEnv", "StringTargetEnv"]
