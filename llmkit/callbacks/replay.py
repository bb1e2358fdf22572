"""Replay: mix examples of earlier tasks into the SDFT continual-learning stream.

Replay keeps a buffer of past examples (prompts + demonstrations) and mixes them into the
stream: each batch slot is replaced by a buffered example with probability ``replay_ratio``
(0.2 by default), and the buffer holds at most ``buffer_size`` examples (50k by default).

Batches from :class:`~llmkit.data.sdft_data.SDFTDataModule` are lists of
:class:`~llmkit.data.sdft_data.Example` that the LightningModule tokenizes in
``training_step``, and Lightning hands ``on_train_batch_start`` the very list that
``training_step`` then receives. So :class:`Replay` edits that list in place: each slot is
replaced, independently with probability ``replay_ratio``, by an example drawn uniformly
from the buffer; then the batch's own (new) examples enter the buffer, so a batch never
replays itself.

The buffer is a reservoir sample (Vitter's algorithm R) of the stream of distinct examples
seen so far (distinct by ``(prompt, demonstration)``): once full, the n-th distinct example
replaces a random entry with probability ``buffer_size / n``, so every example seen stays
in the buffer with the same probability and the first task is as represented as the last.
A FIFO of the latest ``buffer_size`` examples would instead forget the earliest tasks
entirely once a long stream has gone by, the forgetting replay is there to prevent.
Distinctness is tracked with a 64-bit digest of every example ever offered, so a second
epoch over a task adds nothing and does not count as new examples.

All randomness comes from the callback's own seeded :class:`random.Random`; its state, the
buffer and the digests go into the checkpoint (:meth:`Replay.state_dict`, plain data that
``torch.load(weights_only=True)`` reads), so a resumed run makes the same replay decisions
as an uninterrupted one. An interrupt inside a step, whose batch the resume trains again, undoes
what that batch's start drew and buffered first (:meth:`Replay.rewind_in_flight`), as the data
loader puts that batch back.

Under DDP the buffer is global and the same on every rank, by construction: each step every rank
gathers all ranks' batches in rank order (the global batch), draws the replacement of every
global slot with the same seeded generator, applies the draws of its own slots, and offers the
whole global batch to the buffer. So every rank holds the same buffer, digests and generator
state, a buffered example can reach any rank, and a run on N ranks with batch B makes the
decisions a single process makes with batch N x B whose batches are the ranks' in rank order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch

from llmkit.callbacks.interfaces import batch_kind
from llmkit.data.examples import Example, read_all_examples
from llmkit.distributed import gather_objects
from llmkit.errors import LLMKitError


@dataclasses.dataclass
class InFlight:
    """What the start of the training batch in flight changed: the generator state and buffer
    length before it, the buffer slots it overwrote (with what they held) and the digests it added."""

    rng_state: tuple
    buffer_len: int
    overwritten: dict[int, Example] = dataclasses.field(default_factory=dict)
    keys: list[int] = dataclasses.field(default_factory=list)


def example_key(example: Example) -> int:
    """A signed 64-bit digest of ``(prompt, demonstration)``: what makes two examples the same."""
    text = json.dumps([example.prompt, example.demonstration])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


class Replay(L.Callback):
    """Replaces batch slots with buffered past examples and buffers new ones (see module docstring).

    Logs ``train/replay_fraction`` (the fraction of the global batch's slots replaced) and
    ``train/replay_buffer`` (examples in the buffer) every training batch.

    Args:
        buffer_size: most examples the buffer holds.
        replay_ratio: probability that each batch slot is replaced by a buffered example.
        seed: seed of the callback's own random generator (slot choices, draws, reservoir).
        seed_files: SDFT JSONL paths or glob patterns of earlier tasks, put in the buffer at
            ``setup("fit")`` when the buffer is empty.
    """

    def __init__(
        self,
        buffer_size: int = 50_000,
        replay_ratio: float = 0.2,
        seed: int = 0,
        seed_files: list[str] | str | None = None,
    ) -> None:
        if buffer_size < 1:
            raise LLMKitError(f"replay buffer_size must be >= 1, got {buffer_size}")
        if not 0 <= replay_ratio < 1:
            raise LLMKitError(
                f"replay_ratio must be in [0, 1) (the probability of replacing a batch slot), got {replay_ratio}"
            )
        self.buffer_size = buffer_size
        self.replay_ratio = replay_ratio
        self.seed_files = [seed_files] if isinstance(seed_files, str) else seed_files
        self.rng = random.Random(seed)
        self.buffer: list[Example] = []
        self.seen_keys: set[int] = set()
        self.last_fraction = 0.0
        self.in_flight: InFlight | None = None  # set from a batch's start to its end

    def add(self, examples: Iterable[Example]) -> None:
        """Offer ``examples`` to the buffer: each one not seen before is a new element of the
        reservoir's stream (algorithm R)."""
        for example in examples:
            key = example_key(example)
            if key in self.seen_keys:
                continue
            self.seen_keys.add(key)
            if self.in_flight is not None:
                self.in_flight.keys.append(key)
            if len(self.buffer) < self.buffer_size:
                self.buffer.append(example)
            else:
                slot = self.rng.randrange(len(self.seen_keys))
                if slot < self.buffer_size:
                    if self.in_flight is not None:
                        self.in_flight.overwritten.setdefault(slot, self.buffer[slot])
                    self.buffer[slot] = example

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.seed_files and not self.buffer:
            self.add(read_all_examples(self.seed_files, "Replay seed_files"))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, list) or not all(isinstance(example, Example) for example in batch):
            raise LLMKitError(f"Replay needs batches that are lists of Example (SDFTDataModule's, in SFTModule and "
                              f"SDFTModule runs), got a {batch_kind(batch)}")
        batches = gather_objects(trainer, list(batch))  # every rank's batch, in rank order
        self.in_flight = InFlight(self.rng.getstate(), len(self.buffer))
        offset = sum(len(b) for b in batches[: trainer.global_rank])
        new = [example for b in batches for example in b]
        replaced = 0
        if self.buffer:
            for slot in range(len(new)):  # the same draws on every rank: each applies its own slots
                if self.rng.random() < self.replay_ratio:
                    example = self.buffer[self.rng.randrange(len(self.buffer))]
                    replaced += 1
                    if offset <= slot < offset + len(batch):
                        batch[slot - offset] = example
        self.add(new)
        self.last_fraction = replaced / len(new)
        pl_module.log("train/replay_fraction", self.last_fraction, batch_size=len(batch))
        pl_module.log("train/replay_buffer", float(len(self.buffer)), batch_size=len(batch))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.in_flight = None

    def rewind_in_flight(self) -> None:
        """Undo what the start of the batch in flight drew and buffered: an interrupt cut its step
        short, and the checkpoint saved now resumes with that batch
        (:class:`~llmkit.callbacks.Checkpoint` calls this, as it does the data loader's)."""
        undo, self.in_flight = self.in_flight, None
        if undo is None:
            return
        self.rng.setstate(undo.rng_state)
        del self.buffer[undo.buffer_len:]
        for slot, example in undo.overwritten.items():
            if slot < undo.buffer_len:
                self.buffer[slot] = example
        self.seen_keys.difference_update(undo.keys)

    def state_dict(self) -> dict[str, Any]:
        """The buffer (a list of dicts with the :class:`Example` fields), the digests of every
        example seen (an int64 tensor) and the generator state (``random.Random.getstate()``)."""
        return {
            "buffer": [dataclasses.asdict(example) for example in self.buffer],
            "seen_keys": torch.tensor(sorted(self.seen_keys), dtype=torch.int64),
            "rng_state": self.rng.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.buffer = [Example(**example) for example in state_dict["buffer"]]
        self.seen_keys = set(state_dict["seen_keys"].tolist())
        self.rng.setstate(state_dict["rng_state"])
