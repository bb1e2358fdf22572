"""PackedDataModule: window alignment, determinism, shard checks."""

import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmkit.data import packing
from llmkit.data.datamodule import PackedDataModule
from llmkit.data.packing import block_checksums, open_shard, pack
from llmkit.errors import LLMKitError
from tests.conftest import VOCAB_SIZE


def make_dm(shards, **kw) -> PackedDataModule:
    args = dict(train_files=[str(shards["train"])], val_files=[str(shards["val"])], seq_len=32,
                batch_size=4, vocab_size=VOCAB_SIZE, val_windows=8)
    return PackedDataModule(**{**args, **kw})


def test_windows_are_shifted_by_one_and_match_the_shard(shards):
    dm = make_dm(shards)
    dm.setup("fit")
    tokens, _ = open_shard(shards["train"])
    for i in range(5):
        x, y = dm.train_set[i]
        shard, offset = dm.train_set.starts[i]
        assert shard == 0
        assert torch.equal(x, torch.from_numpy(tokens[offset : offset + 32].astype(np.int64)))
        assert torch.equal(x[1:], y[:-1])
        assert y[-1].item() == int(tokens[offset + 32])


def test_validation_windows_are_fixed_consecutive_and_capped(shards):
    dm = make_dm(shards)
    dm.setup("validate")
    assert dm.val_set.starts[:, 1].tolist() == [0, 32, 64, 96, 128, 160, 192, 224]
    batches = [b[0] for b in dm.val_dataloader()]
    again = make_dm(shards)
    again.setup("validate")
    assert all(torch.equal(a, b[0]) for a, b in zip(batches, again.val_dataloader(), strict=True))


def test_training_windows_are_seeded(shards):
    a, b, c = make_dm(shards, seed=1), make_dm(shards, seed=1), make_dm(shards, seed=2)
    crops = [make_dm(shards, seed=seed, samples_per_epoch=50) for seed in (1, 1, 2)]
    for dm in (a, b, c, *crops):
        dm.setup("fit")
    first = [next(iter(dm.train_dataloader()))[0] for dm in (a, b, c)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])  # the order
    assert np.array_equal(crops[0].train_set.starts, crops[1].train_set.starts)  # the crops' offsets
    assert not np.array_equal(crops[0].train_set.starts, crops[2].train_set.starts)


def test_an_epoch_trains_on_every_token_once(shards):
    """Random crops drawn once (the default was one pass worth of them) covered 63% of the tokens,
    the same 63% every epoch: 1 - 1/e."""
    dm = make_dm(shards, train_files=[str(shards["train"]), str(shards["val"])])
    dm.setup("fit")
    for k, shard in enumerate(dm.train_set.shards):
        offsets = dm.train_set.starts[dm.train_set.starts[:, 0] == k, 1]
        targets = np.concatenate([np.arange(off + 1, off + 33) for off in offsets])
        assert np.array_equal(np.sort(targets), np.arange(1, 1 + 32 * len(offsets)))  # each once, in order
        assert len(shard) - 1 - targets.size < 32  # all but a last partial window


def test_windows_never_cross_a_shard_boundary(shards):
    dm = make_dm(shards, train_files=[str(shards["train"]), str(shards["val"])], samples_per_epoch=5000)
    dm.setup("fit")
    lengths = [len(s) for s in dm.train_set.shards]
    starts = dm.train_set.starts
    assert set(starts[:, 0].tolist()) == {0, 1}
    assert all(off + 33 <= lengths[k] for k, off in starts)
    assert len(dm.train_set) == 5000


def test_a_dataset_sent_to_a_spawned_worker_carries_its_files_not_their_tokens(shards):
    """A memmap pickles as its whole data: each spawned worker held a private copy of every shard
    (490 MB per worker for a 197 MB shard, measured)."""
    import pickle

    dm = make_dm(shards)
    dm.setup("fit")
    payload = pickle.dumps(dm.train_set)
    assert len(payload) < 2 * dm.train_set.starts.nbytes + 4096 < dm.train_set.shards[0].nbytes
    copy = pickle.loads(payload)
    assert isinstance(copy.shards[0], np.memmap) and copy.shards[0].filename == dm.train_set.shards[0].filename
    assert all(torch.equal(a, b) for i in (0, 7) for a, b in zip(copy[i], dm.train_set[i], strict=True))


def test_glob_patterns_are_expanded(shards):
    dm = make_dm(shards, train_files=[str(shards["train"].parent / "tra*.bin")])
    dm.setup("fit")
    assert len(dm.train_set.shards) == 1


def test_vocab_mismatch_is_a_clear_error(shards):
    dm = make_dm(shards, vocab_size=1000)
    with pytest.raises(LLMKitError, match=rf"vocab_size {VOCAB_SIZE}.*model has vocab_size 1000"):
        dm.setup("fit")


def test_a_hugging_face_tokenizers_shards_fit_a_padded_vocabulary_but_never_a_smaller_one(shards, tmp_path):
    """Shards packed with a tokenizer.json record vocab_rule at_least: a model with more embedding
    rows than the tokenizer has tokens takes them, one with fewer does not."""
    copies = {}
    for split, path in shards.items():
        copies[split] = tmp_path / path.name
        copies[split].write_bytes(path.read_bytes())
        meta = json.loads(path.with_name(path.name + ".json").read_text())
        (tmp_path / (path.name + ".json")).write_text(json.dumps({**meta, "vocab_rule": "at_least"}))
    make_dm(copies, vocab_size=VOCAB_SIZE + 64).setup("fit")
    with pytest.raises(LLMKitError, match=rf"vocab_size {VOCAB_SIZE}.*model has vocab_size {VOCAB_SIZE - 1}"):
        make_dm(copies, vocab_size=VOCAB_SIZE - 1).setup("fit")


@pytest.mark.parametrize("setting, message", [
    (dict(seq_len=0), "data.seq_len must be >= 1, got 0"),
    (dict(batch_size=-2), "data.batch_size must be >= 1, got -2"),
    (dict(samples_per_epoch=-3), "data.samples_per_epoch must be >= 1, got -3"),
    (dict(num_workers=-1), "data.num_workers must be >= 0, got -1"),
    (dict(val_windows=0), "data.val_windows must be >= 1, got 0; leave data.val_files out to skip validation"),
])
def test_a_setting_out_of_range_is_one_line_naming_it(shards, setting, message):
    """Without the check these were Lightning's or range()'s tracebacks, or (val_windows 0, -1) a
    validation silently skipped or one window short."""
    with pytest.raises(LLMKitError) as e:
        make_dm(shards, **setting)
    assert str(e.value) == message


def test_shard_shorter_than_a_window_is_a_clear_error(shards):
    n = open_shard(shards["val"])[1]["n_tokens"]
    dm = make_dm(shards, seq_len=n)
    with pytest.raises(LLMKitError, match=r"fewer than seq_len \+ 1"):
        dm.setup("validate")


def test_too_few_training_windows_for_one_batch_per_process_is_a_clear_error(shards):
    """The train loader drops the last partial batch: with fewer windows than a batch (per process
    under DDP) Lightning only warned and the run exited 0 having trained nothing."""
    n = open_shard(shards["train"])[1]["n_tokens"] // 32
    make_dm(shards, batch_size=n).setup("fit")
    with pytest.raises(LLMKitError, match=rf"^data\.train_files give {n} windows of 32 tokens, fewer than "
                                          rf"data\.batch_size {n + 1}: lower data\.batch_size or data\.seq_len, or "
                                          r"add data$"):
        make_dm(shards, batch_size=n + 1).setup("fit")
    with pytest.raises(LLMKitError, match=r"^data\.samples_per_epoch gives 3 windows, fewer than data\.batch_size 4: "
                                          r"raise data\.samples_per_epoch or lower data\.batch_size$"):
        make_dm(shards, samples_per_epoch=3).setup("fit")
    dm = make_dm(shards, samples_per_epoch=7)
    dm.trainer = SimpleNamespace(world_size=2)  # a DistributedSampler gives each process ceil(7 / 2) = 4
    dm.setup("fit")
    dm = make_dm(shards, samples_per_epoch=6)
    dm.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(LLMKitError, match=r"gives 6 windows, 3 for each of 2 processes, fewer than data\.batch_size 4"):
        dm.setup("fit")


def test_out_of_range_token_id_is_named_with_its_position(shards, tmp_path):
    tokens, meta = open_shard(shards["val"])
    bad = np.array(tokens, dtype=np.uint16)
    bad[77] = VOCAB_SIZE + 5
    path = tmp_path / "bad.bin"
    bad.tofile(path)  # as another tokenizer's pack would write it: its checksums match
    (tmp_path / "bad.bin.json").write_text(json.dumps({**meta, "block_crc32": block_checksums(bad, 1 << 24)}))
    dm = make_dm(shards, val_files=[str(path)])
    with pytest.raises(LLMKitError, match=rf"bad.bin: token id {VOCAB_SIZE + 5} at position 77"):
        dm.setup("validate")


def test_a_shard_changed_since_pack_is_named_with_the_changed_block(corpus_dir, tokenizer_path, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(packing, "CHECKSUM_BLOCK_TOKENS", 64)
    path = tmp_path / "val.bin"
    meta = pack(tokenizer_path, [corpus_dir / "val.txt"], path, workers=1, progress=False)
    assert meta["checksum_block_tokens"] == 64 and len(meta["block_crc32"]) == -(-meta["n_tokens"] // 64) > 2
    tokens = np.fromfile(path, dtype=np.uint16)
    assert meta["block_crc32"] == block_checksums(tokens, 64)
    make_dm({"train": path, "val": path}).setup("validate")  # as packed: passes

    changed = tokens.copy()
    changed[130:140] = 0  # a zeroed run of valid ids, in the third block
    changed.tofile(path)
    blocks = len(meta["block_crc32"])
    with pytest.raises(LLMKitError, match=rf"val.bin: tokens 128 to 191 \(block 3 of {blocks}\) do not match the "
                                          r"checksum pack recorded in .*val.bin.json.*llmkit data pack"):
        make_dm({"train": path, "val": path}).setup("validate")

    del meta["checksum_block_tokens"], meta["block_crc32"]  # a shard packed before checksums: ids checked only
    (tmp_path / "val.bin.json").write_text(json.dumps(meta))
    make_dm({"train": path, "val": path}).setup("validate")


def test_missing_shard_and_empty_file_list(shards, tmp_path):
    with pytest.raises(LLMKitError, match="nothing.bin"):
        make_dm(shards, train_files=[str(tmp_path / "nothing.bin")]).setup("fit")
    with pytest.raises(LLMKitError, match="train_files is empty"):
        make_dm(shards, train_files=[]).setup("fit")
    text = tmp_path / "arith.jsonl"  # given where a shard goes: the advice was to pack over it
    text.write_text('{"prompt": "1 + 1", "demonstration": "2"}\n')
    with pytest.raises(LLMKitError, match=re.escape(
            f"{text} is a text file, not a token shard: pack it into one with `llmkit data pack --tokenizer "
            f"PREFIX.model --input {text} --output {tmp_path / 'arith.bin'}`")):
        make_dm(shards, train_files=[str(text)]).setup("fit")
    meta = f"{shards['train']}.json"  # tab completion's slip: "text file", packed to train.bin.bin
    with pytest.raises(LLMKitError, match=re.escape(f"{meta} is the metadata of the token shard {shards['train']}: "
                                                    f"give the shard, {shards['train']}")):
        make_dm(shards, train_files=[meta]).setup("fit")


def test_ranks_get_disjoint_windows_when_lightning_adds_a_distributed_sampler(shards):
    """Under DDP Lightning re-creates the train loader with a DistributedSampler (the same call
    the Trainer makes); the resumable loader must survive that, and ranks must not overlap."""
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    from llmkit.data.datamodule import ResumableLoader

    dm = make_dm(shards, samples_per_epoch=64)
    dm.setup("fit")
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dm.train_set, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = _update_dataloader(dm.train_dataloader(), sampler)
        assert isinstance(loader, ResumableLoader) and loader.seed == dm.seed
        seen.append([i for batch in loader.batch_sampler for i in batch])
        assert sum(len(x) for x, _ in loader) == len(seen[rank]) == 32
    assert not set(seen[0]) & set(seen[1])


def test_a_resume_past_the_end_of_a_pass_of_the_data_now_is_an_error_not_endless_empty_passes(shards):
    """A checkpoint's loader position (4 batches into a pass) on data that now gives 4 batches per
    pass: skipping them left every pass empty, and Lightning started the next one forever."""
    dm = make_dm(shards, samples_per_epoch=16, batch_size=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.load_state_dict({"epoch": 0, "consumed": 4})
    with pytest.raises(LLMKitError, match=r"resumes the training data at batch 4 of a pass, but the data gives 4 "
                                          r"batches per pass now"):
        next(iter(loader))
    loader.load_state_dict({"epoch": 0, "consumed": 3})
    assert len(list(loader)) == 1 and loader.state_dict() == {"epoch": 1, "consumed": 0}


def test_with_a_plain_trainer_the_shards_are_checked_against_the_module_being_run(shards):
    """No CLI links the data module to the model: setup takes the PretrainModule's vocab_size and
    max_seq_len, so a mismatch is the same one line, not an IndexError in the embedding mid-step."""
    import lightning as L

    from llmkit.model.config import ModelConfig
    from llmkit.modules.pretrain import PretrainModule

    def fit(vocab_size: int, max_seq_len: int, seq_len: int) -> None:
        config = ModelConfig(vocab_size=vocab_size, n_layers=1, d_model=16, n_heads=2, d_ff=32, max_seq_len=max_seq_len)
        trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(PretrainModule(config), make_dm(shards, vocab_size=None, seq_len=seq_len))

    with pytest.raises(LLMKitError, match=rf"was packed with a tokenizer of vocab_size {VOCAB_SIZE} .* but the model "
                                          rf"has vocab_size {VOCAB_SIZE - 1}: pack it with the model's tokenizer "
                                          rf"\(or, pretraining from scratch, set model.config.vocab_size: "
                                          rf"{VOCAB_SIZE}\)"):
        fit(VOCAB_SIZE - 1, 64, 32)
    with pytest.raises(LLMKitError, match=r"^data\.seq_len 64 is longer than the model's max_seq_len 32"):
        fit(VOCAB_SIZE, 32, 64)
    fit(VOCAB_SIZE, 64, 32)


def test_without_val_files_fit_skips_validation_without_lightnings_zero_length_warning(shards):
    """No val_files is a run without validation, as intended: Lightning's "Total length of `list`
    across ranks is zero. Please make sure this was your intention." would only alarm."""
    import lightning as L

    from llmkit.model.config import ModelConfig
    from llmkit.modules.pretrain import PretrainModule

    config = ModelConfig(vocab_size=VOCAB_SIZE, n_layers=1, d_model=16, n_heads=2, d_ff=32, max_seq_len=32)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, val_check_interval=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(PretrainModule(config), make_dm(shards, val_files=None))
    assert trainer.global_step == 2 and "val/loss" not in trainer.callback_metrics
    assert [str(w.message) for w in caught if "across ranks is zero" in str(w.message)] == []


def test_shards_packed_with_different_tokenizers_are_refused(shards, tmp_path):
    """Only the vocabulary size was checked: a validation shard of another tokenizer of the same size gave a
    meaningless val/loss, and train shards of two tokenizers trained together."""
    import shutil

    other = tmp_path / "other.bin"
    shutil.copyfile(shards["val"], other)
    meta = json.loads(Path(f"{shards['val']}.json").read_text())
    meta.update(tokenizer_sha256="0" * 64, tokenizer="/elsewhere/spm.model")
    Path(f"{other}.json").write_text(json.dumps(meta))
    for train, val in (([shards["train"]], [other]), ([shards["train"], other], [shards["val"]])):
        data = PackedDataModule(train_files=[str(p) for p in train], val_files=[str(p) for p in val], seq_len=32,
                                batch_size=4, vocab_size=VOCAB_SIZE)
        with pytest.raises(LLMKitError, match=rf"^{other} was packed with another tokenizer \(/elsewhere/spm.model\) "
                                              rf"than {shards['train']} \("):
            data.setup("fit")
