"""Checkpoints you can trust: never half-written, integrity-checked when read, holding the final
step, and saved when a run is interrupted.

- :class:`AtomicCheckpointIO` (a Trainer plugin; ``llmkit`` commands add it) writes each
  checkpoint to a temp file in its own directory, fsyncs it and renames it into place, so a crash
  or a full disk never leaves a half-written ``last.ckpt``. Lightning's own writer goes through a
  temp file in the system temp directory, and when that is another filesystem (a tmpfs ``/tmp``)
  the final move is a copy straight into the destination, which a crash can cut short. Reading
  goes through :func:`llmkit.model.checkpoint.load_checkpoint_file`: every member's CRC-32 is
  checked and only tensors and plain data are loaded.
- :class:`Checkpoint` is Lightning's ``ModelCheckpoint`` (same arguments, ``save_last`` on,
  ``enable_version_counter`` off: a file of the name it writes, ``last.ckpt`` or
  ``epoch=0-step=20.ckpt``, is this run's earlier state, from before a resume or a copy of its
  directory, and is replaced rather than joined by ``last-v1.ckpt``) plus two guarantees: the
  step a run ends at is always in ``last.ckpt`` (Lightning's keeps the last multiple of
  ``every_n_train_steps``), and Ctrl-C (SIGINT) or SIGTERM saves a resumable
  ``last.ckpt`` of the last completed step before the run stops (interrupted inside a
  validation before this callback's end hook, with that validation to run again, whole, when the
  run resumes; in that hook, after Lightning logged the metrics, the validation is done). From a
  training batch's first backward to its end hooks, interrupts wait for the batch to be done
  (:meth:`Checkpoint.on_before_backward`). Other exceptions (a bug, a non-finite loss) do not
  overwrite it.
"""

from __future__ import annotations

import os
import signal
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops.utilities import _is_max_limit_reached
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from llmkit.io import atomic_file, hold_interrupts, interrupt_pending, interrupts_held, release_interrupts
from llmkit.model.checkpoint import load_checkpoint_file

INTERRUPTS = (KeyboardInterrupt, SIGTERMException)
"""The exceptions Lightning raises for Ctrl-C and SIGTERM."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes by temp file + fsync + rename in the target directory, Ctrl-C and SIGTERM
    held until the file is whole (:func:`interrupts_held`); integrity-checked, ``weights_only``
    reads (see the module docstring). Remote paths (``s3://...``) use Lightning's."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with interrupts_held(), atomic_file(path) as tmp, tmp.open("wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return load_checkpoint_file(path, map_location if map_location is not None else "cpu")


def _forget_the_batch_in_flight(trainer: L.Trainer) -> None:
    """Before saving an interrupted run: if a training batch was fetched but its step not done (an
    interrupt before its first backward: from there on they wait for the batch's end), put
    the data loader back before it (a :class:`~llmkit.data.datamodule.ResumableLoader`; the resume
    trains that batch, not the one after it), undo what callbacks and the module counted of it
    (``rewind_in_flight``: Replay's draws, PretrainModule's tokens) and put the loop's batch
    counters back to the last batch done, so that the checkpoint is the one an interrupt between
    the two batches saves.

    Lightning restores counters that count the batch in flight as a restart mid-batch: the resume
    then counted its logging step once more (the curves skipped a step) and, where validation
    counts batches across epochs (``check_val_every_n_epoch: null``, as the configs set), it
    numbered every later batch one ahead, so it validated one step early and never after the
    last one."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if progress.current.ready <= progress.current.processed:
        return
    loaders = trainer.train_dataloader
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    for stateful in [*loaders, *trainer.callbacks, trainer.lightning_module]:
        if hasattr(stateful, "rewind_in_flight"):  # ResumableLoader, Replay, PretrainModule (its token count)
            stateful.rewind_in_flight()
    for counts in (progress.total, progress.current):
        counts.ready = counts.started = counts.processed
    progress.is_last_batch = False  # the batch done was not the epoch's last: one more was fetched


_ENDED_BATCH: weakref.WeakKeyDictionary[L.Trainer, tuple[int, bool]] = weakref.WeakKeyDictionary()
"""Per trainer, the batch :func:`_count_the_batch_ended` counted (its total count) and whether a
validation is due after it, for the other ``Checkpoint`` callbacks' ``on_exception``."""


def _logged_step(trainer: L.Trainer) -> int:
    """The step the module's logs number its state with, for the console (``logged_step``: in a
    TTT-Discover ``best_of_n`` run the discovery step, where Lightning's ``global_step`` stays 0)."""
    return getattr(trainer.lightning_module, "logged_step", trainer.global_step)


def _count_the_batch_ended(trainer: L.Trainer) -> bool:
    """Before saving a run whose interrupt, held through a training step, landed at the step's end
    (:meth:`Checkpoint.on_train_batch_end`, the callbacks' last; the LightningModule's own
    ``on_train_batch_end`` is skipped, whose only use in llmkit, the fine-tuning modules', is to log
    nothing after a micro-batch that ends no step): count the batch done and, at a step's end, log
    its step's metrics, as Lightning does after that hook, and, unless a validation is due after
    it, count its logging step, as Lightning does after the validation. Return whether one is due
    (the caller sets it to run on resume). Saved as they were, the resume skipped that
    validation and the step's train points were never logged. Every ``Checkpoint`` of the run calls
    this; the first counts."""
    loop = trainer.fit_loop.epoch_loop
    progress = loop.batch_progress
    if progress.current.processed == progress.current.completed:  # counted: by another Checkpoint, or by
        counted, due = _ENDED_BATCH.get(trainer, (None, False))  # Lightning (its SIGTERM stops between batches)
        return due and counted == progress.total.completed
    trainer._logger_connector.on_batch_end()
    progress.increment_completed()
    if not loop._should_accumulate():
        trainer._logger_connector.update_train_step_metrics()
    due = loop._should_check_val_fx(None) and not loop._skip_next_val
    if not due:
        loop._batches_that_stepped += not loop._should_accumulate()
    _ENDED_BATCH[trainer] = (progress.total.completed, due)
    return due


def _run_ends_after_the_batch(trainer: L.Trainer) -> bool:
    """Whether the fit stops once the current batch, its validation and its epoch's end are done
    (Lightning's ``FitLoop.done`` for the epoch about to close)."""
    fit = trainer.fit_loop
    return (_is_max_limit_reached(fit.epoch_loop.global_step, fit.max_steps) or trainer.should_stop
            or _is_max_limit_reached(fit.epoch_progress.current.processed + 1, fit.max_epochs))


def _validation_to_run_again(trainer: L.Trainer, started: bool) -> None:
    """Before saving a run interrupted inside one of fit's validations (``started``) or before one
    due: set the validation loop's batch counters to Lightning's "restarted mid-evaluation" with no
    batch of it done, so that the resume runs that whole validation again, from its first batch,
    before the next training batch, and logs it at the step the uninterrupted run did.

    Saved as they were, an interrupt inside a validation step made the resume continue the
    validation from the batch in flight, over a fresh iterator of the validation set: it averaged
    the first batches only and logged that as the step's point (2 validation batches, interrupted
    in the second: the loss of the first alone); an interrupt between two of its batches made the
    resume skip the validation."""
    progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress
    done_before = progress.total.completed - (progress.current.completed if started else 0)  # earlier validations'
    progress.current.reset()
    progress.total.ready = progress.total.started = done_before + 1
    progress.total.processed = progress.total.completed = done_before
    progress.is_last_batch = False


@contextmanager
def _logging_step_as_a_resume_counts_it(trainer: L.Trainer, validation_to_run: bool) -> Iterator[None]:
    """Save a checkpoint between batches (at the end of fit, or on an interrupt after a batch) with
    the logging step a resume continues from.

    Lightning takes such a checkpoint for one saved when the last batch's validation ended, before
    that batch's count of the logging step: if the last batch was one to validate after, the resume
    skips the validation and adds the count. Saved after the count, the resumed curves skipped a
    step (a 6-step run validating every 3 steps, resumed to 8, logged steps 0-5, 7, 8). An
    interrupt inside that validation, or before it (``validation_to_run``), comes before the count,
    which the checkpoint then keeps as it is (taken back, the resumed curves logged a step twice and
    every later one a step early), and so does one after a validation inside an accumulation window,
    which Lightning does not count, or at the end of an epoch-based run's epoch, which Lightning does
    not restart (taken back, the resumed curves were a step behind)."""
    loop = trainer.fit_loop.epoch_loop
    progress, epoch = loop.batch_progress.current, trainer.fit_loop.epoch_progress.current
    restarts = epoch.processed != epoch.ready or epoch.processed != epoch.started or trainer.max_steps != -1
    # ^ as Lightning's FitLoop.restarting: it restarts an unfinished epoch, or any of an iteration-based run
    counted_twice = progress.ready == progress.processed == progress.completed > 0 and loop._should_check_val_fx(None) \
        and not validation_to_run and not loop._should_accumulate() and restarts
    loop._batches_that_stepped -= counted_twice
    try:
        yield
    finally:
        loop._batches_that_stepped += counted_twice


def _moved_to(state: dict[str, Any], old_dir: str, new_dir: str) -> dict[str, Any]:
    """``ModelCheckpoint`` state with its directory and the files it lists in it named from ``new_dir``."""
    def moved(path: str) -> str:
        return os.path.join(new_dir, os.path.basename(path)) if path and os.path.dirname(path) == old_dir else path

    return {**state, "dirpath": new_dir, "best_model_path": moved(state.get("best_model_path", "")),
            "kth_best_model_path": moved(state.get("kth_best_model_path", "")),
            "last_model_path": moved(state.get("last_model_path", "")),
            "best_k_models": {moved(path): score for path, score in state.get("best_k_models", {}).items()}}


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the final step and is saved on
    SIGINT/SIGTERM (see the module docstring). Arguments as ``ModelCheckpoint``; files are replaced,
    not versioned (``enable_version_counter`` off)."""

    def __init__(self, *args: Any, save_last: bool | str = True, enable_version_counter: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, save_last=save_last, enable_version_counter=enable_version_counter, **kwargs)
        self._last_step: int | None = None  # the step this process last wrote ``last`` at
        self.validation_pending: int | None = None
        """The step whose validation an interrupt cut short, until a validation runs (checkpointed): a
        resume with no step left to train skips it, so the CLI runs it after ``fit``."""
        self._validation_logged = False  # in fit's validation, from its end hooks on: its metrics are logged
        self._step_held = False  # interrupts held from the batch's first backward to its end
        self._batch_ended = False  # the batch's end hooks all ran: a held interrupt lands after them

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "validation_pending": self.validation_pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's, with the checkpoint's directory taken for this one's where both name the same
        directory: a logger's relative ``save_dir`` is stored as given (``lightning_logs/...``), and a
        ``validate`` or resume that logs into the run by its absolute path (no ``--config``) lost the
        top-k and last-file records, with a warning."""
        stored = state_dict.get("dirpath")
        if stored and self.dirpath and stored != self.dirpath and "://" not in f"{stored}{self.dirpath}" \
                and os.path.realpath(stored) == os.path.realpath(self.dirpath):
            state_dict = _moved_to(state_dict, stored, self.dirpath)
        super().load_state_dict(state_dict)
        self.validation_pending = state_dict.get("validation_pending")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_logged = False
        progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress
        if trainer.state.fn == "fit" and progress.total.ready > progress.total.completed:
            # the validation run again (_validation_to_run_again): Lightning has begun it now, and no longer
            # needs the batch in flight counted; counted, every batch of it and of later validations was
            # numbered one ahead (the validate/* axis of TokenThroughput, Lightning's ThroughputMonitor)
            progress.total.ready = progress.total.started = progress.total.completed
        super().on_validation_start(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validation_pending = None  # before the parent's hook, which may save a checkpoint
            self._validation_logged = True  # Lightning logs a validation's metrics before its end hooks
        super().on_validation_end(trainer, pl_module)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        with interrupts_held():  # an interrupt in the write comes once it is recorded, and is not saved again
            super()._save_last_checkpoint(trainer, monitor_candidates)
            self._last_step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._batch_ended = False
        self._release_step()  # one held over an epoch's end lands here, before this batch's step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        """Hold Ctrl-C and SIGTERM from a training batch's first backward to its end hooks (to this
        callback's, which Lightning runs after the others'): a gradient backpropagated, an optimizer
        step, an EMA teacher update cannot be taken back, and an interrupt among them saved a state no
        uninterrupted run passes through (the resume trained the batch again). One before it takes
        the batch back."""
        if not self._step_held and trainer.training:
            self._step_held = hold_interrupts()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Release the step's hold: an interrupt lands here, after every callback's end of the batch,
        except after the last batch of an epoch, where it waits on through the validation and the
        epoch's end (Lightning closes the epoch after this hook, and one saved unclosed made the
        resume take the next pass's first batch for the old epoch's, or saved the epoch of a SIGTERM
        closed with its batches counted) and lands at the next batch's start, or, for a Ctrl-C at
        the run's last batch, once the final checkpoint is saved (a SIGTERM there lands now: the
        run ends with that epoch, and Lightning stops with status 143 after closing it). Every rank
        decides alike, or one would save while another validates."""
        super().on_train_batch_end(trainer, pl_module, *args)
        if trainer.fit_loop.epoch_loop._is_training_done:
            hold_on = interrupt_pending(signal.SIGINT) or (
                interrupt_pending(signal.SIGTERM) and not _run_ends_after_the_batch(trainer))
            if trainer.strategy.reduce_boolean_decision(hold_on, all=False):
                return
        self._batch_ended = True
        self._release_step()

    def _release_step(self, deliver: bool = True) -> None:
        if self._step_held:
            self._step_held = False
            release_interrupts(deliver)

    def _save_last_now(self, trainer: L.Trainer, validation_to_run: bool = False) -> bool:
        """Save ``last`` at the current step unless it holds that step already (another file saved at
        this step does not count) and no validation is to run (inside one, or due: that save came
        before it); whether it saved."""
        if (not self.save_last or trainer.fast_dev_run or trainer.state.fn != "fit" or trainer.sanity_checking
                or (self._last_step == trainer.global_step and not validation_to_run)):
            return False
        with _logging_step_as_a_resume_counts_it(trainer, validation_to_run):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return True

    def run_pending_validation(self, trainer: L.Trainer, model: L.LightningModule, datamodule: Any) -> bool:
        """After ``fit``: run the validation an interrupt cut short after the run's last step, which a
        resume with no step left to train skips (earlier steps' validations run again inside ``fit``:
        :func:`_validation_to_run_again`), as ``validate`` runs it (its point at the step S of the
        weights it scores, where ``fit`` logs it at S - 1, Lightning's convention), then save ``last``
        again with it done, so that no later resume repeats it. Whether it ran.

        That save keeps the fit's loop state from before the ``validate``, which tears down the fit's
        data (saved after it, the checkpoint lost the data position and its epoch, and a resume to a
        larger ``max_steps`` began the data again)."""
        if self.validation_pending != trainer.global_step:
            return False
        rank_zero_info(f"the validation of step {trainer.global_step} was interrupted: running it")
        connector = trainer._checkpoint_connector
        fit_state = {"epoch": trainer.current_epoch, "loops": connector._get_loops_state_dict()}
        if pending := trainer.fit_loop._combined_loader_states_to_load:  # resumed with nothing to train: unloaded
            fit_state["loops"]["fit_loop"]["state_dict"]["combined_loader"] = pending
        trainer.validate(model, datamodule=datamodule, verbose=False)  # clears validation_pending
        progress = fit_state["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]
        progress["processed"] = progress["completed"] = progress["started"]  # no longer restarted mid-evaluation
        if self.last_model_path:
            trainer.strategy.barrier("Checkpoint.run_pending_validation")
            trainer.strategy.save_checkpoint({**connector.dump_checkpoint(), **fit_state}, self.last_model_path)
            trainer.strategy.barrier("Checkpoint.run_pending_validation")
            rank_zero_info(f"checkpoint: {self.last_model_path} (step {trainer.global_step}, its validation done)")
        return True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last_now(trainer)
        if self.last_model_path:
            rank_zero_info(f"checkpoint: {self.last_model_path} (step {_logged_step(trainer)})")
        self._release_step()  # one held over the last batch's end lands once the run's end is saved

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release_step(deliver=False)  # the run stops anyway
        if not isinstance(exception, INTERRUPTS):
            return  # a failure is not a state to resume from: keep the last good checkpoint
        what = "Ctrl-C" if isinstance(exception, KeyboardInterrupt) else "SIGTERM"
        validation_due = self._batch_ended and trainer.training and _count_the_batch_ended(trainer)
        _forget_the_batch_in_flight(trainer)
        in_validation = trainer.state.fn == "fit" and trainer.validating and not trainer.sanity_checking
        if validation_due or (in_validation and not self._validation_logged):
            _validation_to_run_again(trainer, started=in_validation)
            self.validation_pending = trainer.global_step
        # in or before a validation, saved again if it holds the step: that save was taken before the validation
        # (one whose metrics are logged, interrupted in the save of its end hook, is done, as that save records it)
        saved = self._save_last_now(trainer, validation_to_run=in_validation or validation_due)
        if self._last_step == trainer.global_step:
            rank_zero_info(
                f"{what} at step {_logged_step(trainer)}: {'saved ' if saved else ''}{self.last_model_path}"
                f"{'' if saved else ' holds it'}; resume with --ckpt_path {self.last_model_path}"
            )
