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
- :func:`rank_seed`: a sampling seed of its own for each rank, drawn from the seeded global
  generator, so ranks never sample the same stream and a seeded run is reproducible;
- :func:`require_data_parallel`: a one-line refusal of a sharded strategy (FSDP, DeepSpeed,
  model parallel) by a module that runs its whole backbone outside ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TypeVar

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

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


def rank_seed(rank: int) -> int:
    """A seed for the sampling of global rank ``rank``: one draw from torch's global generator plus
    the rank.

    Every rank draws once, so the generators stay in step, and ranks seeded alike
    (``seed_everything``, which Lightning applies in every process) draw the same number: adding
    the rank gives each its own stream instead of the same samples on different prompts."""
    return int(torch.randint(0, 2**62, ()).item()) + rank


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
