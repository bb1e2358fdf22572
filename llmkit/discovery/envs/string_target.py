"""The toy string-target environment: guess a hidden string.

The reward is the fraction of positions where the guess has the target's character. It exists
to check that the TTT-Discover loop raises a reward (configs/ttt/toy.yaml), not to be hard.

Reward (in [0, 1], 1 exactly for the target), two metrics:

- ``"match"`` (default): ``#{i : s[i] == t[i]} / max(len(s), len(t))``. Dividing by ``len(t)``
  after cutting the guess to ``len(t)`` characters would score ``"HELLO!!!"`` as 1; dividing by
  the longer length makes any extra character cost, so only the target itself scores 1.
- ``"edit"``: ``1 - levenshtein(s, t) / max(len(s), len(t))``, smoother for insertions and
  deletions (a shifted guess keeps most of its credit).

Format (strict: a locked format, anything else rejected with a reason): the state is one line of
1 to ``max_chars`` printable characters
(``str.isprintable``: no control or format characters such as zero-width joiners) after
stripping surrounding ASCII whitespace. In a model's output the first non-blank line is the
guess and the rest is ignored. Anything else makes :meth:`StringTargetEnv.reward` and
:meth:`StringTargetEnv.transition` raise ``ValueError`` (reward 0 via
:func:`llmkit.discovery.env.safe_reward`).
"""

from __future__ import annotations

from llmkit.discovery.env import archive_examples, clip_text, first_line, single_line
from llmkit.errors import LLMKitError

METRICS = ("match", "edit")
"""The reward metrics :class:`StringTargetEnv` knows."""


def levenshtein(a: str, b: str) -> int:
    """The edit distance (insertions, deletions, substitutions, each cost 1) between ``a`` and ``b``."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


class StringTargetEnv:
    """Guess the hidden ``target`` string; the reward says how close a guess is (module docstring)."""

    name = "string_target"

    def __init__(self, target: str = "HELLO", metric: str = "match", max_chars: int = 256, max_examples: int = 2,
                 description: str = "Guess the hidden target string."):
        if metric not in METRICS:
            raise LLMKitError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
        if not isinstance(max_chars, int) or not 1 <= max_chars <= 100_000:
            raise LLMKitError(f"max_chars must be an integer in 1..100000, got {max_chars!r}")
        if not isinstance(max_examples, int) or max_examples < 0:
            raise LLMKitError(f"max_examples must be a non-negative integer, got {max_examples!r}")
        self.metric, self.max_chars, self.max_examples, self.description = metric, max_chars, max_examples, description
        try:
            self.target = self.parse(target)
        except ValueError as error:
            raise LLMKitError(f"target {clip_text(str(target))} is not a valid guess itself: {error}") from error
        if self.target != target:
            raise LLMKitError(f"target {target!r} has surrounding whitespace: strip it")

    def parse(self, state: str) -> str:
        """The guess in ``state``, or ``ValueError`` saying why it is malformed."""
        if not isinstance(state, str):
            raise ValueError(f"the state must be a string, got {type(state).__name__}")
        return self._check(single_line(state))

    def _check(self, guess: str) -> str:
        if not guess:
            raise ValueError("the guess is empty")
        if len(guess) > self.max_chars:
            raise ValueError(f"the guess has {len(guess)} characters, more than the {self.max_chars} allowed")
        if not guess.isprintable():
            bad = next(c for c in guess if not c.isprintable())
            raise ValueError(f"the guess contains the non-printable character {bad!r}")
        return guess

    def reward(self, state: str) -> float:
        """How close the guess is to the target, in [0, 1]; 1 only for the target itself."""
        guess, target = self.parse(state), self.target
        longest = max(len(guess), len(target))
        if self.metric == "edit":
            return 1.0 - levenshtein(guess, target) / longest
        return sum(g == t for g, t in zip(guess, target, strict=False)) / longest

    def initial_state(self) -> str:
        """As many ``?`` as the target has characters."""
        return "?" * len(self.target)

    def transition(self, state: str, action: str) -> str:
        """The first non-blank line of ``action``, checked (``state`` is not used)."""
        return self._check(first_line(action))

    def context_from_archive(self, state: str, archive_texts: list[str]) -> str:
        """The task, the format, up to ``max_examples`` other guesses and ``state`` with their scores."""
        try:
            current = f"Current guess (score {self.reward(state):.3f}): {single_line(state)}"
        except ValueError as error:
            current = f"Current guess (invalid: {error}): {clip_text(state)}"
        lines = [
            f"{self.description} It has {len(self.target)} characters. A guess scores 1.0 when it is exactly right.",
            "Output ONLY your guess on one line and nothing else.",
        ]
        others = archive_examples(state, archive_texts, lambda text: f"score {self.reward(text):.3f}",
                                  self.max_examples)
        if others:
            lines += ["Other guesses so far:", *others]
        lines += [current, "New guess:"]
        return "\n".join(lines)
