"""Replay: the replay ratio, the reservoir buffer, its checkpoint state, and a real Lightning fit."""

import json
import math
import random
import re

import lightning as L
import pytest
import torch

from llmkit.callbacks import Replay
from llmkit.data.examples import Example
from llmkit.data.sdft_data import SDFTDataModule
from llmkit.errors import LLMKitError


class StubModule:
    """Stands in for the LightningModule: records ``log`` calls."""

    def __init__(self) -> None:
        self.logged: list[tuple[str, float, int]] = []

    def log(self, name: str, value: float, batch_size: int) -> None:
        self.logged.append((name, value, batch_size))


@pytest.fixture(scope="module")
def one_process() -> L.Trainer:
    """The Trainer of a single-process run: Replay's global batch is this process's batch."""
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False)


def examples(tag: str, n: int, start: int = 0) -> list[Example]:
    return [Example(f"{tag} prompt {i}", f"{tag} demo {i}", {"i": i}, f"{tag}:{i}") for i in range(start, start + n)]


def keys(batch: list[Example]) -> list[tuple[str, str]]:
    return [(e.prompt, e.demonstration) for e in batch]


def write_jsonl(path, batch: list[Example]):
    path.write_text("".join(json.dumps({"prompt": e.prompt, "demonstration": e.demonstration, **e.meta}) + "\n"
                            for e in batch), encoding="utf-8")
    return path


def test_replay_ratio_holds_and_replays_only_buffered_examples_of_earlier_batches(one_process):
    cb, stub = Replay(buffer_size=500, replay_ratio=0.2, seed=3), StubModule()
    cb.add(examples("old", 50))
    global_python, global_torch = random.getstate(), torch.get_rng_state()
    n_batches, size = 2000, 8
    replaced_per_batch = []
    for b in range(n_batches):
        batch = examples("new", size, start=b * size)
        own = set(keys(batch))
        buffered = set(keys(cb.buffer))
        cb.on_train_batch_start(one_process, stub, batch, b)
        replaced = [k for k in keys(batch) if k not in own]
        assert set(replaced) <= buffered  # drawn from the buffer as it was before this batch
        assert len(replaced) + sum(k in own for k in keys(batch)) == size
        replaced_per_batch.append(len(replaced))
        assert cb.last_fraction == len(replaced) / size
    fraction = sum(replaced_per_batch) / (n_batches * size)
    assert abs(fraction - 0.2) < 4 * math.sqrt(0.2 * 0.8 / (n_batches * size))
    logged_fractions = [v for name, v, _ in stub.logged if name == "train/replay_fraction"]
    assert logged_fractions == [r / size for r in replaced_per_batch]
    expected_sizes = [float(min(50 + size * (b + 1), 500)) for b in range(n_batches)]
    assert [v for name, v, _ in stub.logged if name == "train/replay_buffer"] == expected_sizes
    assert {bs for _, _, bs in stub.logged} == {size}
    # its own generator only: the global ones are untouched
    assert random.getstate() == global_python and torch.equal(torch.get_rng_state(), global_torch)


def test_an_empty_buffer_replays_nothing_and_a_batch_never_replays_itself(one_process):
    cb, stub = Replay(replay_ratio=0.9), StubModule()
    batch = examples("new", 8)
    cb.on_train_batch_start(one_process, stub, batch, 0)
    assert keys(batch) == keys(examples("new", 8)) and cb.last_fraction == 0.0 and len(cb.buffer) == 8
    with pytest.raises(LLMKitError, match="lists of Example"):
        cb.on_train_batch_start(one_process, stub, torch.zeros(2, 3), 1)


def test_buffer_is_capped_deduplicated_and_a_uniform_reservoir():
    cb = Replay(buffer_size=100)
    cb.add(examples("a", 1000))
    assert len(cb.buffer) == 100 and len(cb.seen_keys) == 1000
    assert len(set(keys(cb.buffer))) == 100
    before = keys(cb.buffer)
    cb.add(examples("a", 1000))  # a second epoch: nothing new, no reservoir draws
    assert keys(cb.buffer) == before and len(cb.seen_keys) == 1000
    small = Replay(buffer_size=10)
    small.add(examples("b", 3) + examples("b", 3) + [Example("b prompt 0", "b demo 0", {"other": 1}, "elsewhere")])
    assert keys(small.buffer) == keys(examples("b", 3))
    # each of n = 1000 examples stays with probability 100/1000: the first 100 keep ~10 places,
    # where a FIFO would keep 0 and "keep the first ones" 100
    early = 0
    runs = 50
    for seed in range(runs):
        cb = Replay(buffer_size=100, seed=seed)
        cb.add(examples("a", 1000))
        early += sum(e.meta["i"] < 100 for e in cb.buffer)
    sd = math.sqrt(runs * 100 * 0.1 * 0.9 * 900 / 999)  # hypergeometric
    assert abs(early - runs * 10) < 4 * sd


def test_state_round_trip_through_weights_only_load_continues_identically(tmp_path, one_process):
    original, stub = Replay(buffer_size=40, replay_ratio=0.3, seed=7), StubModule()
    original.add(examples("old", 30))
    for b in range(20):
        original.on_train_batch_start(one_process, stub, examples("new", 4, start=4 * b), b)
    torch.save(original.state_dict(), tmp_path / "replay.pt")
    restored = Replay(buffer_size=40, replay_ratio=0.3, seed=999)  # the seed is overridden by the state
    restored.load_state_dict(torch.load(tmp_path / "replay.pt", weights_only=True))
    assert keys(restored.buffer) == keys(original.buffer)
    assert [(e.meta, e.source) for e in restored.buffer] == [(e.meta, e.source) for e in original.buffer]
    assert restored.seen_keys == original.seen_keys
    replaced_any = False
    for b in range(20, 50):
        a, r = examples("new", 4, start=4 * b), examples("new", 4, start=4 * b)
        original.on_train_batch_start(one_process, stub, a, b)
        restored.on_train_batch_start(one_process, stub, r, b)
        assert keys(a) == keys(r)
        replaced_any |= keys(a) != keys(examples("new", 4, start=4 * b))
    assert replaced_any and keys(restored.buffer) == keys(original.buffer)


def test_seed_files_fill_the_buffer_at_fit_setup_only_when_empty(tmp_path):
    write_jsonl(tmp_path / "task1.jsonl", examples("t1", 3))
    write_jsonl(tmp_path / "task2.jsonl", examples("t2", 2))
    cb = Replay(seed_files=[str(tmp_path / "task*.jsonl")])
    cb.setup(None, None, "validate")
    assert cb.buffer == []
    cb.setup(None, None, "fit")
    assert keys(cb.buffer) == keys(examples("t1", 3) + examples("t2", 2))
    assert cb.buffer[4].meta == {"i": 1} and cb.buffer[4].source == f"{tmp_path / 'task2.jsonl'}:2"
    cb.buffer = cb.buffer[:1]
    cb.setup(None, None, "fit")  # a non-empty (e.g. restored) buffer is left alone
    assert len(cb.buffer) == 1
    with pytest.raises(LLMKitError, match="matches no file"):
        Replay(seed_files=[str(tmp_path / "missing.jsonl")]).setup(None, None, "fit")


@pytest.mark.parametrize(
    "kwargs, message",
    [({"buffer_size": 0}, "buffer_size must be >= 1, got 0"), ({"replay_ratio": 1.0}, "replay_ratio must be in [0, 1)"),
     ({"replay_ratio": -0.1}, "got -0.1")],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(LLMKitError, match=re.escape(message)):
        Replay(**kwargs)


class Recorder(L.LightningModule):
    """Records the examples each training_step receives; one trivial parameter to train."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.received: list[list[tuple[str, str]]] = []

    def training_step(self, batch: list[Example], batch_idx: int) -> torch.Tensor:
        self.received.append(keys(batch))
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordingReplay(Replay):
    """Replay that records each batch before and after its replacements, the fraction it replaced (as it
    logs it), and the buffer at the first batch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.before: list[list[tuple[str, str]]] = []
        self.after: list[list[tuple[str, str]]] = []
        self.fractions: list[float] = []
        self.buffer_at_start: list[Example] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.buffer_at_start is None:
            self.buffer_at_start = list(self.buffer)
        self.before.append(keys(batch))
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.after.append(keys(batch))
        self.fractions.append(self.last_fraction)


def fit(tmp_path, max_steps: int, ckpt_path=None) -> tuple[L.Trainer, Recorder, RecordingReplay]:
    module = Recorder()
    replay = RecordingReplay(buffer_size=16, replay_ratio=0.5, seed=1, seed_files=[str(tmp_path / "old.jsonl")])
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[replay])
    trainer.fit(module, SDFTDataModule(train_files=str(tmp_path / "new.jsonl"), batch_size=4), ckpt_path=ckpt_path)
    return trainer, module, replay


def test_training_step_sees_the_replaced_examples_and_a_resume_restores_the_buffer(tmp_path):
    write_jsonl(tmp_path / "old.jsonl", examples("old", 6))
    write_jsonl(tmp_path / "new.jsonl", examples("new", 12))
    trainer, module, replay = fit(tmp_path, max_steps=3)
    assert module.received == replay.after and len(module.received) == 3
    assert keys(replay.buffer_at_start) == keys(examples("old", 6))  # seed_files
    replaced = [a for before, after in zip(replay.before, replay.after, strict=True)
                for b, a in zip(before, after, strict=True) if a != b]
    assert sum(f * 4 for f in replay.fractions) == len(replaced) > 0  # batch_size 4: what it counted replaced
    assert any(k in keys(examples("old", 6)) for k in replaced)  # the earlier task reaches training_step
    assert trainer.callback_metrics["train/replay_buffer"].item() == len(replay.buffer) == 16
    trainer.save_checkpoint(tmp_path / "three.ckpt")

    _, resumed_module, resumed = fit(tmp_path, max_steps=6, ckpt_path=tmp_path / "three.ckpt")
    assert keys(resumed.buffer_at_start) == keys(replay.buffer)  # restored, not refilled from seed_files
    assert [e.source for e in resumed.buffer_at_start] == [e.source for e in replay.buffer]
    _, _, uninterrupted = fit(tmp_path, max_steps=6)
    assert resumed_module.received == resumed.after == uninterrupted.after[3:]
    assert keys(resumed.buffer) == keys(uninterrupted.buffer)


def test_rewinding_the_batch_in_flight_restores_the_state_before_its_start(one_process):
    replay, stub = Replay(buffer_size=8, replay_ratio=0.5, seed=3), StubModule()
    replay.add(examples("old", 8))  # full: the next examples overwrite slots
    before = (keys(replay.buffer), set(replay.seen_keys), replay.rng.getstate())
    replay.on_train_batch_start(one_process, stub, examples("new", 6), 0)
    assert keys(replay.buffer) != before[0]
    replay.rewind_in_flight()
    assert (keys(replay.buffer), replay.seen_keys, replay.rng.getstate()) == before
    replay.on_train_batch_start(one_process, stub, examples("new", 6), 0)
    replay.on_train_batch_end(one_process, stub, None, examples("new", 6), 0)
    done = keys(replay.buffer)
    replay.rewind_in_flight()  # a batch whose step ended is not undone
    assert keys(replay.buffer) == done


class InterruptedRecorder(Recorder):
    """Ctrl-C inside the third batch's step, after Replay's draws for it."""

    def training_step(self, batch: list[Example], batch_idx: int) -> torch.Tensor:
        if self.global_step == 2:
            raise KeyboardInterrupt
        return super().training_step(batch, batch_idx)


def test_a_resume_after_ctrl_c_inside_a_step_replays_what_an_uninterrupted_run_does(tmp_path):
    """The interrupt's checkpoint held the draws and buffer additions of the batch in flight, which
    the resume trains again: it drew other replacements (SFT's weights differed by 2e-4)."""
    from llmkit.callbacks import Checkpoint

    write_jsonl(tmp_path / "old.jsonl", examples("old", 6))
    write_jsonl(tmp_path / "new.jsonl", examples("new", 12))
    replay = RecordingReplay(buffer_size=16, replay_ratio=0.5, seed=1, seed_files=[str(tmp_path / "old.jsonl")])
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[replay, Checkpoint(dirpath=tmp_path / "ckpt")])
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl-C
        trainer.fit(InterruptedRecorder(), SDFTDataModule(train_files=str(tmp_path / "new.jsonl"), batch_size=4))
    _, resumed_module, resumed = fit(tmp_path, max_steps=6, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    _, _, uninterrupted = fit(tmp_path, max_steps=6)
    assert resumed_module.received == resumed.after == uninterrupted.after[2:]
    assert keys(resumed.buffer) == keys(uninterrupted.buffer)
