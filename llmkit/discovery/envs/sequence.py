"""What the integer-sequence environments share: the strict one-line format and the prompt.

AC1 (:mod:`.autocorrelation`) and Erdős minimum overlap (:mod:`.erdos`) both ask for one line
of exactly ``n`` whole numbers in ``0..q`` (ASCII digits only) separated by spaces or tabs,
not all zero, at most ``2 * n * (digits(q) + 1)`` characters (twice the longest canonical
line: a locked format, anything else is rejected with a reason). Surrounding ASCII
whitespace is ignored; in a model's output only the first non-blank line counts.
:meth:`SequenceEnv.transition` returns the canonical form (single spaces). A subclass gives
its ``name``, :meth:`~SequenceEnv.reward`, :meth:`~SequenceEnv.describe` (the score as the
prompt shows it) and :meth:`~SequenceEnv.problem` (the lines stating the problem).
"""

from __future__ import annotations

from llmkit.discovery.env import archive_examples, clip_text, first_line, parse_int_line, single_line
from llmkit.errors import LLMKitError

MAX_N = 10_000
"""Longest sequence allowed (np.convolve is O(n^2): 10k values take well under a second)."""

MAX_Q = 10**6
"""Largest quantisation level allowed (keeps AC1's convolution exact in int64)."""


class SequenceEnv:
    """Base of the environments whose states are ``n`` integers in ``0..q`` (module docstring).

    Args:
        n: sequence length (1..MAX_N).
        q: largest value (1..MAX_Q); the resolution of the quantisation.
        max_examples: other archive solutions shown in the prompt.
    """

    name = "sequence"

    def __init__(self, n: int = 32, q: int = 100, max_examples: int = 2) -> None:
        limits = (("n", n, 1, MAX_N), ("q", q, 1, MAX_Q), ("max_examples", max_examples, 0, 1000))
        for label, value, low, high in limits:
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise LLMKitError(f"{label} must be an integer in {low}..{high}, got {value!r}")
        self.n, self.q, self.max_examples = n, q, max_examples
        self.max_chars = 2 * n * (len(str(q)) + 1)

    def parse(self, state: str) -> list[int]:
        """The values of a state, or ``ValueError`` saying why it is malformed."""
        if not isinstance(state, str):
            raise ValueError(f"the state must be a string, got {type(state).__name__}")
        return parse_int_line(single_line(state), self.n, self.q, self.max_chars)

    def initial_state(self) -> str:
        """The constant sequence ``max(1, q // 2)``."""
        return " ".join([str(max(1, self.q // 2))] * self.n)

    def transition(self, state: str, action: str) -> str:
        """The canonical line of the first non-blank line of ``action`` (``state`` is not used)."""
        return " ".join(map(str, parse_int_line(first_line(action), self.n, self.q, self.max_chars)))

    def reward(self, state: str) -> float:
        """The verifier's score of ``state`` (higher is better), ``ValueError`` if malformed."""
        raise NotImplementedError

    def describe(self, state: str) -> str:
        """The score of a valid ``state`` as the prompt shows it, e.g. "bound 1.953125"."""
        raise NotImplementedError

    def problem(self) -> list[str]:
        """The prompt's lines stating the problem and the best known value."""
        raise NotImplementedError

    def context_from_archive(self, state: str, archive_texts: list[str]) -> str:
        """Problem, format, up to ``max_examples`` other archive solutions and ``state`` with its score."""
        try:
            current = f"Current solution ({self.describe(state)}):\n{single_line(state)}"
        except ValueError as error:
            current = f"Current solution (invalid: {error}):\n{clip_text(state, 200)}"
        lines = [
            *self.problem(),
            f"Output ONLY one line of exactly {self.n} integers between 0 and {self.q} separated by spaces, "
            "not all zero, and nothing else.",
        ]
        others = archive_examples(state, archive_texts, self.describe, self.max_examples)
        if others:
            lines += ["Other solutions found so far:", *others]
        lines += [current, "Improved solution:", ""]
        return "\n".join(lines)
