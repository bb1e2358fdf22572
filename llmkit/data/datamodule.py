"""PackedDataModule: next-token windows over memory-mapped `.bin` shards.

A window is seq_len + 1 consecutive tokens of one shard; x = window[:-1], y = window[1:]
(next-token prediction). Training windows are, by default, each shard's consecutive
non-overlapping windows (every token is a target once per epoch); with ``samples_per_epoch``, that
many random crops at offsets drawn from a seeded RNG (nanoGPT-style). None crosses a shard
boundary; the DataLoader shuffles their order each epoch, and under DDP Lightning's
DistributedSampler gives each rank distinct windows. Validation uses a
fixed set: consecutive non-overlapping windows from the start of each val shard, the same on
every run, and under DDP each window on one rank only
(:class:`~llmkit.distributed.EvalSampler`), so val/loss is the same on any number of devices.
The training loader is resumable: a mid-epoch checkpoint continues at the next unseen batch, in
the same order, instead of replaying the epoch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from llmkit.data.packing import check_shard, open_shard
from llmkit.distributed import PAD_INDEX, EvalSampler
from llmkit.errors import LLMKitError
from llmkit.io import expand_inputs

IGNORE_INDEX = -100
"""The target id no loss counts (``F.cross_entropy``'s default ``ignore_index``)."""

SHARDS_HINT = ("check the path or pattern; `llmkit data pack` writes shards (and `llmkit demo` the ones "
               "configs/pretrain/tiny_cpu.yaml reads: run it first)")
"""What to do when a data.train_files or data.val_files pattern matches no shard."""


class PackedWindows(Dataset):
    """Windows (x, y) of length seq_len at given (shard, offset) starts; index
    :data:`~llmkit.distributed.PAD_INDEX` gives a window whose targets are all ``IGNORE_INDEX``.
    It pickles its shards as their files, which a DataLoader worker maps again: a memmap pickles
    as its whole data, a copy per worker where workers are spawned (macOS, Windows; Python 3.14's
    forkserver on Linux)."""

    def __init__(self, shards: list[np.memmap], starts: np.ndarray, seq_len: int) -> None:
        self.shards = shards
        self.starts = starts  # [N, 2] int64: shard index, token offset
        self.seq_len = seq_len

    def __getstate__(self) -> dict[str, Any]:
        files = [(s.filename, s.dtype.str, s.offset, s.shape) for s in self.shards]
        return {**self.__dict__, "shards": files}

    def __setstate__(self, state: dict[str, Any]) -> None:
        shards = [np.memmap(name, mode="r", dtype=dtype, offset=offset, shape=shape)
                  for name, dtype, offset, shape in state["shards"]]
        self.__dict__.update(state, shards=shards)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == PAD_INDEX:  # a shorter rank's evaluation padding: no target counts
            return torch.zeros(self.seq_len, dtype=torch.int64), torch.full((self.seq_len,), IGNORE_INDEX)
        shard, offset = self.starts[i]
        window = torch.from_numpy(
            self.shards[shard][offset : offset + self.seq_len + 1].astype(np.int64)
        )
        return window[:-1], window[1:]


def no_validation() -> list:
    """What ``val_dataloader`` returns without val_files: no loaders, so Lightning skips validation.

    Lightning takes the empty list for one loader of length zero and warns "Total length of `list`
    across ranks is zero. Please make sure this was your intention."; it is, so that warning is
    silenced (a ``DataLoader`` of length zero is named as such and still warns)."""
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
    return []


class ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning checkpoints (``state_dict``/``load_state_dict``).

    Pass k reseeds the shuffle generator with ``seed + k``, so every pass has a fixed order;
    the state is (pass, batches yielded in it), and after ``load_state_dict`` the next pass
    fast-forwards past the batches already trained on. Skipped batches are still read (a
    memmap slice each), which costs seconds even for long runs.
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.epoch = 0
        self.consumed = 0
        self.before_last: tuple[int, int] | None = None  # (epoch, consumed) before the last batch yielded

    def __iter__(self) -> Iterator[Any]:
        if self.consumed >= len(self):  # else every pass would be empty, and Lightning would start the next forever
            raise LLMKitError(
                f"the checkpoint resumes the training data at batch {self.consumed} of a pass, but the data gives "
                f"{len(self)} batches per pass now: resume with the run's data settings (files, batch_size, "
                f"seq_len, samples_per_epoch), or start a new run from its weights with model.init_ckpt"
            )
        if self.generator is not None:
            self.generator.manual_seed(self.seed + self.epoch)
        batches = super().__iter__()
        for _ in range(self.consumed):
            next(batches)
        for batch in batches:
            self.before_last = (self.epoch, self.consumed)
            self.consumed += 1
            if self.consumed == len(self):  # Lightning stops at len(loader) without exhausting us
                self.epoch, self.consumed = self.epoch + 1, 0
            yield batch

    def rewind_in_flight(self) -> None:
        """Go back to before the last batch yielded, whose step an interrupt cut short: a checkpoint
        saved now resumes with that batch (:class:`~llmkit.callbacks.Checkpoint` calls this)."""
        if self.before_last is not None:
            self.epoch, self.consumed = self.before_last
            self.before_last = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = state["epoch"], state["consumed"]


def _consecutive_windows(shards: list[np.memmap], seq_len: int) -> np.ndarray:
    """(shard, offset) [N, 2] of each shard's consecutive non-overlapping windows of seq_len + 1
    tokens from its start: every token but a shard's last partial window is a target once."""
    starts = [(k, off) for k, s in enumerate(shards) for off in range(0, len(s) - seq_len, seq_len)]
    return np.asarray(starts, dtype=np.int64).reshape(-1, 2)


def open_checked_shards(
    paths: list[Path], seq_len: int, vocab_size: int | None, packed_with: dict[str, Any]
) -> list[np.memmap]:
    """Memory-map shards and check them against the model: a vocabulary that fits the model (the
    same size for a SentencePiece tokenizer; at most the model's for a Hugging Face one, whose models
    pad their embedding: the metadata's ``vocab_rule``), every id below it, the blocks' checksums
    (:func:`~llmkit.data.packing.check_shard`), and at least seq_len + 1 tokens per shard. Every
    shard must come from one tokenizer (``tokenizer_sha256``): ``packed_with`` holds the first
    shard's path and metadata, and is filled on the first call."""
    shards = []
    for path in paths:
        tokens, meta = open_shard(path)
        if not packed_with:
            packed_with.update(path=path, meta=meta)
        elif meta.get("tokenizer_sha256") != packed_with["meta"].get("tokenizer_sha256"):
            raise LLMKitError(
                f"{path} was packed with another tokenizer ({meta.get('tokenizer')}) than {packed_with['path']} "
                f"({packed_with['meta'].get('tokenizer')}): its ids mean other text; pack every shard, train and "
                "validation, with the model's tokenizer"
            )
        exact = meta.get("vocab_rule", "exact") == "exact"
        if vocab_size is not None and (meta["vocab_size"] > vocab_size or exact and meta["vocab_size"] != vocab_size):
            raise LLMKitError(
                f"{path} was packed with a tokenizer of vocab_size {meta['vocab_size']} "
                f"({meta.get('tokenizer')}) but the model has vocab_size {vocab_size}: pack it with the model's "
                f"tokenizer (or, pretraining from scratch, set model.config.vocab_size: {meta['vocab_size']})"
            )
        check_shard(path, tokens, meta, meta["vocab_size"] if vocab_size is None else vocab_size)
        if len(tokens) < seq_len + 1:
            raise LLMKitError(
                f"{path} has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                f"lower data.seq_len or pack more text into it"
            )
        shards.append(tokens)
    return shards


def _check_window(seq_len: int, max_seq_len: int | None) -> None:
    if max_seq_len is not None and seq_len > max_seq_len:
        raise LLMKitError(
            f"data.seq_len {seq_len} is longer than the model's max_seq_len {max_seq_len}: set data.seq_len "
            f"to at most {max_seq_len} (or leave it out to use {max_seq_len})"
        )


class PackedDataModule(L.LightningDataModule):
    """Train/val DataLoaders of (x, y) token windows from packed `.bin` shards.

    Args:
        train_files: shard paths or glob patterns for training.
        val_files: shard paths or glob patterns for validation.
        seq_len: tokens per window (None: the model's max_seq_len, which must then be given).
        batch_size: windows per micro-batch.
        samples_per_epoch: training windows per epoch, random crops; default: the shards'
            consecutive windows, one pass over every token (random crops drawn once cover only
            1 - 1/e of the tokens, however many epochs: the 37% they miss is never trained on).
        val_windows: cap on the fixed validation windows (None: all of them).
        seed: seeds the shuffling of the training windows (and the crops' offsets).
        num_workers: DataLoader worker processes.
        vocab_size: the model's vocabulary size to check shards against (``llmkit pretrain``
            links it to the model's; None: the ``vocab_size`` of the LightningModule being run,
            else each shard is checked against its own metadata only).
        max_seq_len: the model's context (``llmkit pretrain`` links it to the model's; None: the
            module's ``max_seq_len``): windows may not be longer.
    """

    def __init__(
        self,
        train_files: list[str] | str | None = None,
        val_files: list[str] | str | None = None,
        seq_len: int | None = None,
        batch_size: int = 8,
        samples_per_epoch: int | None = None,
        val_windows: int | None = 256,
        seed: int = 1234,
        num_workers: int = 0,
        vocab_size: int | None = None,
        max_seq_len: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        at_least = {"seq_len": (seq_len, 1), "batch_size": (batch_size, 1), "samples_per_epoch": (samples_per_epoch, 1),
                    "val_windows": (val_windows, 1), "num_workers": (num_workers, 0)}
        for name, (value, low) in at_least.items():
            if value is not None and value < low:
                raise LLMKitError(f"data.{name} must be >= {low}, got {value}"
                                  + ("; leave data.val_files out to skip validation" if name == "val_windows" else ""))
        if seq_len is None and max_seq_len is None:
            raise LLMKitError("data.seq_len is not set: give the window length (at most the model's max_seq_len)")
        if seq_len is not None:
            _check_window(seq_len, max_seq_len)
        seq_len = max_seq_len if seq_len is None else seq_len
        self.train_files = [train_files] if isinstance(train_files, str) else train_files
        self.val_files = [val_files] if isinstance(val_files, str) else val_files
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch
        self.val_windows = val_windows
        self.seed = seed
        self.num_workers = num_workers
        self.vocab_size = vocab_size
        self.train_set: PackedWindows | None = None
        self.val_set: PackedWindows | None = None
        self._packed_with: dict[str, Any] = {}  # the first shard opened: path, metadata

    @property
    def tokenizer_record(self) -> dict[str, str] | None:
        """The tokenizer the shards were packed with, as a checkpoint records it
        (:func:`~llmkit.data.tokenizer.tokenizer_record`), once ``setup`` has opened them."""
        meta = self._packed_with.get("meta")
        return None if meta is None else {"path": meta["tokenizer"], "sha256": meta["tokenizer_sha256"]}

    def setup(self, stage: str) -> None:
        # a plain Trainer has no CLI links: the module being run (PretrainModule) gives what they would
        module = getattr(self.trainer, "lightning_module", None)
        if self.vocab_size is None:
            self.vocab_size = getattr(module, "vocab_size", None)
        _check_window(self.seq_len, self.hparams.max_seq_len or getattr(module, "max_seq_len", None))
        if stage == "fit" and self.train_set is None:
            if not self.train_files:
                raise LLMKitError("data.train_files is empty: give the training .bin shards")
            paths = expand_inputs(self.train_files, "data.train_files", SHARDS_HINT)
            shards = open_checked_shards(paths, self.seq_len, self.vocab_size, self._packed_with)
            self.train_set = PackedWindows(shards, self._train_starts(shards), self.seq_len)
            self._check_train_batches(len(self.train_set))
        if stage in ("fit", "validate") and self.val_set is None and self.val_files:
            paths = expand_inputs(self.val_files, "data.val_files", SHARDS_HINT)
            shards = open_checked_shards(paths, self.seq_len, self.vocab_size, self._packed_with)
            self.val_set = PackedWindows(shards, self._val_starts(shards), self.seq_len)
        if stage == "validate" and self.val_set is None:
            raise LLMKitError("data.val_files is empty: give the validation .bin shards")

    def _train_starts(self, shards: list[np.memmap]) -> np.ndarray:
        if not self.samples_per_epoch:
            return _consecutive_windows(shards, self.seq_len)
        n_valid = np.array([len(s) - self.seq_len for s in shards], dtype=np.int64)
        n = self.samples_per_epoch
        rng = np.random.default_rng(self.seed)
        flat = rng.integers(0, int(n_valid.sum()), size=n)
        bounds = np.cumsum(n_valid)
        shard = np.searchsorted(bounds, flat, side="right")
        offset = flat - np.concatenate(([0], bounds[:-1]))[shard]
        return np.stack([shard, offset], axis=1)

    def _check_train_batches(self, n_windows: int) -> None:
        """Refuse training windows too few for one batch per process: the loader drops the last
        partial batch, so the run would train on nothing (Lightning only warns and exits 0).
        Under DDP, Lightning's DistributedSampler gives each process ceil(n_windows / world size)."""
        world_size = self.trainer.world_size if self.trainer is not None else 1
        per_process = -(-n_windows // world_size)
        if per_process >= self.batch_size:
            return
        split = f", {per_process} for each of {world_size} processes" if world_size > 1 else ""
        if self.samples_per_epoch:
            raise LLMKitError(
                f"data.samples_per_epoch gives {n_windows} windows{split}, fewer than data.batch_size "
                f"{self.batch_size}: raise data.samples_per_epoch or lower data.batch_size"
            )
        raise LLMKitError(
            f"data.train_files give {n_windows} windows of {self.seq_len} tokens{split}, fewer than "
            f"data.batch_size {self.batch_size}: lower data.batch_size or data.seq_len, or add data"
        )

    def _val_starts(self, shards: list[np.memmap]) -> np.ndarray:
        starts = _consecutive_windows(shards, self.seq_len)
        return starts if self.val_windows is None else starts[: self.val_windows]

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(
            self.train_set,
            seed=self.seed,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator(),
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return no_validation()
        ranks = self.trainer.world_size if self.trainer is not None else 1
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            sampler=EvalSampler(self.val_set, ranks, self.trainer.global_rank) if ranks > 1 else None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
