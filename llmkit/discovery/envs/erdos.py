"""Erdős' minimum overlap problem as a discovery environment (TTT-Discover, arXiv 2601.16175).

Find a step function ``h: [0, 2] -> [0, 1]`` with ``∫h = 1`` that makes
``C5(h) = max_k ∫ h(x) (1 - h(x + k)) dx`` small; it proves an upper bound on Erdős' constant
``M``. With ``h`` given by ``n`` equal steps (step ``dx = 2/n``), exactly as in REFERENCE_NOTES
"TTT-Discover" and the official verifier (test-time-training/discover, ``verify_c5_solution``)::

    h    = values rescaled so that Σh = n/2              (that is, ∫h = Σh * dx = 1)
    C5   = max(np.correlate(h, 1 - h, mode="full")) * 2/n
    reward = 1 / C5                                   (higher is better)

Values must lie in [0, 1] before and after the rescaling: a sequence whose rescaled maximum
exceeds 1 is invalid (the official verifier raises there too). The constant 0.5 gives exactly
``C5 = 0.5`` (reward 2); the best known is ``C5 = 0.380876``.

State and action format (strict): the one-line integer format of
:mod:`.sequence`: exactly ``n`` whole numbers in ``0..q`` separated
by spaces or tabs, value ``v`` meaning ``h = v / q``, not all zero, at most
``2 * n * (digits(q) + 1)`` characters; in a model's output only the first non-blank line
counts. Since the sum is rescaled, ``h_i = v_i * n / (2 Σv)`` and ``q`` only sets the
resolution; the rescaled maximum is at most 1 exactly when ``2 Σv >= n * max(v)`` (checked in
integers, so there is no rounding at the boundary).

Invalid input: :meth:`ErdosMinOverlapEnv.reward` raises ``ValueError`` with the reason;
:func:`llmkit.discovery.env.safe_reward` turns that into reward 0.
"""

from __future__ import annotations

import numpy as np

from llmkit.discovery.envs.sequence import SequenceEnv

BEST_KNOWN_C5 = 0.380876
"""The best known upper bound on C5 (REFERENCE_NOTES); lower is better."""


class ErdosMinOverlapEnv(SequenceEnv):
    """Erdős minimum overlap: ``n`` levels in ``0..q`` of a step function with a small C5 (module docstring)."""

    name = "erdos_min_overlap"

    def heights(self, state: str) -> np.ndarray:
        """``h`` rescaled to ``Σh = n/2`` (float64 in [0, 1]), or ``ValueError`` if that leaves [0, 1]."""
        values = self.parse(state)
        total, peak = sum(values), max(values)
        if 2 * total < self.n * peak:
            raise ValueError(
                f"rescaling to sum n/2 = {self.n / 2:g} pushes h above 1 (max {peak * self.n / (2 * total):.4f}): "
                f"the values must add up to at least n * max / 2 = {self.n * peak / 2:g}, they add up to {total}"
            )
        return np.clip(np.array(values, dtype=np.float64) * (self.n / (2 * total)), 0.0, 1.0)

    def c5(self, state: str) -> float:
        """``max(np.correlate(h, 1 - h, mode="full")) * 2/n`` for the rescaled ``h``."""
        h = self.heights(state)
        return float(np.correlate(h, 1.0 - h, mode="full").max()) * 2.0 / self.n

    def reward(self, state: str) -> float:
        """``1 / C5``: 2.0 for a constant sequence, about 2.6255 at the best known C5."""
        return 1.0 / self.c5(state)

    def describe(self, state: str) -> str:
        return f"C5 {self.c5(state):.6f}"

    def problem(self) -> list[str]:
        return [
            f"Erdos minimum overlap problem. Give {self.n} levels v_0 ... v_{self.n - 1}, each an integer between 0 "
            f"and {self.q}. They define a step function h with {self.n} equal steps on [0, 2], h_i = v_i / {self.q}, "
            f"rescaled so that h_0 + ... + h_{self.n - 1} = {self.n / 2:g} (the rescaled values must stay at most 1). "
            f"Make C5 = (2/{self.n}) * max over shifts k of sum_i h_i * (1 - h_(i+k)) as small as possible.",
            f"The constant sequence has C5 = 0.5; the best known C5 is {BEST_KNOWN_C5}. Lower is better.",
        ]
