"""RegressionGate: accept a block of continual updates only if held-out metrics hold.

Continual learning must not forget what the model could do, so every ``every_n_steps``
optimizer steps (a *block*) the gate
evaluates the student (``pl_module.model``) with an :class:`~llmkit.eval.EvalConfig` and
compares the report with the one from before the block:

- ppl_increase = ppl_after / ppl_before - 1 (relative), rejected above ``max_ppl_increase``;
- probe_drop = accuracy_before - accuracy_after (absolute), rejected above ``max_probe_drop``;
- a non-finite perplexity after the block is always rejected.

Accepting makes the after-report the next block's baseline and snapshots the weights; rejecting
restores the snapshot taken before the block: the whole ``pl_module.state_dict()`` (student and
any teacher) and every optimizer's state. The LR scheduler is not rewound and ``global_step``
keeps counting: the rejected block's steps are spent. Snapshots are CPU copies: with AdamW,
three times the trainable weights (weights and two moments) plus the frozen ones (the teacher)
in host memory.

Per block it writes ``block_NNNN/eval_before.json``, ``eval_after.json`` (reports of
:func:`llmkit.eval.evaluate`) and ``gate_decision.json`` under ``out_dir``, and logs to the
trainer's loggers ``gate/accepted`` (1 or 0), ``gate/rejections`` (running count),
``gate/ppl_increase``, ``gate/probe_drop``, ``gate/ppl`` and ``gate/probe_accuracy`` (the last
two: after the block, whatever the decision).

The last block may be shorter. A run that ends at ``max_steps`` gates it at that step, before
Lightning's checkpoint callbacks save (they run after all others), so ``last.ckpt`` holds the
gated weights. A run that ends otherwise (``max_epochs``, early stopping, ``max_time``) gates
it at train end, after those callbacks may have saved: a rejection then reaches the in-memory
module (what ``fit`` leaves you) but not a checkpoint already written.

Checkpoints hold the block counter, the rejection count and the decisions. One saved at a block's
end holds gated weights, and its resume starts a fresh block at them (a new baseline evaluation
and a new snapshot, of the weights the run would have kept). One saved in the middle of a block
(a Ctrl-C, or ``every_n_train_steps`` off the block ends) holds that block's ungated weights, so
it also holds the block's start, its baseline report and its snapshot, and the resume gates the
block against them as the uninterrupted run would (at once, if the interrupt came while the gate
evaluated the block's end): such a checkpoint is about twice the size of one saved at a block's
end (``ModelCheckpoint(every_n_train_steps=every_n_steps)``).

Under DDP every rank evaluates (the same weights on the same data) and rank 0's reports are
broadcast before anything is decided: every rank then compares the same two reports, takes the
same decision and keeps or restores the same snapshot, so the weights stay identical across ranks
even where kernels make rank-local evaluations differ in the last digits. Only rank 0 writes
files. The gate evaluates the whole backbone outside the training forward, so it refuses a
strategy that shards the parameters (FSDP).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from llmkit.callbacks.interfaces import HasBackbone, HasEvaluation, HasTokenizer, require, satisfies
from llmkit.data.tokenizer import TokenizerLike
from llmkit.distributed import require_data_parallel
from llmkit.errors import LLMKitError
from llmkit.eval import EvalConfig
from llmkit.io import as_dataclass, write_json_atomic

_TOLERANCE = 1e-9
"""Slack on the thresholds for float noise: 0.8 - 0.75 is 0.05000000000000004, not above 0.05."""


def _section_value(report: dict, section: str, key: str) -> float | None:
    part = report.get(section)
    return None if part is None else float(part[key])


def gate_decision(before: dict, after: dict, max_ppl_increase: float, max_probe_drop: float) -> dict:
    """Compare two evaluation reports (see :func:`llmkit.eval.evaluate`) of one block.

    Args:
        before: report of the weights before the block.
        after: report of the weights after it.
        max_ppl_increase: largest accepted relative perplexity increase (0.05: +5%).
        max_probe_drop: largest accepted absolute drop of probe accuracy (0.05: 5 points).

    Returns:
        ``{"decision": "accepted"|"rejected", "reasons": [...], "ppl_before", "ppl_after",
        "ppl_increase", "probe_accuracy_before", "probe_accuracy_after", "probe_drop"}``; a
        metric is None where a report lacks its section.
    """
    ppl_before = _section_value(before, "perplexity", "ppl")
    ppl_after = _section_value(after, "perplexity", "ppl")
    acc_before = _section_value(before, "probes", "accuracy")
    acc_after = _section_value(after, "probes", "accuracy")
    ppl_increase = None if ppl_before is None or ppl_after is None else ppl_after / ppl_before - 1
    probe_drop = None if acc_before is None or acc_after is None else acc_before - acc_after
    reasons = []
    if ppl_after is not None and not math.isfinite(ppl_after):
        reasons.append(f"perplexity after the block is not finite ({ppl_after})")
    elif ppl_increase is not None and ppl_increase > max_ppl_increase + _TOLERANCE:
        reasons.append(
            f"perplexity rose by {ppl_increase:.2%} ({ppl_before:.4g} -> {ppl_after:.4g}), "
            f"more than max_ppl_increase {max_ppl_increase:.2%}"
        )
    if probe_drop is not None and probe_drop > max_probe_drop + _TOLERANCE:
        reasons.append(
            f"probe accuracy fell by {probe_drop:.3f} ({acc_before:.3f} -> {acc_after:.3f}), "
            f"more than max_probe_drop {max_probe_drop:.3f}"
        )
    return {
        "decision": "rejected" if reasons else "accepted",
        "reasons": reasons,
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "ppl_increase": ppl_increase,
        "probe_accuracy_before": acc_before,
        "probe_accuracy_after": acc_after,
        "probe_drop": probe_drop,
    }


def describe_decision(d: dict) -> str:
    """The console line of a gate decision ``d``: block, steps, the metrics, the verdict and its reasons."""
    parts = []
    if d["ppl_after"] is not None:
        parts.append(f"ppl {d['ppl_before']:.4g} -> {d['ppl_after']:.4g} ({d['ppl_increase']:+.2%})")
    if d["probe_accuracy_after"] is not None:
        parts.append(f"probes {d['probe_accuracy_before']:.3f} -> {d['probe_accuracy_after']:.3f}")
    verdict = d["decision"]
    if d["reasons"]:
        verdict += f" ({'; '.join(d['reasons'])}); the weights of step {d['snapshot_step']} are restored"
    return f"gate block {d['block']} (steps {d['start_step']}-{d['end_step']}): {', '.join(parts)}: {verdict}"


def _cpu_copy(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts, lists and tuples cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: _cpu_copy(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(value) for value in obj)
    return copy.deepcopy(obj)


class RegressionGate(L.Callback):
    """Evaluates every block of ``every_n_steps`` optimizer steps and reverts a regressing one
    (see module docstring).

    Args:
        every_n_steps: optimizer steps per gated block.
        max_ppl_increase: largest accepted relative perplexity increase over a block.
        max_probe_drop: largest accepted absolute probe-accuracy drop over a block.
        evaluation: what to evaluate (an EvalConfig or its dict); None uses the LightningModule's
            ``evaluation``.
        out_dir: where ``block_NNNN/`` folders go; None: ``gates/`` in the trainer's log dir.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        max_ppl_increase: float = 0.05,
        max_probe_drop: float = 0.05,
        evaluation: EvalConfig | dict | None = None,
        out_dir: str | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise LLMKitError(f"RegressionGate every_n_steps must be >= 1, got {every_n_steps}")
        if not (0 <= max_ppl_increase < math.inf and 0 <= max_probe_drop <= 1):  # NaN compares False: refused
            raise LLMKitError(f"RegressionGate max_ppl_increase must be a number >= 0 and max_probe_drop one in [0, 1] "
                              f"(the regressions tolerated), got {max_ppl_increase} and {max_probe_drop}")
        self.every_n_steps = every_n_steps
        self.max_ppl_increase = max_ppl_increase
        self.max_probe_drop = max_probe_drop
        self.evaluation = as_dataclass(EvalConfig, evaluation) if evaluation is not None else None
        self.out_dir = out_dir
        self.blocks = 0
        self.rejections = 0
        self.decisions: list[dict] = []
        self._config: EvalConfig | None = None
        self._tokenizer: TokenizerLike | None = None
        self._chat_template = False  # the module's option, where it has one
        self._dir: Path | None = None
        self._before: dict | None = None  # report of the kept weights, those of the snapshot
        self._snapshot: tuple[dict, list[dict]] | None = None
        self._snapshot_step = 0
        self._block_start = 0
        self._step = 0  # the last optimizer step this run completed
        self._resumed_block: dict | None = None  # the unfinished block a checkpoint held
        self._resumed_snapshot_step: int | None = None  # the step of the weights a checkpoint's next block starts from

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require_data_parallel(trainer, type(self).__name__)
        require(self, pl_module, HasBackbone, "(the backbone it evaluates)")
        candidates = [self.evaluation]
        if satisfies(pl_module, HasEvaluation):
            candidates.append(pl_module.evaluation)
        config = next((c for c in candidates if c is not None and c.enabled), None)
        if config is None:
            raise LLMKitError(
                "RegressionGate has nothing to evaluate: set evaluation.ppl_files (held-out .bin shards) "
                "and/or evaluation.probes (a probe JSONL file) on the callback or on the module"
            )
        if config.probes is not None:
            why = f"to complete the probes {config.probes}"
            self._tokenizer = require(self, pl_module, HasTokenizer, why).tokenizer
            self._chat_template = bool(getattr(pl_module, "chat_template", False))  # as its training prompts
        self._config = config

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        root = Path(trainer.log_dir or trainer.default_root_dir) / "gates"
        self._dir = Path(self.out_dir) if self.out_dir is not None else root
        self._step = trainer.global_step
        block, self._resumed_block = self._resumed_block, None
        snapshot_step, self._resumed_snapshot_step = self._resumed_snapshot_step, None
        if block is not None:  # finish the block the checkpoint was saved in, against its own baseline
            self._block_start, self._before = block["start_step"], block["before"]
            self._snapshot, self._snapshot_step = (block["module"], block["optimizers"]), block["snapshot_step"]
            rank_zero_info(f"gate block {self.blocks + 1} resumed at step {trainer.global_step} (started at step "
                           f"{self._block_start}; its baseline and the weights of step {self._snapshot_step} "
                           f"from the checkpoint)")
            if trainer.global_step - self._block_start >= self.every_n_steps:  # interrupted while gating its end
                self._gate(trainer, pl_module)
            return
        self._before = self._evaluate(trainer, pl_module)
        self._take_snapshot(trainer, pl_module)
        if snapshot_step is not None:  # resumed at a block's end: after a rejected one, its start's weights
            self._snapshot_step = snapshot_step
        self._block_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._step = trainer.global_step
        steps = trainer.global_step - self._block_start
        last = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
        if steps >= self.every_n_steps or (last and steps > 0):
            self._gate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > self._block_start:
            self._gate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        state = {"blocks": self.blocks, "rejections": self.rejections, "decisions": copy.deepcopy(self.decisions),
                 "snapshot_step": self._snapshot_step}
        if self._snapshot is not None and self._step > self._block_start:  # in the middle of a block
            module, optimizers = self._snapshot
            state["block"] = {"start_step": self._block_start, "before": self._before, "module": module,
                              "optimizers": optimizers, "snapshot_step": self._snapshot_step}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.blocks = state_dict["blocks"]
        self.rejections = state_dict["rejections"]
        self.decisions = copy.deepcopy(state_dict["decisions"])
        self._resumed_block = state_dict.get("block")
        self._resumed_snapshot_step = state_dict.get("snapshot_step")

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """The report of the student's current weights: rank 0's, on every rank (module docstring)."""
        report = self._config.run(pl_module.model, self._tokenizer, self._chat_template)
        return trainer.strategy.broadcast(report, src=0)

    def _take_snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._snapshot = (
            _cpu_copy(pl_module.state_dict()),
            [_cpu_copy(optimizer.state_dict()) for optimizer in trainer.optimizers],
        )
        self._snapshot_step = trainer.global_step

    def _restore_snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The block-start weights and optimizer state, at the learning rates of the schedule's current
        step: the schedule is not rewound, and the snapshot's groups hold the block start's rates. The
        optimizer gets a copy: it keeps the tensors it is given where they sit (the CPU's, on a CPU run),
        and the next block's updates in place would change the snapshot that a rejection restores again."""
        module_state, optimizer_states = self._snapshot
        pl_module.load_state_dict(module_state)
        for optimizer, state in zip(trainer.optimizers, optimizer_states, strict=True):
            rates = [group["lr"] for group in optimizer.param_groups]
            optimizer.load_state_dict(_cpu_copy(state))
            for group, lr in zip(optimizer.param_groups, rates, strict=True):
                group["lr"] = lr

    def _gate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        after = self._evaluate(trainer, pl_module)
        self.blocks += 1
        decision = {
            "block": self.blocks,
            "start_step": self._block_start,
            "end_step": trainer.global_step,
            "snapshot_step": self._snapshot_step,
            **gate_decision(self._before, after, self.max_ppl_increase, self.max_probe_drop),
            "max_ppl_increase": self.max_ppl_increase,
            "max_probe_drop": self.max_probe_drop,
        }
        accepted = decision["decision"] == "accepted"
        if trainer.is_global_zero:
            block_dir = self._dir / f"block_{self.blocks:04d}"
            write_json_atomic(block_dir / "eval_before.json", self._before)
            write_json_atomic(block_dir / "eval_after.json", after)
            write_json_atomic(block_dir / "gate_decision.json", decision)
        rank_zero_info(describe_decision(decision))
        if accepted:
            self._before = after
            self._take_snapshot(trainer, pl_module)
        else:
            self.rejections += 1
            self._restore_snapshot(trainer, pl_module)
        self.decisions.append(decision)
        self._block_start = trainer.global_step
        metrics = {
            "gate/accepted": float(accepted),
            "gate/rejections": float(self.rejections),
            "gate/ppl_increase": decision["ppl_increase"],
            "gate/probe_drop": decision["probe_drop"],
            "gate/ppl": decision["ppl_after"],
            "gate/probe_accuracy": decision["probe_accuracy_after"],
        }
        for logger in trainer.loggers:  # straight to the loggers: self.log is not allowed in on_train_end
            logger.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=trainer.global_step)
