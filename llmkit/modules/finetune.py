"""FineTuneModule: what SFT and SDFT share on top of a pretrained backbone.

Both start from a checkpoint (``init_ckpt``: a pretraining, SFT or SDFT ``.ckpt``) and train
on batches of :class:`~llmkit.data.sdft_data.Example` from :class:`SDFTDataModule`. A
subclass says how a batch becomes a loss by returning the loss *summed* over its real
tokens and their number (:meth:`FineTuneModule.loss_sum`); this class does the rest:

- manual optimisation (SDFT samples inside its training step, so Lightning's automatic loop
  does not fit) through :class:`~llmkit.optim.TokenMeanAccumulator`: the loss is a mean per
  real token however a step is split into micro-batches and ranks. Lightning refuses its own
  ``accumulate_grad_batches`` for such a module; a callback of the module sets it for the fit,
  so that Lightning's loop decides where steps end and counts them as under automatic
  accumulation (the logging step and cadence, ``estimated_stepping_batches``, no ``zero_grad``
  for a validation between a step's micro-batches), and a step's metrics are logged once, at
  its last micro-batch;
- validation: each subclass's ``val/...`` loss per real token on ``data.val_files`` (over every
  rank's batches under DDP) and, when ``evaluation`` names held-out shards or probes, the
  :mod:`llmkit.eval` report (logged as ``val/ppl`` and ``val/probe_accuracy`` and written by
  rank 0 to ``LOG_DIR/eval/step_NNNNNN.json``, NNNNNN the optimizer steps the evaluated weights
  have taken; a ``validate`` writes ``validate_step_NNNNNN.json`` beside them);
- checkpoints that ``llmkit generate`` and later fine-tuning runs read: the backbone's
  config is stored beside the weights (``ckpt["model_config"]``).

:func:`load_student` and :func:`check_fits` are shared with TTT-Discover, which also starts
from a checkpoint but draws its own data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torchmetrics import MeanMetric

from llmkit.data.datamodule import PackedDataModule
from llmkit.data.examples import Example
from llmkit.data.tokenizer import TokenizerLike, first_tokenizer, load_tokenizer, tokenizer_record
from llmkit.distributed import require_data_parallel, sum_over_ranks
from llmkit.errors import LLMKitError
from llmkit.eval.report import EvalConfig
from llmkit.io import as_dataclass, write_json_atomic
from llmkit.model.checkpoint import backbone_from_checkpoint, check_tokenizer, read_checkpoint, tokenizer_candidates
from llmkit.model.config import AttentionBackend
from llmkit.model.moe import end_of_step
from llmkit.model.transformer import Transformer
from llmkit.modules.base import LLMKitModule
from llmkit.optim import OptimConfig, TokenMeanAccumulator, optimizer_with_schedule


class _AccumulationForTheFit(L.Callback):
    """Set ``trainer.accumulate_grad_batches`` to the module's for its fit, and back to 1 after it,
    a failure included (Lightning refuses another at the start of a manual module's fit). Not after
    Ctrl-C or SIGTERM, which end the process: a ``Checkpoint``, whose hook runs after this one's,
    saves the loop's state by it."""

    def setup(self, trainer: L.Trainer, pl_module: FineTuneModule, stage: str) -> None:
        if stage == "fit":
            trainer.accumulate_grad_batches = pl_module.accumulate_grad_batches

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trainer.accumulate_grad_batches = 1

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            trainer.accumulate_grad_batches = 1


@dataclass
class FineTuneOptimConfig(OptimConfig):
    """:class:`OptimConfig` with fine-tuning defaults: the SDFT authors' lr 2e-5, Muon's LR
    lowered with it (the pretraining defaults' ratio, 0.02 to 3e-4: 1.3e-3), no weight decay, a
    short warm-up (YAML that sets only some fields keeps these for the rest)."""

    lr: float = 2e-5
    muon_lr: float = 1.3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10


CHECK_BATCH = 256
"""Examples encoded at a time when ``setup`` checks that every one fits the model's window."""


def load_student(
    init_ckpt: str | None,
    tokenizer: str | None,
    gradient_checkpointing: bool | None = None,
    attention_backend: AttentionBackend | None = None,
    chat_template: bool = False,
) -> tuple[Transformer, TokenizerLike, dict[str, str]]:
    """The backbone of ``init_ckpt`` in training mode, the tokenizer it was trained with and that
    tokenizer's record (:func:`~llmkit.data.tokenizer.tokenizer_record`, the module's
    ``tokenizer_record``), checked to share a vocabulary, to be the tokenizer the checkpoint records
    if it records one, and to have a chat template if ``chat_template`` (the module option of that
    name); ``tokenizer`` None takes the one the checkpoint names
    (:func:`~llmkit.model.checkpoint.tokenizer_candidates`); ``gradient_checkpointing`` and
    ``attention_backend`` override the checkpoint's settings unless None."""
    if init_ckpt is None:
        raise LLMKitError(
            "fine-tuning needs model.init_ckpt (the checkpoint or model directory to start from); `validate "
            "--ckpt_path` of a fine-tuned checkpoint reads it from the checkpoint"
        )
    if not Path(init_ckpt).exists():
        raise LLMKitError(
            f"model.init_ckpt {init_ckpt} does not exist: set it to the checkpoint or model directory to start from "
            f"(the shipped fine-tuning configs start from the demo's model: run `llmkit demo` first)"
        )
    checkpoint = read_checkpoint(init_ckpt)
    tokenizer = tokenizer or first_tokenizer(tokenizer_candidates(init_ckpt, checkpoint))
    if tokenizer is None:
        raise LLMKitError(
            f"model.init_ckpt {init_ckpt} names no tokenizer that is still on disk: set model.tokenizer (the .model, "
            f"tokenizer.json or model directory its data was packed with)"
        )
    model = backbone_from_checkpoint(checkpoint, init_ckpt).train()
    if gradient_checkpointing is not None:
        model.config.gradient_checkpointing = gradient_checkpointing
    if attention_backend is not None:
        model.config.attention_backend = attention_backend
    tok = load_tokenizer(tokenizer)
    tok.check_vocab_size(model.config.vocab_size, f"the model in {init_ckpt}")
    record = tokenizer_record(tok.path)
    check_tokenizer(checkpoint, init_ckpt, record)
    if chat_template and tok.chat_template is None:
        raise LLMKitError(
            f"model.chat_template is true but the tokenizer {tok.path} has no chat template (a Hugging Face model "
            "directory's tokenizer_config.json or chat_template.jinja holds one): set model.chat_template: false"
        )
    return model, tok, record


def prompt_ids(tokenizer: TokenizerLike, texts: list[str], chat_template: bool) -> list[list[int]]:
    """Token ids of each of ``texts`` as a prompt: with ``chat_template``, first rendered as a user
    message through the tokenizer's chat template, the assistant's turn opened after it."""
    if chat_template:
        texts = [tokenizer.render_chat(text) for text in texts]
    return tokenizer.encode_batch(texts)


def check_fits(max_seq_len: int, sources: list[str], contexts: list[list[int]], rooms: list[int], what: str,
               room_what: str, advice: str | None = None) -> None:
    """Raise, naming the source, if a context plus its room (the completion's tokens: ``room_what``,
    a demonstration or a max_new_tokens setting) exceeds ``max_seq_len``; ``advice`` defaults to
    shortening the context or lowering ``room_what``."""
    for source, ids, room in zip(sources, contexts, rooms, strict=True):
        if len(ids) + room > max_seq_len:
            raise LLMKitError(
                f"{source}: the {what} is {len(ids)} tokens and {room_what} adds {room}: {len(ids) + room} in all, "
                f"past the model's max_seq_len {max_seq_len}; {advice or f'shorten it or lower {room_what}'}"
            )


class FineTuneModule(LLMKitModule):
    """Base of :class:`SFTModule` and :class:`SDFTModule` (see the module docstring).

    The text of an example is used as written: the student's context is the tokens of its
    prompt, and what follows is the completion, with no separator added (put one at the end
    of the prompts if the data needs it; ``llmkit data tasks``'s prompts end with their
    question mark or colon). With ``chat_template``
    every prompt (the student's, and SDFT's teacher prompt) is first rendered as a user message
    through the tokenizer's chat template, so a chat model sees its own turn format; the
    completion (SFT's demonstration, SDFT's sample) is the assistant's answer after it.

    Args:
        init_ckpt: the checkpoint whose backbone is fine-tuned (required).
        tokenizer: the tokenizer the backbone was trained with: a SentencePiece ``.model``, a Hugging Face
            ``tokenizer.json``, or a model directory holding one; default: the one init_ckpt records (or the model
            directory it is or was converted from holds).
        optim: AdamW and its warm-up + cosine schedule.
        evaluation: held-out shards and probes for validation and the RegressionGate.
        accumulate_grad_batches: micro-batches per optimizer step.
        gradient_clip_val: clip the global gradient norm to this (None: no clipping).
        gradient_checkpointing: override the backbone config's setting (None keeps it).
        attention_backend: override the backbone config's attention kernel (None keeps it; docs/attention.md).
        compile: torch.compile each transformer block (GPU runs).
        chat_template: render every prompt as a user message through the tokenizer's chat template before
            encoding it (needs a Hugging Face tokenizer that has one).
    """

    loss_name = "loss"
    """The per-token loss is logged as ``train/<loss_name>`` and ``val/<loss_name>``."""

    def __init__(
        self,
        init_ckpt: str | None = None,
        tokenizer: str | None = None,
        optim: FineTuneOptimConfig | None = None,
        evaluation: EvalConfig | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = 1.0,
        gradient_checkpointing: bool | None = None,
        attention_backend: AttentionBackend | None = None,
        compile: bool = False,
        chat_template: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        optim = as_dataclass(FineTuneOptimConfig, optim)
        evaluation = as_dataclass(EvalConfig, evaluation)
        if accumulate_grad_batches < 1:
            raise LLMKitError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        self.accumulate_grad_batches = accumulate_grad_batches
        self.accumulator = TokenMeanAccumulator(self, gradient_clip_val)
        self.save_hyperparameters(
            {"init_ckpt": init_ckpt, "tokenizer": tokenizer, "optim": asdict(optim), "evaluation": asdict(evaluation),
             "accumulate_grad_batches": accumulate_grad_batches, "gradient_clip_val": gradient_clip_val,
             "gradient_checkpointing": gradient_checkpointing, "attention_backend": attention_backend,
             "compile": compile, "chat_template": chat_template}
        )
        self.model, self.tokenizer, self.tokenizer_record = load_student(
            init_ckpt, tokenizer, gradient_checkpointing, attention_backend, chat_template)
        self.chat_template = chat_template
        self.config = self.model.config
        self.optim = optim
        self.evaluation = evaluation
        self.val_loss = MeanMetric()

    def setup(self, stage: str) -> None:
        require_data_parallel(self.trainer, type(self).__name__)
        if isinstance(self.trainer.datamodule, PackedDataModule):
            raise LLMKitError(f"{type(self).__name__} trains on prompt/demonstration examples (SDFTDataModule), not "
                              f"PackedDataModule's token windows, which PretrainModule trains on")
        self.evaluation.check_files()  # a bad path is one line now, not after the steps up to the first validation
        data = self.trainer.datamodule
        for examples in (getattr(data, "train_examples", None) if stage == "fit" else None,
                         getattr(data, "val_examples", None)):
            for start in range(0, len(examples or []), CHECK_BATCH):  # an example too long for the window fails now
                self.encode(examples[start : start + CHECK_BATCH])

    def configure_callbacks(self) -> list[L.Callback]:
        return [_AccumulationForTheFit()]

    def configure_model(self) -> None:
        if self.hparams.compile:
            for module in self.modules():
                if isinstance(module, Transformer):
                    module.compile_blocks()

    def configure_optimizers(self) -> dict:
        return optimizer_with_schedule(self.model.param_groups(self.optim.weight_decay), self.optim, self.trainer)

    def encode(self, batch: list[Example]) -> tuple[list[list[int]], list[list[int]]]:
        """The token ids :meth:`loss_sum` feeds the model for ``batch``, each row checked to fit the
        model's window (:func:`check_fits`): ``setup`` runs it over every example, so one too long
        is an error before the first step, naming its file and line."""
        raise NotImplementedError

    def loss_sum(self, batch: list[Example], stage: str, batch_idx: int) -> tuple[torch.Tensor, int]:
        """(the loss summed over the batch's real tokens, their number); ``stage`` is "train" or
        "val" (a subclass logs its own statistics under that prefix)."""
        raise NotImplementedError

    def encode_prompts(self, texts: list[str], batch: list[Example], what: str) -> list[list[int]]:
        """Token ids of the prompts ``texts`` (one per example of ``batch``; through the chat template
        with ``chat_template``); an empty one is an error naming its example."""
        ids = prompt_ids(self.tokenizer, texts, self.chat_template)
        for example, row in zip(batch, ids, strict=True):
            if not row:
                raise LLMKitError(f"{example.source}: the {what} encodes to no tokens; give it some text")
        return ids

    def training_step(self, batch: list[Example], batch_idx: int) -> None:
        total, count = self.loss_sum(batch, "train", batch_idx)
        if not torch.isfinite(total):
            sources = ", ".join(e.source for e in batch[:3])
            raise LLMKitError(
                f"non-finite training loss at global step {self.global_step} (batch {batch_idx}: {sources}, ...); "
                f"lower optim.lr or resume from the last good checkpoint"
            )
        stats = self.accumulator.backward(total, count, ends_step=not self.trainer.fit_loop._should_accumulate())
        if stats is not None:
            # the MoE layers' balance over the step, and their aux-loss-free bias update
            self.log_dict(end_of_step(self.model, sum_over_ranks(self.trainer)))
            self.log(f"train/{self.loss_name}", stats.loss, prog_bar=True)
            self.log("train/tokens_per_step", float(stats.tokens))
            self.log_dict(stats.lrs, prog_bar=True)

    def on_train_batch_end(self, *args: Any) -> None:
        """After a micro-batch that ends no step, drop the step values cached for the loggers (its
        own, the callbacks', and the last step's, not to be logged again): Lightning logs a manual
        module's after every batch (this hook, after the callbacks', is the last before), where its
        own accumulation logs nothing. The epoch aggregates stay."""
        if self.trainer.fit_loop._should_accumulate():
            for result in self.trainer._results.values():
                result._forward_cache = None

    def on_validation_epoch_start(self) -> None:
        self.val_loss.reset()

    def validation_step(self, batch: list[Example], batch_idx: int) -> None:
        if not batch:  # a rank's last batch, of EvalSampler's padding only (llmkit/data/sdft_data.py)
            return
        total, count = self.loss_sum(batch, "val", batch_idx)
        self.val_loss.update(total / max(count, 1), weight=max(count, 1))

    def on_validation_epoch_end(self) -> None:
        # per real token over every rank's batches: the metric sums values and weights over ranks
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.check_validation_loss(f"val/{self.loss_name}", loss)
        self.log(f"val/{self.loss_name}", loss, prog_bar=True)
        self.log_weights_step()
        if not self.evaluation.enabled or self.trainer.sanity_checking:
            return
        # every rank evaluates the same weights; rank 0's report is the one logged, written and kept
        report = self.trainer.strategy.broadcast(self.evaluation.run(self.model, self.tokenizer, self.chat_template))
        if report["perplexity"] is not None:
            self.log("val/ppl", report["perplexity"]["ppl"])
        if report["probes"] is not None:
            self.log("val/probe_accuracy", report["probes"]["accuracy"])
        fitting = self.trainer.state.fn == "fit"
        name = f"step_{self.global_step:06d}" if fitting else f"validate_step_{self.weights_step:06d}"
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.is_global_zero:  # a validate's report never replaces the one fit wrote for the same weights
            write_json_atomic(log_dir / "eval" / f"{name}.json", report)
