"""`llmkit demo` end to end on a slice of the stdlib corpus (about half a minute on CPU)."""

import re
from pathlib import Path

import pytest
import torch

from llmkit.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_learns(tmp_path, capsys, monkeypatch):
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
    # the bar counts steps: not Lightning's "Epoch 0/-2" of a run bounded by max_steps, nor its lr of "0.000"
    assert "Epoch 0/-2" not in printed
    assert float(re.search(r"train/lr:\s+(\S+)", printed).group(1)) > 0
    before, after = map(
        float, re.search(r"val loss \(nats/token\): ([\d.]+) before -> ([\d.]+) after", printed).groups()
    )
    assert after < before - 0.5
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "data" / "train.bin.json").is_file()
    assert list((tmp_path / "logs" / "demo" / "version_0").glob("events.out.tfevents.*"))
    # the run's checkpoint moved to OUT: no empty checkpoints/ left in the version directory
    assert not (tmp_path / "logs" / "demo" / "version_0" / "checkpoints").exists()
    # the mHC residual's story: H_res of every sublayer in TensorBoard (every 12 // 10 = 1 step), the
    # composite gain in the console, near 1 for doubly stochastic mappings
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs" / "demo" / "version_0"))
    events.Reload()
    assert [e.step for e in events.Scalars("mhc/composite/fwd_gain")] == list(range(12))
    assert {"mhc/L0.attn/row_dev", "mhc/L3.mlp/col_dev"} <= set(events.Tags()["scalars"])
    gains = re.search(r"mHC residual across the depth at step 11: gain ([\d.]+) forward, ([\d.]+) backward", printed)
    assert gains and all(abs(float(g) - 1) < 0.05 for g in gains.groups())
    assert float(gains[1]) == pytest.approx(events.Scalars("mhc/composite/fwd_gain")[-1].value, abs=1e-3)
    assert f"TensorBoard: tensorboard --logdir {tmp_path / 'logs' / 'demo' / 'version_0'}" in printed
    # every file of the demo's that a config or a benchmark names by default is where the demo wrote it
    named = {m for f in [*REPO.glob("configs/**/*.yaml"), *REPO.glob("bench/*.py")]
             for m in re.findall(r"lightning_logs/demo/[\w./-]+", f.read_text())}
    assert "lightning_logs/demo/checkpoints/last.ckpt" in named
    assert [m for m in sorted(named) if not (out / m.removeprefix("lightning_logs/demo/")).is_file()] == []

    # a rerun in the same place replaces the checkpoint and samples its own (Lightning named a second one
    # last-v1.ckpt and the demo sampled the first)
    assert main(["demo", "--out", str(out), "--log-dir", str(tmp_path / "logs"), "--max-files", "150",
                 "--max-steps", "2", "--vocab-size", "1024", "--seq-len", "64", "--batch-size", "8",
                 "--val-windows", "8"]) == 0
    assert f"sample from {out / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2

    # a rerun stopped by Ctrl-C leaves the finished checkpoint (it saved its step-1 state over it, which the
    # sdft/sft/ttt configs then started from)
    finished = (out / "checkpoints" / "last.ckpt").read_bytes()
    from llmkit.modules.pretrain import PretrainModule

    def ctrl_c_at_step_1(module, *args):
        if module.global_step == 1:
            raise KeyboardInterrupt
        return training_step(module, *args)

    training_step = PretrainModule.training_step
    monkeypatch.setattr(PretrainModule, "training_step", ctrl_c_at_step_1)
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl-C
        main(["demo", "--out", str(out), "--log-dir", str(tmp_path / "logs"), "--max-files", "150",
              "--max-steps", "4", "--vocab-size", "1024", "--seq-len", "64", "--batch-size", "8", "--val-windows", "8"])
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == finished
