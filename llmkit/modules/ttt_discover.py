"""TTTDiscoverModule: test-time training on one discovery problem (handoff "TTT-Discover" §1-8, K4).

One training step (K4):

1. pick start states from the archive by PUCT (``reuse``; else always the initial state);
2. build each start's prompt with the environment (``context_from_archive``) and sample
   ``group_size`` rollouts per start with the KV-cached sampler, LoRA on;
3. parse each rollout into a state and score it, both in the sandboxed worker
   (:func:`safe_transition`, :func:`safe_reward`): anything that fails scores 0 and is counted;
4. per group, the adaptive beta (KL(q_beta || uniform) = ``target_kl``; or ``fixed_beta``) and
   the leave-one-out entropic advantages; KL shaping against the frozen base, whose
   log-probabilities come from the same model with LoRA switched off;
5. one REINFORCE update of the LoRA parameters only (per real token, clipped; the base is
   frozen and its fingerprint is checked at the end);
6. the rollouts' valid states enter the archive (top-2 children per start).

Outputs, in ``out_dir`` (default: the run's log directory): ``discovery_log.jsonl`` (one line
per step, handoff I3), ``adapters/step_NNNNNN.safetensors`` every ``adapter_every`` steps and
at the end, ``archive.json`` and ``result.json`` (the best state and its reward, and the
problem's prompt for ``llmkit consolidate``). The same
metrics go to TensorBoard under ``ttt/``. ``mode: best_of_n`` spends the same sampling budget
from the initial state without updates or reuse: the baseline TTT-Discover must beat.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from llmkit.data.corpus import write_json_atomic
from llmkit.discovery.archive import Archive, State
from llmkit.discovery.env import DiscoveryEnv, load_env, safe_reward, safe_transition
from llmkit.discovery.objective import entropic_policy_loss, kl_shaped_advantages, loo_advantages, solve_beta
from llmkit.errors import LLMKitError
from llmkit.eval.mode import eval_mode
from llmkit.model.generation import SamplingConfig, generate, sequence_logprobs
from llmkit.model.lora import (
    LoRAConfig,
    apply_lora,
    base_fingerprint,
    disable_lora,
    mark_only_lora_trainable,
    save_lora,
)
from llmkit.modules.finetune import FineTuneModule
from llmkit.modules.pretrain import as_dataclass

MAX_LOGGED_REASONS = 3
"""Distinct failure reasons (parse errors, exceptions, timeouts) kept per step in discovery_log.jsonl."""


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
        initial state.
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
    adapter_every: int = 10
    mode: Literal["ttt", "best_of_n"] = "ttt"

    def __post_init__(self) -> None:
        if self.group_size < 3:
            raise LLMKitError(
                f"ttt.group_size must be >= 3 (K = 2 makes the adaptive beta unbounded), got {self.group_size}"
            )
        if self.starts_per_step < 1 or self.adapter_every < 1:
            raise LLMKitError("ttt.starts_per_step and ttt.adapter_every must be >= 1")
        if self.mode not in ("ttt", "best_of_n"):
            raise LLMKitError(f"ttt.mode must be 'ttt' or 'best_of_n', got {self.mode!r}")
        SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature)  # checks both


class TTTDiscoverModule(FineTuneModule):
    """TTT-Discover on one problem (see the module docstring); LoRA adapters only.

    Args:
        ttt: the problem and the loop.
        lora: the adapter (the paper: rank 32).
        out_dir: where logs, adapters and results go (None: the run's log directory).
        **kwargs: the :class:`FineTuneModule` arguments (init_ckpt, tokenizer, optim, ...).
    """

    loss_name = "policy_loss"

    def __init__(
        self, ttt: TTTConfig | None = None, lora: LoRAConfig | None = None, out_dir: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.ttt = as_dataclass(TTTConfig, ttt)
        self.lora = as_dataclass(LoRAConfig, lora if lora is not None else {"rank": 32, "alpha": 64.0})
        self.hparams.update({"ttt": asdict(self.ttt), "lora": self.lora.to_dict(), "out_dir": out_dir})
        self.out_dir = out_dir
        self.env: DiscoveryEnv = load_env(self.ttt.env, self.ttt.env_args)
        apply_lora(self.model, self.lora)
        mark_only_lora_trainable(self.model)
        self.base_sha256 = base_fingerprint(self.model)
        initial = self.env.initial_state()
        reward, why = safe_reward(self.env, initial, self.ttt.reward_timeout_s)
        if why is not None:
            raise LLMKitError(f"environment {self.env.name}: its initial state does not score ({why})")
        self.archive = Archive(initial, reward, self.ttt.archive_size, self.ttt.puct_c, self.ttt.children_per_parent)
        self._step_log: dict[str, Any] = {}

    def train_dataloader(self) -> DataLoader:
        """One item per step: the loop draws its own data (rollouts) in the training step."""
        return DataLoader(range(max(1, self.trainer.max_steps)), batch_size=1)

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir or self.trainer.log_dir or self.trainer.default_root_dir)

    def _starts(self) -> list[State]:
        """``starts_per_step`` start states. PUCT selection skips the lineage of each pick, so it
        can return fewer (early on, only the root); the picks are then repeated in turn, each
        repeat a group of its own, so every step samples the same number of rollouts."""
        n = self.ttt.starts_per_step
        picked = self.archive.select(n) if self.ttt.reuse and self.ttt.mode == "ttt" else [self.archive.get(0)]
        return [picked[i % len(picked)] for i in range(n)]

    def _score(self, start: State, action: str) -> tuple[str | None, float, str | None]:
        """(new state or None, reward, failure reason or None) of one rollout, sandboxed."""
        state, why = safe_transition(self.env, start.text, action, self.ttt.reward_timeout_s)
        if state is None:
            return None, 0.0, why
        reward, why = safe_reward(self.env, state, self.ttt.reward_timeout_s)
        return (state if why is None else None), reward, why

    def loss_sum(self, batch: Any, stage: str, batch_idx: int) -> tuple[torch.Tensor, int]:
        cfg, tok = self.ttt, self.tokenizer
        starts = self._starts()
        others = [s.text for s in sorted(self.archive.states.values(), key=lambda s: -s.reward)]
        prompts = [tok.encode(self.env.context_from_archive(s.text, others)) for s in starts]
        self.check_fits([f"archive state {s.id}" for s in starts], prompts, [cfg.max_new_tokens] * len(starts),
                        f"{self.env.name} prompt")
        contexts = [ids for ids in prompts for _ in range(cfg.group_size)]
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
        with eval_mode(self.model):
            y = generate(self.model, contexts, sampling, tok.eos_id, tok.pad_id)
        actions = [row[real].tolist() for row, real in zip(y.tokens, y.mask, strict=True)]

        groups, reasons, rollouts = [], [], {}
        for g, start in enumerate(starts):
            scored = [self._score(start, tok.decode(a)) for a in actions[g * cfg.group_size : (g + 1) * cfg.group_size]]
            reasons += [why for _, _, why in scored if why is not None]
            # a failed rollout still counts as a visit (PUCT's n and T); its NaN keeps it out of the archive
            rollouts.setdefault(start.id, []).extend((s or "", r if s is not None else math.nan) for s, r, _ in scored)
            groups.append([r for _, r, _ in scored])
        betas = [cfg.fixed_beta if cfg.fixed_beta is not None else solve_beta(r, cfg.target_kl) for r in groups]
        advantages = torch.cat([loo_advantages(r, b) for r, b in zip(groups, betas, strict=True)])
        self.archive.record_batch(rollouts)

        rewards = [r for group in groups for r in group]
        self._step_log = {
            "problem": self.env.name, "beta": statistics.fmean(betas), "best_reward": self.archive.best().reward,
            "r_mean": statistics.fmean(rewards), "r_std": statistics.pstdev(rewards), "r_max": max(rewards),
            "start_states": [s.id for s in starts], "failures": len(reasons), "archive_size": len(self.archive),
            "failure_reasons": sorted(set(reasons))[:MAX_LOGGED_REASONS],
        }
        if cfg.mode == "best_of_n":
            return torch.zeros((), device=self.device), 0
        logp, mask = sequence_logprobs(self.model, contexts, actions, tok.pad_id)
        with torch.no_grad(), disable_lora(self.model):
            logp_base, _ = sequence_logprobs(self.model, contexts, actions, tok.pad_id)
        shaped = kl_shaped_advantages(advantages.to(logp.device), logp.detach(), logp_base, mask, cfg.kl_lambda,
                                      cfg.kl_center)
        total, count = entropic_policy_loss(logp, mask, shaped)
        return total.float(), int(count)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if self.ttt.mode == "ttt":
            return super().training_step(batch, batch_idx)
        with torch.no_grad():
            self.loss_sum(batch, "train", batch_idx)
        self.optimizers().step()  # no gradients, so no weight moves: it only counts the step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        record = {"step": step, **self._step_log, "adapter": None}
        if step % self.ttt.adapter_every == 0:
            record["adapter"] = str(self._save_adapter(step))
        for key in ("beta", "best_reward", "r_mean", "r_std", "r_max", "failures", "archive_size"):
            self.log(f"ttt/{key}", float(record[key]))
        if self.trainer.is_global_zero:
            path = self.output_dir / "discovery_log.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _save_adapter(self, step: int) -> Path:
        return save_lora(self.model, self.output_dir / "adapters" / f"step_{step:06d}.safetensors", self.lora,
                         self.base_sha256)

    def on_train_end(self) -> None:
        if base_fingerprint(self.model) != self.base_sha256:
            raise LLMKitError("the base weights changed during TTT-Discover: only LoRA parameters may train")
        if not self.trainer.is_global_zero:
            return
        adapter = self._save_adapter(self.global_step)
        best, initial = self.archive.best(), self.archive.get(0)
        write_json_atomic(self.output_dir / "archive.json", self.archive.to_dict())
        write_json_atomic(self.output_dir / "result.json", {
            "problem": self.env.name, "mode": self.ttt.mode, "prompt": self.env.context_from_archive(initial.text, []),
            "best_state": best.text, "best_reward": best.reward, "best_state_id": best.id, "found_at_step": best.step,
            "initial_reward": initial.reward,
            "steps": self.global_step, "rollouts": self.archive.total_rollouts, "adapter": str(adapter),
            "base_sha256": self.base_sha256,
        })

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["archive"] = self.archive.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.archive = Archive.from_dict(checkpoint["archive"])

