"""SDFTModule: on-policy self-distillation fine-tuning (SDFT, Shenfeld et al., arXiv 2601.19897).

Each training step, for a batch of examples (x, c):

1. sample a completion y ~ π_θ(· | x) from the student for every prompt, KV-cached and
   batched, without gradients (:func:`llmkit.model.generation.generate`); y ends at EOS or
   after ``max_new_tokens``, EOS included;
2. one batched forward of the student on x + y and one of the teacher on template(x, c) + y,
   each sliced to the logits that predict y (from column C - 1 for a context of C tokens;
   :func:`continuation_logits` aligns every row however long its context);
3. the token-level divergence between the two next-token distributions over the full
   vocabulary (:func:`llmkit.modules.distill.distill_loss_sum`: reverse KL at alpha = 1,
   forward KL at alpha = 0), on real completion tokens only (no prompt, no padding; EOS
   counted), summed and then averaged per real token by :class:`FineTuneModule`.

The teacher is ``self.teacher``: a frozen copy of the starting weights that never receives
gradients. Add the :class:`~llmkit.callbacks.EMATeacher` callback to make it the EMA of the
student (the SDFT method); without it the teacher stays the initial model. It is part of the
module's state, so checkpoints save and restore it.

Under DDP each rank samples the completions of its own batch, with a seed of its own
(:meth:`SDFTModule.sample_completions`); DDP starts every rank from rank 0's weights, the
teacher included, so the teacher, like the student, is the same on every rank after every step
(docs/scaling_out.md).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchmetrics import MaxMetric, MeanMetric, MinMetric

from llmkit.data.examples import TEACHER_TEMPLATE, Example, check_template, teacher_prompt
from llmkit.distributed import RankSeeds
from llmkit.errors import LLMKitError, SettingError
from llmkit.eval.mode import eval_mode
from llmkit.io import as_dataclass
from llmkit.model.generation import SamplingConfig, continuation_logits, generate
from llmkit.model.moe import scale_balancing_loss
from llmkit.modules.distill import distill_loss_sum
from llmkit.modules.finetune import FineTuneModule, check_fits

VAL_SEED = 1_000_003
"""Validation samples completions with seed VAL_SEED + batch index, so val/divergence is a
function of the weights alone."""


@dataclass
class SDFTConfig:
    """The distillation and its on-policy sampling.

    alpha: 1.0 reverse KL (llmkit's default, the paper's analytic objective), 0.0 forward KL
        (the SDFT authors' published runs), in between the generalised JSD.
    top_k: compare the distributions on the student's top-k tokens only (memory); None is
        the full vocabulary.
    skip_first: leave the first k completion tokens out of the loss (the official code: 3).
    max_new_tokens, temperature, sample_top_k, sample_top_p: how y is sampled (the official
        code samples at temperature 1.0 without truncation).
    compile_sampler: run the sampler's decode step through torch.compile (CUDA graphs on GPU;
        see :class:`SamplingConfig`); the training forwards follow the module's ``compile``.
    teacher_template: the teacher's context, with ``{prompt}`` and ``{demonstration}`` (default:
        the SDFT paper's; the authors' code ends it with a period instead of the colon).
    """

    alpha: float = 1.0
    top_k: int | None = None
    skip_first: int = 0
    max_new_tokens: int = 128
    temperature: float = 1.0
    sample_top_k: int | None = None
    sample_top_p: float | None = None
    compile_sampler: bool = False
    teacher_template: str = TEACHER_TEMPLATE

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise LLMKitError(f"sdft.alpha must be in [0, 1] (1 = reverse KL, 0 = forward KL), got {self.alpha}")
        if self.top_k is not None and self.top_k < 2:
            raise LLMKitError(f"sdft.top_k must be >= 2 or null (full vocabulary), got {self.top_k}")
        if not 0 < self.temperature < math.inf:  # NaN too
            raise LLMKitError(f"sdft.temperature must be a finite number > 0 (on-policy sampling), "
                              f"got {self.temperature}")
        try:
            self.sampling()
        except SettingError as error:  # max_new_tokens, sample_top_k or sample_top_p (temperature is checked above)
            key = {"top_k": "sample_top_k", "top_p": "sample_top_p"}.get(error.setting, error.setting)
            raise error.renamed(f"sdft.{key}") from None
        if not 0 <= self.skip_first < self.max_new_tokens:  # else no completion token is ever learned from
            raise LLMKitError(f"sdft.skip_first must be >= 0 and below sdft.max_new_tokens ({self.max_new_tokens}), "
                              f"got {self.skip_first}")
        check_template(self.teacher_template)

    def sampling(self, seed: int | None = None) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.sample_top_k,
            top_p=self.sample_top_p, seed=seed, compile=self.compile_sampler,
        )


class SDFTModule(FineTuneModule):
    """SDFT from a pretrained checkpoint (see the module docstring).

    Logs ``train/divergence`` (per real token), ``train/gen_len_mean|min|max`` and
    ``train/eos_fraction`` (a student that stops ending its answers shows there first);
    validation logs ``val/divergence`` on completions sampled with fixed seeds.

    Args:
        sdft: the divergence and the sampling of y.
        **kwargs: the :class:`FineTuneModule` arguments (init_ckpt, tokenizer, optim, ...).
    """

    loss_name = "divergence"

    def __init__(self, sdft: SDFTConfig | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        sdft = as_dataclass(SDFTConfig, sdft)
        self.hparams["sdft"] = asdict(sdft)
        self.sdft = sdft
        self.teacher = copy.deepcopy(self.model).requires_grad_(False).eval()  # fit calls no train() first
        self.seeds = RankSeeds()  # the training samples' seeds, checkpointed
        # validation's completion statistics over every rank's completions: torchmetrics sums values and
        # counts over the ranks (Lightning's sync_dist averages per-rank means, wrong for uneven shares)
        self.val_completions = torch.nn.ModuleDict({
            "gen_len_mean": MeanMetric(), "gen_len_min": MinMetric(), "gen_len_max": MaxMetric(),
            "eos_fraction": MeanMetric(),
        })

    def train(self, mode: bool = True) -> SDFTModule:
        """Lightning's switch between training and evaluation; the teacher stays in eval mode (an
        MoE teacher must not count its routing into the balancing load, for one)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def on_fit_start(self) -> None:
        """Before its first step, Lightning's fit loop warns of every submodule in eval mode ("Found N
        module(s) in eval mode at the start of training"); the teacher's N are so by design. Silence
        that warning for exactly those, so a module of the student left in eval mode still warns."""
        super().on_fit_start()
        teacher = {id(module) for module in self.teacher.modules()}
        if all(id(module) in teacher for module in self.modules() if not module.training):
            warnings.filterwarnings(
                "ignore", message=rf"Found {len(teacher)} module\(s\) in eval mode at the start of training"
            )

    def training_step(self, batch: list[Example], batch_idx: int) -> None:
        super().training_step(batch, batch_idx)
        self.seeds.batch_completed()  # an interrupt inside the batch saves the seeds from before it

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        for metric in self.val_completions.values():
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{name}": metric.compute() for name, metric in self.val_completions.items()})
        super().on_validation_epoch_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self.seeds.save_to(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.seeds.restore_from(checkpoint)

    def encode(self, batch: list[Example]) -> tuple[list[list[int]], list[list[int]]]:
        """(the student's prompts' ids, the teacher's: the prompt with the demonstration in context)."""
        cfg = self.sdft
        prompts = self.encode_prompts([e.prompt for e in batch], batch, "prompt")
        contexts = self.encode_prompts([teacher_prompt(e, cfg.teacher_template) for e in batch], batch,
                                       "teacher prompt")
        sources, rooms = [e.source for e in batch], [cfg.max_new_tokens] * len(batch)
        check_fits(self.config.max_seq_len, sources, prompts, rooms, "prompt", "sdft.max_new_tokens")
        check_fits(self.config.max_seq_len, sources, contexts, rooms, "teacher prompt", "sdft.max_new_tokens")
        return prompts, contexts

    def loss_sum(self, batch: list[Example], stage: str, batch_idx: int) -> tuple[torch.Tensor, int]:
        cfg = self.sdft
        prompts, contexts = self.encode(batch)

        seed = VAL_SEED + batch_idx if stage == "val" else self.seeds.next(self.global_rank)
        completions = self.sample_completions(prompts, seed)

        scale_balancing_loss(self.model, sum(max(len(c) - cfg.skip_first, 0) for c in completions))  # loss tokens
        student, _, mask = continuation_logits(self.model, prompts, completions, self.tokenizer.pad_id)
        with torch.no_grad():
            teacher, _, _ = continuation_logits(self.teacher, contexts, completions, self.tokenizer.pad_id)
        # the divergence of the distributions y was sampled from: softmax(logits / temperature)
        total, count = distill_loss_sum(student / cfg.temperature, teacher / cfg.temperature, mask, cfg.alpha,
                                        cfg.top_k, cfg.skip_first)
        self._log_completions(completions, stage, len(batch))
        return total, int(count)

    def sample_completions(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """The student's completion of each prompt (ids, EOS included), sampled without gradients with
        ``seed``: fixed per validation batch, and in training a draw of its own per rank
        (:class:`~llmkit.distributed.RankSeeds`, checkpointed), so under DDP ranks never share a random
        stream and a resumed run samples what an uninterrupted one does."""
        with eval_mode(self.model):
            y = generate(self.model, prompts, self.sdft.sampling(seed), self.tokenizer.stop_ids, self.tokenizer.pad_id)
        return [row[real].tolist() for row, real in zip(y.tokens, y.mask, strict=True)]

    def _log_completions(self, completions: list[list[int]], stage: str, batch_size: int) -> None:
        """The completions' lengths and how many end on a stop id: per training step (of its last
        micro-batch, as Lightning logs a step's values), or into the validation epoch's statistics
        (``val_completions``, logged at its end)."""
        lengths = [float(len(c)) for c in completions]
        ended = [float(c[-1] in self.tokenizer.stop_ids) for c in completions]
        if stage == "val":
            lengths_t, ended_t = (torch.tensor(v, device=self.device) for v in (lengths, ended))
            for name, values in (("gen_len_mean", lengths_t), ("gen_len_min", lengths_t), ("gen_len_max", lengths_t),
                                 ("eos_fraction", ended_t)):
                self.val_completions[name].update(values)
            return
        self.log_dict({"train/gen_len_mean": sum(lengths) / len(lengths), "train/eos_fraction": sum(ended) / len(ended),
                       "train/gen_len_min": min(lengths), "train/gen_len_max": max(lengths)}, batch_size=batch_size)
