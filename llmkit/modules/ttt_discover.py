"""TTTDiscoverModule: test-time training on one discovery problem (TTT-Discover, arXiv 2601.16175).

The module's data are the states it starts from: :class:`StartStates` hands each training step
the archive states PUCT picks for it, chosen when the step asks (a sized iterable, so Lightning
does not fetch ahead, and the choice sees every earlier step's rollouts). One training step:

1. take the step's start states (PUCT over the archive with ``reuse``; else the initial state);
2. build each start's prompt with the environment (``context_from_archive``; rendered as a user
   message through the tokenizer's chat template with ``chat_template``) and sample
   ``group_size`` rollouts per start with the KV-cached sampler, LoRA on;
3. parse each rollout into a state and score it, both in the sandboxed worker
   (:func:`safe_transition`, :func:`safe_reward`): anything that fails scores 0 and is counted;
4. per group, the adaptive beta (KL(q_beta || uniform) = ``target_kl``; or ``fixed_beta``) and
   the leave-one-out entropic advantages; KL shaping against the frozen base, whose
   log-probabilities come from the same model with LoRA switched off;
5. one REINFORCE update of the LoRA parameters only (per real token, clipped, through
   :class:`~llmkit.optim.TokenMeanAccumulator`; the base is frozen and its fingerprint is
   checked at the end);
6. the rollouts' valid states enter the archive (top-2 children per start).

``mode: best_of_n`` spends the same sampling budget from the initial state without updates or
reuse: the baseline TTT-Discover must beat. It skips steps 4-5 and never steps the optimizer.

The step axis is the discovery step (``archive.step``: steps completed), in both modes: it
numbers the TensorBoard metrics (``ttt/...``, straight to the loggers), the lines of
``discovery_log.jsonl`` and the adapter files. In ``ttt`` mode it equals Lightning's
``global_step``; in ``best_of_n`` mode no optimizer step is taken, so ``global_step`` stays 0
and the run stops after ``trainer.max_steps`` discovery steps.

Outputs, in ``out_dir`` (default: the run's log directory): ``discovery_log.jsonl`` (one line
per step), ``adapters/step_NNNNNN.safetensors`` every ``adapter_every`` steps and at the end
(``ttt`` mode: ``best_of_n`` trains no adapter), ``archive.json`` and ``result.json`` (the best
state and its reward, and the problem's prompt for ``llmkit consolidate``), rewritten after every
step, so an interrupted run leaves them with ``"finished": false``. See docs/ttt.md.

Under DDP (``trainer.strategy: ddp``, N processes) the rollouts of a step are split: every rank
picks the same start states (PUCT is deterministic over an archive that is the same on every
rank), samples its contiguous share of the ``starts_per_step x group_size`` rollouts with a seed
of its own and scores them; the scored rollouts are gathered in rank order, so every rank
computes the same groups, betas and advantages and records the same rollouts into its archive.
Each rank's policy loss covers its own rollouts, normalised by the token count over all ranks
(and ``kl_center``'s mean over all ranks' tokens), and DDP averages the LoRA gradients: the
update is the one a single process would make from all the rollouts. Rank 0 alone writes the
outputs. docs/scaling_out.md.
"""

from __future__ import annotations

import json
import math
import signal
import statistics
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from llmkit.discovery.archive import Archive, State
from llmkit.discovery.env import MEMORY_MB, DiscoveryEnv, EnvWorker, load_env, safe_reward, safe_transition
from llmkit.discovery.objective import (
    beta_summary,
    entropic_policy_loss,
    kl_shaped_advantages,
    loo_advantages,
    solve_beta,
)
from llmkit.distributed import RankSeeds, gather_objects, rank_share, require_data_parallel, sum_over_ranks
from llmkit.errors import LLMKitError, SettingError
from llmkit.eval.mode import eval_mode
from llmkit.io import (
    as_dataclass,
    atomic_file,
    hold_interrupts,
    interrupt_pending,
    release_interrupts,
    write_json_atomic,
)
from llmkit.model.config import AttentionBackend
from llmkit.model.generation import SamplingConfig, generate, sequence_logprobs
from llmkit.model.lora import (
    LoRAConfig,
    apply_lora,
    base_fingerprint,
    disable_lora,
    mark_only_lora_trainable,
    save_lora,
)
from llmkit.model.moe import scale_balancing_loss
from llmkit.modules.base import LLMKitModule
from llmkit.modules.finetune import FineTuneOptimConfig, check_fits, load_student, prompt_ids
from llmkit.optim import TokenMeanAccumulator, optimizer_with_schedule

MAX_LOGGED_REASONS = 3
"""Distinct failure reasons (parse errors, exceptions, timeouts) kept per step in discovery_log.jsonl."""

STEP_METRICS = ("beta", "beta_capped", "best_reward", "r_mean", "r_std", "r_max", "failures", "archive_size")
"""The per-step statistics logged to TensorBoard as ``ttt/<name>``."""


@dataclass
class TTTLoRAConfig(LoRAConfig):
    """:class:`LoRAConfig` with the TTT-Discover paper's adapter, rank 32 and alpha 64 (YAML that
    sets only some fields keeps these for the rest)."""

    rank: int = 32
    alpha: float = 64.0


@dataclass
class TTTConfig:
    """The discovery problem and the TTT-Discover loop.

    env / env_args: the environment's import path and constructor arguments.
    starts_per_step: start states (groups) per step; group_size: rollouts per start (K >= 3:
        with K = 2 the adaptive beta is unbounded, see :func:`solve_beta`).
    target_kl: gamma of the adaptive beta (ln 2); fixed_beta: use this beta instead.
    kl_lambda / kl_center: KL shaping A - lambda log(pi/pi0) (center: the official code's
        batch-centred form).
    reuse: pick starts from the archive by PUCT (c = puct_c); False always starts from the
        initial state. archive_size: states kept; children_per_parent: the best children of one
        parent state a step adds.
    failure_reward: the reward of a rollout that fails (no valid state, a verifier error or
        timeout): keep it at or below the environment's lowest reward, or failing pays.
    reward_timeout_s / reward_memory_mb: the time one transition or reward call may take, and the
        memory a worker that runs them may hold (llmkit/discovery/env.py); reward_workers: how many
        such workers score a step's rollouts in parallel (each a process of its own).
    """

    env: str = "llmkit.discovery.envs.StringTargetEnv"
    env_args: dict[str, Any] = field(default_factory=dict)
    starts_per_step: int = 2
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    target_kl: float = math.log(2)
    fixed_beta: float | None = None
    kl_lambda: float = 0.1
    kl_center: bool = False
    reuse: bool = True
    puct_c: float = 1.0
    archive_size: int = 1000
    children_per_parent: int = 2
    reward_timeout_s: float = 5.0
    reward_memory_mb: int = MEMORY_MB
    reward_workers: int = 1
    failure_reward: float = 0.0
    adapter_every: int = 10
    mode: Literal["ttt", "best_of_n"] = "ttt"

    def __post_init__(self) -> None:
        if self.group_size < 3:
            raise LLMKitError(
                f"ttt.group_size must be >= 3 (K = 2 makes the adaptive beta unbounded), got {self.group_size}"
            )
        if self.starts_per_step < 1 or self.adapter_every < 1 or self.reward_workers < 1:
            raise LLMKitError("ttt.starts_per_step, ttt.adapter_every and ttt.reward_workers must be >= 1")
        if self.reward_memory_mb < 64:
            raise LLMKitError(f"ttt.reward_memory_mb must be >= 64 (a Python interpreter's own), got "
                              f"{self.reward_memory_mb}")
        if self.mode not in ("ttt", "best_of_n"):
            raise LLMKitError(f"ttt.mode must be 'ttt' or 'best_of_n', got {self.mode!r}")
        if not 0 < self.temperature < math.inf:  # NaN too
            raise LLMKitError(f"ttt.temperature must be a finite number > 0 (the policy samples), "
                              f"got {self.temperature}")
        for key, value in (("target_kl", self.target_kl), ("reward_timeout_s", self.reward_timeout_s)):
            if not (math.isfinite(value) and value > 0):
                raise LLMKitError(f"ttt.{key} must be a finite number > 0, got {value}")
        for key, value, low in (("kl_lambda", self.kl_lambda, 0), ("puct_c", self.puct_c, 0),
                                ("archive_size", self.archive_size, 1),
                                ("children_per_parent", self.children_per_parent, 1)):
            if not (math.isfinite(value) and value >= low):
                raise LLMKitError(f"ttt.{key} must be a finite number >= {low}, got {value}")
        if self.fixed_beta is not None and not (math.isfinite(self.fixed_beta) and self.fixed_beta >= 0):
            raise LLMKitError(f"ttt.fixed_beta must be a finite number >= 0 (or null: the adaptive beta), "
                              f"got {self.fixed_beta}")
        if not math.isfinite(self.failure_reward):
            raise LLMKitError(f"ttt.failure_reward must be a finite number, got {self.failure_reward}")
        try:
            SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature)
        except SettingError as error:
            raise error.renamed(f"ttt.{error.setting}") from None


def _logged_step(line: str) -> float:
    """The step of a ``discovery_log.jsonl`` line; infinite for a line a killed run left half-written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class _SaveResults(L.Callback):
    """:meth:`TTTDiscoverModule.save_finished` at the run's end, before the final checkpoint (Lightning
    runs checkpoint callbacks last, and a Ctrl-C in the run's last step lands after that checkpoint,
    which skipped the module's own ``on_train_end``), and :meth:`TTTDiscoverModule.save_after_interrupt`
    when a run stops on an exception."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.save_finished()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        pl_module.save_after_interrupt()


class StartStates:
    """The training data: for each of ``steps`` steps, the ids of the archive states that step
    starts from, selected when the step asks for them (see the module docstring)."""

    def __init__(self, module: TTTDiscoverModule, steps: int) -> None:
        self.module = module
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield [state.id for state in self.module.select_starts()]

    def state_dict(self) -> dict[str, Any]:
        """Nothing to keep: the starts come from the archive, which the module's checkpoint holds.
        With :meth:`load_state_dict` it tells Lightning that a resume inside the run is exact."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """See :meth:`state_dict`."""


class TTTDiscoverModule(LLMKitModule):
    """TTT-Discover on one problem (see the module docstring); LoRA adapters only.

    Args:
        init_ckpt: the checkpoint whose backbone is adapted (required).
        tokenizer: the tokenizer the backbone was trained with: a SentencePiece ``.model``, a Hugging Face
            ``tokenizer.json``, or a model directory holding one; default: the one init_ckpt records (or the model
            directory it is or was converted from holds).
        ttt: the problem and the loop.
        lora: the adapter (the paper's: rank 32, alpha 64).
        optim: AdamW over the adapter and its schedule (the paper: lr 4e-5).
        out_dir: where logs, adapters and results go (None: the run's log directory).
        gradient_clip_val: clip the adapter's global gradient norm to this (None: no clipping).
        gradient_checkpointing: override the backbone config's setting (None keeps it).
        attention_backend: override the backbone config's attention kernel (None keeps it; docs/attention.md).
        compile: torch.compile each transformer block (GPU runs).
        chat_template: render each prompt (the environment's context) as a user message through the
            tokenizer's chat template before encoding it (needs a Hugging Face tokenizer that has one).
    """

    def __init__(
        self,
        init_ckpt: str | None = None,
        tokenizer: str | None = None,
        ttt: TTTConfig | None = None,
        lora: TTTLoRAConfig | None = None,
        optim: FineTuneOptimConfig | None = None,
        out_dir: str | None = None,
        gradient_clip_val: float | None = 1.0,
        gradient_checkpointing: bool | None = None,
        attention_backend: AttentionBackend | None = None,
        compile: bool = False,
        chat_template: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.ttt = as_dataclass(TTTConfig, ttt)
        self.lora = as_dataclass(TTTLoRAConfig, lora)
        self.optim = as_dataclass(FineTuneOptimConfig, optim)
        self.save_hyperparameters(
            {"init_ckpt": init_ckpt, "tokenizer": tokenizer, "ttt": asdict(self.ttt), "lora": self.lora.to_dict(),
             "optim": asdict(self.optim), "out_dir": out_dir, "gradient_clip_val": gradient_clip_val,
             "gradient_checkpointing": gradient_checkpointing, "attention_backend": attention_backend,
             "compile": compile, "chat_template": chat_template}
        )
        self.out_dir = out_dir
        self.chat_template = chat_template
        self.model, self.tokenizer, self.tokenizer_record = load_student(
            init_ckpt, tokenizer, gradient_checkpointing, attention_backend, chat_template)
        self.config = self.model.config
        self.accumulator = TokenMeanAccumulator(self, gradient_clip_val=gradient_clip_val)
        try:
            self.env: DiscoveryEnv = load_env(self.ttt.env, self.ttt.env_args)
        except LLMKitError as e:
            raise LLMKitError(
                f"ttt.env: {e} (ttt.env_args {self.ttt.env_args} may come from the config: when you change ttt.env, "
                "set ttt.env_args for it too)" if self.ttt.env_args else f"ttt.env: {e}"
            ) from None
        apply_lora(self.model, self.lora)
        mark_only_lora_trainable(self.model)
        self.base_sha256 = base_fingerprint(self.model)
        self.workers = [EnvWorker(memory_mb=self.ttt.reward_memory_mb) for _ in range(self.ttt.reward_workers)]
        ok, initial = self.workers[0].call(self.env, "initial_state", (), self.ttt.reward_timeout_s)
        if not ok:  # run where reward and transition run: an exception or a hang is one line
            raise LLMKitError(f"environment {self.env.name}: {initial}")
        reward, why = safe_reward(self.env, initial, self.ttt.reward_timeout_s, self.workers[0])
        if why is not None:
            raise LLMKitError(f"environment {self.env.name}: its initial state does not score ({why})")
        self.archive = Archive(initial, reward, self.ttt.archive_size, self.ttt.puct_c, self.ttt.children_per_parent)
        self.seeds = RankSeeds()  # the rollouts' seeds, checkpointed
        self.output_dir: Path | None = None  # set when fit starts
        self._weights_ahead = False  # inside a step, after its update: the weights are not archive.step's
        self._step_held = False  # Ctrl-C and SIGTERM held from a step's update to its batch's end
        self._finished = False  # the run's end saved (save_finished)
        self._warned_failure_reward = False

    def configure_callbacks(self) -> list[L.Callback]:
        return [_SaveResults()]

    @property
    def logged_step(self) -> int:
        """The discovery step (see the module docstring): ``global_step`` stays 0 in best_of_n."""
        return self.archive.step

    def setup(self, stage: str) -> None:
        require_data_parallel(self.trainer, type(self).__name__)
        rollouts = self.ttt.starts_per_step * self.ttt.group_size
        if rollouts < self.trainer.world_size:
            raise LLMKitError(
                f"ttt.starts_per_step x ttt.group_size = {rollouts} rollouts per step cannot be split over "
                f"{self.trainer.world_size} processes: sample more rollouts per step or use fewer devices"
            )

    def configure_model(self) -> None:
        scale_balancing_loss(self.model, 0.0)  # MoE routers are frozen with the base: no balancing loss to train
        if self.hparams.compile:
            self.model.compile_blocks()

    def configure_optimizers(self) -> dict:
        return optimizer_with_schedule(self.model.param_groups(self.optim.weight_decay), self.optim, self.trainer)

    def train_dataloader(self) -> StartStates:
        if self.trainer.max_steps < 1:
            raise LLMKitError("TTT-Discover needs trainer.max_steps >= 1: the number of discovery steps to run")
        return StartStates(self, self.trainer.max_steps)

    def on_train_start(self) -> None:
        """A ``best_of_n`` run resumed at its last step stops before a batch: it steps no optimizer, so
        ``max_steps`` never stops it (``_record_step`` does, after a step), and it ran one step more."""
        super().on_train_start()
        if self.ttt.mode == "best_of_n" and self.archive.step >= self.trainer.max_steps:
            self.trainer.should_stop = True

    def on_fit_start(self) -> None:
        """Resolve the output directory on every rank (``trainer.log_dir`` is a collective under DDP;
        rank 0 writes there later), and drop what a run went on to write past the step this one starts
        at (a resume's later steps, or an earlier run's in the same ``out_dir``): the log's later
        records and adapters; ``archive.json`` and ``result.json`` are this run's from the start, so a
        run that fails before its first step leaves no earlier run's results for ``consolidate``."""
        super().on_fit_start()
        self._finished = False
        self.output_dir = Path(self.out_dir or self.trainer.log_dir or self.trainer.default_root_dir)
        if not self.trainer.is_global_zero:
            return
        log = self.output_dir / "discovery_log.jsonl"
        if log.is_file():
            lines = log.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if _logged_step(line) <= self.archive.step]
            with atomic_file(log) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        for adapter in (self.output_dir / "adapters").glob("step_*.safetensors"):
            if int(adapter.stem.removeprefix("step_")) > self.archive.step:
                adapter.unlink()
        if 0 < self.trainer.max_steps <= self.archive.step:  # a resume with no step left: Lightning runs no
            self.save_finished()                              # on_train_end in mode ttt
        else:
            self._write_results(self._last_saved_adapter(self.archive.step), finished=False)

    def select_starts(self) -> list[State]:
        """``starts_per_step`` start states. PUCT selection skips the lineage of each pick, so it
        can return fewer (early on, only the root); the picks are then repeated in turn, each
        repeat a group of its own, so every step samples the same number of rollouts."""
        n = self.ttt.starts_per_step
        picked = self.archive.select(n) if self.ttt.reuse and self.ttt.mode == "ttt" else [self.archive.get(0)]
        return [picked[i % len(picked)] for i in range(n)]

    def score_rollouts(self, rollouts: list[tuple[State, str]]) -> list[tuple[str | None, float, str | None]]:
        """(new state or None, reward, failure reason or None) of each (start, action), in order. Each
        worker takes a contiguous share in a thread of its own: a call waits on its worker process, so
        the threads, and the processes, run at once."""
        shares = [rank_share(len(rollouts), k, len(self.workers)) for k in range(len(self.workers))]

        def score(k: int) -> list[tuple[str | None, float, str | None]]:
            return [self._score(*rollouts[i], self.workers[k]) for i in shares[k]]

        if len(self.workers) == 1:
            return score(0)
        with ThreadPoolExecutor(len(self.workers), thread_name_prefix="llmkit-score") as pool:
            return [scored for share in pool.map(score, range(len(self.workers))) for scored in share]

    def _score(self, start: State, action: str, worker: EnvWorker) -> tuple[str | None, float, str | None]:
        """(new state or None, reward, failure reason or None) of one rollout, sandboxed in ``worker``."""
        state, why = safe_transition(self.env, start.text, action, self.ttt.reward_timeout_s, worker)
        if state is None:
            return None, self.ttt.failure_reward, why
        reward, why = safe_reward(self.env, state, self.ttt.reward_timeout_s, worker)
        if why is not None:
            return None, self.ttt.failure_reward, why
        if reward < self.ttt.failure_reward and not self._warned_failure_reward:
            self._warned_failure_reward = True
            rank_zero_warn(f"{self.env.name}: a valid state scored {reward:.6g}, below ttt.failure_reward "
                           f"{self.ttt.failure_reward:g}, so failing rollouts are favoured over it: set "
                           f"ttt.failure_reward at or below the environment's lowest reward")
        return state, reward, None

    def context(self, start: State, others: list[str]) -> str:
        """The environment's prompt for ``start`` (``context_from_archive``, run here: it reads states,
        which are parsed model output, so an error in it stops the run with one line naming it)."""
        try:
            context = self.env.context_from_archive(start.text, others)
        except Exception as error:
            raise LLMKitError(
                f"environment {self.env.name}: context_from_archive failed on archive state {start.id} (found at "
                f"step {start.step}) with {type(error).__name__}: {str(error)[:200]}; it must accept every state "
                f"its transition returns"
            ) from error
        if not isinstance(context, str):
            raise LLMKitError(f"environment {self.env.name}: context_from_archive returned {type(context).__name__} "
                              f"for archive state {start.id}; it must return the prompt's text")
        return context

    def teardown(self, stage: str) -> None:
        for worker in self.workers:
            worker.close()

    def training_step(self, batch: list[int], batch_idx: int) -> None:
        cfg, tok = self.ttt, self.tokenizer
        starts = [self.archive.get(state_id) for state_id in batch]
        others = [s.text for s in sorted(self.archive.states.values(), key=lambda s: -s.reward)]
        prompts = prompt_ids(tok, [self.context(s, others) for s in starts], self.chat_template)
        check_fits(self.config.max_seq_len, [f"archive state {s.id}" for s in starts], prompts,
                   [cfg.max_new_tokens] * len(starts), f"{self.env.name} prompt", "ttt.max_new_tokens")
        contexts = [ids for ids in prompts for _ in range(cfg.group_size)]
        # this rank samples and scores its share of the step's rollouts; then every rank holds all of them
        mine = rank_share(len(contexts), self.global_rank, self.trainer.world_size)
        actions = self.sample_actions([contexts[i] for i in mine])
        scored_here = self.score_rollouts([(starts[i // cfg.group_size], tok.decode(action))
                                           for i, action in zip(mine, actions, strict=True)])
        scored = [rollout for part in gather_objects(self.trainer, scored_here) for rollout in part]

        groups, reasons, rollouts = [], [], {}
        for g, start in enumerate(starts):
            group = scored[g * cfg.group_size : (g + 1) * cfg.group_size]
            reasons += [why for _, _, why in group if why is not None]
            # a failed rollout still counts as a visit (PUCT's n and T); its NaN keeps it out of the archive
            rollouts.setdefault(start.id, []).extend((s or "", r if s is not None else math.nan) for s, r, _ in group)
            groups.append([r for _, r, _ in group])
        betas = [cfg.fixed_beta if cfg.fixed_beta is not None else solve_beta(r, cfg.target_kl) for r in groups]
        metrics = {}
        # Ctrl-C and SIGTERM wait for the update, the archive and the step's records to land together, at the
        # batch's end (on_train_batch_end): one between the optimizer step and the archive saved the weights of
        # a step whose archive, seeds and discovery_log line were the previous step's, and one landing inside
        # the step had the checkpoint take its batch back (the sampling above, the long part, stays
        # interruptible)
        self._step_held = hold_interrupts()
        if cfg.mode == "ttt":
            advantages = torch.cat([loo_advantages(r, b) for r, b in zip(groups, betas, strict=True)])
            metrics = self._update([contexts[i] for i in mine], actions, advantages[mine.start : mine.stop])
        self.archive.record_batch(rollouts)  # the step is done: archive, weights and seeds all at archive.step
        self.seeds.batch_completed()
        self._weights_ahead = False
        rewards = [r for group in groups for r in group]
        self._record_step({
            "problem": self.env.name, **beta_summary(betas), "best_reward": self.archive.best().reward,
            "r_mean": statistics.fmean(rewards), "r_std": statistics.pstdev(rewards), "r_max": max(rewards),
            "start_states": [s.id for s in starts], "failures": len(reasons), "archive_size": len(self.archive),
            "failure_reasons": sorted(set(reasons))[:MAX_LOGGED_REASONS],
        }, metrics)

    def on_train_batch_end(self, *args: Any) -> None:
        """Release the step's hold of Ctrl-C and SIGTERM (see :meth:`training_step`): the hook runs after
        every callback's, so an interrupt lands with the step's batch done; a Ctrl-C in the run's last
        step waits on until its results and final checkpoint are saved (:meth:`on_train_end`), as
        :class:`~llmkit.callbacks.Checkpoint` holds one in mode ``ttt``, so the run is finished.
        Every rank decides alike."""
        if self.archive.step >= self.trainer.max_steps > 0 and self.trainer.strategy.reduce_boolean_decision(
                interrupt_pending(signal.SIGINT), all=False):
            return
        self._release_step()

    def on_train_end(self) -> None:
        self._release_step()  # after the callbacks': the results (_SaveResults) and the final checkpoint

    def _release_step(self, deliver: bool = True) -> None:
        if self._step_held:
            self._step_held = False
            release_interrupts(deliver)

    def sample_actions(self, contexts: list[list[int]]) -> list[list[int]]:
        """One rollout (action ids, EOS included) after each of ``contexts``, sampled with LoRA on and
        a seed of this rank's own (:class:`~llmkit.distributed.RankSeeds`): under DDP each rank samples
        its share of the step's rollouts, and no two ranks the same random stream."""
        tok, cfg = self.tokenizer, self.ttt
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  seed=self.seeds.next(self.global_rank))
        with eval_mode(self.model):
            y = generate(self.model, contexts, sampling, tok.stop_ids, tok.pad_id)
        return [row[real].tolist() for row, real in zip(y.tokens, y.mask, strict=True)]

    def policy_logprobs(self, contexts: list[list[int]], actions: list[list[int]]) -> tuple[torch.Tensor, ...]:
        """(log pi_theta, its mask, log pi_theta0) of every action token, under the policy that sampled
        them: softmax(logits / ttt.temperature); pi_theta0 is the base (LoRA off, no gradient)."""
        pad, temperature = self.tokenizer.pad_id, self.ttt.temperature
        logp, mask = sequence_logprobs(self.model, contexts, actions, pad, temperature)
        with torch.no_grad(), disable_lora(self.model):
            logp_base, _ = sequence_logprobs(self.model, contexts, actions, pad, temperature)
        return logp, mask, logp_base

    def _update(self, contexts: list[list[int]], actions: list[list[int]], advantages: torch.Tensor) -> dict:
        """The policy-gradient step of the LoRA parameters; its TensorBoard metrics."""
        cfg = self.ttt
        logp, mask, logp_base = self.policy_logprobs(contexts, actions)
        shaped = kl_shaped_advantages(advantages.to(logp.device), logp.detach(), logp_base, mask, cfg.kl_lambda,
                                      cfg.kl_center, sum_over_ranks(self.trainer))
        total, count = entropic_policy_loss(logp, mask, shaped)
        if not torch.isfinite(total):
            raise LLMKitError(
                f"non-finite policy loss at discovery step {self.archive.step + 1}; lower optim.lr or ttt.kl_lambda, "
                f"or resume from the last good checkpoint"
            )
        stats = self.accumulator.backward(total.float(), int(count))
        self._weights_ahead = True  # the optimizer stepped: from here on, an exception must not save these weights
        if not all(bool(p.isfinite().all()) for p in self.model.parameters() if p.requires_grad):
            raise LLMKitError(
                f"the LoRA weights are not finite after discovery step {self.archive.step + 1} (the update diverged): "
                f"lower optim.lr (now {self.optim.lr}), or resume from the last good checkpoint"
            )
        if stats is None:
            return {}
        return {"train/policy_loss": stats.loss, **stats.lrs, "train/tokens_per_step": float(stats.tokens)}

    def _record_step(self, record: dict[str, Any], metrics: dict[str, float]) -> None:
        """Log the step that just completed (``archive.step``) to the loggers, the progress bar,
        ``discovery_log.jsonl``, and save the adapter every ``adapter_every`` steps (in ``ttt`` mode:
        ``best_of_n`` trains none)."""
        step = self.archive.step
        record = {"step": step, **record, "adapter": None}
        if self.ttt.mode == "ttt" and step % self.ttt.adapter_every == 0:
            record["adapter"] = str(self._save_adapter(step))
        metrics = {f"ttt/{key}": float(record[key]) for key in STEP_METRICS} | metrics
        for logger in self.trainer.loggers:  # the discovery step, not global_step (see the module docstring)
            logger.log_metrics(metrics, step=step)
        self.log_dict({k: metrics[k] for k in ("ttt/best_reward", "ttt/r_mean")}, prog_bar=True, logger=False)
        rollouts = len(record["start_states"]) * self.ttt.group_size
        line = (f"discovery step {step}/{self.trainer.max_steps}: best reward {record['best_reward']:.6g} "
                f"(this step: max {record['r_max']:.6g}, mean {record['r_mean']:.4g}), "
                f"{record['failures']}/{rollouts} rollouts failed")
        if record["failures"] == rollouts:
            rank_zero_warn(f"{line}: every rollout failed ({'; '.join(record['failure_reasons'])})")
        else:
            rank_zero_info(line)
        if self.trainer.is_global_zero:
            path = self.output_dir / "discovery_log.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self._write_results(self._last_saved_adapter(step), finished=False)
        if self.ttt.mode == "best_of_n" and step >= self.trainer.max_steps:
            self.trainer.should_stop = True  # no optimizer step moves global_step towards max_steps

    def _save_adapter(self, step: int) -> Path:
        """The adapter file of discovery step ``step``, written by rank 0 (every rank's adapter is the same)."""
        path = self._adapter_path(step)
        if self.trainer.is_global_zero:
            save_lora(self.model, path, self.lora, self.base_sha256)
        return path

    def _adapter_path(self, step: int) -> Path:
        return self.output_dir / "adapters" / f"step_{step:06d}.safetensors"

    def _last_saved_adapter(self, step: int) -> Path | None:
        """The adapter :meth:`_record_step` saved at or before ``step``: None before the first, and in
        ``best_of_n`` mode."""
        last_saved = step - step % self.ttt.adapter_every
        return self._adapter_path(last_saved) if self.ttt.mode == "ttt" and last_saved > 0 else None

    def save_finished(self) -> None:
        """Save the adapter and results of the run's last step, once, after checking that only LoRA
        parameters trained."""
        if self._finished:
            return
        if base_fingerprint(self.model) != self.base_sha256:
            raise LLMKitError("the base weights changed during TTT-Discover: only LoRA parameters may train")
        if self.trainer.is_global_zero:
            self._save_last(finished=True)
        self._finished = True

    def save_after_interrupt(self) -> None:
        """Save the adapter and results of the last completed step when the run stops on an
        exception (Ctrl-C among them), which ``on_train_end`` does not see; not when the weights
        already hold an update of the unfinished step."""
        self._release_step(deliver=False)  # the run stops anyway
        if self.trainer.is_global_zero and self.output_dir is not None and self.archive.step > 0 \
                and not self._weights_ahead and not self._finished:
            self._save_last(finished=False)

    def _save_last(self, finished: bool) -> None:
        step, best = self.archive.step, self.archive.best()
        adapter = self._last_saved_adapter(step)
        if self.ttt.mode == "ttt" and adapter != self._adapter_path(step):  # else saved from these same weights
            adapter = self._save_adapter(step)
        self._write_results(adapter, finished)
        unresumable = not finished and self.trainer.checkpoint_callback is None
        rank_zero_info(f"discovery {'finished' if finished else 'stopped'} at step {step}: best reward "
                       f"{best.reward:.6g} (initial {self.archive.get(0).reward:.6g}, found at step {best.step}); "
                       f"{self.output_dir / 'result.json'}" + (f", adapter {adapter}" if adapter else "")
                       + ("; no checkpoint to resume from (trainer.enable_checkpointing is off: docs/ttt.md)"
                          if unresumable else ""))

    def _write_results(self, adapter: Path | None, finished: bool) -> None:
        """``archive.json`` and ``result.json`` as of the last step, the adapter saved at or before it
        (None before the first), and whether the run finished: written after every step too, so an
        interrupted run leaves what it found (``llmkit consolidate`` reads it). Rank 0 only."""
        best, initial = self.archive.best(), self.archive.get(0)
        prompt = self.context(initial, [])  # before anything is written: result.json goes with archive.json
        write_json_atomic(self.output_dir / "archive.json", self.archive.to_dict())
        write_json_atomic(self.output_dir / "result.json", {
            "problem": self.env.name, "mode": self.ttt.mode, "prompt": prompt,
            "best_state": best.text, "best_reward": best.reward, "best_state_id": best.id, "found_at_step": best.step,
            "initial_reward": initial.reward,
            "steps": self.archive.step, "rollouts": self.archive.total_rollouts,
            "adapter": None if adapter is None else str(adapter), "finished": finished,
            "base_sha256": self.base_sha256,
        })

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["archive"] = self.archive.to_dict()
        self.seeds.save_to(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.archive = Archive.from_dict(checkpoint["archive"])
        self.seeds.restore_from(checkpoint)
