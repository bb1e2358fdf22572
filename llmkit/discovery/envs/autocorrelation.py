"""AC1, the first autocorrelation inequality, as a discovery environment (TTT-Discover, arXiv 2601.16175).

For a non-negative step function ``f`` on ``[-1/4, 1/4]``, ``max_t (f*f)(t) >= C (∫f)^2``; the
task is to find an ``f`` with a small ratio, which proves an upper bound on the best constant
``C``. With ``f`` a sequence ``a`` of ``n`` equal steps (REFERENCE_NOTES, "TTT-Discover")::

    bound(a) = 2n * max(a*a) / (Σa)^2        a*a = np.convolve(a, a), the full autoconvolution
    reward   = 1 / bound                     (higher is better)

A constant sequence gives exactly 2.0 (reward 0.5); the best known bound is 1.50287. The
bound does not change when ``a`` is scaled, so integers lose nothing but resolution.

State and action format: the strict one-line integer format of :mod:`.sequence` (``n`` whole
numbers in ``0..q``).

Invalid input: :meth:`AutocorrelationEnv.reward` raises ``ValueError`` with a message saying
what is wrong; :func:`llmkit.discovery.env.safe_reward` turns that into reward 0 and the reason.
"""

from __future__ import annotations

import numpy as np

from llmkit.discovery.envs.sequence import SequenceEnv

BEST_KNOWN_BOUND = 1.50287
"""The best known AC1 bound (REFERENCE_NOTES); lower is better."""


class AutocorrelationEnv(SequenceEnv):
    """AC1: find ``n`` integers in ``0..q`` whose autoconvolution has a small peak (module docstring)."""

    name = "autocorrelation_ac1"

    def _peak_and_total(self, state: str) -> tuple[int, int]:
        """(max(a*a), Σa) of the state, exact integers."""
        a = np.array(self.parse(state), dtype=np.int64)
        return int(np.convolve(a, a).max()), int(a.sum())

    def bound(self, state: str) -> float:
        """``2n * max(a*a) / (Σa)^2`` of the state (exact integer arithmetic, one final division)."""
        peak, total = self._peak_and_total(state)
        return (2 * self.n * peak) / (total * total)

    def reward(self, state: str) -> float:
        """``1 / bound``: 0.5 for a constant sequence, about 0.6654 at the best known bound."""
        peak, total = self._peak_and_total(state)
        return (total * total) / (2 * self.n * peak)

    def describe(self, state: str) -> str:
        return f"bound {self.bound(state):.6f}"

    def problem(self) -> list[str]:
        return [
            f"Find a sequence of {self.n} non-negative integers a_0 ... a_{self.n - 1}, each between 0 and {self.q}, "
            f"that makes bound = 2*{self.n} * max_k (a*a)_k / (a_0 + ... + a_{self.n - 1})^2 as small as possible, "
            "where a*a is the autoconvolution, (a*a)_k = sum over i + j = k of a_i * a_j.",
            f"A constant sequence has bound 2.0; the best known bound is {BEST_KNOWN_BOUND}. Lower is better.",
        ]
