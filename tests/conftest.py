"""Shared fixtures: a small synthetic Python-like corpus, its tokenizer and packed shards.

Built once per test session in a temporary directory; nothing here needs ../shared or the
network.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.summary.writer import event_file_writer

from llmkit.data.corpus import DOC_SEPARATOR
from llmkit.data.packing import pack
from llmkit.data.tokenizer import TokenizerTrainConfig, train_tokenizer

# TensorBoard names an event file ...{second}.{host}.{pid}.{n}, n counting this process's writers, and reads a
# run's files in name order: the in-process runs of one test, started in the same second, sorted .10 before .9
# and their points came out of order. Counts of seven digits sort as numbers.
event_file_writer._global_uid = event_file_writer.AtomicCounter(1_000_000)

VOCAB_SIZE = 384


def dead_pid() -> int:
    """The pid of a process that has ended: a temp file named after it is a killed writer's."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def synthetic_source(n_docs: int, seed: int) -> str:
    """Deterministic Python-like documents joined by DOC_SEPARATOR lines."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "value", "count", "items", "total", "result"]
    docs = []
    for d in range(n_docs):
        lines = [f'"""Module {d}."""', "import os", ""]
        for f in range(rng.randint(2, 5)):
            a, b = rng.sample(names, 2)
            lines += [
                f"def {a}_{f}({b}, {a}=None):",
                f"    if {a} is None:",
                f"        {a} = len({b}) + {rng.randint(0, 99)}",
                f"    return [{b}[i] * {a} for i in range({a})]",
                "",
            ]
        docs.append("\n".join(lines))
    return "".join(doc + "\n" + DOC_SEPARATOR + "\n" for doc in docs)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_in_the_working_directory():
    """Every test writes under its tmp_path: a Trainer that falls back to Lightning's default
    directories (./checkpoints, ./lightning_logs) would leave files in the checkout."""
    before = set(os.listdir())
    yield
    assert sorted(set(os.listdir()) - before - {".pytest_cache"}) == [], "a test wrote into the working directory"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "train.txt").write_text(synthetic_source(300, seed=0), encoding="utf-8")
    (root / "val.txt").write_text(synthetic_source(40, seed=1), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tokenizer_path(corpus_dir) -> Path:
    config = TokenizerTrainConfig(
        vocab_size=VOCAB_SIZE, normalization="identity", keep_whitespace=True, num_threads=2
    )
    return train_tokenizer([corpus_dir / "train.txt"], corpus_dir / "spm", config)


@pytest.fixture(scope="session")
def shards(corpus_dir, tokenizer_path) -> dict[str, Path]:
    out = {}
    for split in ("train", "val"):
        out[split] = corpus_dir / f"{split}.bin"
        pack(tokenizer_path, [corpus_dir / f"{split}.txt"], out[split], workers=1, progress=False)
    return out


@pytest.fixture
def ctrl_c():
    """SIGINT raising KeyboardInterrupt, as a user's terminal gives it: a test runner started as a
    background job of a non-interactive shell inherits it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def ctrl_c_right_after_update(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Send a real SIGINT right after the optimizer step of a module that accumulates by hand
    (``TokenMeanAccumulator``) that makes its ``global_step`` ``step``; ``monkeypatch.undo()`` stops it."""
    from llmkit.optim import TokenMeanAccumulator

    backward = TokenMeanAccumulator.backward

    def interrupted(self: TokenMeanAccumulator, *args, **kwargs):
        stats = backward(self, *args, **kwargs)
        if self.module.global_step == step:
            signal.raise_signal(signal.SIGINT)
        return stats

    monkeypatch.setattr(TokenMeanAccumulator, "backward", interrupted)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; without it they are skipped, not failed."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
