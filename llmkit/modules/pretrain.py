"""PretrainModule: next-token pretraining of the mHC backbone (docs/architecture.md, "Training")."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from llmkit.data.datamodule import IGNORE_INDEX, PackedDataModule
from llmkit.data.sdft_data import SDFTDataModule
from llmkit.distributed import sum_over_ranks
from llmkit.errors import LLMKitError
from llmkit.io import as_dataclass
from llmkit.model.checkpoint import backbone_from_checkpoint, checkpoint_model_config, read_checkpoint
from llmkit.model.config import MHC_RUN_SETTINGS, RUN_SETTINGS, ModelConfig
from llmkit.model.moe import end_of_step, scale_balancing_loss
from llmkit.model.transformer import Transformer
from llmkit.modules.base import LLMKitModule
from llmkit.optim import OptimConfig, clip_grad_norm, lr_metrics, optimizer_with_schedule


def run_as(shape: ModelConfig, config: ModelConfig) -> ModelConfig:
    """``shape`` (changed in place) with ``config``'s run settings
    (:data:`~llmkit.model.config.RUN_SETTINGS`, :data:`~llmkit.model.config.MHC_RUN_SETTINGS`)."""
    for name in RUN_SETTINGS:
        setattr(shape, name, getattr(config, name))
    for name in MHC_RUN_SETTINGS:
        setattr(shape.mhc, name, getattr(config.mhc, name))
    return shape


def initial_config(init_ckpt: str, config: ModelConfig) -> ModelConfig:
    """The backbone config of a run from ``init_ckpt``: the checkpoint's shape, run as ``config``
    says (:func:`run_as`); the weights are not read."""
    return run_as(checkpoint_model_config(init_ckpt), config)


def initial_backbone(checkpoint: dict, init_ckpt: str, config: ModelConfig) -> Transformer:
    """The backbone of ``checkpoint`` (read from ``init_ckpt``) in training mode, run as
    ``config``'s run settings say (:func:`run_as`)."""
    model = backbone_from_checkpoint(checkpoint, init_ckpt).train()
    shape = run_as(model.config, config)
    rank_zero_info(f"weights from {init_ckpt}: {shape.n_layers} layers, d_model {shape.d_model}, "
                   f"vocab {shape.vocab_size}, n_streams {shape.n_streams} (the checkpoint's shape; "
                   f"model.config's is not used)")
    return model


class PretrainModule(LLMKitModule):
    """Causal-LM pretraining: cross-entropy on (x, y) windows from PackedDataModule.

    Logs train/loss, train/lr (and train/muon_lr under Muon), train/tokens, val/loss, val/ppl and
    val/tokens (the training tokens of the weights scored, which scaling fits read) to the
    Trainer's logger; add ``llmkit.callbacks.TokenThroughput`` for tokens/s and MFU. Hyperparameters are
    stored as plain dicts, so a checkpoint alone rebuilds the model and loads with
    ``torch.load(weights_only=True)``.

    With ``init_ckpt`` training starts from the weights of a checkpoint (llmkit's, one written by
    ``llmkit convert from-hf`` or ``convert upcycle``, or a model directory; docs/interop.md): the
    backbone's shape is the checkpoint's, and of ``config`` only the settings of how to run apply
    (:func:`run_as`). ``--ckpt_path`` of such a run rebuilds the model from that checkpoint
    alone, so the initial one may be gone by then.

    The backbone is built in ``configure_model``, which the Trainer calls inside its strategy's
    contexts, so each rank builds it straight on its device (under FSDP its GPU, before the
    strategy shards it one ``Block`` at a time: docs/scaling_out.md); under
    ``torch.device("meta")`` it allocates nothing. ``model`` is None until then (``config``,
    ``vocab_size`` and ``max_seq_len`` are set from the start); outside a Trainer call
    ``configure_model()`` yourself (``load_state_dict`` does).

    Args:
        config: the backbone (see configs/model/*.yaml).
        optim: AdamW and learning-rate schedule.
        compile: torch.compile each transformer block (GPU runs).
        init_ckpt: start from this checkpoint's weights, whose shape then replaces config's (None: random init).
    """

    built_in_configure_model = ("model",)
    """Attributes that ``configure_model`` builds, after every callback's ``setup``: a callback's
    protocol check (:func:`llmkit.callbacks.interfaces.require`) takes them as present."""

    def __init__(
        self,
        config: ModelConfig | None = None,
        optim: OptimConfig | None = None,
        compile: bool = False,
        init_ckpt: str | None = None,
    ) -> None:
        super().__init__()
        config, optim = as_dataclass(ModelConfig, config), as_dataclass(OptimConfig, optim)
        self.save_hyperparameters(
            {"config": config.to_dict(), "optim": asdict(optim), "compile": compile, "init_ckpt": init_ckpt}
        )
        self.config = config if init_ckpt is None else initial_config(init_ckpt, config)
        self.model: Transformer | None = None  # built by configure_model
        self.optim = optim
        self.val_loss = MeanMetric()
        self.tokens_seen = 0
        self._tokens_in_flight = 0  # what training_step counted for the batch in flight
        self._flops_per_token: dict[int, float] = {}
        self.flops_per_batch: float | None = None  # read by ThroughputMonitor

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def setup(self, stage: str) -> None:
        """Refuse SDFT's data module; take the tokenizer of PackedDataModule's shards (set up before
        this), which ``init_ckpt`` and a loaded checkpoint must have learned."""
        data = self.trainer.datamodule
        if isinstance(data, SDFTDataModule):
            raise LLMKitError("PretrainModule trains on token windows (PackedDataModule), not SDFTDataModule's "
                              "examples, which SFTModule and SDFTModule train on")
        if isinstance(data, PackedDataModule):
            self.tokenizer_record = data.tokenizer_record or self.tokenizer_record

    def configure_model(self) -> None:
        """Build the backbone (once: later calls keep it), from ``init_ckpt`` if given, and compile
        its blocks with ``compile``."""
        if self.model is not None:
            return
        init_ckpt = self.hparams.init_ckpt
        if init_ckpt is None:
            self.model = Transformer(self.config)
        else:
            checkpoint = read_checkpoint(init_ckpt)
            self.take_tokenizer_of(checkpoint, init_ckpt)
            self.model = initial_backbone(checkpoint, init_ckpt, self.config)
        self.config = self.model.config
        if self.hparams.compile:
            self.model.compile_blocks()

    def on_train_start(self) -> None:
        """An MoE balancing loss weighs as the cross-entropy, which Lightning divides by the accumulation."""
        super().on_train_start()
        scale_balancing_loss(self.model, 1 / self.trainer.accumulate_grad_batches)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` after building the backbone if no Trainer has (a state dict
        loaded into a fresh module, or the weights ``ddp_spawn`` hands back to the main process)."""
        self.configure_model()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def flops_per_token(self, seq_len: int) -> float:
        """``Transformer.flops_per_token`` of this backbone, counted once per ``seq_len`` on a copy on
        the meta device (no memory): under FSDP the live parameters are this rank's shards."""
        if seq_len not in self._flops_per_token:
            with torch.device("meta"):
                self._flops_per_token[seq_len] = Transformer(self.config).flops_per_token(seq_len)
        return self._flops_per_token[seq_len]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.model.loss(x, y)
        if not torch.isfinite(loss):
            raise LLMKitError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); lower optim.lr, set "
                f"trainer.gradient_clip_val, or resume from the last good checkpoint"
            )
        self._tokens_in_flight = x.numel() * self.trainer.world_size
        self.tokens_seen += self._tokens_in_flight
        self.flops_per_batch = self.flops_per_token(x.size(1)) * x.numel()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen))
        self.log_dict(lr_metrics(self.optimizers()), prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._tokens_in_flight = 0  # done: not at the next batch's start, which an interrupt held to then precedes

    def rewind_in_flight(self) -> None:
        """Uncount the tokens of the batch in flight, whose step an interrupt cut short: the resume
        trains that batch again (:class:`~llmkit.callbacks.Checkpoint` calls this, as it does the
        data loader's)."""
        self.tokens_seen -= self._tokens_in_flight
        self._tokens_in_flight = 0

    def on_validation_epoch_start(self) -> None:
        self.val_loss.reset()  # fresh state in this loop's grad/inference mode

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        counted = (y != IGNORE_INDEX).sum()  # all but a padding window's (EvalSampler)
        loss = self.model.loss(x, y)  # a padding batch's too: every rank runs as many forwards
        self.val_loss.update(torch.where(counted > 0, loss, 0.0), weight=counted)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.check_validation_loss("val/loss", loss)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))
        self.log("val/tokens", float(self.tokens_seen))  # what the scored weights trained on, for scaling fits
        self.log_weights_step()

    def configure_optimizers(self) -> dict:
        if self.optim.name == "muon" and isinstance(self.trainer.strategy, FSDPStrategy):
            raise LLMKitError(
                "optim.name: muon orthogonalises whole weight matrices, and FSDP gives each rank a shard of them: "
                "use optim.name: adamw with FSDP, or Muon under DDP (docs/scaling_out.md)"
            )
        return optimizer_with_schedule(self.model.param_groups(self.optim.weight_decay), self.optim, self.trainer)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """``trainer.gradient_clip_val`` by global norm through :func:`clip_grad_norm` (which
        accepts a fused AdamW under bf16-mixed); clipping by value goes to Lightning."""
        if gradient_clip_val and gradient_clip_algorithm != "value":
            clip_grad_norm(self, optimizer, gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's step (its closure runs the last micro-batch's forward and backward), then the
        MoE layers' balance over the step is logged and their auxiliary-loss-free biases move (loads
        summed over ranks, so every rank moves them alike). Not earlier: Lightning zeroes the
        gradients between a step's first forward and its backward, where a bias that moved would
        change the routing a checkpointed block recomputes."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.log_dict(end_of_step(self.model, sum_over_ranks(self.trainer)))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
