"""What every rank must do alike when one run spans several processes (docs/scaling_out.md).

Lightning's DDP gives each rank distinct batches and averages the gradients of ``backward``.
Anything a module or callback decides outside that (which rollouts to sample, what to replay,
what enters an archive, whether to keep a block of updates) is either identical on every rank by
construction, computed by the same deterministic code from the same inputs gathered from every
rank in rank order, or owned by rank 0 and broadcast. These are the pieces they are built from,
each a no-op on a single device:

- :func:`gather_objects`: every rank's Python object, in rank order, on every rank;
- :func:`rank_share`: a rank's contiguous part of a list split over the ranks;
- :func:`sum_over_ranks`: a tensor summed over the ranks (MoE loads, KL-centre statistics);
- :class:`EvalSampler`: each item of an evaluation set on one rank only, the shorter ranks'
  shares padded with :data:`PAD_INDEX` so that every rank runs as many batches;
- :class:`RankSeeds`: a sampling seed of its own for each rank and draw, from a base drawn
  from the seeded global generator, so ranks never sample the same stream, a seeded run is
  reproducible, and a resumed one (its state is checkpointed) samples what it would have;
- :func:`require_data_parallel`: a one-line refusal of a sharded strategy (FSDP, DeepSpeed,
  model parallel) by a module that runs its whole backbone outside ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from functools import partial
from typing import TypeVar

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from torch.utils.data import DistributedSampler

from llmkit.errors import LLMKitError

T = TypeVar("T")


def gather_objects(trainer: L.Trainer, obj: T) -> list[T]:
    """``obj`` of every rank, in rank order, on every rank: one ``trainer.strategy.broadcast`` from
    each rank (picklable objects; ``[obj]`` on a single device)."""
    return [trainer.strategy.broadcast(obj, src=rank) for rank in range(trainer.world_size)]


def sum_over_ranks(trainer: L.Trainer) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function of a tensor that returns its sum over every rank (``trainer.strategy.reduce``
    with ``reduce_op="sum"``): the tensor itself on a single device."""
    return partial(trainer.strategy.reduce, reduce_op="sum")


def rank_share(n: int, rank: int, world_size: int) -> range:
    """The indices of ``n`` items that rank ``rank`` of ``world_size`` takes: contiguous, in rank
    order, the first ``n % world_size`` ranks one more than the others."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


PAD_INDEX = -1
"""The index :class:`EvalSampler` pads a shorter rank's share with: the dataset answers it with an
item that weighs nothing in the metric (:class:`~llmkit.data.datamodule.PackedWindows`: targets all
``IGNORE_INDEX``)."""


class EvalSampler(DistributedSampler):
    """Rank r of R takes items r, r + R, r + 2R, ... of an evaluation set, each item on one rank
    only; a rank whose share is one shorter ends on :data:`PAD_INDEX`.

    Lightning's own (torch's DistributedSampler) pads the shorter shares with the first items
    again, so a metric of a set whose size the ranks do not divide counts those twice and moves
    with the number of devices. Padding, rather than shares of uneven length, keeps the ranks'
    batch counts equal: a sharded model's every forward is a collective. Lightning leaves a loader
    whose sampler is a DistributedSampler as it is.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)  # num_samples: ceil(N / R)

    def __iter__(self) -> Iterator[int]:
        share = list(range(self.rank, len(self.dataset), self.num_replicas))
        return iter(share + [PAD_INDEX] * (self.num_samples - len(share)))


SEEDS_KEY = "sampling_seeds"
"""The checkpoint entry that holds a module's :class:`RankSeeds`."""

MAX_RANKS = 2**16
"""Ranks :class:`RankSeeds` keeps apart: one draw's seeds for ranks below it never meet another's."""


class RankSeeds:
    """The sampling seeds of a module: draw k of global rank r is ``base + k * MAX_RANKS + r``.

    ``base`` is one draw from torch's global generator when the module is built, so modules built
    after ``seed_everything`` (which Lightning applies in every process) agree on it, and the rank
    gives each its own stream instead of the same samples on different prompts. The seeds depend
    on nothing else: not on torch's global generator, which checkpoints do not hold and data
    loaders draw from, so with :meth:`state_dict` in the checkpoint a resumed run samples what an
    uninterrupted one does. The state holds the draws of the batches that completed
    (:meth:`batch_completed`): a checkpoint an interrupt saves in mid-batch, which the resumed run
    repeats, holds the draws from before that batch."""

    def __init__(self) -> None:
        self.base = int(torch.randint(0, 2**40, ()).item())
        self.draws = 0
        self.completed = 0  # the draws of completed batches: what a checkpoint holds

    def next(self, rank: int) -> int:
        """The seed of the next draw for global rank ``rank``."""
        self.draws += 1
        return self.base + self.draws * MAX_RANKS + rank

    def batch_completed(self) -> None:
        """Call at the end of a training step: its draws now belong to the checkpointed state."""
        self.completed = self.draws

    def state_dict(self) -> dict[str, int]:
        return {"base": self.base, "draws": self.completed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.base, self.draws = state["base"], state["draws"]
        self.completed = self.draws

    def save_to(self, checkpoint: dict) -> None:
        """Put the state in a module's checkpoint (its ``on_save_checkpoint``)."""
        checkpoint[SEEDS_KEY] = self.state_dict()

    def restore_from(self, checkpoint: dict) -> None:
        """Take the state from a module's checkpoint (its ``on_load_checkpoint``); a checkpoint
        written before the seeds were kept leaves them as built."""
        if SEEDS_KEY in checkpoint:
            self.load_state_dict(checkpoint[SEEDS_KEY])


def require_data_parallel(trainer: L.Trainer, who: str) -> None:
    """Raise unless ``trainer`` runs on one device or under DDP (``ddp``, ``ddp_spawn``, ...):
    ``who`` samples, scores or evaluates its whole backbone outside the training forward, which a
    strategy that shards the parameters (FSDP, DeepSpeed, model parallel) does not allow."""
    strategy = trainer.strategy
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, DeepSpeedStrategy):
        return
    raise LLMKitError(
        f"{who} runs on one device or under DDP (trainer.strategy: ddp), not {type(strategy).__name__}: it runs the "
        "whole backbone outside the training forward (sampling, scoring, evaluation), which needs every weight on "
        "every rank; sharded strategies are for pretraining (docs/scaling_out.md)"
    )
