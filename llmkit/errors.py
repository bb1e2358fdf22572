"""The one exception type that the `llmkit` command turns into a clean message.

Raise :class:`LLMKitError` for anything the user can fix (a missing file, a bad shard, a
mismatched vocabulary, a non-finite loss): the message must say what is wrong, where (file,
line, step) and what to do. The CLI prints it without a traceback and exits with status 1.
"""


class LLMKitError(Exception):
    """A user-facing error: its message is the whole story, no traceback needed."""
