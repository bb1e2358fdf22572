"""TTTDiscoverModule end to end on the toy environment: LoRA-only updates, logs, adapters, results."""

from __future__ import annotations

import csv
import json
import math
import re
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from llmkit.callbacks import Checkpoint, EMATeacher
from llmkit.cli import main
from llmkit.data.sdft_data import SDFTDataModule
from llmkit.discovery.consolidate import consolidate
from llmkit.discovery.envs import StringTargetEnv
from llmkit.errors import LLMKitError
from llmkit.model.checkpoint import load_backbone
from llmkit.model.config import ModelConfig
from llmkit.model.generation import SamplingConfig, generate
from llmkit.model.lora import read_lora
from llmkit.model.transformer import Transformer
from llmkit.modules.sdft import SDFTModule
from llmkit.modules.ttt_discover import TTTConfig, TTTDiscoverModule
from llmkit.optim import TokenMeanAccumulator
from tests.conftest import VOCAB_SIZE, ctrl_c_right_after_update
from tests.lenient_env import PrintableGuessEnv

CONFIG = ModelConfig(vocab_size=VOCAB_SIZE, n_layers=1, d_model=32, n_heads=4, d_ff=64, max_seq_len=512, n_streams=2)
TOY = {"env": "llmkit.discovery.envs.StringTargetEnv", "env_args": {"target": "alpha", "metric": "edit"},
       "starts_per_step": 2, "group_size": 4, "max_new_tokens": 12, "adapter_every": 2}


class ThrowingEnv(StringTargetEnv):
    """Every guess but the initial state makes the verifier raise."""

    def reward(self, state: str) -> float:
        if state != self.initial_state():
            raise RuntimeError("verifier crashed")
        return super().reward(state)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    path = tmp_path_factory.mktemp("ttt_base") / "base.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"config": CONFIG.to_dict()}}, path)
    return path


def fit(base_ckpt, tokenizer_path, out: Path, steps: int, logger=False, **ttt) -> TTTDiscoverModule:
    L.seed_everything(0, verbose=False)
    module = TTTDiscoverModule(ttt={**TOY, **ttt}, lora={"rank": 4, "alpha": 8.0}, out_dir=str(out),
                               init_ckpt=str(base_ckpt), tokenizer=str(tokenizer_path), optim={"lr": 1e-3})
    L.Trainer(accelerator="cpu", max_steps=steps, logger=logger, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module)
    return module


def logged_steps(log_dir: Path, metric: str) -> list[int]:
    with (log_dir / "metrics.csv").open() as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get(metric)]


def test_cli_run_trains_only_lora_logs_saves_and_improves_the_toy_reward(base_ckpt, tokenizer_path, tmp_path,
                                                                         caplog, recwarn):
    config = {
        "seed_everything": 1,
        "trainer": {"accelerator": "cpu", "max_steps": 4, "enable_progress_bar": False, "logger": False,
                    "default_root_dir": str(tmp_path),
                    "enable_checkpointing": False, "enable_model_summary": False},
        "model": {"init_ckpt": str(base_ckpt), "tokenizer": str(tokenizer_path), "ttt": TOY,
                  "lora": {"rank": 4, "alpha": 8.0}, "optim": {"lr": 1e-3}, "out_dir": str(tmp_path / "out")},
    }
    (tmp_path / "ttt.yaml").write_text(yaml.safe_dump(config))
    with caplog.at_level("INFO"):
        assert main(["ttt", "fit", "--config", str(tmp_path / "ttt.yaml")]) == 0
    # one line per step: logged, or a warning when every rollout of the step failed
    lines = caplog.text.splitlines() + [str(w.message) for w in recwarn]
    steps = sorted(re.search(r"discovery step (\d)/4: best reward", line)[1] for line in lines
                   if "discovery step" in line)
    assert steps == ["1", "2", "3", "4"]

    out = tmp_path / "out"
    result = json.loads((out / "result.json").read_text())
    assert result["initial_reward"] == 0.0 and result["best_reward"] > 0.0  # "?????" vs "alpha" scores 0
    assert result["rollouts"] == 4 * 2 * 4 and result["steps"] == 4
    assert StringTargetEnv(target="alpha", metric="edit").reward(result["best_state"]) == result["best_reward"]
    log = [json.loads(line) for line in (out / "discovery_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    keys = {"beta", "beta_capped", "best_reward", "r_mean", "r_std", "r_max", "start_states", "adapter"}
    assert all(keys <= r.keys() for r in log)
    assert [r["adapter"] is not None for r in log] == [False, True, False, True]
    assert [r["best_reward"] for r in log] == sorted(r["best_reward"] for r in log)  # the archive keeps the best
    # a step's start states are picked when the step asks for them, after the last step's rollouts entered
    # the archive: step 2 already starts from states that step 1 found (the seed is one whose first step finds
    # some: the tiny random model fails most rollouts, and with seed 0 all eight of step 1's)
    assert log[0]["start_states"] == [0, 0] and log[0]["archive_size"] > 1
    assert any(state_id > 0 for state_id in log[1]["start_states"])

    tensors, _, meta = read_lora(out / "adapters" / "step_000004.safetensors")
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("lora_B"))  # the adapter learned
    base = {k.removeprefix("model."): v for k, v in torch.load(base_ckpt, weights_only=True)["state_dict"].items()}
    assert meta["base_sha256"] == result["base_sha256"]
    archive = json.loads((out / "archive.json").read_text())
    assert len(archive["states"]) >= 2

    # the base weights stay bit-identical to the checkpoint (only LoRA trains)
    module = fit(base_ckpt, tokenizer_path, tmp_path / "again", steps=2)
    for name, value in module.model.state_dict().items():
        if not name.endswith(("lora_A", "lora_B")):
            assert torch.equal(value, base[name]), name


def test_best_of_n_spends_the_budget_without_updates_on_the_same_step_axis(base_ckpt, tokenizer_path, tmp_path):
    runs = {}
    for mode in ("ttt", "best_of_n"):
        logger = CSVLogger(tmp_path, name=mode, version=0)
        runs[mode] = fit(base_ckpt, tokenizer_path, tmp_path / mode, steps=3, logger=logger, mode=mode)
        assert logged_steps(Path(logger.log_dir), "ttt/best_reward") == [1, 2, 3]
    ttt, best_of_n = runs["ttt"], runs["best_of_n"]
    assert ttt.global_step == ttt.archive.step == 3  # one optimizer step per discovery step
    assert best_of_n.archive.step == 3 and best_of_n.global_step == 0  # three steps, no optimizer step
    assert best_of_n.trainer.optimizers[0].state_dict()["state"] == {}  # AdamW never stepped
    assert all(p.abs().sum() == 0 for n, p in best_of_n.model.named_parameters() if n.endswith("lora_B"))
    result = json.loads((tmp_path / "best_of_n" / "result.json").read_text())
    assert result["mode"] == "best_of_n" and result["rollouts"] == 3 * 2 * 4 and result["steps"] == 3
    log = [json.loads(line) for line in (tmp_path / "best_of_n" / "discovery_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["start_states"] == [0, 0] for r in log)  # no reuse: always the initial state
    # no adapter trains, so none is saved (the ttt run, with adapter_every 2, saved steps 2 and 3)
    assert result["adapter"] is None and all(r["adapter"] is None for r in log)
    assert not (tmp_path / "best_of_n" / "adapters").exists()
    assert sorted(p.name for p in (tmp_path / "ttt" / "adapters").iterdir()) == ["step_000002.safetensors",
                                                                               "step_000003.safetensors"]


def run_discovery(mode: str, max_steps: int, tmp_path: Path, base_ckpt: Path, tokenizer_path: Path,
                  ckpt_path: Path | None = None) -> TTTDiscoverModule:
    """A toy discovery run in ``tmp_path / "out"``, checkpointed in ``tmp_path / "ckpt"``."""
    L.seed_everything(0, verbose=False)
    module = TTTDiscoverModule(ttt={**TOY, "mode": mode}, lora={"rank": 4, "alpha": 8.0},
                               out_dir=str(tmp_path / "out"), init_ckpt=str(base_ckpt), tokenizer=str(tokenizer_path))
    L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Checkpoint(dirpath=tmp_path / "ckpt")]
              ).fit(module, ckpt_path=ckpt_path)
    return module


def test_a_best_of_n_run_resumed_at_its_last_step_runs_no_more_steps(base_ckpt, tokenizer_path, tmp_path):
    """best_of_n steps no optimizer, so max_steps never stopped a resumed run: resumed at its last step (a run
    that finished, or one interrupted there) it ran one more discovery step, past trainer.max_steps."""
    run_discovery("best_of_n", 2, tmp_path, base_ckpt, tokenizer_path)
    resumed = run_discovery("best_of_n", 2, tmp_path, base_ckpt, tokenizer_path, tmp_path / "ckpt" / "last.ckpt")
    log = [json.loads(line)["step"] for line in (tmp_path / "out" / "discovery_log.jsonl").read_text().splitlines()]
    assert resumed.archive.step == 2 and log == [1, 2]


def ctrl_c_in_the_records(monkeypatch, step: int) -> None:
    """A real SIGINT once the archive has recorded discovery step ``step``, inside the step's records."""
    from llmkit.discovery.archive import Archive

    record_batch = Archive.record_batch

    def record_then_ctrl_c(self, rollouts):
        record_batch(self, rollouts)
        if self.step == step:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(Archive, "record_batch", record_then_ctrl_c)


def test_ctrl_c_in_a_best_of_n_step_saves_that_step_done_and_says_its_discovery_step(base_ckpt, tokenizer_path,
                                                                                      tmp_path, monkeypatch, caplog):
    """best_of_n takes no backward, so no Checkpoint held the interrupt to the batch's end: a Ctrl-C in a
    step's records landed inside the step, whose batch the checkpoint then took back (the loop's batches
    one behind the archive's steps), and the console said "Ctrl-C at step 0" and "checkpoint: ... (step
    0)", Lightning's step, where every other line counts discovery steps."""
    ctrl_c_in_the_records(monkeypatch, step=2)
    last = tmp_path / "ckpt" / "last.ckpt"
    with pytest.raises(SystemExit), caplog.at_level("INFO"):  # Lightning's graceful shutdown after Ctrl-C
        run_discovery("best_of_n", 4, tmp_path, base_ckpt, tokenizer_path)
    assert f"Ctrl-C at step 2: saved {last}; resume with --ckpt_path {last}" in caplog.text
    saved = torch.load(last, weights_only=True)
    progress = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert saved["archive"]["step"] == progress["processed"] == 2  # the step's batch is done
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level("INFO"):
        resumed = run_discovery("best_of_n", 6, tmp_path, base_ckpt, tokenizer_path, last)
    log = [json.loads(line)["step"] for line in (tmp_path / "out" / "discovery_log.jsonl").read_text().splitlines()]
    assert resumed.archive.step == 6 and log == [1, 2, 3, 4, 5, 6]
    assert f"checkpoint: {last} (step 6)" in caplog.text


@pytest.mark.parametrize("mode", ["ttt", "best_of_n"])
def test_ctrl_c_in_the_last_step_leaves_the_run_finished(mode, base_ckpt, tokenizer_path, tmp_path, monkeypatch,
                                                        caplog):
    """The interrupt landed before the module's on_train_end (in mode ttt after the final checkpoint, in
    best_of_n at the last batch's end), so a run whose every step was done said "discovery stopped" and
    left result.json "finished": false, which no resume (nothing left to train) set right."""
    ctrl_c_in_the_records(monkeypatch, step=3)
    last = tmp_path / "ckpt" / "last.ckpt"
    with pytest.raises(SystemExit), caplog.at_level("INFO"):  # Lightning's graceful shutdown after Ctrl-C
        run_discovery(mode, 3, tmp_path, base_ckpt, tokenizer_path)
    assert "discovery finished at step 3" in caplog.text and "discovery stopped" not in caplog.text
    assert f"Ctrl-C at step 3: {last} holds it" in caplog.text
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    adapter = str(tmp_path / "out" / "adapters" / "step_000003.safetensors") if mode == "ttt" else None
    assert (result["steps"], result["finished"], result["adapter"]) == (3, True, adapter)
    assert torch.load(last, weights_only=True)["archive"]["step"] == 3


@pytest.mark.parametrize("mode", ["ttt", "best_of_n"])
def test_a_finished_run_resumed_with_no_step_left_keeps_its_results(mode, base_ckpt, tokenizer_path, tmp_path, caplog):
    """Lightning runs no on_train_end for a resume with nothing to train (mode ttt), and the run's start
    wrote result.json "finished": false with the adapter of the last multiple of adapter_every (step 2's,
    not the final step 3's)."""
    run_discovery(mode, 3, tmp_path, base_ckpt, tokenizer_path)
    finished = json.loads((tmp_path / "out" / "result.json").read_text())
    assert finished["finished"] and finished["steps"] == 3
    caplog.clear()
    with caplog.at_level("INFO"):
        run_discovery(mode, 3, tmp_path, base_ckpt, tokenizer_path, tmp_path / "ckpt" / "last.ckpt")
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == finished
    assert caplog.text.count("discovery finished at step 3") == 1


def test_a_resumed_best_of_n_run_keeps_its_tensorboard_steps(base_ckpt, tokenizer_path, tmp_path):
    """The resume purged from global_step + 1 = 1 (best_of_n never steps the optimizer): steps 1-2 were lost."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = {
        "seed_everything": 1,
        "trainer": {"accelerator": "cpu", "max_steps": 2, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "tb"), "name": "run"}},
                    "callbacks": [{"class_path": "llmkit.callbacks.Checkpoint"}]},
        "model": {"init_ckpt": str(base_ckpt), "tokenizer": str(tokenizer_path), "ttt": {**TOY, "mode": "best_of_n"},
                  "lora": {"rank": 4, "alpha": 8.0}},
    }
    (tmp_path / "ttt.yaml").write_text(yaml.safe_dump(config))
    assert main(["ttt", "fit", "--config", str(tmp_path / "ttt.yaml")]) == 0
    run = tmp_path / "tb" / "run" / "version_0"
    assert main(["ttt", "fit", "--config", str(tmp_path / "ttt.yaml"), "--trainer.max_steps", "3",
                 "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    assert (run / "resume_step_2_config.yaml").is_file()
    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("ttt/best_reward")] == [1, 2, 3]



def test_a_resumed_discovery_says_nothing_of_lightnings_resume_caveats(base_ckpt, tokenizer_path, tmp_path, recwarn):
    """Lightning warned that the data was not resumable (the starts come from the archive: it is) and printed
    a 13-line example about manual optimization (the state after step S is the one to save)."""
    config = {
        "seed_everything": 1,
        "trainer": {"accelerator": "cpu", "max_steps": 2, "enable_progress_bar": False, "logger": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "llmkit.callbacks.Checkpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 1,
                                                 "save_top_k": -1}}]},
        "model": {"init_ckpt": str(base_ckpt), "tokenizer": str(tokenizer_path), "ttt": {**TOY, "adapter_every": 1},
                  "lora": {"rank": 4, "alpha": 8.0}, "out_dir": str(tmp_path / "out")},
    }
    (tmp_path / "ttt.yaml").write_text(yaml.safe_dump(config))
    assert main(["ttt", "fit", "--config", str(tmp_path / "ttt.yaml"), "--trainer.max_steps", "3"]) == 0
    first, _, _ = read_lora(tmp_path / "out" / "adapters" / "step_000003.safetensors")
    assert main(["ttt", "fit", "--config", str(tmp_path / "ttt.yaml"), "--trainer.max_steps", "3",
                 "--ckpt_path", str(tmp_path / "ckpt" / "epoch=0-step=1.ckpt")]) == 0
    again, _, _ = read_lora(tmp_path / "out" / "adapters" / "step_000003.safetensors")
    assert all(torch.equal(first[name], again[name]) for name in first)  # exact
    log = [json.loads(line) for line in (tmp_path / "out" / "discovery_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]  # steps 2 and 3 once, from the resume
    said = [str(w.message) for w in recwarn]
    assert not [m for m in said if "not resumable" in m or "manual optimization" in m], said


def test_a_crashing_verifier_scores_zero_and_the_run_goes_on(base_ckpt, tokenizer_path, tmp_path):
    with pytest.warns(UserWarning, match=r"discovery step \d/2: best reward 0 .* 8/8 rollouts failed: every rollout "
                                         r"failed \(reward failed: RuntimeError: verifier crashed"):
        module = fit(base_ckpt, tokenizer_path, tmp_path, steps=2, env="tests.test_ttt.ThrowingEnv")
    assert module.global_step == 2
    log = [json.loads(line) for line in (tmp_path / "discovery_log.jsonl").read_text().splitlines()]
    assert [r["failures"] for r in log] == [8, 8] and all(r["r_max"] == 0.0 for r in log)
    reasons = [why for r in log for why in r["failure_reasons"]]
    assert "reward failed: RuntimeError: verifier crashed" in reasons
    assert all(why.startswith(("reward failed", "transition failed")) for why in reasons)
    assert json.loads((tmp_path / "result.json").read_text())["best_state_id"] == 0


def test_a_prompt_builder_that_fails_on_a_found_state_stops_the_run_in_one_line(base_ckpt, tokenizer_path, tmp_path):
    """context_from_archive reads states the model found: it raised a traceback out of training_step."""
    with pytest.raises(LLMKitError, match=r"^environment .*: context_from_archive failed on archive state [1-9]\d* "
                                          r"\(found at step 1\) with ValueError: cannot read .*; it must accept every "
                                          r"state its transition returns$"):
        fit(base_ckpt, tokenizer_path, tmp_path, steps=3, env="tests.lenient_env.StrictContextEnv", reuse=True)


@pytest.mark.parametrize(("env", "message"), [
    ({"env": "tests.lenient_env.FailingInitialStateEnv"},
     r"initial_state failed: RuntimeError: no initial construction"),  # a traceback
    ({"env": "tests.lenient_env.FailingInitialStateEnv", "env_args": {"target": "alpha", "mode": "hangs"},
      "reward_timeout_s": 1.0}, r"timed out after 1 s while running initial_state \(worker killed\)"),  # forever
    ({"env": "tests.lenient_env.NumberContextEnv"},  # a sentencepiece TypeError, result.json left unwritten
     r"context_from_archive returned int for archive state 0; it must return the prompt's text"),
])
def test_an_environment_whose_initial_state_or_prompt_fails_stops_the_run_in_one_line(env, message, base_ckpt,
                                                                                     tokenizer_path, tmp_path):
    with pytest.raises(LLMKitError, match=r"^environment .*: " + message + "$"):
        fit(base_ckpt, tokenizer_path, tmp_path, 1, **env)
    assert not (tmp_path / "archive.json").exists()


def test_the_reward_worker_runs_with_the_configured_memory(base_ckpt, tokenizer_path, tmp_path):
    module = fit(base_ckpt, tokenizer_path, tmp_path, steps=1, reward_memory_mb=512)
    assert [(w.memory_mb, w.pid) for w in module.workers] == [(512, None)]  # closed at teardown
    with pytest.raises(LLMKitError, match="ttt.reward_memory_mb must be >= 64"):
        TTTConfig(reward_memory_mb=8)


def test_several_reward_workers_score_a_step_as_one_does(base_ckpt, tokenizer_path, tmp_path):
    """All scoring went through one worker, one call at a time: 512 rollouts of a 1 s verifier took
    512 s a step. Each worker now takes a contiguous share of the rollouts, in a thread of its own."""
    class WorkerPids(L.Callback):
        pids: list = []

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            self.pids.append([w.pid for w in pl_module.workers])

    def run(out: Path, workers: int) -> list[dict]:
        L.seed_everything(0, verbose=False)
        module = TTTDiscoverModule(ttt={**TOY, "env": "tests.lenient_env.PrintableGuessEnv", "reward_workers": workers},
                                   lora={"rank": 4, "alpha": 8.0}, out_dir=str(out), init_ckpt=str(base_ckpt),
                                   tokenizer=str(tokenizer_path), optim={"lr": 1e-3})
        L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[WorkerPids()]).fit(module)
        return [json.loads(line) for line in (out / "discovery_log.jsonl").read_text().splitlines()]

    one = run(tmp_path / "one", 1)
    WorkerPids.pids = []
    three = run(tmp_path / "three", 3)
    assert all(len(set(pids)) == 3 and None not in pids for pids in WorkerPids.pids)  # every worker served
    for record in one + three:
        record.pop("adapter", None)  # in each run's own directory
    assert three == one  # the same rollouts, scored alike, in the same order


def test_ttt_then_consolidate_then_sdft_without_manual_steps(base_ckpt, tokenizer_path, tmp_path, capsys):
    """Consolidation: a discovery run's best states become SDFT examples, and SDFT trains on them."""
    fit(base_ckpt, tokenizer_path, tmp_path / "run", steps=3)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    out = tmp_path / "consolidated.jsonl"
    assert main(["consolidate", "--run", str(tmp_path / "run"), "--out", str(out), "--top", "2"]) == 0
    assert "SDFT examples from 1 run(s)" in capsys.readouterr().out
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["demonstration"] == result["best_state"] and lines[0]["reward"] == result["best_reward"]
    assert all(line["prompt"] == result["prompt"] and line["reward"] > result["initial_reward"] for line in lines)
    assert [line["reward"] for line in lines] == sorted((line["reward"] for line in lines), reverse=True)

    sdft = SDFTModule(init_ckpt=str(base_ckpt), tokenizer=str(tokenizer_path), sdft={"max_new_tokens": 8})
    run = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=[EMATeacher(decay=0.9)])
    run.fit(sdft, SDFTDataModule(str(out), batch_size=2))
    assert run.global_step == 2

    with pytest.raises(LLMKitError, match="no state in 1 run"):
        consolidate([tmp_path / "run"], min_reward=2.0)
    with pytest.raises(LLMKitError, match="does not exist"):
        consolidate([tmp_path / "nowhere"])


def test_a_discovery_checkpoint_loads_as_its_adapted_model(base_ckpt, tokenizer_path, tmp_path, capsys):
    """Its weights are the base's plus the adapter's lora_A / lora_B: generate, convert and init_ckpt failed on
    the adapter tensors ("weights do not match its config"); they read the model the run discovered with."""
    module = fit(base_ckpt, tokenizer_path, tmp_path / "run", steps=2)
    ckpt = tmp_path / "ttt.ckpt"
    module.trainer.save_checkpoint(ckpt)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 16))
    with torch.no_grad():
        adapted, base = module.model.eval()(tokens), load_backbone(base_ckpt)(tokens)
        merged = load_backbone(ckpt)(tokens)
    assert not torch.allclose(adapted, base, atol=1e-4)  # the run moved the adapter
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert main(["generate", "--ckpt", str(ckpt), "--tokenizer", str(tokenizer_path), "--prompt", "a",
                 "--max-new-tokens", "2"]) == 0
    adapter = next((tmp_path / "run" / "adapters").glob("step_*.safetensors"))
    capsys.readouterr()
    assert main(["lora", "merge", "--ckpt", str(ckpt), "--lora", str(adapter), "--out", str(tmp_path / "m.ckpt")]) == 1
    assert f"{ckpt} is a TTT-Discover checkpoint, which holds its adapter and is read with it merged" in \
        capsys.readouterr().err
    hf = tmp_path / "hf"  # --no-merge-lora would write the adapter beside weights that hold it already
    assert main(["convert", "to-hf", "--ckpt", str(ckpt), "--lora", str(adapter), "--no-merge-lora", "--out",
                 str(hf)]) == 1
    assert "is a TTT-Discover checkpoint" in capsys.readouterr().err and not hf.exists()


def test_two_rollouts_per_start_are_refused():
    with pytest.raises(LLMKitError, match="group_size must be >= 3"):
        TTTConfig(group_size=2)


@pytest.mark.parametrize(("setting", "message"), [
    ({"fixed_beta": -1.0}, "ttt.fixed_beta must be a finite number >= 0 (or null: the adaptive beta), got -1.0"),
    ({"fixed_beta": math.nan}, "ttt.fixed_beta must be a finite number >= 0"),
    ({"target_kl": 0.0}, "ttt.target_kl must be a finite number > 0, got 0.0"),
    ({"kl_lambda": -1.0}, "ttt.kl_lambda must be a finite number >= 0, got -1.0"),
    ({"puct_c": -1.0}, "ttt.puct_c must be a finite number >= 0, got -1.0"),
    ({"archive_size": 0}, "ttt.archive_size must be a finite number >= 1, got 0"),
    ({"children_per_parent": 0}, "ttt.children_per_parent must be a finite number >= 1, got 0"),
    ({"reward_timeout_s": 0.0}, "ttt.reward_timeout_s must be a finite number > 0, got 0.0"),
    ({"failure_reward": math.inf}, "ttt.failure_reward must be a finite number, got inf"),
    ({"max_new_tokens": 0}, "ttt.max_new_tokens must be >= 1, got 0"),  # was "max_new_tokens", no section
])
def test_a_bad_loop_setting_is_refused_when_the_config_is_built_naming_its_key(setting, message):
    """fixed_beta, target_kl and kl_lambda were found only after the model loaded and a step sampled."""
    with pytest.raises(LLMKitError, match=re.escape(message)):
        TTTConfig(**setting)


class NegativeEnv(PrintableGuessEnv):
    """The edit-distance reward less 100 (higher is better, every reward < 0); a rollout of odd length fails."""

    def transition(self, state: str, action: str) -> str:
        if len(action) % 2:
            raise ValueError("odd length")
        return super().transition(state, action)

    def reward(self, state: str) -> float:
        return super().reward(state) - 100.0


def test_failed_rollouts_score_failure_reward_which_must_stay_below_the_valid_ones(base_ckpt, tokenizer_path,
                                                                                   tmp_path, recwarn):
    """Failures scored 0: with negative rewards a failure beat every valid state and got the advantage."""
    module = fit(base_ckpt, tokenizer_path, tmp_path / "low", 1, env="tests.test_ttt.NegativeEnv",
                 failure_reward=-1000.0)
    log = json.loads((tmp_path / "low" / "discovery_log.jsonl").read_text())
    assert 0 < log["failures"] < 8 and -200 < log["r_max"] < 0  # a valid state's reward, not a failure's
    assert log["r_mean"] < -200  # failures count at -1000
    assert not [w for w in recwarn if "failure_reward" in str(w.message)]
    fit(base_ckpt, tokenizer_path, tmp_path / "default", 1, env="tests.test_ttt.NegativeEnv")
    warned = [str(w.message) for w in recwarn if "failure_reward" in str(w.message)]
    assert len(warned) == 1 and re.fullmatch(  # once, not for each such rollout
        rf"{re.escape(module.env.name)}: a valid state scored -\d+(\.\d+)?, below ttt.failure_reward 0, so failing "
        r"rollouts are favoured over it: set ttt.failure_reward at or below the environment's lowest reward",
        warned[0]), warned


def test_the_update_scores_actions_under_the_policy_that_sampled_them(base_ckpt, tokenizer_path):
    """At ttt.temperature 0.5, log pi_theta is that of softmax(logits / 0.5), the distribution the sampler drew
    from (the policy gradient and the KL shaping are wrong under any other)."""
    module = TTTDiscoverModule(ttt={**TOY, "temperature": 0.5}, lora={"rank": 4, "alpha": 8.0},
                               init_ckpt=str(base_ckpt), tokenizer=str(tokenizer_path))
    tok = module.tokenizer
    contexts = [tok.encode("alpha beta"), tok.encode("gamma")]
    sampled = generate(module.model.eval(), contexts, SamplingConfig(max_new_tokens=6, temperature=0.5, seed=0),
                       tok.eos_id, tok.pad_id)
    actions = [row[real].tolist() for row, real in zip(sampled.tokens, sampled.mask, strict=True)]
    logp, mask, logp_base = module.policy_logprobs(contexts, actions)
    width = mask.size(1)
    assert torch.allclose(logp[mask], sampled.logprobs[:, :width][mask], atol=1e-5)
    assert torch.allclose(logp_base, logp.detach(), atol=1e-6)  # LoRA B starts at zero: the base is the policy
    for temperature in (0.0, math.inf, math.nan):  # inf sampled uniformly; the message said "(0 = greedy)"
        with pytest.raises(LLMKitError, match=f"ttt.temperature must be a finite number > 0 .*got {temperature}"):
            TTTConfig(temperature=temperature)


def test_an_env_that_does_not_import_or_rejects_the_configs_env_args_says_what_to_set(base_ckpt, tokenizer_path):
    common = {"lora": {"rank": 4, "alpha": 8.0}, "init_ckpt": str(base_ckpt), "tokenizer": str(tokenizer_path)}
    with pytest.raises(LLMKitError, match=r"^ttt\.env: cannot import module 'mymod' .*directory is on PYTHONPATH"):
        TTTDiscoverModule(ttt={**TOY, "env": "mymod.MyEnv"}, **common)
    stale = r"^ttt\.env: could not build .*AutocorrelationEnv.* \(ttt\.env_args \{'target'.* may come from the config"
    with pytest.raises(LLMKitError, match=stale + r": when you change ttt\.env, set ttt\.env_args"):
        TTTDiscoverModule(ttt={**TOY, "env": "llmkit.discovery.envs.AutocorrelationEnv"}, **common)
    with pytest.raises(LLMKitError, match=r"^ttt\.env: could not build environment .*StringTargetEnv' with init_args "
                                          r"\{'target': 'alpha', 'metric': 'foo'\}: unknown metric 'foo': choose one"):
        TTTDiscoverModule(ttt={**TOY, "env_args": {**TOY["env_args"], "metric": "foo"}}, **common)


def test_a_single_file_is_accepted_where_a_list_of_files_is():
    from llmkit.callbacks import Replay
    from llmkit.eval import EvalConfig

    assert EvalConfig(ppl_files="data/val.bin").ppl_files == ["data/val.bin"]
    assert Replay(seed_files="old.jsonl").seed_files == ["old.jsonl"]


def test_a_lora_setting_given_alone_keeps_the_papers_other_adapter_settings(base_ckpt, tokenizer_path):
    """lora: {rank: 8} gave LoRAConfig's alpha 32, not the paper's 64 that no lora section gives."""
    module = TTTDiscoverModule(ttt=TOY, lora={"rank": 8}, init_ckpt=str(base_ckpt), tokenizer=str(tokenizer_path))
    assert (module.lora.rank, module.lora.alpha) == (8, 64.0) and module.hparams["lora"]["alpha"] == 64.0
    default = TTTDiscoverModule(ttt=TOY, init_ckpt=str(base_ckpt), tokenizer=str(tokenizer_path))
    assert (default.lora.rank, default.lora.alpha) == (32, 64.0)


def test_the_rollouts_seeds_travel_with_the_checkpoint(base_ckpt, tokenizer_path, tmp_path):
    """A resumed discovery samples the rollouts an uninterrupted one would, not the first steps' again."""
    module = fit(base_ckpt, tokenizer_path, tmp_path / "run", 2)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["sampling_seeds"] == {"base": module.seeds.base, "draws": 2}  # one draw per step
    fresh = TTTDiscoverModule(ttt=TOY, lora={"rank": 4, "alpha": 8.0}, init_ckpt=str(base_ckpt),
                              tokenizer=str(tokenizer_path))
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.seeds.next(0) == module.seeds.next(0)
    module.on_save_checkpoint(checkpoint)  # a step began sampling (the draw above) and was interrupted:
    assert checkpoint["sampling_seeds"]["draws"] == 2  # its resume samples that step's rollouts again


def test_an_update_that_leaves_the_adapter_non_finite_stops_the_run_in_one_line(base_ckpt, tokenizer_path, tmp_path,
                                                                                 monkeypatch):
    """It surfaced at the next step, as the sampler's "probability tensor contains either inf, nan"."""
    backward = TokenMeanAccumulator.backward

    def diverging(self, *args, **kwargs):
        stats = backward(self, *args, **kwargs)
        next(p for p in self.module.parameters() if p.requires_grad).data.fill_(math.inf)
        return stats

    monkeypatch.setattr(TokenMeanAccumulator, "backward", diverging)
    with pytest.raises(LLMKitError, match=r"the LoRA weights are not finite after discovery step 1 \(the update "
                                          r"diverged\): lower optim.lr \(now 0.001\)"):
        fit(base_ckpt, tokenizer_path, tmp_path, 2, env="tests.lenient_env.PrintableGuessEnv")


def test_an_update_that_diverges_saves_no_adapter_of_the_diverged_weights(base_ckpt, tokenizer_path, tmp_path,
                                                                          monkeypatch):
    """The stop after step 2's update diverged saved the inf weights as step 1's adapter."""
    backward = TokenMeanAccumulator.backward
    updates = []

    def diverging_at_step_2(self, *args, **kwargs):
        stats = backward(self, *args, **kwargs)
        updates.append(1)
        if len(updates) == 2:
            next(p for p in self.module.parameters() if p.requires_grad).data.fill_(math.inf)
        return stats

    monkeypatch.setattr(TokenMeanAccumulator, "backward", diverging_at_step_2)
    with pytest.raises(LLMKitError, match=r"not finite after discovery step 2"):
        fit(base_ckpt, tokenizer_path, tmp_path, 3, env="tests.lenient_env.PrintableGuessEnv")  # TOY saves
    # adapters every 2 steps: none at step 1
    assert not (tmp_path / "adapters").exists()
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["steps"], result["adapter"], result["finished"]) == (1, None, False)


def test_a_run_in_a_used_out_dir_drops_the_later_steps_log_and_adapters(base_ckpt, tokenizer_path, tmp_path):
    """discovery_log.jsonl was appended to: a rerun (or a resume from step 2 of 4) read 1,2,3,1."""
    fit(base_ckpt, tokenizer_path, tmp_path, 3)  # adapters at steps 2 (adapter_every) and 3 (the end)
    with (tmp_path / "discovery_log.jsonl").open("a") as f:
        f.write('{"step": 4, "problem": "str')  # a line a killed run left half-written
    fit(base_ckpt, tokenizer_path, tmp_path, 1)
    log = [json.loads(line) for line in (tmp_path / "discovery_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1]
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["step_000001.safetensors"]


def test_a_run_that_fails_before_its_first_step_leaves_no_earlier_results(base_ckpt, tokenizer_path, tmp_path):
    """The earlier run's result.json (finished, naming a deleted adapter) stayed, and consolidate took it."""
    fit(base_ckpt, tokenizer_path, tmp_path, 2)
    assert consolidate([tmp_path])  # the first run found something

    class FailsAtTheFirstStep(L.Callback):
        def on_train_batch_start(self, *args) -> None:
            raise RuntimeError("a bug in step 1")

    module = TTTDiscoverModule(ttt=TOY, lora={"rank": 4, "alpha": 8.0}, out_dir=str(tmp_path),
                               init_ckpt=str(base_ckpt), tokenizer=str(tokenizer_path), optim={"lr": 1e-3})
    with pytest.raises(RuntimeError, match="a bug in step 1"):
        L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[FailsAtTheFirstStep()]).fit(module)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["finished"] is False and result["adapter"] is None and result["best_state_id"] == 0
    assert len(json.loads((tmp_path / "archive.json").read_text())["states"]) == 1
    with pytest.raises(LLMKitError, match="no state in 1 run"):
        consolidate([tmp_path])


def test_ctrl_c_during_a_discovery_update_lands_after_the_step_is_recorded(base_ckpt, tokenizer_path, tmp_path,
                                                                           monkeypatch):
    """A Ctrl-C right after step 2's optimizer step (the real signal, as a user sends it) saved the
    updated weights beside the archive of step 1, and the step's discovery_log line was never written;
    the update, the archive and the step's records now land together."""
    ctrl_c_right_after_update(monkeypatch, step=2)
    L.seed_everything(0, verbose=False)
    module = TTTDiscoverModule(ttt=TOY, lora={"rank": 4, "alpha": 8.0}, out_dir=str(tmp_path),
                               init_ckpt=str(base_ckpt), tokenizer=str(tokenizer_path), optim={"lr": 1e-3})
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl-C
        L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[Checkpoint(dirpath=tmp_path / "ckpt")]).fit(module)
    log = [json.loads(line) for line in (tmp_path / "discovery_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == saved["archive"]["step"] == 2  # the weights are those of the archive's step
    monkeypatch.undo()
    resumed = TTTDiscoverModule(ttt=TOY, lora={"rank": 4, "alpha": 8.0}, out_dir=str(tmp_path),
                                init_ckpt=str(base_ckpt), tokenizer=str(tokenizer_path), optim={"lr": 1e-3})
    L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[Checkpoint(dirpath=tmp_path / "ckpt")]).fit(resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    log = [json.loads(line) for line in (tmp_path / "discovery_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and resumed.archive.step == 4


def test_an_interrupted_discovery_leaves_what_it_found(base_ckpt, tokenizer_path, tmp_path, caplog):
    """archive.json and result.json after every step, and the adapter on the interrupt: Ctrl-C after step 3,
    checkpointing off, loses nothing found or trained (adapter_every 2 kept step 2's adapter only)."""

    class CtrlC(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            if pl_module.archive.step == 3:
                raise KeyboardInterrupt

    L.seed_everything(1, verbose=False)
    module = TTTDiscoverModule(ttt=TOY, lora={"rank": 4, "alpha": 8.0}, out_dir=str(tmp_path),
                               init_ckpt=str(base_ckpt), tokenizer=str(tokenizer_path), optim={"lr": 1e-3})
    with pytest.raises(SystemExit), caplog.at_level("INFO"):  # Lightning's graceful shutdown after Ctrl-C
        L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[CtrlC()]).fit(module)
    # the console said only "discovery stopped at step 3", though nothing could resume the run
    assert "; no checkpoint to resume from (trainer.enable_checkpointing is off: docs/ttt.md)" in caplog.text
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["steps"], result["finished"]) == (3, False)
    assert result["adapter"] == str(tmp_path / "adapters" / "step_000003.safetensors")  # saved on the interrupt
    assert read_lora(result["adapter"])[0].keys() == {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert result["best_reward"] == module.archive.best().reward
    assert len(json.loads((tmp_path / "archive.json").read_text())["states"]) == len(module.archive)
    assert result["best_reward"] > result["initial_reward"]  # seed 1 finds states (as in the CLI run)
    assert consolidate([tmp_path])[0]["reward"] == result["best_reward"]  # consolidate takes the interrupted run
