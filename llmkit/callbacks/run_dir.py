"""A run that stops on bad input before its first optimizer step leaves its log directory as it
found it.

A logger creates its ``version_N`` directory before the data module checks its files, so a
missing shard, a vocab mismatch or a malformed JSONL line used to leave an empty
``version_N`` behind, and the corrected run, the next number: the paths a user wrote down
(``.../version_0/checkpoints/last.ckpt``) then named the empty one. A resume that logs into the
run of its checkpoint (docs/checkpoints.md) and is refused would likewise leave an events file
whose ``purge_step`` hides the run's last steps. ``llmkit`` commands add :class:`DiscardUnstartedRun`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L

from llmkit.errors import LLMKitError


class DiscardUnstartedRun(L.Callback):
    """When the run fails with an :class:`~llmkit.errors.LLMKitError` (bad input, fixed and rerun)
    before its first optimizer step: removes ``log_dir`` if this run created it and no checkpoint
    is in it, with the directories above it that this run created (``lightning_logs/NAME``), or
    else the files this run added to its top level (an events file, a config). Only rank 0 writes
    logs, so only rank 0 removes them."""

    def __init__(self, log_dir: str | Path | None) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        existed = self.log_dir is not None and self.log_dir.is_dir()
        self.found: set[Path] | None = set(self.log_dir.iterdir()) if existed else None  # None: this run creates it
        self.created = None if existed or self.log_dir is None else _topmost_missing(self.log_dir.absolute())
        self.stepped = False

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.stepped = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if (self.log_dir is None or not isinstance(exception, LLMKitError) or self.stepped
                or not trainer.is_global_zero or not self.log_dir.is_dir()):
            return
        for logger in trainer.loggers:  # TensorBoard creates its events file from a thread at its first write:
            logger.finalize("failed")  # flushed, every file the run added exists (Lightning finalizes again: a no-op)
        if self.created is not None:
            if not any(self.created.rglob("*.ckpt")):
                shutil.rmtree(self.created, ignore_errors=True)
            return
        for added in set(self.log_dir.iterdir()) - self.found:
            if added.is_file():
                added.unlink(missing_ok=True)


def _topmost_missing(path: Path) -> Path:
    """The outermost directory of ``path`` (absolute) that does not exist yet: the one a run
    writing into ``path`` creates first."""
    while not path.parent.exists():
        path = path.parent
    return path
