"""`llmkit demo` end to end on a slice of the stdlib corpus (about half a minute on CPU)."""

import re

import pytest
import torch

from llmkit.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end_and_learns(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--log-dir",
            str(tmp_path / "logs"),
            "--max-files",
            "150",
            "--max-steps",
            "12",
            "--vocab-size",
            "1024",
            "--seq-len",
            "64",
            "--batch-size",
            "8",
            "--val-windows",
            "8",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    before, after = map(
        float, re.search(r"val loss \(nats/token\): ([\d.]+) before -> ([\d.]+) after", printed).groups()
    )
    assert after < before - 0.5
    assert (tmp_path / "logs" / "demo" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert (out / "data" / "train.bin.json").is_file()
    assert list((tmp_path / "logs" / "demo").rglob("events.out.tfevents.*"))
    assert "TensorBoard: tensorboard --logdir" in printed

    # a rerun in the same place samples its own checkpoint (Lightning named a second one last-v1.ckpt)
    assert main(["demo", "--out", str(out), "--log-dir", str(tmp_path / "logs"), "--max-files", "150",
                 "--max-steps", "2", "--vocab-size", "1024", "--seq-len", "64", "--batch-size", "8",
                 "--val-windows", "8"]) == 0
    rerun = tmp_path / "logs" / "demo" / "version_1" / "checkpoints" / "last.ckpt"
    assert f"sample from {rerun}" in capsys.readouterr().out
    assert torch.load(rerun, weights_only=True)["global_step"] == 2
