"""A toy discovery environment for tests whose rollouts come from an untrained model."""

from __future__ import annotations

from llmkit.discovery.envs.string_target import StringTargetEnv


class PrintableGuessEnv(StringTargetEnv):
    """``StringTargetEnv`` whose transition keeps a rollout's printable characters (``?`` if none):
    every rollout of a random model becomes a guess, so rewards differ within a group and the
    policy gradient is not zero."""

    def transition(self, state: str, action: str) -> str:
        return self._check("".join(c for c in action if c.isprintable()).strip() or "?")


class StrictContextEnv(PrintableGuessEnv):
    """``PrintableGuessEnv`` whose prompt builder fails on any state but the initial one (a parse of
    the archive's states, which are model output, that not every state survives)."""

    def context_from_archive(self, state: str, archive_texts: list[str]) -> str:
        if state != self.initial_state():
            raise ValueError(f"cannot read {state[:10]!r}")
        return super().context_from_archive(state, archive_texts)


class FailingInitialStateEnv(PrintableGuessEnv):
    """An environment whose initial state cannot be built (``mode``: it raises, or it never returns)."""

    def __init__(self, mode: str = "raises", **kwargs) -> None:
        super().__init__(**kwargs)
        self.mode = mode

    def initial_state(self) -> str:
        if self.mode == "raises":
            raise RuntimeError("no initial construction")
        import time

        time.sleep(60)
        return super().initial_state()


class NumberContextEnv(PrintableGuessEnv):
    """An environment whose prompt builder returns a number, not text."""

    def context_from_archive(self, state: str, archive_texts: list[str]) -> str:
        return 42
