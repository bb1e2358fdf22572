"""The `llmkit` command end to end: LightningCLI fit/validate, generate, and clean errors."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tqdm import tqdm

from llmkit import cli
from llmkit.cli import main
from llmkit.errors import LLMKitError
from llmkit.io import check_yaml_keys
from llmkit.model.config import MHCConfig, ModelConfig
from tests.conftest import VOCAB_SIZE


def write_config(tmp_path: Path, shards, **model_overrides) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 3, "log_every_n_steps": 1,
            "default_root_dir": str(tmp_path / "logs"), "enable_progress_bar": False,
            "num_sanity_val_steps": 0, "limit_val_batches": 2, "enable_model_summary": False,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}],
        },
        "model": {
            "config": {"vocab_size": VOCAB_SIZE, "n_layers": 2, "d_model": 32, "n_heads": 4, "d_ff": 64,
                       "max_seq_len": 64, "n_streams": 4, **model_overrides},
            "optim": {"lr": 1e-3, "warmup_steps": 1},
        },
        "data": {"train_files": [str(shards["train"])], "val_files": [str(shards["val"])],
                 "seq_len": 32, "batch_size": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """One `llmkit pretrain fit` run with a dotted override, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("cli")
    config = write_config(tmp, shards)
    assert main(["pretrain", "fit", "--config", str(config), "--model.config.n_streams", "2"]) == 0
    return tmp


def generate_args(trained: Path, tokenizer: Path, *args: str) -> list[str]:
    """``llmkit generate`` on the trained fixture's last checkpoint, with ``args``."""
    return ["generate", "--ckpt", str(trained / "ckpt" / "last.ckpt"), "--tokenizer", str(tokenizer), *args]


def test_fit_tells_where_its_logs_go_without_third_party_tips(shards, tmp_path, capsys, caplog):
    config = write_config(tmp_path, shards)
    with caplog.at_level("INFO"):
        assert main(["pretrain", "fit", "--config", str(config), "--trainer.max_steps", "1"]) == 0
    said = caplog.text + "".join(capsys.readouterr())
    assert f"logs: {tmp_path / 'logs'}" in said and "fit finished at step 1" in said
    assert "attention: flash (attention_backend auto, cpu float32)" in said
    assert "Tip:" not in said and "LeafSpec" not in said


def test_fit_says_the_model_in_one_line_in_the_place_of_lightnings_table(shards, tmp_path, capsys, caplog):
    config = yaml.safe_load(write_config(tmp_path, shards).read_text())
    del config["trainer"]["enable_model_summary"]  # Lightning's default: on
    (tmp_path / "default.yaml").write_text(yaml.safe_dump(config))
    with caplog.at_level("INFO"):
        assert main(["pretrain", "fit", "--config", str(tmp_path / "default.yaml"), "--trainer.max_steps", "1"]) == 0
    said = caplog.text + "".join(capsys.readouterr())
    from llmkit.model.transformer import Transformer
    model = Transformer(ModelConfig(**config["model"]["config"]))
    total, body = model.num_params() / 1e6, model.num_params(non_embedding=True) / 1e6
    assert f"model: 2 layers, d_model 32, 4 heads, mHC 4 streams; {total:.2f}M parameters, {body:.2f}M without" in said
    assert "Total FLOPs" not in said and "Trainable params" not in said

    config["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelSummary"})
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(config))
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(["pretrain", "fit", "--config", str(tmp_path / "own.yaml"), "--trainer.max_steps", "1",
                     "--trainer.default_root_dir", str(tmp_path / "own")]) == 0
    assert "Trainable params" in caplog.text + "".join(capsys.readouterr())  # a summary callback asked for stays


def test_llmkit_warnings_print_as_one_line_and_the_libraries_keep_their_source_lines(monkeypatch):
    import warnings

    import llmkit.optim
    from llmkit.callbacks.console import quiet_known_noise

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    quiet_known_noise()
    ours = warnings.formatwarning("optim.warmup_steps 40 >= decay_steps 20", UserWarning, llmkit.optim.__file__, 216,
                                  "    rank_zero_warn(")
    assert ours == "llmkit: warning: optim.warmup_steps 40 >= decay_steps 20\n"
    theirs = warnings.formatwarning("deprecated", FutureWarning, torch.__file__, 7, "    x = 1")
    assert theirs == f"{torch.__file__}:7: FutureWarning: deprecated\n  x = 1\n"


def test_an_abbreviated_option_is_refused_not_expanded(shards, tmp_path, capsys):
    """argparse expanded --model.config.moe.n_expert to n_experts without a word."""
    config = write_config(tmp_path, shards)
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "fit", "--config", str(config), "--model.config.moe.n_expert", "4"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --moe.n_expert=4" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_float32_matmul_precision_applies_to_the_run_and_is_saved_with_its_config(shards, tmp_path, capsys):
    config = write_config(tmp_path, shards)
    before = torch.get_float32_matmul_precision()
    try:
        assert main(["pretrain", "fit", "--config", str(config), "--trainer.max_steps", "1",
                     "--float32_matmul_precision", "high"]) == 0
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    (saved,) = (tmp_path / "logs").rglob("config.yaml")
    assert yaml.safe_load(saved.read_text())["float32_matmul_precision"] == "high"
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "fit", "--config", str(config), "--float32_matmul_precision", "fast"])
    assert exit_info.value.code == 2 and "float32_matmul_precision" in capsys.readouterr().err


def test_an_attention_backend_this_machine_lacks_stops_fit_before_the_first_step(shards, tmp_path, capsys):
    config = write_config(tmp_path, shards, attention_backend="cudnn")
    assert main(["pretrain", "fit", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "llmkit: error: attention_backend cudnn needs a CUDA device (this is cpu): use auto, flash or math" in err
    assert not (tmp_path / "ckpt").exists()


def test_fit_writes_a_checkpoint_with_the_override_and_tensorboard_logs(trained):
    ckpt = torch.load(trained / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert ckpt["hyper_parameters"]["config"]["n_streams"] == 2
    assert list((trained / "logs").rglob("events.out.tfevents.*"))


def test_validate_from_the_checkpoint_alone(trained, shards, capsys):
    code = main(["pretrain", "validate", "--ckpt_path", str(trained / "ckpt" / "last.ckpt"),
                 "--data.val_files", str(shards["val"]), "--data.seq_len", "32",
                 "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(trained / "val"),
                 "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"])
    assert code == 0
    assert "val/loss" in capsys.readouterr().out


def test_generate_from_the_checkpoint(trained, tokenizer_path, capsys):
    args = generate_args(trained, tokenizer_path, "--prompt", "def alpha", "--max-new-tokens", "6",
                         "--temperature", "0")
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("def alpha")
    assert len(first.strip()) > len("def alpha")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # greedy decoding is deterministic
    assert main([*args, "--attention-backend", "math"]) == 0
    assert capsys.readouterr().out == first  # the CPU's flash kernel and the math reference agree


def test_generate_samples_under_bf16_autocast_when_asked(trained, tokenizer_path, capsys, monkeypatch):
    import llmkit.model.generation as generation

    sample, autocast_seen = generation.generate, []

    def spy(*args, **kwargs):
        autocast_seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return sample(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    args = generate_args(trained, tokenizer_path, "--prompt", "def alpha", "--max-new-tokens", "6",
                         "--temperature", "0")
    assert main(args) == 0  # auto is 32-true on a CPU
    assert main([*args, "--precision", "bf16-mixed"]) == 0
    assert autocast_seen == [False, torch.bfloat16]
    assert capsys.readouterr().out.split("-" * 40)[1].strip().startswith("def alpha")


def test_generate_precision_auto_is_bf16_mixed_on_a_cuda_gpu_with_bf16(monkeypatch):
    from llmkit.cli.generate import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", "cuda") == resolve_precision("auto", "cuda:1") == "bf16-mixed"
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("32-true", "cuda") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # e.g. a V100
    assert resolve_precision("auto", "cuda") == "32-true"


def test_a_printed_config_runs_as_given_with_every_default_resolved(shards, tmp_path, capsys):
    """What `--print_config` prints is a complete config: fed back, it resolves to itself."""
    with pytest.raises(SystemExit):
        main(["pretrain", "fit", "--config", str(write_config(tmp_path, shards)), "--model.config.n_streams", "2",
              "--print_config"])
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert resolved["model"]["config"]["n_streams"] == 2  # the override is in it
    assert set(resolved["model"]["config"]["mhc"]) == {f.name for f in dataclasses.fields(MHCConfig)}
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["pretrain", "fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == resolved


def test_malformed_yaml_key_is_a_clean_error(shards, tmp_path, capsys):
    config = write_config(tmp_path, shards, n_layer=2)  # typo for n_layers
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "fit", "--config", str(config)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("llmkit pretrain fit: error: model.config: unknown option 'n_layer' (did you "
                                       "mean 'n_layers'?)\n(llmkit pretrain fit --help lists the options)\n")


def test_a_key_given_twice_in_a_yaml_file_is_refused_naming_its_lines(shards, tmp_path, capsys):
    """YAML kept the last of the two silently: a config with max_steps 400 then 30 ran 30 steps."""
    text = write_config(tmp_path, shards).read_text()
    doubled = tmp_path / "doubled.yaml"
    doubled.write_text(text.replace("trainer:\n", "trainer:\n  max_steps: 400\n", 1))
    assert "max_steps: 400" in doubled.read_text() and "max_steps:" in text
    with pytest.raises(SystemExit) as exit_info:  # a config error as every other: the message alone, exit 2
        main(["pretrain", "fit", f"--config={doubled}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.match(rf"llmkit pretrain: error: {re.escape(str(doubled))}:\d+: key 'max_steps' is given twice "
                    r"in one mapping \(first on line \d+\), and YAML keeps the last silently: remove one of them\n",
                    err)
    model = tmp_path / "model.yaml"
    model.write_text("n_layers: 2\nd_model: 32\nn_layers: 4\n")
    with pytest.raises(LLMKitError, match=r"model.yaml:3: key 'n_layers' is given twice in one mapping \(first on "
                                          r"line 1\)"):
        ModelConfig.from_yaml(model)


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/**/*.yaml")),
                         ids=lambda p: str(p.relative_to(Path(__file__).parent.parent)))
def test_the_shipped_configs_give_every_key_once(path):
    check_yaml_keys(path)


def test_a_choice_outside_an_optional_literal_lists_the_choices_in_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "fit", "--config", "configs/sft/tiny_cpu.yaml", "--model.attention_backend", "fastest"])
    assert capsys.readouterr().err.splitlines()[0] == (  # was jsonargparse's Union message on one line
        "llmkit sft fit: error: model.attention_backend: expected auto, flash, cudnn, efficient, math, flash_attn "
        "(or null), got fastest")


def test_config_errors_name_the_key_or_the_file_in_one_line(shards, tmp_path, capsys):
    """Not jsonargparse's ten lines about every member of an Optional's Union, nor its "<unicode string>"."""
    config = write_config(tmp_path, shards)

    def error(*args: str) -> str:
        with pytest.raises(SystemExit):
            main(["pretrain", "fit", "--config", str(config), *args])
        return capsys.readouterr().err.splitlines()[0]

    assert error("--model.config.n_layers", "two") == \
        "llmkit pretrain fit: error: model.config.n_layers: Expected a <class 'int'>. Got value: two"
    assert error("--model.optim.lrr", "0.1") == \
        "llmkit pretrain fit: error: model.optim: unknown option 'lrr' (did you mean 'lr'?)"
    assert error("--data.batch_size", "x") == "llmkit pretrain fit: error: data.batch_size: Expected a <class " \
                                              "'int'>. Got value: x"
    assert error("--model.config.n_kv_heads", "x") == \
        "llmkit pretrain fit: error: model.config.n_kv_heads: expected int (or null), got x"  # cut off after "Errors:"
    assert error("--data.val_windows", "8.5") == \
        "llmkit pretrain fit: error: data.val_windows: expected int (or null), got 8.5"  # was nine lines
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "my.yaml").write_text(yaml.safe_dump({"model": {"config": "../model/tiny.yaml"}}))
    assert error("--config", str(tmp_path / "sub" / "my.yaml")) == (
        "llmkit pretrain fit: error: model.config: no file ../model/tiny.yaml (a relative path in a config file is "
        "relative to that file's directory)")
    # a value of the right type that the config class refuses: its own one line, not jsonargparse's wrapper
    assert main(["pretrain", "fit", "--config", str(config), "--model.config.n_kv_heads", "3"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == \
        "llmkit: error: invalid model config: n_heads (4) must be divisible by n_kv_heads (3)"
    (tmp_path / "typo.yaml").write_text("trainer:\n  max_step: 30\n")  # the nearest Trainer argument, as model keys
    assert error("--config", str(tmp_path / "typo.yaml")) == (
        "llmkit pretrain: error: Subcommand 'fit' does not accept option 'trainer.max_step' (did you mean "
        "'trainer.max_steps'?)")
    # a data key, and either typo on the command line, got no hint (model keys had one)
    (tmp_path / "data_typo.yaml").write_text("data:\n  seq_length: 30\n")
    assert error("--config", str(tmp_path / "data_typo.yaml")) == (
        "llmkit pretrain: error: Subcommand 'fit' does not accept option 'data.seq_length' (did you mean "
        "'data.seq_len'?)")
    assert error("--trainer.max_step", "3") == \
        "llmkit pretrain fit: error: unrecognized arguments: --trainer.max_step 3 (did you mean '--trainer.max_steps'?)"
    assert error("--seed_everythin", "3") == "llmkit pretrain fit: error: unrecognized arguments: --seed_everythin 3 " \
                                            "(did you mean '--seed_everything'?)"  # an option of no section
    assert error("--data.batch_sz", "3") == \
        "llmkit pretrain fit: error: unrecognized arguments: --data.batch_sz 3 (did you mean '--data.batch_size'?)"
    (tmp_path / "broken.yaml").write_text("model:\n  optim: [1, 2\n  x: 1\n")
    assert error("--config", str(tmp_path / "broken.yaml")) == (
        f"llmkit pretrain: error: {tmp_path / 'broken.yaml'}: not valid YAML at line 3, column 4: expected ',' or "
        "']', but got ':'")
    for name, text, what in [("empty.yaml", "# nothing yet\n", "empty"), ("list.yaml", "- a\n- b\n", "a YAML list")]:
        (tmp_path / name).write_text(text)  # jsonargparse: "Unexpected config:" and the text
        assert error("--config", str(tmp_path / name)) == (
            f"llmkit pretrain: error: {tmp_path / name} is {what}, not a mapping of settings: write one 'key: value' "
            "per line (configs/ holds examples)")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "broken.yaml").write_text("n_layers: [2\nd_model: 64\n")
    (tmp_path / "names_it.yaml").write_text("model:\n  config: model/broken.yaml\n")  # jsonargparse: "no file"
    assert error("--config", str(tmp_path / "names_it.yaml")) == (
        f"llmkit pretrain: error: {tmp_path / 'model' / 'broken.yaml'}: not valid YAML at line 2, column 8: expected "
        "',' or ']', but got ':'")
    (tmp_path / "callbacks.yaml").write_text("- class_path: llmkit.callbacks.TokenThroughput\n")  # a YAML list
    (tmp_path / "names_a_list.yaml").write_text("trainer:\n  callbacks: callbacks.yaml\n")
    from llmkit.cli.lightning import check_config_files

    check_config_files(["--config", str(tmp_path / "names_a_list.yaml")])  # as jsonargparse takes it
    for section in ("trainer", "model", "data"):  # its settings commented out: a traceback from jsonargparse
        (tmp_path / "section.yaml").write_text(f"{section}:\n  # max_steps: 3\n")
        assert error("--config", str(tmp_path / "section.yaml")) == (
            f"llmkit pretrain: error: {tmp_path / 'section.yaml'}: the section '{section}' is empty; give its settings "
            "under it, or remove the key")


@pytest.mark.parametrize(("callback", "message"), [
    ({"class_path": "llmkit.callbacks.MHCMonitor", "init_args": {"every_n_stepz": 5}},
     "trainer.callbacks: MHCMonitor: unknown option 'every_n_stepz' (did you mean 'every_n_steps'?)"),
    ({"class_path": "llmkit.callbacks.MHCMonitor", "init_args": {"every_n_steps": "abc"}},
     "trainer.callbacks: MHCMonitor.every_n_steps: Expected a <class 'int'>. Got value: abc"),
    ({"class_path": "llmkit.callbacks.MHCMonitr"},
     "trainer.callbacks: no class llmkit.callbacks.MHCMonitr: did you mean llmkit.callbacks.MHCMonitor?"),
    ({"class_path": "llmkit.nowhere.Monitor"}, "trainer.callbacks: no class llmkit.nowhere.Monitor: module llmkit "
                                               "has no 'nowhere'"),  # read as a missing file before
    ({"class_path": "nowhere.Monitor"}, "trainer.callbacks: no class nowhere.Monitor: there is no module 'nowhere'"),
    ({"class_path": "MHCMonitr"},  # a short name: jsonargparse's "Expected a dot import path string" and ten lines
     "trainer.callbacks: no class MHCMonitr: did you mean llmkit.callbacks.MHCMonitor?"),
    ({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"every_n_train_steps": "x"}},
     "trainer.callbacks: ModelCheckpoint.every_n_train_steps: expected int (or null), got x"),
    ({"class_path": "broken_callback_module.Monitor"},  # the class's module imports a package that is not there
     "trainer.callbacks: importing broken_callback_module.Monitor failed: no module named 'not_installed_xyz'"),
])
def test_a_callback_error_names_the_callback_in_one_line(callback, message, shards, tmp_path, capsys, monkeypatch):
    """Was jsonargparse's "Not a valid subclass of Callback Subclass types expect one of: ..." after
    the reason, which named neither the callback nor the nearest option."""
    (tmp_path / "broken_callback_module.py").write_text("import not_installed_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = write_config(tmp_path, shards)
    values = yaml.safe_load(config.read_text())
    values["trainer"]["callbacks"] = [callback]
    config.write_text(yaml.safe_dump(values))
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "fit", "--config", str(config)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == f"llmkit pretrain fit: error: {message}"


def test_barebones_runs_and_its_refusals_are_one_line(shards, tmp_path, capsys):
    """llmkit's default Checkpoint made barebones fail ("enable_checkpointing=False but found ModelCheckpoint");
    what barebones turns off, set anyway, was a ValueError's traceback."""
    config = write_config(tmp_path, shards)
    bare = ["--trainer.barebones", "true", "--trainer.callbacks", "[]", "--trainer.log_every_n_steps", "null",
            "--trainer.logger", "false"]
    assert main(["pretrain", "fit", "--config", str(config), *bare]) == 0
    assert not (tmp_path / "logs" / "checkpoints").exists()
    capsys.readouterr()
    assert main(["pretrain", "fit", "--config", str(config), *bare[:4], *bare[6:]]) == 1  # the config's logging
    err = capsys.readouterr().err.splitlines()[-1]  # after Lightning's "Seed set to 0"
    assert err.startswith("llmkit: error: trainer: `Trainer(barebones=True, log_every_n_steps=1)` was passed. ")
    assert err.endswith("(set that trainer option to null or false, or leave barebones off)")


def test_a_run_without_a_checkpoint_callback_saves_llmkits_last_ckpt(shards, tmp_path):
    """Lightning's default ModelCheckpoint saved at epoch ends only, and nothing on Ctrl-C."""
    config = write_config(tmp_path, shards)
    assert main(["pretrain", "fit", "--config", str(config), "--trainer.callbacks", "[]"]) == 0
    (last,) = (tmp_path / "logs").rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 3


def test_vocab_mismatch_exits_1_with_one_clear_line(shards, tmp_path, capsys):
    config = write_config(tmp_path, shards, vocab_size=VOCAB_SIZE + 1)
    assert main(["pretrain", "fit", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"llmkit: error: {shards['train']} was packed with a tokenizer of vocab_size {VOCAB_SIZE}" in err
    assert not (tmp_path / "ckpt").exists()


def test_generate_rejects_a_tokenizer_of_another_vocabulary(trained, tmp_path, corpus_dir, capsys):
    from llmkit.data.tokenizer import TokenizerTrainConfig, train_tokenizer

    other = train_tokenizer([corpus_dir / "train.txt"], tmp_path / "other",
                            TokenizerTrainConfig(vocab_size=350, normalization="identity"))
    code = main(generate_args(trained, other, "--prompt", "x"))
    assert code == 1
    assert "vocab_size 350" in capsys.readouterr().err


def test_missing_checkpoint_and_missing_corpus(tmp_path, tokenizer_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "none.ckpt"), "--tokenizer", str(tokenizer_path),
                 "--prompt", "x"]) == 1
    assert "none.ckpt does not exist" in capsys.readouterr().err
    out = tmp_path / "out.bin"
    assert main(["data", "pack", "--tokenizer", str(tokenizer_path), "--input", str(tmp_path / "no.txt"),
                 "--output", str(out)]) == 1
    assert "no.txt" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("signal_error", "code", "line"), [(KeyboardInterrupt, 130, "llmkit: interrupted"),
                                                           (cli.Terminated, 143, "llmkit: terminated")])
def test_a_signal_while_a_progress_bar_is_drawn_prints_its_line_below_the_bar(signal_error, code, line, capsys,
                                                                               monkeypatch):
    """A CI run of `data pack` caught Ctrl-C right after the bar's first line, before its `with` began:
    the bar stayed open and stderr ended `pack big.bin:   0%|...| 0.00/63.6M [00:00<?, ?B/s]llmkit: interrupted`."""
    def drawing_then_signalled(command, args):
        bar = tqdm(desc="pack big.bin", total=100, unit="B")  # drawn, not yet inside its `with`
        raise signal_error(bar)

    monkeypatch.setattr(cli, "call_command", drawing_then_signalled)
    assert main(["data", "verify", "--shard", "x.bin"]) == code
    err = capsys.readouterr().err
    assert err.endswith(f"\n{line}\n") and "pack big.bin:   0%" in err.splitlines()[-2]


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "llmkit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("data", "pretrain", "sdft", "sft", "ttt", "generate", "lora", "consolidate", "demo", "scaling"):
        assert re.search(rf"^    {command}\b", result.stdout, re.MULTILINE), command


@pytest.mark.parametrize("argv", [
    ["--help"], ["data", "tokenizer", "--help"], ["data", "pack", "--help"], ["data", "tasks", "--help"],
    ["generate", "--help"], ["lora", "merge", "--help"], ["consolidate", "--help"], ["demo", "--help"],
    ["pretrain", "--help"], ["ttt", "--help"], ["scaling", "--help"], ["scaling", "fit", "--help"],
])
def test_help_answers_without_loading_torch_or_lightning(argv):
    """What keeps `--help` instant: neither torch, Lightning, TensorBoard nor matplotlib is imported to print it."""
    script = (
        "import sys\nfrom llmkit.cli import main\n"
        f"try:\n    code = main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "print(code, sorted(m for m in ('torch', 'lightning', 'tensorboard', 'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.splitlines()[-1] == "0 []", result.stderr
    assert f"usage: llmkit {' '.join(argv[:-1])}".strip() in result.stdout


def test_resume_from_checkpoint_continues_the_step_count(trained, shards, tmp_path):
    """The attention kernel and the mHC stream's recomputation are settings of how to run, not of
    what was trained: a resume may change them."""
    config = write_config(tmp_path, shards)
    code = main(["pretrain", "fit", "--config", str(config), "--model.config.n_streams", "2",
                 "--model.config.attention_backend", "math", "--model.config.mhc.recompute_stream", "true",
                 "--ckpt_path", str(trained / "ckpt" / "last.ckpt"), "--trainer.max_steps", "5"])
    assert code == 0
    resumed = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    ran_as = resumed["hyper_parameters"]["config"]
    assert resumed["global_step"] == 5 and ran_as["attention_backend"] == "math" and ran_as["mhc"]["recompute_stream"]


def test_generate_rejects_a_prompt_beyond_the_context(trained, tokenizer_path, capsys):
    code = main(generate_args(trained, tokenizer_path, "--prompt", "alpha beta gamma " * 40))
    assert code == 1
    assert "max_seq_len 64" in capsys.readouterr().err


def test_generate_refuses_files_that_are_not_plain_checkpoints(tmp_path, tokenizer_path, capsys):
    import argparse

    (tmp_path / "notes.ckpt").write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {}, "payload": argparse.Namespace(a=1)}, tmp_path / "pickled.ckpt")
    for name in ("notes.ckpt", "pickled.ckpt"):
        assert main(["generate", "--ckpt", str(tmp_path / name), "--tokenizer", str(tokenizer_path),
                     "--prompt", "x"]) == 1
        err = capsys.readouterr().err
        assert f"cannot read checkpoint {tmp_path / name}" in err
        assert "weights_only" not in err


def test_generate_batches_a_prompt_file_like_single_prompts(trained, tokenizer_path, tmp_path, capsys):
    prompts = ["def alpha", "import os", "    return [beta"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    base = generate_args(trained, tokenizer_path, "--max-new-tokens", "8", "--temperature", "0")
    out = tmp_path / "out.jsonl"
    assert main([*base, "--prompt-file", str(tmp_path / "prompts.txt"), "--batch-size", "2", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts
    capsys.readouterr()
    for record in records:
        assert main([*base, "--prompt", record["prompt"]]) == 0
        assert capsys.readouterr().out.split("\n" + "-" * 40)[0] == record["prompt"] + record["completion"]


@pytest.mark.parametrize("command", [["data", "tasks", "--task", "arithmetic", "--n", "5", "--out", "{out}.jsonl"],
                                     ["data", "corpus", "--source", "{text}", "--out", "{out}"]])
def test_an_output_path_under_a_file_is_one_line(command, tmp_path, capsys):
    """A FileExistsError traceback from mkdir (data tokenizer said it in one line already)."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "doc.txt").write_text("def f():\n    return 1\n" * 20)
    args = [arg.format(out=tmp_path / "afile" / "sub", text=tmp_path / "doc.txt") for arg in command]
    assert main(args) == 1
    assert capsys.readouterr().err == (f"llmkit: error: {tmp_path / 'afile'}: a file, where a directory must be: check "
                                       "the path and its permissions (and the disk's free space)\n")


def test_a_prompt_file_opening_with_a_byte_order_mark_prompts_without_it(tmp_path):
    """The .txt file's first prompt began with U+FEFF (the JSONL reader refuses one)."""
    from llmkit.cli.generate import read_prompts

    (tmp_path / "prompts.txt").write_bytes("\ufeffdef a(\ndef b(\n".encode())
    assert read_prompts(tmp_path / "prompts.txt") == ["def a(", "def b("]


def test_bad_prompt_files(trained, tokenizer_path, tmp_path, capsys):
    base = generate_args(trained, tokenizer_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert main([*base, "--prompt-file", str(tmp_path / "empty.txt")]) == 1
    assert "has no prompts" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    assert main([*base, "--prompt-file", str(tmp_path / "bad.jsonl")]) == 1
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main([*base, "--prompt-file", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"llmkit: error: prompt file {tmp_path} is a directory: give a file of one "
                                       "prompt per line (or JSONL)\n")


@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda: CUDA is not available here (torch.cuda.is_available() is False); use --device cpu"),
    ("foo", "--device foo: not a device llmkit generates on; use cpu, cuda, cuda:N or mps"),
    ("xla", "--device xla: not a device llmkit generates on; use cpu, cuda, cuda:N or mps"),
    ("mps", "--device mps: MPS is not available here (torch.backends.mps.is_available() is False); use --device cpu"),
])
def test_generate_blames_a_device_this_machine_lacks_not_the_checkpoint(device, message, trained, tokenizer_path,
                                                                        capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert main(generate_args(trained, tokenizer_path, "--prompt", "def f(", "--device", device)) == 1
    assert capsys.readouterr().err == f"llmkit: error: {message}\n"


def test_the_checkpoint_loader_reports_the_file_not_the_device(trained, tmp_path):
    """Only the file's faults read as "not a torch checkpoint"; the tensors go to the device after."""
    import zipfile

    from llmkit.errors import LLMKitError
    from llmkit.model.checkpoint import load_checkpoint_file

    path = trained / "ckpt" / "last.ckpt"
    ckpt = load_checkpoint_file(path, "meta")
    assert {t.device.type for t in ckpt["state_dict"].values()} == {"meta"}
    with pytest.raises(RuntimeError, match="device type") as error:
        load_checkpoint_file(path, "foo")
    assert not isinstance(error.value, LLMKitError)
    with zipfile.ZipFile(tmp_path / "notes.zip", "w") as archive:  # a sound archive, but not torch's
        archive.writestr("notes.txt", "hello")
    with pytest.raises(LLMKitError, match="it is not a torch checkpoint of tensors and plain data"):
        load_checkpoint_file(tmp_path / "notes.zip")


@pytest.mark.parametrize("flag", ["--num-samples", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_generate_refuses_counts_below_one(flag, value, trained, tokenizer_path, capsys):
    assert main(generate_args(trained, tokenizer_path, "--prompt", "x", flag, value)) == 1
    assert capsys.readouterr().err == f"llmkit: error: {flag} {value}: must be 1 or more\n"


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--max-new-tokens", "0", "--max-new-tokens must be >= 1, got 0"),
    ("--top-k", "0", "--top-k must be >= 1, got 0"),
    ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
    ("--temperature", "-1", "--temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    ("--temperature", "nan", "--temperature must be a finite number >= 0 (0 = greedy), got nan"),
    ("--temperature", "inf", "--temperature must be a finite number >= 0 (0 = greedy), got inf"),
])
def test_generate_refuses_a_bad_sampling_flag_before_it_loads_the_model(flag, value, message, tmp_path, capsys):
    """The checkpoint given does not exist: the sampling error comes first, not after a long load, and
    names the flag (it named SamplingConfig's field, top_k for --top-k)."""
    assert main(["generate", "--ckpt", str(tmp_path / "missing.ckpt"), "--tokenizer", str(tmp_path / "t.model"),
                 "--prompt", "x", flag, value]) == 1
    assert capsys.readouterr().err == f"llmkit: error: {message}\n"


def test_generate_gives_each_batch_its_own_samples_and_takes_top_k_none(trained, tokenizer_path, tmp_path):
    """Every batch replayed the seed's stream: --num-samples 4 --batch-size 1 gave one sample four times."""
    prompts = tmp_path / "prompts.JSONL"  # read as JSONL whatever the suffix's case
    prompts.write_text('{"prompt": "def"}\n')

    def completions(*args: str) -> list[str]:
        out = tmp_path / "out.jsonl"
        assert main(generate_args(trained, tokenizer_path, "--prompt-file", str(prompts), "--out", str(out),
                                  "--max-new-tokens", "8", "--temperature", "2", *args)) == 0
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert {r["prompt"] for r in records} == {"def"}
        return [r["completion"] for r in records]

    samples = completions("--num-samples", "4", "--batch-size", "1", "--top-k", "none")
    assert len(set(samples)) == 4
    assert completions("--num-samples", "4", "--batch-size", "1", "--top-k", "none") == samples  # seeded
    assert completions("--num-samples", "4", "--batch-size", "1", "--top-k", "none", "--seed", "1") != samples
    assert len(set(completions("--num-samples", "4", "--batch-size", "4", "--top-k", "1"))) == 1  # greedy


def test_writing_onto_a_directory_is_refused_before_anything_is_written(trained, tokenizer_path, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("def alpha\n")
    out = tmp_path / "data"
    out.mkdir()
    assert main(generate_args(trained, tokenizer_path, "--prompt-file", str(tmp_path / "prompts.txt"),
                              "--out", str(out))) == 1
    assert capsys.readouterr().err == (f"llmkit: error: --out {out}: it is a directory; give the .jsonl file to "
                                       f"write, e.g. {out / 'completions.jsonl'}\n")
    assert main(["data", "tasks", "--task", "arithmetic", "--n", "5", "--out", str(out)]) == 1  # llmkit.io's writers
    assert capsys.readouterr().err == f"llmkit: error: cannot write {out}: it is a directory; give the path of a " \
                                      "file instead\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "prompts.txt"]  # no temp file left behind


def test_generate_refuses_to_write_its_completions_over_its_prompt_file(trained, tokenizer_path, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def alpha\n")
    assert main(generate_args(trained, tokenizer_path, "--prompt-file", str(prompts), "--out", str(prompts))) == 1
    assert capsys.readouterr().err == (f"llmkit: error: --out {prompts} is the --prompt-file it reads: write the "
                                       "completions to another file\n")
    assert prompts.read_text() == "def alpha\n"


def test_an_atomic_write_that_fails_leaves_no_temp_file(tmp_path):
    from llmkit.io import write_jsonl_atomic

    with pytest.raises(TypeError):
        write_jsonl_atomic(tmp_path / "out.jsonl", [{"ok": 1}, {"not json": object()}])
    assert list(tmp_path.iterdir()) == []


def test_an_atomic_write_gets_the_permissions_of_a_plain_open(tmp_path):
    """safetensors writes 0600: exported weights and adapters were unreadable to a group sharing them."""
    import stat

    from safetensors.torch import save_file

    from llmkit.io import UMASK, atomic_file

    with atomic_file(tmp_path / "model.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    (tmp_path / "plain.txt").write_text("x")
    mode = stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~UMASK


def test_interrupt_holds_nest_and_released_in_any_order_deliver_once_at_the_last(ctrl_c, capfd):
    """A training step's hold spans hooks that hold and release their own (a checkpoint write, TTT's update):
    the handler-stack version restored the step's catcher's predecessor when an inner block ended first. A held
    Ctrl-C says it was heard, and how to quit at once (silent, a long held step looked hung)."""
    import os
    import signal

    from llmkit.io import hold_interrupts, interrupts_held, release_interrupts

    assert hold_interrupts()  # the step's
    with interrupts_held():  # a write inside it, which the step's hold outlives...
        pass
    assert hold_interrupts()  # ...and one opened in it and closed after it
    release_interrupts()
    signal.raise_signal(signal.SIGINT)  # still held, though the write's block ended
    assert capfd.readouterr().err == ("\nllmkit: SIGINT received: stopping once the work in progress (a training "
                                      "step, a file being written) is complete (Ctrl-C again quits at once, without "
                                      "saving)\n")
    with pytest.raises(KeyboardInterrupt):
        release_interrupts()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    assert hold_interrupts()
    signal.raise_signal(signal.SIGINT)
    release_interrupts(deliver=False)  # an exception stops the work already: dropped
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(RuntimeError, match="without a hold"):  # a stray release would have disabled later holds
        release_interrupts()

    saved_stderr = os.dup(2)
    os.close(2)  # the message cannot be written (a closed stderr, a broken pipe): the interrupt is still held
    try:
        assert hold_interrupts()
        signal.raise_signal(signal.SIGINT)
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
    with pytest.raises(KeyboardInterrupt):
        release_interrupts()

    capfd.readouterr()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's: the process ignores Ctrl-C, and says nothing
    with interrupts_held():
        signal.raise_signal(signal.SIGINT)
    assert capfd.readouterr().err == ""


def test_a_second_ctrl_c_quits_a_held_block_at_once_and_a_second_sigterm_waits(tmp_path):
    """A held step or write that took long (a slow disk) could not be stopped from the keyboard: the second Ctrl-C
    was caught and held like the first. SIGTERM (a scheduler's, sent again) still waits for the work."""
    import signal

    script = tmp_path / "held.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from llmkit.io import at_quit_now, atomic_file, interrupts_held\n"
        "sig = getattr(signal, sys.argv[1])\n"
        "at_quit_now(lambda: open(sys.argv[2] + '.cleaned', 'w').close())\n"
        "try:\n"
        "    with interrupts_held(), atomic_file(sys.argv[2]) as tmp:\n"
        "        tmp.write_text('half')\n"
        "        os.kill(os.getpid(), sig)\n"
        "        os.kill(os.getpid(), sig)\n"
        "        time.sleep(0.2)\n"
        "        tmp.write_text('whole')\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(3)\n"
    )
    out = tmp_path / "file.txt"
    run = subprocess.run([sys.executable, str(script), "SIGINT", str(out)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 130 and not out.exists() and len(list(tmp_path.glob(".file.txt.*.tmp"))) == 1
    assert run.stderr.endswith("is complete (Ctrl-C again quits at once, without saving)\n\nllmkit: SIGINT again: "
                               "quitting now, without the save an interrupt makes: what no checkpoint holds yet is "
                               "lost (the last one written is whole)\n")
    assert (tmp_path / "file.txt.cleaned").is_file()  # the at_quit_now cleanups ran (a reward worker's kill)
    (tmp_path / "file.txt.cleaned").unlink()
    run = subprocess.run([sys.executable, str(script), "SIGTERM", str(out)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == -signal.SIGTERM and out.read_text() == "whole"  # the write completed, then SIGTERM
    assert run.stderr.count("SIGTERM received") == 1 and "again" not in run.stderr
    assert not list(tmp_path.glob(".file.txt.*.tmp"))  # the killed writer's temp file went with the next write


def test_validate_with_a_model_directory_as_ckpt_path_says_what_to_pass(trained, shards, tokenizer_path, tmp_path,
                                                                       capsys):
    model_dir = tmp_path / "exported"
    assert main(["convert", "to-hf", "--ckpt", str(trained / "ckpt" / "last.ckpt"), "--out", str(model_dir),
                 "--tokenizer", str(tokenizer_path)]) == 0
    base = ["pretrain", "validate", "--data.val_files", str(shards["val"]), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
            "--trainer.default_root_dir", str(tmp_path / "val")]
    capsys.readouterr()
    assert main([*base, "--ckpt_path", str(model_dir)]) == 1
    assert capsys.readouterr().err == (
        f"llmkit: error: checkpoint {model_dir} is a model directory, not a training checkpoint: --ckpt_path takes "
        f"a Lightning .ckpt file (e.g. .../checkpoints/last.ckpt); to validate or train from a model directory "
        f"give it as --model.init_ckpt {model_dir}, to sample from it `llmkit generate --ckpt {model_dir}`\n"
    )
    assert main([*base, "--model.init_ckpt", str(model_dir)]) == 0  # the advice holds
    assert "val/loss" in capsys.readouterr().out


def test_lightning_commands_offer_fit_and_validate_and_name_a_bad_trainer_setting(trained, shards, capsys,
                                                                                  monkeypatch):
    ckpt = str(trained / "ckpt" / "last.ckpt")
    with pytest.raises(SystemExit) as exited:  # the modules have no test or predict step
        main(["pretrain", "test", "--ckpt_path", ckpt])
    assert exited.value.code == 2
    assert "invalid choice: 'test' (choose from 'fit', 'validate')" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main(["pretrain", "validate", "--ckpt_path", ckpt, "--data.val_files", str(shards["val"]),
                 "--trainer.accelerator", "gpu"]) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # (under pytest, a stale logging handler may print before it)
    assert last == ("llmkit: error: trainer: No supported gpu backend found! (this machine lacks that accelerator; the "
                    "*_gpu and *_fsdp configs ask for a CUDA GPU: on a CPU take a *_cpu config, or run a *_gpu config "
                    "with --trainer.accelerator cpu)")
    assert main(["pretrain", "validate", "--ckpt_path", ckpt, "--data.val_files", str(shards["val"]),
                 "--trainer.devices", "0"]) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("llmkit: error: trainer: `Trainer(devices='0')`")
    assert last.endswith("(check the trainer settings: accelerator, devices, strategy, precision)")


@pytest.fixture(scope="module")
def adapter(trained, tmp_path_factory):
    """A LoRA adapter with non-zero weights on the trained checkpoint, saved with its fingerprint."""
    from llmkit.model.checkpoint import load_backbone
    from llmkit.model.lora import LoRAConfig, apply_lora, base_fingerprint, lora_layers, save_lora

    model = load_backbone(trained / "ckpt" / "last.ckpt")
    fingerprint = base_fingerprint(model)
    config = LoRAConfig(rank=4, alpha=8)
    apply_lora(model, config)
    torch.manual_seed(0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    path = tmp_path_factory.mktemp("lora") / "adapter.safetensors"
    save_lora(model, path, config, fingerprint)
    return path, model


def test_generate_with_lora_and_merge_into_a_plain_checkpoint(trained, adapter, tokenizer_path, shards, tmp_path,
                                                              capsys):
    """The merged checkpoint loads as its base does; --ckpt_path, which resumes or validates a run,
    refuses it in one line (a fit met Lightning's KeyError for the optimizer state it lacks; an SDFT
    command took its pretraining hyperparameters for its own)."""
    from llmkit.model.checkpoint import load_backbone

    path, lora_model = adapter
    ckpt = str(trained / "ckpt" / "last.ckpt")
    gen = ["--tokenizer", str(tokenizer_path), "--prompt", "def alpha", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(["generate", "--ckpt", ckpt, *gen]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", "--ckpt", ckpt, "--lora", str(path), *gen]) == 0
    with_lora = capsys.readouterr().out
    assert with_lora != plain  # the adapter changes the model

    merged = tmp_path / "merged.ckpt"
    assert main(["lora", "merge", "--ckpt", ckpt, "--lora", str(path), "--out", str(merged)]) == 0
    assert "14 LoRA layers merged" in capsys.readouterr().out
    idx = torch.randint(0, VOCAB_SIZE, (2, 20))
    with torch.no_grad():
        assert torch.allclose(load_backbone(merged)(idx), lora_model.eval()(idx), atol=1e-5)
    assert main(["generate", "--ckpt", str(merged), *gen]) == 0
    assert capsys.readouterr().out == with_lora

    assert main(["pretrain", "fit", "--config", str(write_config(tmp_path, shards)), "--ckpt_path", str(merged)]) == 1
    assert capsys.readouterr().err == (f"llmkit: error: {merged} holds weights only (no optimizer state), so a fit "
                                       f"cannot resume from it: start a new run from its weights with "
                                       f"--model.init_ckpt {merged}\n")
    assert main(["sdft", "validate", "--ckpt_path", str(merged)]) == 1
    assert capsys.readouterr().err == (f"llmkit: error: {merged} was written by PretrainModule, not SDFTModule: use "
                                       f"it with `llmkit pretrain validate` (or as model.init_ckpt to fine-tune from "
                                       f"it)\n")


def test_an_adapter_given_as_the_checkpoint_is_named_as_an_adapter(adapter, tmp_path, capsys):
    """It was called a weights file whose model directory to give: the adapters/ directory, which
    has no config.json either."""
    path = adapter[0]
    assert main(["lora", "merge", "--ckpt", str(path), "--lora", str(path), "--out", str(tmp_path / "m.ckpt")]) == 1
    assert capsys.readouterr().err == (f"llmkit: error: {path} is a LoRA adapter, not a checkpoint: give the "
                                       "checkpoint it was trained on, and the adapter as --lora (llmkit generate, "
                                       "llmkit lora merge)\n")


def test_lora_merge_onto_a_directory_is_refused_and_leaves_no_temp_file(trained, adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    assert main(["lora", "merge", "--ckpt", str(trained / "ckpt" / "last.ckpt"), "--lora", str(adapter[0]),
                 "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"llmkit: error: cannot write {out}: it is a directory; give the path of a " \
                                      "file instead\n"
    assert [p.name for p in tmp_path.rglob("*")] == ["merged"]


def test_adapter_for_another_base_is_refused(adapter, shards, tmp_path, tokenizer_path, capsys):
    config = write_config(tmp_path, shards)
    assert main(["pretrain", "fit", "--config", str(config), "--model.config.n_streams", "2",
                 "--seed_everything", "7"]) == 0
    code = main(["generate", "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--lora", str(adapter[0]),
                 "--tokenizer", str(tokenizer_path), "--prompt", "x"])
    assert code == 1
    assert "trained on base" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["120m", "350m", "900m"])
def test_gpu_configs_resolve_their_model_and_turn_every_speed_setting_on(size, capsys):
    """Each GPU config parses, its relative model path resolves to that model YAML, and it runs the fast
    path of docs/performance.md: bf16-mixed, compiled blocks, fused AdamW, the mHC kernels, a bf16 stream."""
    configs = Path(__file__).parents[1] / "configs"
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "fit", "--config", str(configs / "pretrain" / f"{size}_gpu.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    model_yaml = configs / "model" / f"{size}.yaml"
    assert ModelConfig.from_dict(printed["model"]["config"]) == ModelConfig.from_yaml(model_yaml)
    speed = (printed["trainer"]["precision"], printed["model"]["compile"], printed["model"]["optim"]["implementation"],
             printed["model"]["config"]["mhc"]["implementation"], printed["model"]["config"]["bf16_residual"])
    assert speed == ("bf16-mixed", True, "fused", "auto", True)


def test_commands_refuse_an_out_that_is_their_own_input_before_reading_it(trained, adapter, tmp_path, capsys):
    """`lora merge --out BASE` turned a training checkpoint into a merged backbone, and with it failed the
    fingerprint check of every adapter trained on BASE; `convert upcycle` replaced its input too, and
    `--out MODEL_DIR/model.safetensors` replaced a model directory's weights with a .ckpt."""
    ckpt, lora = tmp_path / "last.ckpt", tmp_path / "adapter.safetensors"
    ckpt.write_bytes((trained / "ckpt" / "last.ckpt").read_bytes())
    lora.write_bytes(adapter[0].read_bytes())
    before = ckpt.read_bytes(), lora.read_bytes()
    same_ckpt = tmp_path / "sub" / ".." / "last.ckpt"  # another spelling of the same file
    (tmp_path / "sub").mkdir()
    weights = tmp_path / "sub" / "model.safetensors"  # a model directory's file: --out must not replace it
    weights.write_bytes(b"a model's weights")
    for argv, message in [
        (["lora", "merge", "--ckpt", str(ckpt), "--lora", str(lora), "--out", str(same_ckpt)],
         f"--out {same_ckpt} is the --ckpt it reads: write the merged checkpoint to another file"),
        (["lora", "merge", "--ckpt", str(ckpt), "--lora", str(lora), "--out", str(lora)],
         f"--out {lora} is the --lora it reads: write the merged checkpoint to another file"),
        (["convert", "upcycle", "--ckpt", str(ckpt), "--out", str(ckpt)],
         f"--out {ckpt} is the --ckpt it reads: write the upcycled checkpoint to another file"),
        (["convert", "to-hf", "--ckpt", str(ckpt), "--out", str(ckpt)],
         f"--out {ckpt} is the --ckpt it reads: write the exported model to a new directory"),
        (["convert", "from-hf", "--model-dir", str(tmp_path / "sub"), "--out", str(tmp_path / "sub")],
         f"--out {tmp_path / 'sub'} is the --model-dir it reads: give the path of the .ckpt file to write"),
        (["convert", "from-hf", "--model-dir", str(tmp_path / "sub"), "--out", str(weights)],
         f"--out {weights} is a file in the --model-dir {tmp_path / 'sub'} it reads: give the path of the .ckpt "
         "file to write"),
        (["convert", "upcycle", "--ckpt", str(tmp_path / "sub"), "--out", str(weights)],
         f"--out {weights} is a file in the --ckpt {tmp_path / 'sub'} it reads: write the upcycled checkpoint to "
         "another file"),
        (["lora", "merge", "--ckpt", str(tmp_path / "sub"), "--lora", str(lora), "--out", str(weights)],
         f"--out {weights} is a file in the --ckpt {tmp_path / 'sub'} it reads: write the merged checkpoint to "
         "another file"),
        (["generate", "--ckpt", str(ckpt), "--tokenizer", str(tmp_path / "sub"), "--prompt", "x", "--out", str(ckpt)],
         f"--out {ckpt} is the --ckpt it reads: write the completions to another file"),
        (["generate", "--ckpt", str(ckpt), "--tokenizer", str(weights), "--prompt", "x", "--out", str(weights)],
         f"--out {weights} is the --tokenizer it reads: write the completions to another file"),
    ]:
        assert main(argv) == 1
        assert capsys.readouterr().err == f"llmkit: error: {message}\n"
    assert (ckpt.read_bytes(), lora.read_bytes(), weights.read_bytes()) == (*before, b"a model's weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "last.ckpt", "sub"]


def write_discovery_run(run: Path) -> None:
    """The files `llmkit ttt fit` leaves for consolidation: an initial state and one that beats it."""
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"prompt": "find x", "problem": "toy", "initial_reward": 0.0}))
    (run / "archive.json").write_text(json.dumps({"states": [{"id": 0, "reward": 0.0, "text": "x = 0"},
                                                             {"id": 1, "reward": 1.0, "text": "x = 1"}]}))


def test_consolidate_refuses_to_overwrite_a_run_it_reads(tmp_path, capsys):
    run = tmp_path / "run"
    write_discovery_run(run)
    before = {name: (run / name).read_bytes() for name in ("result.json", "archive.json")}
    for name in before:
        assert main(["consolidate", "--run", str(run), "--out", str(run / name)]) == 1
        assert capsys.readouterr().err == (f"llmkit: error: --out {run / name} is the {name} of --run {run} it "
                                           "reads: write the SDFT examples to another file\n")
    assert {name: (run / name).read_bytes() for name in before} == before


@pytest.mark.parametrize(("flags", "message"), [
    (["--top", "0"], "top (--top) must be >= 1, got 0"),
    (["--min-reward", "nan"], "min_reward (--min-reward) must be a number, got nan"),
])
def test_consolidate_refuses_a_bad_flag_naming_it(flags, message, tmp_path, capsys):
    write_discovery_run(tmp_path / "run")
    assert main(["consolidate", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "o.jsonl"), *flags]) == 1
    assert capsys.readouterr().err == f"llmkit: error: {message}\n" and not (tmp_path / "o.jsonl").exists()


def test_consolidate_counts_a_run_given_twice_once(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "found.jsonl"
    write_discovery_run(run)
    assert main(["consolidate", "--run", str(run), str(run / ".." / "run"), str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}: 1 SDFT example from 1 run(s), best reward 1\n"
    assert [json.loads(line)["run"] for line in out.read_text().splitlines()] == [str(run)]
    from llmkit.discovery.consolidate import consolidate  # the Python function too

    assert [e["run"] for e in consolidate([run, tmp_path / "." / "run"])] == [str(run)]


def test_an_error_on_a_rank_above_0_says_which_rank(tmp_path, capsys, monkeypatch):
    """Every rank of a distributed run reports its own error: the copies are told apart."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    args = ["consolidate", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "out.jsonl")]
    assert main(args) == 1
    assert capsys.readouterr().err.startswith(f"llmkit: error: {tmp_path / 'missing'}")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert main(args) == 1
    assert capsys.readouterr().err.startswith(f"llmkit: error (rank 1): {tmp_path / 'missing'}")


def test_a_lightning_command_stopped_by_sigterm_exits_143_not_0(monkeypatch):
    """Lightning's SIGTERMException is a SystemExit without a code: a scheduler saw a finished run."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def stopped(name, args):
        raise SIGTERMException

    monkeypatch.setattr("llmkit.cli.lightning.run", stopped)
    assert main(["pretrain", "fit", "--config", "x.yaml"]) == 143


MISSING_DEMO_CHECKPOINT = (
    "model.init_ckpt lightning_logs/demo/checkpoints/last.ckpt does not exist: set it to the checkpoint or model "
    "directory to start from (the shipped fine-tuning configs start from the demo's model: run `llmkit demo` first)")


@pytest.mark.parametrize("config, error", [
    ("pretrain/tiny_cpu", "data.train_files: 'lightning_logs/demo/data/train.bin' matches no file; check the path "
                          "or pattern; `llmkit data pack` writes shards (and `llmkit demo` the ones "
                          "configs/pretrain/tiny_cpu.yaml reads: run it first)"),
    ("sft/tiny_cpu", MISSING_DEMO_CHECKPOINT), ("sdft/tiny_cpu", MISSING_DEMO_CHECKPOINT),
    ("ttt/toy", MISSING_DEMO_CHECKPOINT)])
def test_a_cpu_config_run_before_the_demo_says_to_run_it(config, error, tmp_path, monkeypatch, capsys):
    """The shipped CPU configs read the demo's shards or start from its checkpoint; without them
    the one line names the key and the command that writes them."""
    monkeypatch.chdir(tmp_path)
    command = config.split("/")[0]
    assert main([command, "fit", "--config", str(Path(__file__).parents[1] / "configs" / f"{config}.yaml")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"llmkit: error: {error}"


def test_version_is_the_installed_packages(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"llmkit {version('llmkit')}\n"
