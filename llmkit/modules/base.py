"""LLMKitModule: what every llmkit LightningModule writes into its checkpoints and checks in them."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn

from llmkit.distributed import sum_over_ranks
from llmkit.errors import LLMKitError
from llmkit.model.checkpoint import (
    LOGGED_STEP_KEY,
    TOKENIZER_KEY,
    WRITER_KEY,
    check_tokenizer,
    check_writer,
    reshape_scalar_alpha_moments,
)
from llmkit.model.config import ModelConfig
from llmkit.model.mhc import reshape_scalar_alphas
from llmkit.model.moe import moe_layers
from llmkit.optim import MuonAdamW, TokenMeanAccumulator, optimizer_name

WINDOW_KEY = "llmkit_accumulation_window"
"""The checkpoint entry of a step saved between its micro-batches (:meth:`LLMKitModule.accumulation_window`)."""


class LLMKitModule(L.LightningModule):
    """Base of :class:`~llmkit.modules.pretrain.PretrainModule`,
    :class:`~llmkit.modules.finetune.FineTuneModule` and
    :class:`~llmkit.modules.ttt_discover.TTTDiscoverModule`.

    A checkpoint holds the backbone's config (``ckpt["model_config"]``, the truth where
    ``init_ckpt`` set the shape, read by ``llmkit generate`` and later fine-tuning runs) and the
    name of the module that wrote it, which a loading module checks
    (:func:`~llmkit.model.checkpoint.check_writer`: a checkpoint of another module is refused,
    naming the module that wrote it; ``llmkit`` commands name the command that reads it). The
    module also knows the optimizer step of the weights it holds (:attr:`weights_step`: a loaded
    checkpoint's, or the last fit's end), at which a ``validate`` plots its metrics
    (:meth:`log_weights_step`). It records the tokenizer whose ids the weights learned
    (:attr:`tokenizer_record`, :data:`~llmkit.model.checkpoint.TOKENIZER_KEY`), and a checkpoint
    it loads must have learned the same one. A checkpoint saved between the micro-batches of an
    optimizer step holds that step's gradients so far (:meth:`accumulation_window`).
    """

    config: ModelConfig
    """The backbone's config; a subclass sets it in ``__init__``."""
    tokenizer_record: dict[str, str] | None = None
    """The tokenizer this module's data is encoded with (``{"path", "sha256"}``; None: unknown): a
    fine-tuning module's ``tokenizer``, the one pretraining shards were packed with."""
    accumulator: TokenMeanAccumulator | None = None
    """The gradient accumulation of a module that optimises by hand (None: Lightning's)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights_step = 0
        self._resumed_optimizer: str | None = None  # the optimizer a loaded checkpoint's state is of
        self._resumed_window: dict[str, Any] | None = None  # a loaded checkpoint's step in progress

    @property
    def logged_step(self) -> int:
        """The step this module's logs number its current state with (saved in checkpoints as
        :data:`~llmkit.model.checkpoint.LOGGED_STEP_KEY`, where a resume's TensorBoard purge starts)."""
        return self.global_step

    def check_validation_loss(self, name: str, loss: torch.Tensor) -> None:
        """Raise on a non-finite validation loss ``name``: the weights diverged (it was logged, and
        the run went on to fail at the next training batch)."""
        if not torch.isfinite(loss):
            raise LLMKitError(
                f"non-finite {name} ({loss.item()}) at global step {self.global_step}: the weights diverged; lower "
                f"optim.lr, set gradient clipping, or resume from the last good checkpoint"
            )

    def log_weights_step(self) -> None:
        """In a ``validate``, log ``step``: Lightning then plots the validation at the step of the
        weights it scores, not at 0."""
        if self.trainer.state.fn == "validate":
            self.log("step", float(self.weights_step))

    def take_tokenizer_of(self, checkpoint: dict[str, Any], ckpt: str) -> None:
        """Check that ``checkpoint`` (read from ``ckpt``) learned the ids of :attr:`tokenizer_record`
        (:func:`~llmkit.model.checkpoint.check_tokenizer`), and take its record where this module
        knows none."""
        check_tokenizer(checkpoint, ckpt, self.tokenizer_record)
        self.tokenizer_record = self.tokenizer_record or checkpoint.get(TOKENIZER_KEY)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model_config"] = self.config.to_dict()
        checkpoint[WRITER_KEY] = type(self).__name__
        checkpoint[LOGGED_STEP_KEY] = self.logged_step
        if self.tokenizer_record is not None:
            checkpoint[TOKENIZER_KEY] = self.tokenizer_record
        window = self.accumulation_window()
        if window is not None:
            checkpoint[WINDOW_KEY] = window

    def accumulation_window(self) -> dict[str, Any] | None:
        """The optimizer step in progress, for a checkpoint saved between its micro-batches (an
        interrupt, a validation inside the window): the gradients of its micro-batches so far
        (:meth:`window_gradients`), the MoE routers' expert loads so far (summed over the ranks; a
        resume gives each rank an equal share) and :attr:`accumulator`'s sums; None between steps. Lightning
        checkpoints neither gradients nor buffers kept out of the state dict, and the resumed step
        applied the gradients of its later micro-batches alone, and moved the balancing bias by their load.
        Under FSDP the gradients are sharded and none of this is saved (a warning says so)."""
        inside = self.accumulator.in_window if self.accumulator is not None else \
            self.trainer.state.fn == "fit" and self.trainer.fit_loop._should_accumulate()
        if not inside:  # Lightning keeps a step's gradients until the next step's first backward: not these
            return None
        if isinstance(self.trainer.strategy, FSDPStrategy):
            rank_zero_warn(f"step {self.global_step}: a checkpoint saved between the micro-batches of an optimizer "
                           "step does not hold their gradients (nor an MoE model's expert load) under FSDP; a resume "
                           "from it steps on the later ones alone")
            return None
        window: dict[str, Any] = {"gradients": self.window_gradients()}
        if layers := moe_layers(self):  # the step's expert loads so far, which its bias update reads
            reduce = sum_over_ranks(self.trainer)
            window["moe_load"] = [reduce(layer.router.load.clone()).cpu() for layer in layers]
        if self.accumulator is not None:
            window["accumulator"] = self.accumulator.state_dict()
        return window

    def window_gradients(self) -> dict[str, torch.Tensor]:
        """The gradients set, by name. Under DDP (every rank calls this): their mean over the ranks,
        which the step's all-reduce then completes, for the parameters one rank or more set, in one
        all-reduce over every trained parameter (a rank whose micro-batches left one unused, an MoE
        expert, still makes the same call as the others)."""
        trained = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        if self.trainer.world_size == 1:
            return {name: p.grad.detach().clone() for name, p in trained if p.grad is not None}
        parts = [p.grad.detach().float().flatten() if p.grad is not None else p.new_zeros(p.numel(), dtype=torch.float)
                 for _, p in trained]
        set_here = torch.tensor([float(p.grad is not None) for _, p in trained], device=parts[0].device)
        flat = self.trainer.strategy.reduce(torch.cat([*parts, set_here]), reduce_op="mean")
        values = flat[: -len(trained)].split([p.numel() for _, p in trained])
        return {name: value.view_as(p).to(p.dtype) for (name, p), value, anywhere
                in zip(trained, values, flat[-len(trained):] > 0, strict=True) if anywhere}

    def on_fit_end(self) -> None:
        self.weights_step = self.global_step  # a validate after fit, in this process, scores these weights

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_writer(checkpoint, type(self).__name__)
        reshape_scalar_alpha_moments(checkpoint)
        ckpt_path = self._trainer.ckpt_path if self._trainer is not None else None
        self.take_tokenizer_of(checkpoint, ckpt_path or "the checkpoint")
        self.weights_step = checkpoint.get("global_step", 0)
        states = checkpoint.get("optimizer_states")
        self._resumed_optimizer = optimizer_name(states[0]) if states else None
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        self._resumed_window = checkpoint.get(WINDOW_KEY) if fitting else None

    def on_train_start(self) -> None:
        """Put a resumed run's training data where the checkpoint has it, and continue the optimizer
        step it was saved inside (:meth:`accumulation_window`; not earlier: Lightning zeroes the
        gradients before the fit loop starts).

        The data: Lightning loads the loader's saved position only when it restarts inside an epoch
        and sets the data up after the restore; a checkpoint saved at an epoch's end (the final one
        of a run that ended there) and a schedule that reads ``trainer.estimated_stepping_batches``
        (``max_steps`` -1: ``max_epochs`` runs), which sets the data up before the restore
        (Lightning issue 20550), left it unloaded, and the resume began the data again from the
        first pass. Loaded here, and the loader iterated again from it."""
        loop = self.trainer.fit_loop
        if loop._combined_loader_states_to_load and loop._combined_loader is not None:
            loop._combined_loader._load_state_dicts(loop._combined_loader_states_to_load)
            loop._combined_loader_states_to_load = []
            iter(loop._data_fetcher)
        window, self._resumed_window = self._resumed_window, None
        if window is None:
            return
        parameters = dict(self.named_parameters())
        reshape_scalar_alphas(window["gradients"])
        for name, grad in window["gradients"].items():
            parameters[name].grad = grad.to(parameters[name].device, parameters[name].dtype)
        for layer, load in zip(moe_layers(self), window.get("moe_load", []), strict=False):  # absent: older
            # an equal share on every rank: DDP's first forward copies rank 0's buffers to every rank
            layer.router.load.copy_(load / self.trainer.world_size)
        if self.accumulator is not None:
            self.accumulator.load_state_dict(window["accumulator"], self.global_rank)

    def on_fit_start(self) -> None:
        """Refuse to resume a checkpoint whose optimizer state is of another optimizer than
        ``optim.name`` builds (Lightning restores it after this hook, and the state of one does not
        load into the other)."""
        if self._resumed_optimizer is None or not self.trainer.optimizers:
            return
        built = "muon" if isinstance(self.trainer.optimizers[0], MuonAdamW) else "adamw"
        if built != self._resumed_optimizer:
            names = {"adamw": "AdamW", "muon": "Muon with AdamW"}
            raise LLMKitError(
                f"optim.name: the checkpoint {self.trainer.ckpt_path} holds the state of "
                f"{names[self._resumed_optimizer]}, and this run builds {names[built]}: resume with the run's "
                f"optim.name, or start a new run from its weights with model.init_ckpt"
            )
