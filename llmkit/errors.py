"""The one exception type that the `llmkit` command turns into a clean message.

Raise :class:`LLMKitError` for anything the user can fix (a missing file, a bad shard, a
mismatched vocabulary, a non-finite loss): the message must say what is wrong, where (file,
line, step) and what to do. The CLI prints it without a traceback and exits with status 1. A
warning llmkit raises prints, under the `llmkit` command, as one line too (:func:`format_warning`).
"""

import warnings
from pathlib import Path

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_python_formatwarning = warnings.formatwarning


def format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   line: str | None = None) -> str:
    """``llmkit: warning: MESSAGE`` for a warning llmkit raises (its message names the setting); Python's
    two lines with the file, line number and source line for one of the libraries underneath (a
    ``warnings.formatwarning``)."""
    if filename.startswith(_PACKAGE_DIR):
        return f"llmkit: warning: {message}\n"
    return _python_formatwarning(message, category, filename, lineno, line)


class LLMKitError(Exception):
    """A user-facing error: its message is the whole story, no traceback needed."""


class SettingError(LLMKitError):
    """An :class:`LLMKitError` about one setting, raised where it is checked under its Python name
    (``top_k``); a caller that knows the name the user typed (``--top-k``, ``sdft.sample_top_k``)
    raises :meth:`renamed` instead."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting} {problem}")
        self.setting, self.problem = setting, problem

    def renamed(self, name: str) -> "SettingError":
        return SettingError(name, self.problem)
