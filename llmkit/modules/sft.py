"""SFTModule: supervised fine-tuning on (prompt, demonstration) pairs, the SDFT baseline.

The loss is the next-token cross-entropy of the demonstration followed by EOS (with
``chat_template``, the token the template ends an assistant's turn with: ``<|eot_id|>`` for
Llama 3), given the prompt (the prompt's own tokens are context, never targets), summed over real target
tokens and averaged per token by :class:`FineTuneModule`. The same JSONL files, callbacks
(Replay, RegressionGate) and evaluation as SDFT apply, so the two compare like for like.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkit.data.examples import Example
from llmkit.model.generation import continuation_logits
from llmkit.model.moe import scale_balancing_loss
from llmkit.modules.finetune import FineTuneModule, check_fits


class SFTModule(FineTuneModule):
    """Maximum likelihood of the demonstrations; arguments as :class:`FineTuneModule`."""

    def encode(self, batch: list[Example]) -> tuple[list[list[int]], list[list[int]]]:
        """(the prompts' ids, the targets': the demonstration and the end of its turn)."""
        prompts = self.encode_prompts([e.prompt for e in batch], batch, "prompt")
        demonstrations = self.tokenizer.encode_batch([e.demonstration for e in batch])
        end = self.tokenizer.turn_end_id if self.chat_template else self.tokenizer.eos_id  # as generation will stop
        targets = [ids + [end] for ids in demonstrations]
        check_fits(self.config.max_seq_len, [e.source for e in batch], prompts, [len(t) for t in targets],
                   "prompt", "its demonstration (with the end of its turn)", "shorten the example")
        return prompts, targets

    def loss_sum(self, batch: list[Example], stage: str, batch_idx: int) -> tuple[torch.Tensor, int]:
        prompts, targets = self.encode(batch)
        scale_balancing_loss(self.model, sum(len(t) for t in targets))  # as the summed loss's tokens
        logits, ids, mask = continuation_logits(self.model, prompts, targets, self.tokenizer.pad_id)
        total = F.cross_entropy(logits[mask].float(), ids[mask], reduction="sum")
        return total, int(mask.sum())
