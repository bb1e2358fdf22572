"""Checkpoints: never half-written, integrity-checked on every read, holding the final step, saved
on Ctrl-C/SIGTERM, and a `--ckpt_path` policy a Lightning user can predict."""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException

from llmkit.callbacks import AtomicCheckpointIO, Checkpoint, TokenThroughput
from llmkit.cli import main
from llmkit.data.datamodule import PackedDataModule
from llmkit.errors import LLMKitError
from llmkit.model.checkpoint import load_backbone, load_checkpoint_file
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.modules.pretrain import PretrainModule
from llmkit.optim import OptimConfig, WarmupCosine
from tests.conftest import VOCAB_SIZE

MODEL = {"vocab_size": VOCAB_SIZE, "n_layers": 2, "d_model": 32, "n_heads": 4, "d_ff": 64, "max_seq_len": 64,
         "n_streams": 2}


def write_config(tmp_path: Path, shards, max_steps: int = 3, every: int = 2) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
            "default_root_dir": str(tmp_path / "root"), "enable_progress_bar": False, "num_sanity_val_steps": 0,
            "limit_val_batches": 2, "enable_model_summary": False,
            "callbacks": [{"class_path": "llmkit.callbacks.Checkpoint",
                           "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": every}}],
        },
        "model": {"config": MODEL, "optim": {"lr": 1e-3, "warmup_steps": 1}},
        "data": {"train_files": [str(shards["train"])], "val_files": [str(shards["val"])], "seq_len": 32,
                 "batch_size": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    """`llmkit pretrain fit` for 3 steps, checkpointing every 2: last.ckpt must still hold step 3."""
    tmp = tmp_path_factory.mktemp("ckpt")
    assert main(["pretrain", "fit", "--config", str(write_config(tmp, shards))]) == 0
    return tmp / "ckpt" / "last.ckpt"


def step_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def test_the_final_step_is_saved_even_off_the_checkpoint_interval(trained):
    assert step_of(trained) == 3
    assert step_of(trained.parent / "epoch=0-step=2.ckpt") == 2
    assert not list(trained.parent.glob(".*tmp*"))  # no temp file left by the atomic writes


def test_validate_needs_only_the_checkpoint_and_scores_the_windows_its_run_scored(trained, shards, capsys,
                                                                                  monkeypatch):
    """The data settings not given come from the checkpoint's run (its files, seq_len 32, batch 4), not
    from the defaults (windows of the model's max_seq_len, 64, batches of 8): what validate logs
    into the run's curve is the loss the run measured. Given ones apply."""
    seen = []
    setup = PackedDataModule.setup
    monkeypatch.setattr(PackedDataModule, "setup", lambda self, stage: seen.append(
        (self.val_files, self.seq_len, self.batch_size)) or setup(self, stage))
    base = ["pretrain", "validate", "--ckpt_path", str(trained), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(trained.parent.parent / "val")]
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # which an earlier run in this process set
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(base) == 0
    assert "val/loss" in capsys.readouterr().out
    assert not [w for w in caught if "No seed found" in str(w.message)]  # the seed defaults to 0, quietly
    assert main([*base, "--data.batch_size", "2"]) == 0
    assert seen == [([str(shards["val"])], 32, 4), ([str(shards["val"])], 32, 2)]


def test_a_window_longer_than_the_model_is_one_clear_line(trained, shards, capsys):
    code = main(["pretrain", "validate", "--ckpt_path", str(trained), "--data.val_files", str(shards["val"]),
                 "--data.seq_len", "1024", "--trainer.logger", "false"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "data.seq_len 1024 is longer than the model's max_seq_len 64" in err


def test_an_architecture_override_that_contradicts_the_checkpoint_is_an_error(trained, shards, tmp_path, capsys):
    base = ["pretrain", "validate", "--ckpt_path", str(trained), "--data.val_files", str(shards["val"]),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path)]
    assert main([*base, "--model.config.d_model", "64"]) == 1
    err = capsys.readouterr().err
    assert f"model.config.d_model: the checkpoint {trained} was trained with 32 but the config asks for 64" in err
    assert "drop that setting or pass --model.config.d_model 32" in err
    assert main([*base, "--model.config.d_model", "32"]) == 0  # the flag the error suggests is accepted
    other = tmp_path / "120m.yaml"
    other.write_text(yaml.safe_dump({**MODEL, "n_layers": 12, "d_model": 768, "n_heads": 12}))
    assert main([*base, "--model.config", str(other)]) == 1  # a whole model YAML of another size
    assert "model.config.d_model: the checkpoint" in capsys.readouterr().err
    # how to run is not what was trained: these apply
    assert main([*base, "--model.config.gradient_checkpointing", "true", "--model.config.n_layers", "2"]) == 0


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_missing_checkpoint_is_one_line_for_fit_and_validate(command, shards, tmp_path, capsys):
    missing = tmp_path / "nope.ckpt"
    code = main(["pretrain", command, "--config", str(write_config(tmp_path, shards)), "--ckpt_path", str(missing)])
    err = capsys.readouterr().err
    assert code == 1 and err == f"llmkit: error: checkpoint {missing} does not exist: check the path " \
                                "(ckpt_path, init_ckpt or --ckpt)\n"


def test_a_checkpoint_that_lightning_did_not_write_is_one_line(shards, tmp_path, capsys):
    """A torch.save'd dict (no Lightning version) is neither resumed nor validated."""
    other = tmp_path / "weights.ckpt"
    torch.save({"model": {"w": torch.zeros(2)}}, other)
    code = main(["pretrain", "validate", "--ckpt_path", str(other), "--data.val_files", str(shards["val"]),
                 "--model.config.vocab_size", str(VOCAB_SIZE)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert f"{other} is not a Lightning training checkpoint (it has no pytorch-lightning_version)" in err


def damaged_copies(source: Path, tmp_path: Path) -> dict[str, Path]:
    data = source.read_bytes()
    copies = {"empty": b"", "truncated": data[: len(data) // 2], "random": bytes(range(256)) * 64,
              "zeroed": data[: len(data) // 2] + bytes(65536) + data[len(data) // 2 + 65536:]}
    paths = {}
    for name, content in copies.items():
        paths[name] = tmp_path / f"{name}.ckpt"
        paths[name].write_bytes(content)
    return paths


@pytest.mark.parametrize("damage, message", [
    ("empty", "the file is empty"), ("truncated", "not a complete checkpoint archive"),
    ("random", "not a complete checkpoint archive"), ("zeroed", "fails the CRC check, the file is damaged"),
])
def test_a_damaged_checkpoint_is_refused_by_every_reader(damage, message, trained, shards, tmp_path, capsys):
    path = damaged_copies(trained, tmp_path)[damage]
    with pytest.raises(LLMKitError, match=message):
        load_checkpoint_file(path)
    with pytest.raises(LLMKitError, match=message):
        AtomicCheckpointIO().load_checkpoint(path)  # what the Trainer resumes through
    assert main(["pretrain", "fit", "--config", str(write_config(tmp_path, shards, max_steps=5)),
                 "--ckpt_path", str(path)]) == 1
    assert main(["generate", "--ckpt", str(path), "--tokenizer", "x.model", "--prompt", "x"]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(f"cannot read checkpoint {path}: " in e and message in e for e in errors)


def test_a_checkpoint_read_twice_is_checked_once_unless_it_changed(trained, tmp_path, monkeypatch):
    """init_ckpt's config, then its weights: one CRC pass over an unchanged file; a file rewritten
    in between (damaged, here) is checked again and refused."""
    import zipfile

    path = tmp_path / "init.ckpt"
    path.write_bytes(trained.read_bytes())
    passes = []
    real_testzip = zipfile.ZipFile.testzip
    monkeypatch.setattr(zipfile.ZipFile, "testzip", lambda self: passes.append(1) or real_testzip(self))
    first = load_checkpoint_file(path, weights=False)
    second = load_checkpoint_file(path)
    assert len(passes) == 1 and first.keys() == second.keys()
    path.write_bytes(damaged_copies(trained, tmp_path)["zeroed"].read_bytes())
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1))  # a new mtime even on a coarse clock
    with pytest.raises(LLMKitError, match="fails the CRC check"):
        load_checkpoint_file(path)
    assert len(passes) == 2


def test_a_crash_while_writing_leaves_the_previous_checkpoint_whole(trained, tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    target.write_bytes(trained.read_bytes())

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, target)
    assert target.read_bytes() == trained.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


class Interrupt(L.Callback):
    """Raises ``exception`` after optimizer step ``at``, as Lightning does for Ctrl-C (KeyboardInterrupt)
    and for SIGTERM (SIGTERMException)."""

    def __init__(self, at: int, exception: BaseException) -> None:
        self.at, self.exception = at, exception

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at:
            raise self.exception


def fit(tmp_path: Path, shards, max_steps: int, callbacks: list, ckpt_path: Path | None = None) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    module = PretrainModule(ModelConfig(**MODEL), OptimConfig(lr=1e-3, warmup_steps=1))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                        callbacks=[Checkpoint(dirpath=tmp_path, every_n_train_steps=100), *callbacks])
    data = PackedDataModule(train_files=[str(shards["train"])], seq_len=32, batch_size=4, vocab_size=VOCAB_SIZE)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("exception", [KeyboardInterrupt(), SIGTERMException()])
def test_ctrl_c_and_sigterm_save_a_checkpoint_that_resumes(exception, shards, tmp_path):
    if isinstance(exception, KeyboardInterrupt):
        with pytest.raises(SystemExit):  # Lightning's graceful Ctrl-C ends with exit status 1
            fit(tmp_path, shards, 6, [Interrupt(2, exception)])
    else:
        with pytest.raises(SIGTERMException):
            fit(tmp_path, shards, 6, [Interrupt(2, exception)])
    assert step_of(tmp_path / "last.ckpt") == 2
    resumed = fit(tmp_path / "resumed", shards, 6, [], ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 6


def with_scalar_alphas(ckpt: dict) -> dict:
    """``ckpt`` as llmkit wrote it while the mHC alphas were 0-d (before FSDP's refusal of scalar
    parameters made them [1]): the alphas and their AdamW moments 0-d."""
    for name, value in ckpt["state_dict"].items():
        if name.rpartition(".")[2].startswith("alpha_"):
            ckpt["state_dict"][name] = value.reshape(())
    for optimizer in ckpt["optimizer_states"]:
        for state in optimizer["state"].values():  # by index: the alphas' are the one-element moments
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = state[key].reshape(()) if state[key].numel() == 1 else state[key]
    return ckpt


def test_a_run_saved_with_scalar_alphas_resumes_and_loads(shards, tmp_path):
    fit(tmp_path, shards, 2, [])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    old = tmp_path / "old.ckpt"
    torch.save(with_scalar_alphas(torch.load(tmp_path / "last.ckpt", weights_only=True)), old)
    assert load_backbone(old).state_dict()["blocks.0.attn_res.mapping.alpha_res"].shape == (1,)
    weights = {k.removeprefix("model."): v for k, v in torch.load(old, weights_only=True)["state_dict"].items()}
    Transformer(ModelConfig(**MODEL)).load_state_dict(weights)  # the model's own load takes 0-d alphas too
    resumed = fit(tmp_path / "resumed", shards, 4, [], ckpt_path=old)  # foreach AdamW: 0-d moments would not step
    assert resumed.global_step == 4
    alpha = resumed.lightning_module.model.blocks[0].attn_res.mapping.alpha_res
    before = saved["state_dict"]["model.blocks.0.attn_res.mapping.alpha_res"]
    assert alpha.shape == (1,) and not torch.equal(alpha.detach(), before)


def test_a_failure_does_not_overwrite_the_last_good_checkpoint(shards, tmp_path):
    fit(tmp_path, shards, 2, [])
    with pytest.raises(LLMKitError, match="boom"):
        fit(tmp_path, shards, 6, [Interrupt(3, LLMKitError("boom"))], ckpt_path=tmp_path / "last.ckpt")
    assert step_of(tmp_path / "last.ckpt") == 2


def test_sdft_validate_applies_evaluation_overrides_and_needs_no_init_ckpt(sdft_run, tmp_path, capsys):
    ckpt, config, other_probes = sdft_run
    assert main(["sdft", "validate", "--config", str(config), "--ckpt_path", str(ckpt),
                 "--model.init_ckpt", str(tmp_path / "moved_away.ckpt"),
                 "--model.evaluation.probes", str(other_probes), "--model.evaluation.max_windows", "3",
                 "--trainer.default_root_dir", str(tmp_path / "val")]) == 0
    report = json.loads(next((tmp_path / "val").rglob("validate_step_*.json")).read_text())
    assert [r["name"] for r in report["probes"]["results"]] == ["other-0", "other-1"]
    assert report["perplexity"]["windows"] == 3


@pytest.fixture
def sdft_run(shards, tokenizer_path, tmp_path) -> tuple[Path, Path, Path]:
    """A 2-step SDFT run from a random base, and a second probe file."""
    torch.manual_seed(0)
    base = tmp_path / "base.ckpt"
    module = PretrainModule(ModelConfig(**{**MODEL, "max_seq_len": 256}))  # room for the teacher's template
    module.configure_model()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": module.config.to_dict()}}, base)
    examples = tmp_path / "ex.jsonl"
    examples.write_text("".join(json.dumps({"prompt": f"def f{i}(", "demonstration": "x)"}) + "\n" for i in range(4)))
    probes = tmp_path / "probes.jsonl"
    other = tmp_path / "other.jsonl"
    for path, prefix in ((probes, "probe"), (other, "other")):
        path.write_text("".join(json.dumps({"name": f"{prefix}-{i}", "prompt": "def ", "expect_substring": "("}) + "\n"
                                for i in range(2)))
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 2, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "llmkit.callbacks.Checkpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt")}}]},
        "model": {"init_ckpt": str(base), "tokenizer": str(tokenizer_path), "sdft": {"max_new_tokens": 4},
                  "evaluation": {"ppl_files": [str(shards["val"])], "probes": str(probes), "seq_len": 32,
                                 "max_windows": 8, "max_new_tokens": 4}},
        "data": {"train_files": [str(examples)], "val_files": [str(examples)], "batch_size": 2},
    }
    path = tmp_path / "sdft.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["sdft", "fit", "--config", str(path)]) == 0
    return tmp_path / "ckpt" / "last.ckpt", path, other


def test_a_resumed_run_with_more_steps_follows_the_longer_schedule(shards, tmp_path):
    """The warm-up + cosine is sized for the run that is going on, not restored from the checkpoint."""
    first = fit(tmp_path, shards, 4, [])
    assert first.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1)  # the floor of a 4-step run
    resumed = fit(tmp_path / "longer", shards, 8, [], ckpt_path=tmp_path / "last.ckpt")
    expected = WarmupCosine(warmup_steps=1, decay_steps=8, min_ratio=0.1)
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * expected(8))
    scheduler = resumed.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 8 and scheduler.lr_lambdas[0](6) == pytest.approx(expected(6))


def test_resuming_with_max_steps_already_reached_says_there_is_nothing_to_train(trained, shards, tmp_path):
    config = str(write_config(tmp_path, shards, max_steps=3))
    with pytest.warns(UserWarning, match=f"{trained} is at step 3 and trainer.max_steps is 3: this fit has nothing "
                                         "to train; raise trainer.max_steps to continue the run"):
        assert main(["pretrain", "fit", "--config", config, "--ckpt_path", str(trained)]) == 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*nothing to train")
        assert main(["pretrain", "fit", "--config", config, "--ckpt_path", str(trained),
                     "--trainer.max_steps", "4"]) == 0
    assert step_of(tmp_path / "ckpt" / "last.ckpt") == 4


def test_throughput_totals_continue_across_a_resume(shards, tmp_path):
    """train/batches, samples, lengths and time carry on from the checkpoint instead of restarting at 0."""
    first = TokenThroughput()
    fit(tmp_path, shards, 3, [first])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("TokenThroughput")]
    assert (state["batches"], state["samples"], state["lengths"]) == (3, 3 * 4, 3 * 4 * 32) and state["time"] > 0
    resumed = TokenThroughput()
    fit(tmp_path / "resumed", shards, 5, [resumed], ckpt_path=tmp_path / "last.ckpt")
    after = resumed.state_dict()
    assert (after["batches"], after["samples"]) == (5, 5 * 4) and after["time"] > state["time"]


def write_tensorboard_config(tmp_path: Path, shards, max_steps: int) -> Path:
    """:func:`write_config` logging to the TensorBoard run TMP/tb/run/version_N, its checkpoints inside it."""
    config = yaml.safe_load(write_config(tmp_path, shards, max_steps=max_steps).read_text())
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                   "init_args": {"save_dir": str(tmp_path / "tb"), "name": "run",
                                                 "default_hp_metric": False}}
    del config["trainer"]["callbacks"][0]["init_args"]["dirpath"]
    path = tmp_path / "tb.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_run_refused_before_its_first_step_leaves_no_log_directories(shards, tmp_path):
    """Its version_N was removed but the SAVE_DIR/NAME it had created stayed, empty."""
    config = str(write_tensorboard_config(tmp_path, shards, 3))
    assert main(["pretrain", "fit", "--config", config, "--data.train_files", str(tmp_path / "missing.bin")]) == 1
    assert not (tmp_path / "tb").exists()
    (tmp_path / "tb" / "other").mkdir(parents=True)  # a save_dir in use: only the run's own directories go
    assert main(["pretrain", "fit", "--config", config, "--data.train_files", str(tmp_path / "missing.bin")]) == 1
    assert [p.name for p in (tmp_path / "tb").iterdir()] == ["other"]


def test_a_run_logged_under_a_relative_save_dir_keeps_its_checkpoint_records_without_its_config(
        shards, tmp_path, monkeypatch, recwarn):
    """The README's `sdft validate --ckpt_path lightning_logs/...` with no --config: the run's
    Checkpoint had stored its directory relative (the logger's save_dir as written), the validate
    logs into the run by its absolute path, and Lightning dropped the top-k and last-file records
    with a warning; a resume likewise forgot last.ckpt and the file it keeps."""
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(write_tensorboard_config(tmp_path, shards, 2).read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = "tb"
    config["trainer"]["callbacks"] = [{"class_path": "llmkit.callbacks.Checkpoint"}]  # what a run without one gets
    (tmp_path / "relative.yaml").write_text(yaml.safe_dump(config))
    assert main(["pretrain", "fit", "--config", "relative.yaml"]) == 0
    last = Path("tb", "run", "version_0", "checkpoints", "last.ckpt")
    assert main(["pretrain", "validate", "--ckpt_path", str(last), "--trainer.enable_progress_bar", "false"]) == 0
    assert main(["pretrain", "fit", "--ckpt_path", str(last), "--trainer.max_steps", "4",
                 "--trainer.enable_progress_bar", "false"]) == 0
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]  # step 2's went
    records = torch.load(last, weights_only=True)["callbacks"]
    (state,) = [v for k, v in records.items() if k.startswith("Checkpoint")]
    assert state["dirpath"] == str(tmp_path / last.parent)
    assert (state["best_model_path"], state["last_model_path"]) == (
        str(tmp_path / last.parent / "epoch=0-step=4.ckpt"), str(tmp_path / last))


@pytest.mark.parametrize("config_given", [True, False])
def test_validate_logs_into_the_run_of_its_checkpoint_at_its_step(config_given, shards, tmp_path, caplog):
    """With the run's config (its TensorBoardLogger), or with none (Lightning's default logger)."""
    assert main(["pretrain", "fit", "--config", str(write_tensorboard_config(tmp_path, shards, 3))]) == 0
    run = tmp_path / "tb" / "run" / "version_0"
    given = ["--config", str(tmp_path / "tb.yaml")] if config_given else ["--trainer.enable_progress_bar", "false"]
    with caplog.at_level("INFO"):
        assert main(["pretrain", "validate", *given, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    assert f"logs: {run}" in caplog.text
    assert sorted(p.name for p in (tmp_path / "tb" / "run").iterdir()) == ["version_0"]  # no version_1
    assert (run / "config.yaml").is_file() and (run / "validate_config.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("val/loss")] == [3]  # the checkpoint's step, not 0


def test_a_run_validates_and_resumes_with_the_config_yaml_it_saved(shards, tmp_path):
    """The run's config.yaml writes null for n_kv_heads and head_dim, which the model config
    derives and the checkpoint holds: both commands were refused ("trained with 4 but the config
    asks for None"), though the CLI itself advises that file for a resume."""
    assert main(["pretrain", "fit", "--config", str(write_tensorboard_config(tmp_path, shards, 2))]) == 0
    run = tmp_path / "tb" / "run" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]["config"]
    assert saved["n_kv_heads"] is None and saved["head_dim"] is None
    last = str(run / "checkpoints" / "last.ckpt")
    assert main(["pretrain", "validate", "--config", str(run / "config.yaml"), "--ckpt_path", last]) == 0
    assert main(["pretrain", "fit", "--config", str(run / "config.yaml"), "--ckpt_path", last,
                 "--trainer.max_steps", "3"]) == 0
    assert step_of(run / "checkpoints" / "last.ckpt") == 3


def test_a_run_that_stops_on_bad_input_before_its_first_step_leaves_no_version_directory(shards, tmp_path,
                                                                                         capsys):
    """The corrected run is version_0, where the paths the user wrote down point; a failed
    validation of an existing run leaves that run alone."""
    base = ["pretrain", "fit", "--config", str(write_tensorboard_config(tmp_path, shards, 1))]
    assert main([*base, "--data.train_files", str(tmp_path / "missing.bin")]) == 1
    assert "data.train_files" in capsys.readouterr().err
    assert not (tmp_path / "tb" / "run").exists() or not any((tmp_path / "tb" / "run").iterdir())
    assert main(base) == 0
    run = tmp_path / "tb" / "run" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert main(["pretrain", "validate", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                 "--data.val_files", str(tmp_path / "missing.bin")]) == 1
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()


def test_a_module_refuses_a_checkpoint_another_module_wrote_in_plain_lightning_too(sdft_run, shards, tmp_path):
    """Trainer.fit(ckpt_path=...) without the CLI: one line before the weights meet the wrong module."""
    ckpt, _, _ = sdft_run
    with pytest.raises(LLMKitError, match=r"^this checkpoint was written by SDFTModule, not PretrainModule: resume "
                                          r"or load it with SDFTModule, or give it to PretrainModule as init_ckpt"):
        fit(tmp_path / "wrong", shards, 3, [], ckpt_path=ckpt)


def test_a_validation_after_fit_in_the_same_process_is_logged_at_the_step_fit_ended(shards, tmp_path):
    """Not at 0 (the step of no loaded checkpoint), where scaling fits would read a stale loss."""
    trainer = fit(tmp_path, shards, 3, [])
    data = PackedDataModule(val_files=[str(shards["val"])], seq_len=32, batch_size=4, vocab_size=VOCAB_SIZE)
    (metrics,) = trainer.validate(trainer.lightning_module, datamodule=data, verbose=False)
    assert metrics["step"] == 3


def test_the_progress_bar_counts_to_max_steps_after_a_resume():
    from types import SimpleNamespace

    from llmkit.callbacks.console import TQDMStepProgressBar

    bar = TQDMStepProgressBar()
    progress = SimpleNamespace(current=SimpleNamespace(ready=30))
    bar._trainer = SimpleNamespace(max_steps=40, global_step=30, max_epochs=-1, num_training_batches=400,
                                   accumulate_grad_batches=1, fit_loop=SimpleNamespace(
                                       epoch_loop=SimpleNamespace(batch_progress=progress),
                                       epoch_progress=SimpleNamespace(current=SimpleNamespace(ready=1, started=1)),
                                       _should_accumulate=lambda: False))
    assert bar.total_train_batches == 40  # Lightning's says 10, while the batch index runs 31..40
    bar._trainer.max_steps = 1000
    assert bar.total_train_batches == 400  # the epoch ends first


def fit_with_bar(shards, callbacks: list, ckpt_path: Path | None = None, **trainer_args) -> None:
    """A short pretraining fit whose callbacks (a progress bar among them) watch the bar."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=callbacks, **trainer_args)
    data = PackedDataModule(train_files=[str(shards["train"])], seq_len=32, batch_size=4, vocab_size=VOCAB_SIZE)
    trainer.fit(PretrainModule(ModelConfig(**MODEL), OptimConfig(lr=1e-3, warmup_steps=1)), datamodule=data,
                ckpt_path=ckpt_path)


def test_the_progress_bar_total_holds_still_between_the_micro_batches_of_a_step(shards):
    """It counted the micro-batches begun in the step under way twice (3 steps of 2: totals 7, 6, 7, 6, 7, 6), so
    the bar of a run resumed between them, which takes its total at the epoch's start, ended short of it."""
    from llmkit.callbacks.console import TQDMStepProgressBar

    totals = []

    class RecordTotal(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            totals.append(bar.total_train_batches)

    bar = TQDMStepProgressBar()
    fit_with_bar(shards, [bar, RecordTotal()], max_steps=3, accumulate_grad_batches=2, enable_checkpointing=False)
    assert totals == [6] * 6


def test_the_progress_bar_of_a_later_epoch_counts_to_the_run_s_last_step(shards):
    """At an epoch's start the epoch loop's counters still hold the previous epoch's batches, all of them:
    the bar of the last epoch of a run bounded by steps counted to a full epoch (SDFT's demo run ended at
    "1/5")."""
    from llmkit.callbacks.console import TQDMStepProgressBar

    totals = []

    class RecordTotal(L.Callback):
        def on_train_epoch_start(self, trainer, *args) -> None:
            totals.append(bar.total_train_batches)

    bar = TQDMStepProgressBar()
    fit_with_bar(shards, [bar, RecordTotal()], max_steps=7, limit_train_batches=3, enable_checkpointing=False)
    assert totals == [3, 3, 1]


def test_the_tqdm_bar_of_a_run_resumed_mid_epoch_has_its_total(shards, tmp_path):
    """Lightning runs no on_train_epoch_start on a resume mid-epoch, where its tqdm bar takes its total:
    the resumed epoch counted without one (4/?, no ETA)."""
    from llmkit.callbacks.console import TQDMStepProgressBar

    def run(steps: int, ckpt_path: Path | None = None) -> list[tuple[int, int | None, str]]:
        bar, seen = TQDMStepProgressBar(), []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, *args) -> None:
                seen.append((bar.train_progress_bar.n, bar.train_progress_bar.total, bar.train_progress_bar.desc))

        fit_with_bar(shards, [bar, Record(), Checkpoint(dirpath=tmp_path)], ckpt_path, max_steps=steps,
                     limit_train_batches=5)
        return seen

    assert run(3) == [(1, 3, "Epoch 0: "), (2, 3, "Epoch 0: "), (3, 3, "Epoch 0: ")]
    assert run(7, tmp_path / "last.ckpt") == [(4, 5, "Epoch 0: "), (5, 5, "Epoch 0: "), (1, 2, "Epoch 1: "),
                                              (2, 2, "Epoch 1: ")]


def test_the_step_counting_bar_keeps_the_settings_of_the_bar_it_replaces():
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme

    from llmkit.callbacks.console import RichStepProgressBar, TQDMStepProgressBar, step_progress_bar

    bar = step_progress_bar(RichProgressBar(refresh_rate=7, leave=True, console_kwargs={"width": 90}))
    assert isinstance(bar, RichStepProgressBar) and (bar.refresh_rate, bar._leave, bar._console_kwargs) == (
        7, True, {"width": 90})
    assert f"{3e-4:{bar.theme.metrics_format}}" == "0.0003"  # Lightning's default ".3f" shows 0.000
    assert step_progress_bar(RichProgressBar(theme=RichProgressBarTheme(metrics_format=".2e"))).theme.metrics_format \
        == ".2e"
    bar = step_progress_bar(TQDMProgressBar(refresh_rate=3, process_position=1, leave=True))
    assert isinstance(bar, TQDMStepProgressBar) and (bar.refresh_rate, bar.process_position, bar._leave) == (3, 1, True)


def test_a_checkpoint_of_another_module_says_which_command_reads_it(sdft_run, trained, tmp_path, capsys):
    ckpt, config, _ = sdft_run
    examples = str(ckpt.parent.parent / "ex.jsonl")
    assert main(["sft", "validate", "--ckpt_path", str(ckpt), "--data.val_files", examples]) == 1
    assert capsys.readouterr().err == (f"llmkit: error: {ckpt} was written by SDFTModule, not SFTModule: use it with "
                                       "`llmkit sdft validate` (or as model.init_ckpt to fine-tune from it)\n")
    assert main(["sdft", "fit", "--config", str(config), "--ckpt_path", str(trained)]) == 1
    assert "was written by PretrainModule, not SDFTModule: use it with `llmkit pretrain fit`" in capsys.readouterr().err


@pytest.mark.parametrize("config_given", [True, False])
def test_a_resumed_fit_continues_the_run_of_its_checkpoint(config_given, shards, tmp_path, caplog, recwarn):
    """With the run's config or none: one TensorBoard run whose curves continue. The first run went past
    its step-2 checkpoint to step 4; the resume hides what it logged after step 2 (trained again) and
    keeps a validation of the checkpoint (logged at 2); the resume's config goes beside the run's."""
    config = yaml.safe_load(write_tensorboard_config(tmp_path, shards, 4).read_text())
    config["trainer"]["callbacks"][0]["init_args"]["save_top_k"] = -1  # keep the step-2 checkpoint
    (tmp_path / "tb.yaml").write_text(yaml.safe_dump(config))
    every_step = ["--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "2"]
    assert main(["pretrain", "fit", "--config", str(tmp_path / "tb.yaml"), *every_step]) == 0
    run = tmp_path / "tb" / "run" / "version_0"
    step_2 = str(run / "checkpoints" / "epoch=0-step=2.ckpt")
    first_config = (run / "config.yaml").read_text()
    given = ["--config", str(tmp_path / "tb.yaml")] if config_given else ["--trainer.enable_progress_bar", "false"]
    assert main(["pretrain", "validate", *given, "--ckpt_path", step_2]) == 0
    with caplog.at_level("INFO"):
        assert main(["pretrain", "fit", *given, *every_step, "--trainer.max_steps", "6", "--ckpt_path", step_2]) == 0
    assert f"logs: {run}" in caplog.text
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]  # it holds the run continued
    without_config = [str(w.message) for w in recwarn if "resuming without --config" in str(w.message)]
    assert without_config == ([] if config_given else [
        "resuming without --config: the trainer runs with Lightning's defaults (seed, callbacks, gradient clipping, "
        f"validation), not the run's; add --config {run / 'config.yaml'} to continue it as it ran"])
    assert sorted(p.name for p in (tmp_path / "tb" / "run").iterdir()) == ["version_0"]  # no version_1
    assert (run / "config.yaml").read_text() == first_config
    assert "max_steps: 6" in (run / "resume_step_2_config.yaml").read_text()
    # without the config's Checkpoint too (Lightning's default ModelCheckpoint left last.ckpt at step 4 and
    # saved nothing on Ctrl-C)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    resumed = yaml.safe_load((run / "resume_step_2_config.yaml").read_text())["trainer"]["logger"]["init_args"]
    assert resumed["version"] == 0  # not "version_0", which the progress bar showed as v_num "on_0"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    # train/loss at x logs batch x + 1: the first run's 2 (its third batch) stays beside the resume's, its 3 goes
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 2, 3, 4, 5]
    # sorted: TensorBoard reads a run's files in name order, and two that one process opens in the same second
    # are ordered by a counter compared as text (the validate's ".9" after the resume's ".10")
    assert sorted(e.step for e in events.Scalars("val/loss")) == [1, 2, 3, 5]  # fit's at 1 and 3 (Lightning's
    # x) and the validate's at 2; a resume with nothing to train hides nothing
    assert main(["pretrain", "fit", *given, "--trainer.max_steps", "2", "--ckpt_path", step_2]) == 0
    events = EventAccumulator(str(run))
    events.Reload()
    assert sorted(e.step for e in events.Scalars("val/loss")) == [1, 2, 3, 5]

def test_a_refused_resume_leaves_the_run_it_would_continue_as_it_was(shards, tmp_path, monkeypatch):
    """Its events file (whose purge_step would hide the run's last steps) and config are removed.
    TensorBoard's writer creates its file from a background thread at its first write; that write
    is delayed here, as on a busy machine, so the file appears only when the logger is flushed."""
    from tensorboard.summary.writer.record_writer import RecordWriter

    assert main(["pretrain", "fit", "--config", str(write_tensorboard_config(tmp_path, shards, 4)),
                 "--trainer.log_every_n_steps", "1"]) == 0
    run = tmp_path / "tb" / "run" / "version_0"
    before = sorted(p.name for p in run.iterdir())
    write = RecordWriter.write
    monkeypatch.setattr(RecordWriter, "write", lambda self, data: (time.sleep(0.5), write(self, data)))
    assert main(["pretrain", "fit", "--config", str(tmp_path / "tb.yaml"), "--trainer.max_steps", "6",
                 "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                 "--data.train_files", str(tmp_path / "missing.bin")]) == 1
    assert sorted(p.name for p in run.iterdir()) == before
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3]


class CtrlCInStep3(L.Callback):
    """Ctrl-C inside the third batch's step, after its forward, before its backward: the last point at
    which an interrupt lands at once (from the backward on it waits for the batch's end)."""

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step == 2:
            raise KeyboardInterrupt


def losses(root: Path, tag: str = "train/loss") -> list[tuple[int, float]]:
    """The ``tag`` curve of the TensorBoard run of :func:`write_tensorboard_config` under ``root``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "tb" / "run" / "version_0"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def straight_and_resumed(shards, tmp_path: Path, interrupt: str, every_n_train_steps: int | None = 100,
                         stop: int = 2, accumulate: int = 1, max_steps: int = 6, val_every: int = 2,
                         extra: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Two ``max_steps`` runs validating every ``val_every`` batches, as the configs count them
    (across epochs), with ``accumulate`` batches a step and the options ``extra``: one straight, one
    stopped by the callback ``interrupt`` (Ctrl-C) at step ``stop`` and resumed from its last.ckpt,
    saved every ``every_n_train_steps`` (by default only the interrupt saves; None: after every
    validation). An ``interrupt`` that is a :class:`Checkpoint` takes the place of the config's.
    Their roots, for :func:`losses`."""
    every = ["--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", str(val_every),
             "--trainer.check_val_every_n_epoch", "null", "--trainer.accumulate_grad_batches", str(accumulate),
             *extra]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    interrupt_path = f"tests.test_checkpoints.{interrupt}"
    replaces_checkpoint = issubclass(globals()[interrupt], Checkpoint)
    for root in (straight, interrupted):
        root.mkdir()
        config = yaml.safe_load(write_tensorboard_config(root, shards, max_steps).read_text())
        config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = every_n_train_steps
        if root == interrupted and replaces_checkpoint:
            config["trainer"]["callbacks"][0]["class_path"] = interrupt_path
        (root / "tb.yaml").write_text(yaml.safe_dump(config))
    assert main(["pretrain", "fit", "--config", str(straight / "tb.yaml"), *every]) == 0
    config = str(interrupted / "tb.yaml")
    try:
        code = main(["pretrain", "fit", "--config", config, *every,
                     *([] if replaces_checkpoint else [f"--trainer.callbacks+={interrupt_path}"])])
    except SystemExit as shutdown:  # Lightning's graceful shutdown after Ctrl-C
        code = shutdown.code
    assert code == (143 if "SIGTERM" in interrupt else 1)
    last = interrupted / "tb" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert step_of(last) == stop
    assert main(["pretrain", "fit", "--config", config, *every, "--ckpt_path", str(last)]) == 0
    return straight, interrupted


def test_ctrl_c_inside_a_step_resumes_with_that_batch_on_an_unbroken_step_axis(shards, tmp_path):
    """The checkpoint saved on the interrupt held the data loader past the batch in flight and the logging step
    one ahead: the resume skipped that batch (its losses were the next batches') and its curves skipped a step;
    its batch counters one ahead too, so the resume validated one step early (and never validated the last),
    and its token count one batch ahead (train/tokens and val/tokens, which scaling fits read)."""
    straight, interrupted = straight_and_resumed(shards, tmp_path, "CtrlCInStep3")
    assert losses(interrupted) == losses(straight)
    validations = losses(straight, "val/loss")
    assert [step for step, _ in validations] == [1, 3, 5]
    assert losses(interrupted, "val/loss") == validations
    assert losses(interrupted, "train/tokens") == losses(straight, "train/tokens")


class CtrlCRightAfterUpdate3(L.Callback):
    """A real Ctrl-C right after the third optimizer step, inside the batch's step."""

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer_step = pl_module.optimizer_step

        def interrupted(*args, **kwargs):
            optimizer_step(*args, **kwargs)
            if trainer.global_step == 2:  # Lightning counts the update once this hook returns
                signal.raise_signal(signal.SIGINT)

        pl_module.optimizer_step = interrupted


class CtrlCInBatchEndBeforeValidation2(L.Callback):
    """A real Ctrl-C in this callback's end hook of the second batch, which a validation follows."""

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 2:
            signal.raise_signal(signal.SIGINT)


class CtrlCBetweenMicroBatches(L.Callback):
    """Ctrl-C before the second micro-batch of the third optimizer step (2 batches a step)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 5:
            raise KeyboardInterrupt


class CtrlCAfterTheLastBackwardOfStep3(L.Callback):
    """A real Ctrl-C after the backward of the third step's last micro-batch, before its update."""

    def on_before_optimizer_step(self, trainer, *args) -> None:
        if trainer.global_step == 2:
            signal.raise_signal(signal.SIGINT)


class CtrlCAfterTheValidationInStep2(L.Callback):
    """Ctrl-C before the fourth batch, the second micro-batch of step 2, after the validation of the third."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 3:
            raise KeyboardInterrupt


class CtrlCAfterTheLastBackwardOfEpoch0(L.Callback):
    """A real Ctrl-C after the backward of the third batch, the last of the first epoch (3 batches each)."""

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.fit_loop.epoch_loop.total_batch_idx == 2:
            signal.raise_signal(signal.SIGINT)


class SIGTERMAfterTheLastBackwardOfEpoch0(L.Callback):
    """A SIGTERM, as a scheduler sends it, after the backward of the last batch of the first epoch (of 3)."""

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.fit_loop.epoch_loop.total_batch_idx == 2:
            signal.raise_signal(signal.SIGTERM)


EPOCHS_OF_3 = ("--data.samples_per_epoch", "12")
MOE_BALANCED_BY_BIAS = ("--model.config.moe.n_experts", "4", "--model.config.moe.bias_update_rate", "0.01")


@pytest.mark.parametrize(("interrupt", "stop", "accumulate", "val_every", "extra"), [
    ("CtrlCRightAfterUpdate3", 3, 1, 2, ()),
    ("CtrlCInBatchEndBeforeValidation2", 2, 1, 2, ()),
    ("CtrlCBetweenMicroBatches", 2, 2, 2, ()),
    ("CtrlCBetweenMicroBatches", 2, 2, 2, MOE_BALANCED_BY_BIAS),  # the step's expert load so far, for its bias
    ("CtrlCAfterTheLastBackwardOfStep3", 3, 2, 2, ()),
    ("CtrlCAfterTheValidationInStep2", 1, 2, 3, ()),
    ("CtrlCAfterTheLastBackwardOfEpoch0", 3, 1, 2, EPOCHS_OF_3),
    ("CtrlCAfterTheLastBackwardOfEpoch0", 2, 2, 2, EPOCHS_OF_3),
    ("CtrlCAfterTheLastBackwardOfEpoch0", 3, 1, 2, (*EPOCHS_OF_3, "--trainer.max_steps", "-1",
                                                    "--trainer.max_epochs", "2")),
    ("SIGTERMAfterTheLastBackwardOfEpoch0", 2, 2, 2, EPOCHS_OF_3),  # stops after the next batch (mid-step)
    ("SIGTERMAfterTheLastBackwardOfEpoch0", 3, 1, 2, (*EPOCHS_OF_3, "--trainer.max_steps", "3")),  # the last
])
def test_a_resume_after_ctrl_c_anywhere_in_a_step_continues_as_the_uninterrupted_run(
        interrupt, stop, accumulate, val_every, extra, shards, tmp_path, ctrl_c):
    """An interrupt after the update took the batch back with the weights moved: the resume trained it twice.
    One in a callback's batch end lost the step's train points and the validation due after it. One between
    the micro-batches of a step lost their gradients (Lightning checkpoints none): the resumed step applied
    the later micro-batches' alone; after a validation inside the step, the resumed curves were a step behind.
    One after a backward took back a batch whose gradient it kept. One between the micro-batches of an MoE
    model's step lost their expert load (a buffer outside the state dict): the bias moved by the later ones'.
    One held to the end of an epoch's last batch saved that epoch unclosed: the resume took the next pass's
    first batch for the old epoch's, and stepped at other batches; a SIGTERM there (Lightning stops after
    closing the epoch) saved it closed with its batches counted, and the resume stepped at other batches too.
    One held to the next batch's start uncounted the tokens of the batch done (the module forgot them at its
    own batch start, after the callbacks')."""
    straight, interrupted = straight_and_resumed(shards, tmp_path, interrupt, stop=stop, accumulate=accumulate,
                                                 val_every=val_every, extra=extra)
    moe = ("moe/load_std",) if extra == MOE_BALANCED_BY_BIAS else ()  # the balance of each step's whole load
    for tag in ("train/loss", "val/loss", "train/tokens", "val/tokens", *moe):
        assert losses(interrupted, tag) == losses(straight, tag), tag
    saved = [torch.load(root / "tb" / "run" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
             for root in (straight, interrupted)]
    torch.testing.assert_close(saved[1]["state_dict"], saved[0]["state_dict"], rtol=0, atol=0)


def test_two_checkpoints_interrupted_at_a_batch_end_save_the_same_state(shards, tmp_path, ctrl_c):
    """The first Checkpoint counted the batch the interrupt ended, and the second, finding it counted, took it
    for one Lightning had counted: its last.ckpt lost the due validation and logged every later step one early."""
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=2, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, limit_val_batches=1,
                        callbacks=[CtrlCInBatchEndBeforeValidation2(),
                                   Checkpoint(dirpath=tmp_path / "a", every_n_train_steps=100),
                                   Checkpoint(dirpath=tmp_path / "b", every_n_train_steps=99)])  # another state key
    data = PackedDataModule(train_files=[str(shards["train"])], val_files=[str(shards["val"])], seq_len=32,
                            batch_size=4, vocab_size=VOCAB_SIZE)
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl-C
        trainer.fit(PretrainModule(ModelConfig(**MODEL), OptimConfig(lr=1e-3, warmup_steps=1)), datamodule=data)
    a, b = (torch.load(tmp_path / name / "last.ckpt", weights_only=True) for name in "ab")
    assert a["global_step"] == b["global_step"] == 2 and a["loops"] == b["loops"]
    for name, saved in zip("ab", (a, b), strict=True):  # each file's own Checkpoint has the validation to run
        (own,) = [state for state in saved["callbacks"].values() if state.get("dirpath") == str(tmp_path / name)]
        assert own["validation_pending"] == 2


def test_a_checkpoint_saved_after_a_step_holds_no_step_in_progress(shards, tmp_path):
    """Lightning keeps a step's gradients until the next step's first backward: every checkpoint saved after a
    step held them as a step in progress (a full copy of the gradients, and a resume with another
    accumulate_grad_batches applied them a second time)."""
    trainer = L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Checkpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)])
    data = PackedDataModule(train_files=[str(shards["train"])], seq_len=32, batch_size=4, vocab_size=VOCAB_SIZE)
    module = PretrainModule(ModelConfig(**MODEL), OptimConfig(lr=1e-3, warmup_steps=1))
    trainer.fit(module, datamodule=data)
    assert all(p.grad is not None for p in module.parameters())  # as Lightning leaves them
    for name in ("epoch=0-step=1.ckpt", "last.ckpt"):
        assert "llmkit_accumulation_window" not in torch.load(tmp_path / name, weights_only=True), name


class CtrlCInValidationAtStep2(L.Callback):
    """Ctrl-C inside the validation that follows the second step, before its first batch."""

    def on_validation_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == 2 and not trainer.sanity_checking:
            raise KeyboardInterrupt


class CtrlCInValidationStepAtStep2(L.Callback):
    """Ctrl-C inside the validation step of the second (and last) batch of the validation that follows the
    second step: where a validation spends its time."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.global_step == 2 and not trainer.sanity_checking and batch_idx == 1:
            assert trainer.num_val_batches == [2]

            def interrupted(*args, **kwargs):
                raise KeyboardInterrupt

            pl_module.validation_step = interrupted


@pytest.mark.parametrize(("interrupt", "every_n_train_steps"), [
    ("CtrlCInValidationStepAtStep2", 100),  # only the interrupt saves
    ("CtrlCInValidationAtStep2", 2),  # last.ckpt held step 2 from before its validation: saved again
])
def test_ctrl_c_inside_a_validation_runs_it_again_on_resume_on_the_same_step_axis(interrupt, every_n_train_steps,
                                                                                  shards, tmp_path):
    """The interrupt's checkpoint took back a logging step the batch had not counted yet: the resumed
    curves logged step 1 twice and every later point a step early. The resume then continued an interrupted
    validation step's validation from the batch in flight over a fresh iterator: its point was the first
    batch's loss alone (5.872 where the whole validation gives 5.856); interrupted before a batch, or after a
    checkpoint at that step, it skipped the validation: the point was missing. Now it runs it again, whole,
    on the validation batches' axis of the uninterrupted run too (TokenThroughput's validate/* curves were a
    batch ahead from there on)."""
    straight, interrupted = straight_and_resumed(shards, tmp_path, interrupt, every_n_train_steps,
                                                 extra=("--trainer.callbacks+=llmkit.callbacks.TokenThroughput",))
    assert losses(interrupted) == losses(straight)
    validations = losses(straight, "val/loss")
    assert [step for step, _ in validations] == [1, 3, 5]
    assert losses(interrupted, "val/loss") == validations
    batches = [step for step, _ in losses(straight, "validate/batches")]
    # (a point the cut validation logged before the interrupt stays: this axis is not the step axis a resume purges)
    assert batches == [1, 2, 3, 4, 5, 6] and sorted({step for step, _ in losses(interrupted, "validate/batches")}) \
        == batches


class CheckpointCtrlCdInItsSaveAfterStep2(Checkpoint):
    """llmkit's Checkpoint, Ctrl-C'd while it writes the checkpoint of the validation after the second
    step (the interrupt lands once the file is whole), in the run that is not a resume."""

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        if trainer.global_step == 2 and trainer.validating and trainer.ckpt_path is None:
            raise KeyboardInterrupt


def test_ctrl_c_while_a_validation_checkpoint_is_written_keeps_that_validation_once(shards, tmp_path):
    """The validation's metrics were logged before the save (Lightning saves in on_validation_end), yet
    the interrupt's checkpoint marked it to run again: the resumed curves held val/loss at step 1 twice."""
    straight, interrupted = straight_and_resumed(shards, tmp_path, "CheckpointCtrlCdInItsSaveAfterStep2", None)
    assert losses(interrupted) == losses(straight)
    validations = losses(straight, "val/loss")
    assert [step for step, _ in validations] == [1, 3, 5]
    assert losses(interrupted, "val/loss") == validations


class CtrlCInTheLastValidationStep(L.Callback):
    """Ctrl-C inside the validation step of the second batch of the validation after the sixth (last) step."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.global_step == 6 and not trainer.sanity_checking and batch_idx == 1:
            def interrupted(*args, **kwargs):
                raise KeyboardInterrupt

            pl_module.validation_step = interrupted


def test_a_validation_interrupted_after_the_last_step_runs_once_when_the_run_is_resumed(shards, tmp_path, caplog,
                                                                                          recwarn):
    """Resumed with no step left to train, fit ran nothing: the point of the interrupted validation was missing.
    It now runs after fit, as `validate` runs it (at step 6, where fit logs it at 5), and only once: last.ckpt
    is saved again with it done, so a second resume, or one to a larger max_steps, does not repeat it. The
    resume says so up front (it warned only that the fit had nothing to train) and names the checkpoint saved."""
    straight, interrupted = straight_and_resumed(shards, tmp_path, "CtrlCInTheLastValidationStep", 2, stop=6)
    assert "the validation of step 6 was interrupted: running it" in caplog.text
    last = interrupted / "tb" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"checkpoint: {last} (step 6, its validation done)" in caplog.text
    nothing_to_train = [str(w.message) for w in recwarn if "nothing to train" in str(w.message)]
    assert nothing_to_train == [f"{last} is at step 6 and trainer.max_steps is 6: this fit has nothing to train; it "
                                f"runs the validation of step 6 that an interrupt cut short, and stops; raise "
                                f"trainer.max_steps to continue the run"]
    (*earlier, (_, last_loss)) = losses(straight, "val/loss")
    assert losses(interrupted, "val/loss") == [*earlier, (6, last_loss)]
    assert losses(interrupted) == losses(straight)
    config = str(interrupted / "tb.yaml")
    saved_again, saved_straight = (torch.load(root / "tb" / "run" / "version_0" / "checkpoints" / "last.ckpt",
                                              weights_only=True) for root in (interrupted, straight))
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "epoch"):  # the straight run's training state
        torch.testing.assert_close(saved_again[key], saved_straight[key], rtol=0, atol=0)
    data = [saved["loops"]["fit_loop"]["state_dict"] for saved in (saved_again, saved_straight)]
    assert data[0] == data[1]  # the data position (saved after the validate, it was lost: a resume began again)
    every = ["--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "2",
             "--trainer.check_val_every_n_epoch", "null"]
    resume = ["pretrain", "fit", "--config", config, *every, "--ckpt_path", str(last)]
    assert main(resume) == 0
    assert main([*resume, "--trainer.max_steps", "8"]) == 0
    assert [step for step, _ in losses(interrupted, "val/loss")] == [1, 3, 6, 7]
    straight_last = straight / "tb" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["pretrain", "fit", "--config", str(straight / "tb.yaml"), *every, "--ckpt_path",
                 str(straight_last), "--trainer.max_steps", "8"]) == 0
    assert losses(interrupted) == losses(straight)  # steps 6 and 7 on the same data (it began the data again)


class CtrlCAfterStep3(L.Callback):
    """Ctrl-C between batches, after the third step and its validation."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 3:
            raise KeyboardInterrupt


@pytest.mark.parametrize(("first_run", "data"), [
    (["--trainer.max_steps", "6"], []),  # its last step validates
    (["--trainer.max_steps", "5"], []),  # its last step does not
    (["--trainer.callbacks+=tests.test_checkpoints.CtrlCAfterStep3"], []),  # stopped after a step that validated
    (["--trainer.max_steps", "6"], ["--data.samples_per_epoch", "12"]),  # its last step ends an epoch (of 3)
])
def test_a_run_extended_from_its_last_checkpoint_continues_its_curves_step_for_step(first_run, data, shards, tmp_path):
    """A checkpoint saved between batches after a step that validated made the resumed curves skip a step
    (Lightning's resume counted that step again): 6 steps validating every 3, resumed to 8, logged 0-5, 7, 8.
    One saved at an epoch's end resumed the data from its first pass (Lightning loads a loader's position
    only when it restarts inside an epoch)."""
    every = ["--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "3",
             "--model.optim.decay_steps", "8", *data]  # one schedule for the runs of 5, 6 and 8 steps
    for root in (tmp_path / "straight", tmp_path / "extended"):
        root.mkdir()
        config = yaml.safe_load(write_tensorboard_config(root, shards, 8).read_text())
        config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 100  # saved at the end alone
        (root / "tb.yaml").write_text(yaml.safe_dump(config))
    assert main(["pretrain", "fit", "--config", str(tmp_path / "straight" / "tb.yaml"), *every]) == 0
    config = str(tmp_path / "extended" / "tb.yaml")
    try:
        main(["pretrain", "fit", "--config", config, *every, *first_run])
    except SystemExit:  # Lightning's graceful shutdown after Ctrl-C
        pass
    last = tmp_path / "extended" / "tb" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["pretrain", "fit", "--config", config, *every, "--ckpt_path", str(last)]) == 0
    assert [step for step, _ in losses(tmp_path / "extended")] == list(range(8))
    assert losses(tmp_path / "extended") == losses(tmp_path / "straight")


def test_a_max_epochs_run_extended_by_an_epoch_continues_its_data(shards, tmp_path):
    """Lightning loads a loader's position only when it restarts inside an epoch, after setting the data up; a
    max_epochs run's schedule sets the data up before the restore (trainer.estimated_stepping_batches,
    Lightning issue 20550) and its last checkpoint closes an epoch: extended by one, it ran the first pass's
    batches again."""
    every = ["--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "3", "--trainer.max_steps", "-1",
             "--data.samples_per_epoch", "12", "--model.optim.decay_steps", "9"]  # epochs of 3 steps, one schedule
    for root in (tmp_path / "straight", tmp_path / "extended"):
        root.mkdir()
        config = yaml.safe_load(write_tensorboard_config(root, shards, 8).read_text())
        config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 100  # saved at the end alone
        (root / "tb.yaml").write_text(yaml.safe_dump(config))
    assert main(["pretrain", "fit", "--config", str(tmp_path / "straight" / "tb.yaml"), *every,
                 "--trainer.max_epochs", "3"]) == 0
    config = str(tmp_path / "extended" / "tb.yaml")
    assert main(["pretrain", "fit", "--config", config, *every, "--trainer.max_epochs", "2"]) == 0
    last = tmp_path / "extended" / "tb" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["pretrain", "fit", "--config", config, *every, "--trainer.max_epochs", "3", "--ckpt_path",
                 str(last)]) == 0
    assert losses(tmp_path / "extended") == losses(tmp_path / "straight")
    assert [step for step, _ in losses(tmp_path / "straight")] == list(range(9))


def test_a_run_resumed_in_a_copied_directory_writes_last_ckpt_not_last_v1(shards, tmp_path):
    """The copy's last.ckpt is the run's earlier state: replaced, so --ckpt_path .../last.ckpt resumes the latest."""
    fit(tmp_path / "run", shards, 2, [])
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "last.ckpt").write_bytes((tmp_path / "run" / "last.ckpt").read_bytes())
    fit(copy, shards, 4, [], ckpt_path=copy / "last.ckpt")
    assert sorted(p.name for p in copy.iterdir()) == ["last.ckpt"] and step_of(copy / "last.ckpt") == 4


def test_a_discovery_checkpoint_is_pointed_to_ttt_fit_which_is_all_ttt_offers(trained, tmp_path, capsys):
    """TTTDiscoverModule has no validation step: `llmkit ttt validate` is neither offered nor suggested."""
    ckpt = torch.load(trained, weights_only=True)
    ckpt["llmkit_module"] = "TTTDiscoverModule"
    torch.save(ckpt, tmp_path / "ttt.ckpt")
    assert main(["pretrain", "validate", "--ckpt_path", str(tmp_path / "ttt.ckpt")]) == 1
    assert "was written by TTTDiscoverModule, not PretrainModule: use it with `llmkit ttt fit`" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ttt", "validate", "--ckpt_path", str(tmp_path / "ttt.ckpt")])
    assert "invalid choice: 'validate' (choose from 'fit')" in capsys.readouterr().err


def test_ctrl_c_during_a_checkpoint_write_lands_once_the_file_is_whole(tmp_path, monkeypatch, ctrl_c):
    """torch.save turned a KeyboardInterrupt in mid-write into a RuntimeError: a traceback and no interrupt save."""
    real_save = torch.save

    def save_interrupted(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the checkpoint is being written
        time.sleep(0.05)
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save_interrupted)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"global_step": 3}, tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"global_step": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_ctrl_c_during_the_final_save_writes_it_once(shards, tmp_path, monkeypatch, caplog, ctrl_c):
    """The interrupt, raised once the final last.ckpt was whole, found it unrecorded and wrote it again."""
    real_save, saved = torch.save, []

    def save_interrupted(obj, f):
        saved.append(obj["global_step"])
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the run's final checkpoint is being written
        time.sleep(0.05)
        real_save(obj, f)

    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[AtomicCheckpointIO()], limit_val_batches=0,
                        callbacks=[Checkpoint(dirpath=tmp_path, every_n_train_steps=100)])
    data = PackedDataModule(train_files=[str(shards["train"])], seq_len=32, batch_size=4, vocab_size=VOCAB_SIZE)
    monkeypatch.setattr(torch, "save", save_interrupted)
    with caplog.at_level("INFO"), pytest.raises(SystemExit):
        trainer.fit(PretrainModule(ModelConfig(**MODEL), OptimConfig(lr=1e-3, warmup_steps=1)), datamodule=data)
    last = tmp_path / "last.ckpt"
    assert saved == [2] and step_of(last) == 2
    assert f"Ctrl-C at step 2: {last} holds it" in caplog.text


def test_an_interrupt_in_the_validation_after_a_checkpointed_step_saves_the_step_again(shards, tmp_path, caplog):
    """Ctrl-C during the validation after a checkpointed step printed nothing, though last.ckpt held the
    step; it is saved again, with its validation to run on resume (the earlier save is from before it)."""
    class CtrlCInValidation(L.Callback):
        def on_validation_batch_start(self, trainer, *args) -> None:
            if trainer.global_step == 2:
                raise KeyboardInterrupt

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[AtomicCheckpointIO()], val_check_interval=2,
                        num_sanity_val_steps=0, limit_val_batches=1,
                        callbacks=[Checkpoint(dirpath=tmp_path, every_n_train_steps=2), CtrlCInValidation()])
    data = PackedDataModule(train_files=[str(shards["train"])], val_files=[str(shards["val"])], seq_len=32,
                            batch_size=4, vocab_size=VOCAB_SIZE)
    with caplog.at_level("INFO"), pytest.raises(SystemExit):
        trainer.fit(PretrainModule(ModelConfig(**MODEL), OptimConfig(lr=1e-3, warmup_steps=1)), datamodule=data)
    last = tmp_path / "last.ckpt"
    assert f"Ctrl-C at step 2: saved {last}; resume with --ckpt_path {last}" in caplog.text
    assert step_of(last) == 2
