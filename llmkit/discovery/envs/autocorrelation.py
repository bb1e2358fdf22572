"""AC1, the first autocorrelation inequality, as a discovery environment (TTT-Discover, arXiv 2601.16175).

For a non-negative step function ``f`` on ``[-1/4, 1/4]``, ``max_t (f*f)(t) >= C (∫f)^2``; the
task is to find an ``f`` with a small ratio, which proves an upper bound on the best constant
``C``. With ``f`` a sequence ``a`` of ``n`` equal steps (REFERENCE_NOTES, "TTT-Discover")::

    bound(a) = 2n * max(a*a) / (Σa)^2        a*a = np.convolve(a, a), the full autoconvolution
    reward   = 1 / bound                     (higher is better)

A constant sequence gives exactly 2.0 (reward 0.5); the best known bound is 1.50287. The
bound does not change when ``a`` is scaled, so integers lose nothing but resolution.

State and action format (strict, handoff H2-H3): one line of exactly ``n`` whole numbers in
``0..q`` (ASCII digits only) separated by spaces or tabs, not all zero, at most
``2 * n * (digits(q) + 1)`` characters (twice the longest canonical line). Surrounding ASCII
whitespace is ignored; in a model's output only the first non-blank line counts and the rest
is ignored; anything else on that line (signs, decimals, commas, brackets, words) makes it
malformed. :meth:`AutocorrelationEnv.transition` returns the canonical form (single spaces).

Invalid input: :meth:`AutocorrelationEnv.reward` raises ``ValueError`` with a message saying
what is wrong; :func:`llmkit.discovery.env.safe_reward` turns that into reward 0 and the reason.
"""

from __future__ import annotations

import numpy as np

from llmkit.discovery.env import archive_examples, clip_text, first_line, parse_int_line, single_line
from llmkit.errors import LLMKitError

BEST_KNOWN_BOUND = 1.50287
"""The best known AC1 bound (REFERENCE_NOTES); lower is better."""

MAX_N = 10_000
"""Longest sequence allowed (np.convolve is O(n^2): 10k values take well under a second)."""

MAX_Q = 10**6
"""Largest quantisation level allowed (keeps the convolution exact in int64)."""


def check_size(n: int, q: int, max_examples: int) -> None:
    """LLMKitError unless ``1 <= n <= MAX_N``, ``1 <= q <= MAX_Q`` and ``max_examples >= 0``."""
    for label, value, low, high in (("n", n, 1, MAX_N), ("q", q, 1, MAX_Q), ("max_examples", max_examples, 0, 1000)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise LLMKitError(f"{label} must be an integer in {low}..{high}, got {value!r}")


class AutocorrelationEnv:
    """AC1: find ``n`` integers in ``0..q`` whose autoconvolution has a small peak (module docstring)."""

    name = "autocorrelation_ac1"

    def __init__(self, n: int = 32, q: int = 100, max_examples: int = 2):
        check_size(n, q, max_examples)
        self.n, self.q, self.max_examples = n, q, max_examples
        self.max_chars = 2 * n * (len(str(q)) + 1)

    def parse(self, state: str) -> np.ndarray:
        """The sequence of a state as int64, or ``ValueError`` saying why it is malformed."""
        if not isinstance(state, str):
            raise ValueError(f"the state must be a string, got {type(state).__name__}")
        return np.array(parse_int_line(single_line(state), self.n, self.q, self.max_chars), dtype=np.int64)

    def bound(self, state: str) -> float:
        """``2n * max(a*a) / (Σa)^2`` of the state (exact integer arithmetic, one final division)."""
        a = self.parse(state)
        peak = int(np.convolve(a, a).max())
        total = int(a.sum())
        return (2 * self.n * peak) / (total * total)

    def reward(self, state: str) -> float:
        """``1 / bound``: 0.5 for a constant sequence, about 0.6654 at the best known bound."""
        a = self.parse(state)
        total = int(a.sum())
        return (total * total) / (2 * self.n * int(np.convolve(a, a).max()))

    def initial_state(self) -> str:
        """The constant sequence ``max(1, q // 2)`` (bound exactly 2.0)."""
        return " ".join([str(max(1, self.q // 2))] * self.n)

    def transition(self, state: str, action: str) -> str:
        """The canonical line of the first non-blank line of ``action`` (``state`` is not used)."""
        values = parse_int_line(first_line(action), self.n, self.q, self.max_chars)
        return " ".join(map(str, values))

    def _describe(self, text: str) -> str:
        return f"bound {self.bound(text):.6f}"

    def context_from_archive(self, state: str, archive_texts: list[str]) -> str:
        """Problem, format, up to ``max_examples`` other archive solutions and ``state`` with its bound."""
        try:
            current = f"Current solution ({self._describe(state)}):\n{single_line(state)}"
        except ValueError as error:
            current = f"Current solution (invalid: {error}):\n{clip_text(state, 200)}"
        lines = [
            f"Find a sequence of {self.n} non-negative integers a_0 ... a_{self.n - 1}, each between 0 and {self.q}, "
            f"that makes bound = 2*{self.n} * max_k (a*a)_k / (a_0 + ... + a_{self.n - 1})^2 as small as possible, "
            "where a*a is the autoconvolution, (a*a)_k = sum over i + j = k of a_i * a_j.",
            f"A constant sequence has bound 2.0; the best known bound is {BEST_KNOWN_BOUND}. Lower is better.",
            f"Output ONLY one line of exactly {self.n} integers between 0 and {self.q} separated by spaces, "
            "not all zero, and nothing else.",
        ]
        others = archive_examples(state, archive_texts, self._describe, self.max_examples)
        if others:
            lines += ["Other solutions found so far:", *others]
        lines += [current, "Improved solution:", ""]
        return "\n".join(lines)
