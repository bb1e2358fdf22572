"""Callbacks that the multi-process tests (tests/test_distributed.py) attach to every rank.

They live outside the test module so that the processes Lightning launches, which import them
(``ddp_spawn`` unpickles them, ``llmkit ttt fit --trainer.strategy ddp`` names them by class path),
import them without pytest's test collection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from llmkit.callbacks import AtomicCheckpointIO, Replay
from llmkit.callbacks.regression_gate import RegressionGate

WRITERS = {
    "llmkit.callbacks.regression_gate": ("write_json_atomic",),
    "llmkit.modules.finetune": ("write_json_atomic",),
    "llmkit.modules.ttt_discover": ("write_json_atomic", "save_lora"),
}
"""The output writers each rank's calls are recorded from: module, function names (first argument:
the file written, after the model for save_lora)."""


class FirstGrads(L.Callback):
    """The gradients the first optimizer step applies (``grads``: all-reduced and normalised, before
    the optimizer; after clipping under manual optimisation, before it under automatic)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


class RankLog(FirstGrads):
    """Records what this rank did and writes it to ``out/rank{R}.pt`` at teardown: every batch as
    the data module handed it (before Replay, which must come after this callback), what the
    module sampled (``sample_completions`` / ``sample_actions``: contexts and samples), the files
    it wrote (``WRITERS`` and checkpoints), DDP's gradient all-reduces, the gradients the first
    optimizer step applies, and at the end the module's state dict, the replay state, the gate's
    decisions and the TTT archive."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = Path(out)
        self.batches: list[Any] = []
        self.samples: list[tuple[list[list[int]], list[list[int]]]] = []
        self.writes: list[str] = []
        self.allreduces = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import importlib

        for module_name, names in WRITERS.items():
            module = importlib.import_module(module_name)
            for name in names:
                setattr(module, name, self._recording(getattr(module, name)))
        save = AtomicCheckpointIO.save_checkpoint

        def save_checkpoint(io: AtomicCheckpointIO, checkpoint: dict, path: Any, *args: Any, **kwargs: Any) -> None:
            self.writes.append(str(path))
            save(io, checkpoint, path, *args, **kwargs)

        AtomicCheckpointIO.save_checkpoint = save_checkpoint
        for name in ("sample_completions", "sample_actions"):
            if hasattr(pl_module, name):
                setattr(pl_module, name, self._recording_samples(getattr(pl_module, name)))

    def _recording(self, write: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.writes.append(str(next(a for a in args if isinstance(a, (str, Path)))))
            return write(*args, **kwargs)

        return recorded

    def _recording_samples(self, sample: Callable[..., list[list[int]]]) -> Callable[..., list[list[int]]]:
        def recorded(contexts: list[list[int]], *args: Any) -> list[list[int]]:
            samples = sample(contexts, *args)
            self.samples.append((contexts, samples))
            return samples

        return recorded

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            def counting(state, bucket):  # DDP checks a hook's annotations: none is accepted
                self.allreduces += 1
                return default_hooks.allreduce_hook(None, bucket)

            trainer.strategy.model.register_comm_hook(None, counting)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.batches.append([item.clone() if isinstance(item, torch.Tensor) else
                             dataclasses.asdict(item) if dataclasses.is_dataclass(item) else item for item in batch])

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        replay = next((c for c in trainer.callbacks if isinstance(c, Replay)), None)
        gate = next((c for c in trainer.callbacks if isinstance(c, RegressionGate)), None)
        archive = getattr(pl_module, "archive", None)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({
            "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "first_grads": self.grads,
            "batches": self.batches, "samples": self.samples, "writes": self.writes, "allreduces": self.allreduces,
            "global_step": trainer.global_step, "world_size": trainer.world_size,
            "replay": None if replay is None else replay.state_dict(),
            "decisions": None if gate is None else gate.decisions,
            "archive": None if archive is None else archive.to_dict(),
            "tokens_seen": getattr(pl_module, "tokens_seen", None),
        }, self.out / f"rank{trainer.global_rank}.pt")


class SaveInTheFirstWindow(L.Callback):
    """After the first micro-batch (of 2 a step): write this rank's gradients and accumulated token and
    loss sums to ``out/window{R}.pt``, then save the run's checkpoint ``out/window.ckpt`` (every rank
    takes part, as in a save at a validation inside the window)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.total.processed != 1:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        accumulator = pl_module.accumulator
        torch.save({"gradients": {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None},
                    "tokens": accumulator._tokens, "loss_sum": accumulator._loss_sum},
                   self.out / f"window{trainer.global_rank}.pt")
        trainer.save_checkpoint(self.out / "window.ckpt")


class ReplaySamples(L.Callback):
    """Makes the module's sampler (``sample_completions`` / ``sample_actions``) return recorded
    samples in order, checking that it is asked for the recorded contexts: a single-process run
    then trains on the very samples a multi-process run drew."""

    def __init__(self, recorded: list[tuple[list[list[int]], list[list[int]]]]) -> None:
        self.recorded = list(recorded)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        def replay(contexts: list[list[int]], *args: Any) -> list[list[int]]:
            expected, samples = self.recorded.pop(0)
            assert contexts == expected, "the reference run asked to sample other contexts than the recorded ones"
            return samples

        for name in ("sample_completions", "sample_actions"):
            if hasattr(pl_module, name):
                setattr(pl_module, name, replay)


class SkewedGate(RegressionGate):
    """A RegressionGate whose evaluations after a block read 10x the perplexity on rank 1: a
    decision taken from rank-local reports would reject there and accept on rank 0."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.global_rank != 1:
            return
        config, run = self._config, self._config.run
        calls = []

        def skewed(model: torch.nn.Module, tokenizer: Any, chat_template: bool = False) -> dict:
            report = run(model, tokenizer, chat_template)
            calls.append(1)
            if len(calls) > 1:  # the first report is the baseline before any block
                report["perplexity"]["ppl"] *= 10
            return report

        self._config = dataclasses.replace(config)
        self._config.run = skewed
