"""A run that stops on bad input before its first optimizer step leaves no log directory.

A logger creates its ``version_N`` directory before the data module checks its files, so a
missing shard, a vocab mismatch or a malformed JSONL line used to leave an empty
``version_N`` behind, and the corrected run, the next number: the paths a user wrote down
(``.../version_0/checkpoints/last.ckpt``) then named the empty one. ``llmkit`` commands add
:class:`DiscardUnstartedRun`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L

from llmkit.errors import LLMKitError


class DiscardUnstartedRun(L.Callback):
    """Removes ``log_dir`` when the run fails with an :class:`~llmkit.errors.LLMKitError` (bad
    input, fixed and rerun) before its first optimizer step, if this run created it and no
    checkpoint is in it. Only rank 0 writes logs, so only rank 0 removes them."""

    def __init__(self, log_dir: str | Path | None) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None and not Path(log_dir).exists() else None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if (self.log_dir is None or not isinstance(exception, LLMKitError) or trainer.global_step > 0
                or not trainer.is_global_zero or not self.log_dir.is_dir()):
            return
        if not any(self.log_dir.rglob("*.ckpt")):
            shutil.rmtree(self.log_dir, ignore_errors=True)
