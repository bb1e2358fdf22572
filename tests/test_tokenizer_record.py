"""A checkpoint records the tokenizer whose ids its weights learned, and every command that meets
another tokenizer of the same size refuses it: every shape check passes, and the ids mean other text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from llmkit.cli import main
from llmkit.data.packing import meta_path_for, pack
from llmkit.data.tokenizer import TokenizerTrainConfig, first_tokenizer, tokenizer_record, train_tokenizer
from llmkit.errors import LLMKitError
from llmkit.model.checkpoint import TOKENIZER_KEY, load_checkpoint_file, tokenizer_candidates
from llmkit.modules.finetune import load_student
from tests.conftest import VOCAB_SIZE

MODEL = {"vocab_size": VOCAB_SIZE, "n_layers": 1, "d_model": 32, "n_heads": 4, "d_ff": 64, "max_seq_len": 64}


@pytest.fixture(scope="module")
def other(corpus_dir, tmp_path_factory) -> dict[str, Path]:
    """Another tokenizer of the same vocabulary size (BPE, not unigram) and shards packed with it."""
    root = tmp_path_factory.mktemp("other")
    config = TokenizerTrainConfig(vocab_size=VOCAB_SIZE, model_type="bpe", normalization="identity",
                                  keep_whitespace=True, num_threads=2)
    tokenizer = train_tokenizer([corpus_dir / "train.txt"], root / "bpe", config)
    out = {"tokenizer": tokenizer}
    for split in ("train", "val"):
        out[split] = root / f"{split}.bin"
        pack(tokenizer, [corpus_dir / f"{split}.txt"], out[split], workers=1, progress=False)
    return out


def pretrain_config(tmp_path: Path, shards: dict[str, Path], **model) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 2, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 1,
                    "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "llmkit.callbacks.Checkpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt")}}]},
        "model": {"config": MODEL, "optim": {"warmup_steps": 1}, **model},
        "data": {"train_files": [str(shards["train"])], "val_files": [str(shards["val"])], "seq_len": 32,
                 "batch_size": 2},
    }
    path = tmp_path / "config.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def pretrained(shards, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pretrained")
    assert main(["pretrain", "fit", "--config", str(pretrain_config(tmp, shards))]) == 0
    return tmp / "ckpt" / "last.ckpt"


def refusal(err: str, ckpt: Path, learned: Path, given: Path) -> bool:
    return err.count("\n") == 1 and f"{ckpt} learned the ids of the tokenizer {learned.resolve()}" in err \
        and f"not of {given.resolve()}" in err


def test_pretraining_records_the_tokenizer_its_shards_were_packed_with(pretrained, tokenizer_path, shards):
    recorded = load_checkpoint_file(pretrained)[TOKENIZER_KEY]
    assert recorded == tokenizer_record(tokenizer_path)
    assert recorded["sha256"] == json.loads(meta_path_for(shards["train"]).read_text())["tokenizer_sha256"]


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_checkpoint_refuses_shards_of_another_tokenizer(command, pretrained, tokenizer_path, other, tmp_path,
                                                          capsys):
    config = pretrain_config(tmp_path, other)
    code = main(["pretrain", command, "--config", str(config), "--ckpt_path", str(pretrained),
                 "--trainer.max_steps", "4"])
    assert code == 1 and refusal(capsys.readouterr().err, pretrained, tokenizer_path, other["tokenizer"])


def test_pretraining_from_init_ckpt_refuses_shards_of_another_tokenizer(pretrained, tokenizer_path, other,
                                                                        shards, tmp_path, capsys):
    config = pretrain_config(tmp_path, other, init_ckpt=str(pretrained))
    assert main(["pretrain", "fit", "--config", str(config)]) == 1
    assert refusal(capsys.readouterr().err, pretrained, tokenizer_path, other["tokenizer"])
    same = pretrain_config(tmp_path / "same", shards, init_ckpt=str(pretrained))
    assert main(["pretrain", "fit", "--config", str(same)]) == 0
    assert load_checkpoint_file(tmp_path / "same" / "ckpt" / "last.ckpt")[TOKENIZER_KEY] == \
        tokenizer_record(tokenizer_path)


def test_fine_tuning_refuses_another_tokenizer_and_records_its_own(pretrained, tokenizer_path, other):
    with pytest.raises(LLMKitError, match="learned the ids of the tokenizer"):
        load_student(str(pretrained), str(other["tokenizer"]))
    model, tok, record = load_student(str(pretrained), str(tokenizer_path))
    assert tok.path == tokenizer_path and model.config.vocab_size == VOCAB_SIZE
    assert record == tokenizer_record(tokenizer_path) == load_checkpoint_file(pretrained)[TOKENIZER_KEY]


def test_a_checkpoint_names_its_tokenizer_by_the_first_candidate_still_on_disk(tokenizer_path, tmp_path):
    """The recorded file, else the run's tokenizer hyperparameter, else the directory it was converted
    from, else the directory it is; a directory counts only if load_tokenizer reads it."""
    source, ckpt_dir = tmp_path / "source", tmp_path / "ckpt_dir"
    for directory in (source, ckpt_dir):
        directory.mkdir()
        (directory / "tokenizer_config.json").write_text("{}")  # not a tokenizer on its own
    checkpoint = {TOKENIZER_KEY: {"path": str(tmp_path / "moved.model"), "sha256": "0" * 64},
                  "hyper_parameters": {"tokenizer": str(tokenizer_path)}, "converted_from": {"model_dir": str(source)}}
    assert tokenizer_candidates(ckpt_dir, checkpoint) == [tmp_path / "moved.model", tokenizer_path, source, ckpt_dir]
    assert first_tokenizer(tokenizer_candidates(ckpt_dir, checkpoint)) == tokenizer_path
    del checkpoint["hyper_parameters"]
    assert first_tokenizer(tokenizer_candidates(ckpt_dir, checkpoint)) is None
    (ckpt_dir / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    assert first_tokenizer(tokenizer_candidates(ckpt_dir, checkpoint)) == ckpt_dir
    (source / "tokenizer.json").write_text("{}")
    assert first_tokenizer(tokenizer_candidates(ckpt_dir, checkpoint)) == source
    assert first_tokenizer(tokenizer_candidates(tmp_path / "file.ckpt", {})) is None


def test_fine_tuning_without_model_tokenizer_takes_the_one_init_ckpt_names(pretrained, tokenizer_path, tmp_path,
                                                                           capsys):
    """The recorded tokenizer of a checkpoint, the tokenizer files of a model directory; a checkpoint
    that names none asks for model.tokenizer."""
    _, tok, record = load_student(str(pretrained), None)
    assert tok.path == tokenizer_path and record == load_checkpoint_file(pretrained)[TOKENIZER_KEY]
    exported = tmp_path / "exported"
    assert main(["convert", "to-hf", "--ckpt", str(pretrained), "--out", str(exported)]) == 0
    _, tok, record = load_student(str(exported), None)
    assert tok.path == exported / "tokenizer.model" and record["sha256"] == tokenizer_record(tokenizer_path)["sha256"]
    ckpt = torch.load(pretrained, weights_only=True)
    del ckpt[TOKENIZER_KEY]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    with pytest.raises(LLMKitError) as error:
        load_student(str(old), None)
    assert str(error.value) == (f"model.init_ckpt {old} names no tokenizer that is still on disk: set model.tokenizer "
                                f"(the .model, tokenizer.json or model directory its data was packed with)")


def test_generate_takes_the_recorded_tokenizer_and_refuses_another(pretrained, tokenizer_path, other, capsys):
    common = ["generate", "--ckpt", str(pretrained), "--prompt", "def ", "--max-new-tokens", "3",
              "--temperature", "0"]
    assert main(common) == 0
    default = capsys.readouterr().out
    assert main([*common, "--tokenizer", str(tokenizer_path)]) == 0
    assert capsys.readouterr().out == default and default.startswith("def ")
    assert main([*common, "--tokenizer", str(other["tokenizer"])]) == 1
    assert refusal(capsys.readouterr().err, pretrained, tokenizer_path, other["tokenizer"])


def test_generate_without_a_recorded_tokenizer_asks_for_one(pretrained, tmp_path, capsys):
    ckpt = torch.load(pretrained, weights_only=True)
    del ckpt[TOKENIZER_KEY]  # a checkpoint written before the record existed
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    assert main(["generate", "--ckpt", str(old), "--prompt", "def "]) == 1
    assert capsys.readouterr().err == (f"llmkit: error: {old} records no tokenizer that is still on disk: give "
                                       f"--tokenizer (the .model, tokenizer.json or model directory its data was "
                                       f"packed with)\n")


def test_generate_from_a_model_directory_takes_the_tokenizer_it_holds(pretrained, tokenizer_path, tmp_path, capsys):
    """`llmkit convert to-hf` writes the tokenizer into the model directory: generate from it needs
    no --tokenizer; a directory without tokenizer files is asked for one, by what it lacks."""
    exported = tmp_path / "exported"
    assert main(["convert", "to-hf", "--ckpt", str(pretrained), "--out", str(exported)]) == 0
    capsys.readouterr()
    common = ["--prompt", "def ", "--max-new-tokens", "3", "--temperature", "0"]
    assert main(["generate", "--ckpt", str(pretrained), *common]) == 0
    expected = capsys.readouterr().out
    assert main(["generate", "--ckpt", str(exported), *common]) == 0
    assert capsys.readouterr().out == expected and expected.startswith("def ")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (exported / name).unlink()
    assert main(["generate", "--ckpt", str(exported), *common]) == 1
    assert capsys.readouterr().err == (f"llmkit: error: {exported} has no tokenizer.json or tokenizer.model: give "
                                       f"--tokenizer (the .model, tokenizer.json or model directory its data was "
                                       f"packed with)\n")
    assert main(["generate", "--ckpt", str(exported), "--tokenizer", str(tokenizer_path), *common]) == 0
    assert capsys.readouterr().out == expected


def test_to_hf_exports_the_recorded_tokenizer_and_refuses_another(pretrained, tokenizer_path, other, tmp_path,
                                                                  capsys):
    assert main(["convert", "to-hf", "--ckpt", str(pretrained), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    assert main(["convert", "to-hf", "--ckpt", str(pretrained), "--out", str(tmp_path / "bad"),
                 "--tokenizer", str(other["tokenizer"])]) == 1
    assert refusal(capsys.readouterr().err, pretrained, tokenizer_path, other["tokenizer"])
    assert not (tmp_path / "bad").exists()
