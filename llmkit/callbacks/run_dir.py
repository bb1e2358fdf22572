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
    is in it, and then each directory above it that this run created and that is empty
    (``lightning_logs/NAME``; one another run has written into stays), or else the files this run
    added to its top level (an events file, a config). Only rank 0 writes logs, so only rank 0
    removes them."""

    def __init__(self, log_dir: str | Path | None) -> None:
        self.log_dir = Path(log_dir).absolute() if log_dir is not None else None
        existed = self.log_dir is not None and self.log_dir.is_dir()
        self.found: set[Path] | None = set(self.log_dir.iterdir()) if existed else None  # None: this run creates it
        self.parents_created = [] if self.log_dir is None else _missing_parents(self.log_dir)
        self.stepped = False

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.stepped = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if (self.log_dir is None or not isinstance(exception, LLMKitError) or self.stepped
                or not trainer.is_global_zero or not self.log_dir.is_dir()):
            return
        for logger in trainer.loggers:  # TensorBoard creates its events file from a thread at its first write:
            logger.finalize("failed")  # flushed, every file the run added exists (Lightning finalizes again: a no-op)
        if self.found is None:
            if not any(self.log_dir.rglob("*.ckpt")):
                shutil.rmtree(self.log_dir, ignore_errors=True)
                for parent in self.parents_created:
                    try:
                        parent.rmdir()
                    except OSError:  # not empty: another run writes there
                        break
            return
        for added in set(self.log_dir.iterdir()) - self.found:
            if added.is_file():
                added.unlink(missing_ok=True)


def _missing_parents(path: Path) -> list[Path]:
    """The directories above ``path`` (absolute) that do not exist yet, innermost first: those a run
    writing into ``path`` creates."""
    return [parent for parent in path.parents if not parent.exists()]
