"""Optimisation shared by every LightningModule: AdamW, or Muon for the hidden weight matrices
with AdamW for the rest, under a warm-up + cosine schedule; gradient clipping that works with a
fused AdamW under bf16-mixed; and the per-token gradient accumulation of the modules that
optimise by hand (SFT, SDFT, TTT-Discover). docs/optim.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.fsdp import FullyShardedDataParallel

from llmkit.errors import LLMKitError


@dataclass
class OptimConfig:
    """The optimizer and its schedule: linear warm-up then cosine decay to min_lr_ratio x the
    peak LR (the mHC paper's pretraining recipe, AdamW betas 0.9/0.95).

    name: ``adamw`` for every parameter, or ``muon``: ``torch.optim.Muon`` (momentum
        orthogonalised by Newton-Schulz; Jordan et al. 2024) for the hidden weight matrices (the
        attention and MLP projections of the blocks) at ``muon_lr`` / ``muon_weight_decay``, and
        AdamW at ``lr`` / ``weight_decay`` for the embeddings, the LM head, norms, biases, the mHC
        mapping (phi, alphas, biases) and the stream embedding. One schedule scales both.
    decay_steps: optimizer steps from 0 to the end of the cosine; None uses the Trainer's
        estimated_stepping_batches (max_steps, or epochs x batches / accumulation).
    implementation: "foreach" or "fused" AdamW (one kernel for the whole update; the GPU configs
        use it). Lightning's mixed-precision plugin refuses to clip gradients for a fused optimizer
        even in bf16, where there is no loss scaler; :func:`clip_grad_norm` clips them itself then.
    muon_adjust_lr: how Muon scales its update to a matrix's shape: ``original`` (Keller
        Jordan's, sqrt(max(1, rows/cols))) or ``match_rms_adamw`` (Moonshot's, an update RMS like
        AdamW's, so ``muon_lr`` can be AdamW's LR).
    """

    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None
    implementation: Literal["foreach", "fused"] = "foreach"
    muon_lr: float = 0.02
    muon_weight_decay: float = 0.0
    muon_momentum: float = 0.95
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "original"

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML and checkpoints give a list
        if self.name not in ("adamw", "muon"):
            raise LLMKitError(f"optim.name must be 'adamw' or 'muon', got {self.name!r}")
        for name in ("lr", "muon_lr", "weight_decay", "muon_weight_decay", "warmup_steps"):
            if not getattr(self, name) >= 0:  # NaN too
                raise LLMKitError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise LLMKitError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name, value in (("betas[0]", self.betas[0]), ("betas[1]", self.betas[1]),
                            ("muon_momentum", self.muon_momentum)):
            if not 0 <= value < 1:
                raise LLMKitError(f"optim.{name} must be in [0, 1), got {value}")
        if not 0 < self.eps < math.inf:
            raise LLMKitError(f"optim.eps must be > 0, got {self.eps}")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise LLMKitError(f"optim.decay_steps must be >= 1 (or null: the Trainer's steps), got {self.decay_steps}")


@dataclass(frozen=True)
class WarmupCosine:
    """LR multiplier: (s+1)/W for s < W, then 1 -> min_ratio along a half cosine until
    decay_steps, then min_ratio."""

    warmup_steps: int
    decay_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.decay_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class RunSchedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over this run's :class:`WarmupCosine` whose checkpoint brings back only where the
    schedule is (``last_epoch``). Loading one keeps this run's optimizer settings (``lr``,
    ``weight_decay``, betas, Muon's momentum: every group's hyperparameters as built, which
    Lightning's restore of the optimizer state, done first, overwrote with the old run's) and sets
    each group's learning rate for the step it resumes at: what you set applies on resume
    (docs/checkpoints.md). The multiplier is a closure: LambdaLR saves the state of a callable
    object, and would bring back the old run's length."""

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier: WarmupCosine) -> None:
        super().__init__(optimizer, lambda step: multiplier(step))
        self.multiplier = multiplier
        self.configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k not in ("multiplier", "configured")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        scale = self.multiplier(self.last_epoch)
        for group, configured in zip(self.optimizer.param_groups, self.configured, strict=True):
            group.update(configured, lr=configured["initial_lr"] * scale)
        self.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


class _JointState(MutableMapping):
    """The per-parameter states of several optimizers as one mapping: each read and write goes to
    the optimizer that holds the parameter (a ChainMap would create an entry in the first
    optimizer's defaultdict on every lookup of another's parameter)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def _holder(self, p: torch.Tensor) -> dict:
        for optimizer in self.optimizers:
            if p in optimizer.state or any(p is q for g in optimizer.param_groups for q in g["params"]):
                return optimizer.state
        raise KeyError(p)

    def __getitem__(self, p: torch.Tensor) -> Any:
        state = self._holder(p)
        if p not in state:
            raise KeyError(p)
        return state[p]

    def __setitem__(self, p: torch.Tensor, value: Any) -> None:
        self._holder(p)[p] = value

    def __delitem__(self, p: torch.Tensor) -> None:
        del self._holder(p)[p]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return chain.from_iterable(optimizer.state for optimizer in self.optimizers)

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self.optimizers)


class MuonAdamW(torch.optim.Optimizer):
    """Muon and AdamW stepped as one optimizer, so Lightning's automatic optimisation, gradient
    clipping and accumulation, the LR schedule and checkpoints treat the pair as one.

    ``param_groups`` is the list of both optimizers' groups (the same dicts, so a scheduler that
    sets ``lr`` reaches them), ``state`` a view of both states; ``state_dict`` holds both. Loading
    a state dict replaces the inner groups and states, so the views are rebuilt after it.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> None:
        super().__init__([p for group in muon.param_groups + adamw.param_groups for p in group["params"]], {})
        self.muon, self.adamw = muon, adamw
        self._share_inner_groups()

    def _share_inner_groups(self) -> None:
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self.state = _JointState(self.muon, self.adamw)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self._share_inner_groups()


def optimizer_name(state: dict[str, Any]) -> str:
    """``muon`` or ``adamw``: the optimizer ``build_optimizer`` built whose state dict ``state`` is
    (:class:`MuonAdamW`'s holds both optimizers' by name)."""
    return "muon" if "muon" in state else "adamw"


def build_optimizer(param_groups: list[dict], o: OptimConfig) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer ``o`` names over ``param_groups`` (from ``Transformer.param_groups``: the
    group marked ``hidden_matrices`` is Muon's under ``muon``), and a line saying how the
    parameters were split."""
    adamw_args = {"lr": o.lr, "betas": o.betas, "eps": o.eps, o.implementation: True}
    hidden = [g for g in param_groups if g.get("hidden_matrices") and g["params"]]
    if o.name == "adamw" or not hidden:
        groups = [g for g in param_groups if g["params"]]
        why = "" if o.name == "adamw" else " (Muon has no hidden matrix to train here)"
        return torch.optim.AdamW(groups, **adamw_args), f"optimizer: AdamW on {_count(groups)}{why}"
    muon = torch.optim.Muon(
        [{**g, "weight_decay": o.muon_weight_decay} for g in hidden], lr=o.muon_lr, momentum=o.muon_momentum,
        adjust_lr_fn=o.muon_adjust_lr,
    )
    rest = [g for g in param_groups if not g.get("hidden_matrices") and g["params"]]
    adamw = torch.optim.AdamW(rest, **adamw_args)
    return MuonAdamW(muon, adamw), (
        f"optimizer: Muon (lr {o.muon_lr:g}, weight decay {o.muon_weight_decay:g}) on {_count(hidden)}; "
        f"AdamW (lr {o.lr:g}, weight decay {o.weight_decay:g} on matrices) on {_count(rest)}"
    )


def _count(groups: list[dict]) -> str:
    tensors = sum(len(g["params"]) for g in groups)
    numbers = sum(p.numel() for g in groups for p in g["params"])
    return f"{tensors} tensors ({numbers / 1e6:.2f}M parameters)"


def lr_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``train/lr``: AdamW's learning rate on its schedule (``optim.lr`` at the peak), and under
    Muon also ``train/muon_lr``, Muon's (``optim.muon_lr`` at the peak)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper holds the optimizer
    if isinstance(inner, MuonAdamW):
        return {"train/lr": inner.adamw.param_groups[0]["lr"], "train/muon_lr": inner.muon.param_groups[0]["lr"]}
    return {"train/lr": inner.param_groups[0]["lr"]}


def optimizer_with_schedule(param_groups: list[dict], o: OptimConfig, trainer: L.Trainer) -> dict:
    """The optimizer of ``o`` over ``param_groups`` (:func:`build_optimizer`; its split is logged)
    and the warm-up + cosine LambdaLR of ``o``, stepped per optimizer step, in the dict
    ``configure_optimizers`` returns.

    The schedule is sized for this run (``decay_steps``, else the Trainer's length in optimizer
    steps, ``trainer.estimated_stepping_batches``), and a checkpoint
    restores only its step (:class:`RunSchedule`). A run resumed with a longer ``max_steps``
    follows the cosine of the new length from its current step (the LR rises from the old floor
    to where the longer cosine is); one resumed with another ``lr`` trains at it; docs/checkpoints.md.
    """
    optimizer, split = build_optimizer(param_groups, o)
    rank_zero_info(split)
    decay_steps = o.decay_steps or trainer.estimated_stepping_batches
    if not math.isfinite(decay_steps):
        raise LLMKitError(
            "cannot size the cosine schedule: set trainer.max_steps, trainer.max_epochs or model.optim.decay_steps"
        )
    warmup = o.warmup_steps
    if warmup >= decay_steps:
        warmup = max(1, int(decay_steps) // 10)
        rank_zero_warn(
            f"optim.warmup_steps {o.warmup_steps} >= decay_steps {decay_steps}: warming up over {warmup} "
            f"step{'s' if warmup > 1 else ''} instead"
        )
    scheduler = RunSchedule(optimizer, WarmupCosine(warmup, int(decay_steps), o.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def clip_grad_norm(module: L.LightningModule, optimizer: Any, max_norm: float) -> None:
    """Scale ``module``'s gradients so their global L2 norm is at most ``max_norm``.

    Goes through Lightning (``module.clip_gradients``: loss-scaler unscaling) except in two cases.
    Under FSDP the norm is over every rank's shards, which only the root FSDP module computes
    (``FullyShardedDataParallel.clip_grad_norm_``; Lightning's FSDP plugin refuses to clip by
    norm). A fused optimizer under bf16-mixed unscales inside its step, so Lightning's
    mixed-precision plugin refuses to clip for it, although only an fp16 loss scaler needs that;
    bf16 has none, so the gradients are clipped directly."""
    root = module.trainer.strategy.model
    if isinstance(root, FullyShardedDataParallel):
        root.clip_grad_norm_(max_norm)
        return
    inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the torch one
    if getattr(inner, "_step_supports_amp_scaling", False) and module.trainer.precision == "bf16-mixed":
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)
    else:
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


MAX_EMPTY_WINDOWS = 10
"""Accumulation windows in a row without a real token after which :class:`TokenMeanAccumulator`
stops the run: each is skipped without an optimizer step, so ``max_steps`` would never come."""


@dataclass
class StepStats:
    """What one optimizer step of :class:`TokenMeanAccumulator` saw: the mean loss per real token
    and the real tokens, both over all ranks, and the learning rates it stepped with
    (:func:`lr_metrics`)."""

    loss: float
    tokens: int
    lrs: dict[str, float]


class TokenMeanAccumulator:
    """Per-token gradient accumulation for a LightningModule that optimises by hand.

    Each micro-batch hands :meth:`backward` its loss *summed* over its real tokens and their
    number, and whether it ends the step (Lightning's fit loop says so for the fine-tuning modules:
    the one count of the window there is). The step divides the summed gradients by the step's
    real-token count over all ranks (times the world size, since DDP averages gradients over
    ranks), clips them to ``gradient_clip_val``, and steps the optimizer and the LR scheduler. So
    the loss is a mean per real token however a step's tokens are split into micro-batches and
    ranks, the normalisation peer trainers get wrong. A step with no real token anywhere is
    skipped with a warning; :data:`MAX_EMPTY_WINDOWS` in a row stop the run with an
    :class:`LLMKitError`.

    Under DDP the backward of every micro-batch but a step's last runs in the strategy's
    ``block_backward_sync`` (DDP's ``no_sync``): gradients accumulate locally and are all-reduced
    once per optimizer step, by the last micro-batch's backward, as Lightning's automatic
    optimisation does. The token count and the loss sum are all-reduced as tensors on the
    module's device (NCCL reduces GPU tensors only).
    """

    def __init__(self, module: L.LightningModule, gradient_clip_val: float | None = None) -> None:
        self.module = module
        self.gradient_clip_val = gradient_clip_val
        self._loss_sum = 0.0
        self._tokens = 0
        self._micro_batches = 0
        self._empty_windows = 0  # accumulation windows in a row without a real token

    @property
    def in_window(self) -> bool:
        """Whether micro-batches of a step not yet taken have been backpropagated."""
        return self._micro_batches > 0

    def state_dict(self) -> dict[str, float | int]:
        """The window in progress, for a checkpoint saved between its micro-batches: its micro-batches,
        the loss and real tokens so far summed over ranks (every rank calls this), and the empty windows
        before it."""
        tokens, loss_sum = self._sums_over_ranks()
        return {"micro_batches": self._micro_batches, "empty_windows": self._empty_windows, "tokens": tokens,
                "loss_sum": loss_sum}

    def load_state_dict(self, state: dict[str, float | int], rank: int) -> None:
        """Continue the window of :meth:`state_dict`; its sums go to rank 0 alone, as the step adds
        every rank's."""
        self._micro_batches, self._empty_windows = int(state["micro_batches"]), int(state["empty_windows"])
        self._tokens, self._loss_sum = (int(state["tokens"]), float(state["loss_sum"])) if rank == 0 else (0, 0.0)

    def backward(self, total: torch.Tensor, count: int, ends_step: bool = True) -> StepStats | None:
        """Backward of one micro-batch's summed loss; when it ``ends_step``, the step, and its
        statistics are returned, else None."""
        strategy = self.module.trainer.strategy
        local = not ends_step and isinstance(strategy, ParallelStrategy)
        with strategy.block_backward_sync() if local else nullcontext():
            self.module.manual_backward(total)
        self._loss_sum += total.item()
        self._tokens += count
        self._micro_batches += 1
        return self._step() if ends_step else None

    def _sums_over_ranks(self) -> tuple[int, float]:
        """(real tokens, summed loss) of the window so far, over all ranks (every rank calls this)."""
        reduce, device = self.module.trainer.strategy.reduce, self.module.device
        tokens = int(reduce(torch.tensor(self._tokens, dtype=torch.int64, device=device), reduce_op="sum"))
        loss_sum = float(reduce(torch.tensor(self._loss_sum, dtype=torch.float32, device=device), reduce_op="sum"))
        return tokens, loss_sum

    def _step(self) -> StepStats | None:
        module = self.module
        optimizer, scheduler = module.optimizers(), module.lr_schedulers()
        tokens, loss_sum = self._sums_over_ranks()
        self._loss_sum, self._tokens, self._micro_batches = 0.0, 0, 0
        if tokens == 0:
            optimizer.zero_grad(set_to_none=True)
            self._empty_windows += 1
            if self._empty_windows >= MAX_EMPTY_WINDOWS:  # global_step stands still: max_steps is never reached
                raise LLMKitError(
                    f"step {module.global_step}: {self._empty_windows} accumulation windows in a row had no real token "
                    "to learn from, so training makes no progress; check the data (empty demonstrations or "
                    "completions) and the settings that drop tokens (sdft.skip_first against sdft.max_new_tokens)"
                )
            rank_zero_warn(f"step {module.global_step}: no real tokens in the accumulated batches; skipping the update")
            return None
        self._empty_windows = 0
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, module.trainer.world_size / tokens)
        if self.gradient_clip_val is not None:
            clip_grad_norm(module, optimizer, self.gradient_clip_val)
        lrs = lr_metrics(optimizer)  # the step's, before the scheduler moves them on
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return StepStats(loss=loss_sum / tokens, tokens=tokens, lrs=lrs)
