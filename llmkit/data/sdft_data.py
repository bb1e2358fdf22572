"""SDFTDataModule: batches of SDFT examples from JSONL files.

Batches are lists of :class:`~llmkit.data.examples.Example`, raw text: the LightningModule
tokenizes them, so a replay callback can swap examples in a batch first. The training loader
is resumable like pretraining's (:class:`~llmkit.data.datamodule.ResumableLoader`). Under DDP
each validation example goes to one rank only (:class:`~llmkit.distributed.EvalSampler`), so
the validation loss does not count any twice. See docs/sdft_data.md.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from llmkit.data.datamodule import ResumableLoader, no_validation
from llmkit.data.examples import Example, read_all_examples
from llmkit.distributed import PAD_INDEX, EvalSampler
from llmkit.errors import LLMKitError


class EvalExamples(Dataset):
    """Validation examples as :class:`~llmkit.distributed.EvalSampler` reads them: its padding
    index (a shorter rank's last item) gives None, which :func:`real_examples` drops."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example | None:
        return None if i == PAD_INDEX else self.examples[i]


def real_examples(batch: list[Example | None]) -> list[Example]:
    """The validation loader's collate: the batch without the sampler's padding (an empty list
    for a batch of padding only, which the module skips)."""
    return [example for example in batch if example is not None]


class SDFTDataModule(L.LightningDataModule):
    """Batches of :class:`Example` (lists, untokenized) from SDFT JSONL files.

    Args:
        train_files: JSONL paths or glob patterns for training.
        val_files: JSONL paths or glob patterns for validation (optional).
        batch_size: examples per batch; the last batch of an epoch may be smaller.
        seed: the training order of pass k is a shuffle seeded with ``seed + k``.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        train_files: list[str] | str | None = None,
        val_files: list[str] | str | None = None,
        batch_size: int = 8,
        seed: int = 1234,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1:
            raise LLMKitError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise LLMKitError(f"data.num_workers must be >= 0, got {num_workers}")
        self.train_files = [train_files] if isinstance(train_files, str) else train_files
        self.val_files = [val_files] if isinstance(val_files, str) else val_files
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_examples: list[Example] | None = None
        self.val_examples: list[Example] | None = None

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.train_examples is None:
            if not self.train_files:
                raise LLMKitError("data.train_files is empty: give the SDFT training .jsonl files")
            self.train_examples = read_all_examples(self.train_files, "data.train_files")
        if stage in ("fit", "validate") and self.val_examples is None and self.val_files:
            self.val_examples = read_all_examples(self.val_files, "data.val_files")
        if stage == "validate" and self.val_examples is None:
            raise LLMKitError("data.val_files is empty: give the SDFT validation .jsonl files")

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(
            self.train_examples,
            seed=self.seed,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator(),
            drop_last=False,
            collate_fn=list,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_examples is None:
            return no_validation()
        ranks = self.trainer.world_size if self.trainer is not None else 1
        if ranks > len(self.val_examples):  # a rank of padding only would log none of a step's statistics
            raise LLMKitError(f"data.val_files hold {len(self.val_examples)} examples, fewer than the {ranks} "
                              f"processes validating them: give at least {ranks}")
        return DataLoader(
            EvalExamples(self.val_examples), batch_size=self.batch_size, collate_fn=real_examples,
            sampler=EvalSampler(self.val_examples, ranks, self.trainer.global_rank) if ranks > 1 else None,
            num_workers=self.num_workers,
        )
