"""EMATeacher: the SDFT teacher as an exponential moving average of the student (SDFT, arXiv 2601.19897).

After every optimizer step, for every parameter (and floating-point buffer a checkpoint keeps,
such as an MoE router's balancing bias) of the teacher and its student namesake:

    θ_ema ← τ θ_ema + (1 − τ) θ

τ (``decay``) is 0.999 by default, llmkit's choice; the SDFT authors' official code
uses 0.99 (``teacher = 0.99 * teacher + 0.01 * student`` each step), which adapts the
teacher ten times faster. Lightning's ``EMAWeightAveraging`` keeps its average private and
swaps it in for validation, so it cannot be a live teacher; here the average *is* the
module's ``teacher`` submodule, which is why checkpoints save and restore it with the
weights. The callback's own state (its count of updates and the last step it saw) is saved
beside them.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from llmkit.callbacks.interfaces import HasTeacher, require
from llmkit.errors import LLMKitError


class EMATeacher(Callback):
    """Keep ``pl_module.teacher`` the EMA of ``pl_module.model`` (see the module docstring).

    Optimizer steps are detected by ``trainer.global_step`` changing, so the update follows
    each real step under gradient accumulation and skips micro-batches.

    Args:
        decay: τ in [0, 1); 0 makes the teacher a copy of the student after every step.
    """

    def __init__(self, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise LLMKitError(f"EMATeacher decay must be in [0, 1), got {decay} (1 would freeze the teacher)")
        self.decay = decay
        self.updates = 0
        self.last_step: int | None = None

    @staticmethod
    def _pairs(pl_module: HasTeacher) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher tensors, student tensors) matched by name: the parameters and the floating-point
        buffers a checkpoint keeps (an MoE router's balancing bias, which moves by a rule, not by
        gradient: averaged too, so the teacher routes as the average of the student does)."""
        t, s = pl_module.teacher.state_dict(keep_vars=True), pl_module.model.state_dict(keep_vars=True)
        if t.keys() != s.keys():
            differ = sorted(t.keys() ^ s.keys())[:3]
            raise LLMKitError(
                f"teacher and student parameters differ (e.g. {differ}): the teacher must be a copy of the student"
            )
        names = [name for name, tensor in s.items() if tensor.is_floating_point()]
        return [t[name] for name in names], [s[name] for name in names]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._pairs(require(self, pl_module, HasTeacher, "(use it with SDFTModule)"))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last_step is None:
            self.last_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.last_step:
            return
        self.last_step = trainer.global_step
        teacher, student = self._pairs(pl_module)
        torch._foreach_lerp_(teacher, student, 1.0 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = state_dict["updates"]
        self.last_step = state_dict["last_step"]
