"""FineTuneModule: what SFT and SDFT share on top of a pretrained backbone.

Both start from a checkpoint (``init_ckpt``: a pretraining, SFT or SDFT ``.ckpt``) and train
on batches of :class:`~llmkit.data.sdft_data.Example` from :class:`SDFTDataModule`. A
subclass says how a batch becomes a loss by returning the loss *summed* over its real
tokens and their number (:meth:`FineTuneModule.loss_sum`); this class does the rest:

- manual optimisation (SDFT samples inside its training step, so Lightning's automatic loop
  does not fit): gradients of the summed losses accumulate over ``accumulate_grad_batches``
  micro-batches and are divided by the total real-token count before clipping and the
  AdamW step, so the loss is a mean per real token however a batch is split (and across
  DDP ranks);
- validation: each subclass's ``val/...`` loss on ``data.val_files`` and, when
  ``evaluation`` names held-out shards or probes, the :mod:`llmkit.eval` report (logged as
  ``val/ppl`` and ``val/probe_accuracy`` and written to ``LOG_DIR/eval/step_NNNNNN.json``,
  NNNNNN the optimizer steps the evaluated weights have taken);
- checkpoints that ``llmkit generate`` and later fine-tuning runs read: the backbone's
  config is stored beside the weights (``ckpt["model_config"]``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from llmkit.checkpoint import backbone_from_checkpoint, read_checkpoint
from llmkit.data.sdft_data import Example
from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import LLMKitError
from llmkit.eval.report import EvalConfig, write_report
from llmkit.model.transformer import Transformer
from llmkit.modules.pretrain import OptimConfig, adamw_with_schedule, as_dataclass, clip_grad_norm


@dataclass
class FineTuneOptimConfig(OptimConfig):
    """:class:`OptimConfig` with fine-tuning defaults: the SDFT authors' lr 2e-5, no weight
    decay, a short warm-up (YAML that sets only some fields keeps these for the rest)."""

    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10


class FineTuneModule(L.LightningModule):
    """Base of :class:`SFTModule` and :class:`SDFTModule` (see the module docstring).

    The text of an example is used as written: the student's context is the tokens of its
    prompt, and what follows is the completion, with no separator added (put one at the end
    of the prompts if the data needs it, as ``llmkit data tasks`` does).

    Args:
        init_ckpt: the checkpoint whose backbone is fine-tuned (required).
        tokenizer: the SentencePiece ``.model`` the backbone was trained with (required).
        optim: AdamW and its warm-up + cosine schedule.
        evaluation: held-out shards and probes for validation and the RegressionGate.
        accumulate_grad_batches: micro-batches per optimizer step.
        gradient_clip_val: clip the global gradient norm to this (None: no clipping).
        gradient_checkpointing: override the backbone config's setting (None keeps it).
        compile: torch.compile each transformer block (GPU runs).
    """

    def __init__(
        self,
        init_ckpt: str | None = None,
        tokenizer: str | None = None,
        optim: FineTuneOptimConfig | None = None,
        evaluation: EvalConfig | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = 1.0,
        gradient_checkpointing: bool | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if init_ckpt is None or tokenizer is None:
            raise LLMKitError(
                "fine-tuning needs model.init_ckpt (the checkpoint to start from) and model.tokenizer (its "
                ".model file); `validate --ckpt_path` of a fine-tuned checkpoint reads both from it"
            )
        self.automatic_optimization = False
        optim = as_dataclass(FineTuneOptimConfig, optim)
        optim.betas = tuple(optim.betas)
        evaluation = as_dataclass(EvalConfig, evaluation)
        if accumulate_grad_batches < 1:
            raise LLMKitError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        self.save_hyperparameters(
            {"init_ckpt": init_ckpt, "tokenizer": tokenizer, "optim": asdict(optim), "evaluation": asdict(evaluation),
             "accumulate_grad_batches": accumulate_grad_batches, "gradient_clip_val": gradient_clip_val,
             "gradient_checkpointing": gradient_checkpointing, "compile": compile}
        )
        self.model: Transformer = backbone_from_checkpoint(read_checkpoint(init_ckpt), init_ckpt).train()
        if gradient_checkpointing is not None:
            self.model.config.gradient_checkpointing = gradient_checkpointing
        self.config = self.model.config
        self.tokenizer = Tokenizer(tokenizer)
        if self.tokenizer.vocab_size != self.config.vocab_size:
            raise LLMKitError(
                f"tokenizer {tokenizer} has vocab_size {self.tokenizer.vocab_size} but the model in {init_ckpt} has "
                f"{self.config.vocab_size}; use the tokenizer the model was trained with"
            )
        self.optim = optim
        self.evaluation = evaluation
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.compile_blocks = compile
        self._acc_loss = 0.0
        self._acc_tokens = 0
        self._loaded_step = 0

    loss_name = "loss"
    """The per-token loss is logged as ``train/<loss_name>`` and ``val/<loss_name>``."""

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def configure_model(self) -> None:
        if self.compile_blocks:
            for module in self.modules():
                if isinstance(module, Transformer):
                    module.compile_blocks()

    def configure_optimizers(self) -> dict:
        return adamw_with_schedule(self.model, self.optim, self.trainer)

    def loss_sum(self, batch: list[Example], stage: str, batch_idx: int) -> tuple[torch.Tensor, int]:
        """(the loss summed over the batch's real tokens, their number); ``stage`` is "train" or
        "val" (a subclass logs its own statistics under that prefix)."""
        raise NotImplementedError

    def encode_prompts(self, texts: list[str], batch: list[Example], what: str) -> list[list[int]]:
        """Token ids of ``texts`` (one per example of ``batch``); an empty one is an error naming its example."""
        ids = self.tokenizer.encode_batch(texts)
        for example, row in zip(batch, ids, strict=True):
            if not row:
                raise LLMKitError(f"{example.source}: the {what} encodes to no tokens; give it some text")
        return ids

    def check_fits(self, sources: list[str], contexts: list[list[int]], rooms: list[int], what: str) -> None:
        """Raise, naming the source, if a context plus its room (completion tokens) exceeds max_seq_len."""
        limit = self.config.max_seq_len
        for source, ids, room in zip(sources, contexts, rooms, strict=True):
            if len(ids) + room > limit:
                raise LLMKitError(
                    f"{source}: the {what} is {len(ids)} tokens and needs {room} more, past the model's "
                    f"max_seq_len {limit}; shorten it or lower the completion length"
                )

    def training_step(self, batch: list[Example], batch_idx: int) -> None:
        total, count = self.loss_sum(batch, "train", batch_idx)
        if not torch.isfinite(total):
            sources = ", ".join(e.source for e in batch[:3])
            raise LLMKitError(
                f"non-finite training loss at global step {self.global_step} (batch {batch_idx}: {sources}, ...); "
                f"lower optim.lr or resume from the last good checkpoint"
            )
        self.manual_backward(total)
        self._acc_loss += total.item()
        self._acc_tokens += count
        if (batch_idx + 1) % self.accumulate_grad_batches == 0 or self.trainer.is_last_batch:
            self._optimizer_step()

    def _optimizer_step(self) -> None:
        """Divide the accumulated gradients by the real-token count (over all ranks), clip, step."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        tokens = int(self.trainer.strategy.reduce(torch.tensor(float(self._acc_tokens)), reduce_op="sum").item())
        loss = self._acc_loss / max(self._acc_tokens, 1)
        self._acc_loss, self._acc_tokens = 0.0, 0
        if tokens == 0:
            rank_zero_warn(f"step {self.global_step}: no real tokens in the accumulated batches; skipping the update")
            optimizer.zero_grad(set_to_none=True)
            return
        scale = self.trainer.world_size / tokens  # DDP averages gradients over ranks
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, scale)
        if self.gradient_clip_val is not None:
            clip_grad_norm(self, optimizer, self.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self.log(f"train/{self.loss_name}", loss, prog_bar=True)
        self.log("train/tokens_per_step", float(tokens))
        self.log("train/lr", optimizer.param_groups[0]["lr"], prog_bar=True)

    def validation_step(self, batch: list[Example], batch_idx: int) -> None:
        total, count = self.loss_sum(batch, "val", batch_idx)
        self.log(f"val/{self.loss_name}", total / max(count, 1), batch_size=max(count, 1), prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if not self.evaluation.enabled or self.trainer.sanity_checking:
            return
        report = self.evaluation.run(self.model, self.tokenizer)
        if report["perplexity"] is not None:
            self.log("val/ppl", report["perplexity"]["ppl"])
        if report["probes"] is not None:
            self.log("val/probe_accuracy", report["probes"]["accuracy"])
        step = self.global_step if self.trainer.state.fn == "fit" else self._loaded_step
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.is_global_zero:
            write_report(log_dir / "eval" / f"step_{step:06d}.json", report)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model_config"] = self.config.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._loaded_step = checkpoint.get("global_step", 0)  # names `validate --ckpt_path` reports
