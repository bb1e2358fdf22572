"""bench/quality.py end to end at a toy size (well under a minute on CPU)."""

import json

import pytest
import yaml

from bench import quality as bench


@pytest.mark.slow
def test_quality_benchmark_runs_every_variant_and_seed(tmp_path, capsys):
    model = tmp_path / "micro.yaml"
    model.write_text(yaml.safe_dump({"vocab_size": 512, "n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 64,
                                     "max_seq_len": 64}))
    rows = bench.main(["--model", str(model), "--variants", "dense", "n4_copy", "moe", "--seeds", "0", "1",
                       "--tokens", "8192", "--seq-len", "32", "--batch-size", "8", "--max-files", "40",
                       "--vocab-size", "512", "--work", str(tmp_path / "work")])
    assert [r["variant"] for r in rows] == ["dense", "n4_copy", "moe"]
    assert rows[0]["active_params"] == rows[0]["params"] and rows[2]["active_params"] < rows[2]["params"]
    for r in rows:
        assert r["seeds"] == 2 and r["tokens"] == 8192
        assert 0 < r["val_loss_mean"] < 6.3  # below ln(512) = 6.24 + slack: it trained
        assert r["val_loss_std"] > 0  # two seeds give two different runs
        assert r["bpb_mean"] > 0
    saved = json.loads((tmp_path / "work" / "quality.json").read_text())
    assert len(saved["runs"]) == 6 and saved["summary"] == rows
    # the same seed gives the same data order and init: rerunning one variant reproduces it exactly
    again = bench.main(["--model", str(model), "--variants", "dense", "--seeds", "0", "--tokens", "8192",
                        "--seq-len", "32", "--batch-size", "8", "--max-files", "40", "--vocab-size", "512",
                        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "again.json")])
    first = next(r for r in saved["runs"] if r["variant"] == "dense" and r["seed"] == 0)
    assert again[0]["val_loss_mean"] == pytest.approx(first["val_loss"], abs=1e-6)
    assert again[0]["val_loss_std"] is None and again[0]["bpb_std"] is None  # one seed has no spread
    table = capsys.readouterr().out
    assert "bits/byte" in table
    row = next(line for line in table.splitlines()[::-1] if line.startswith("dense "))
    assert "±" not in row and f"{again[0]['val_loss_mean']:.4f}" in row  # the last table: one seed, no "± 0.0000"
    both = bench.main(["--model", str(model), "--variants", "dense", "--optimizers", "adamw", "muon", "--seeds", "0",
                       "--tokens", "8192", "--seq-len", "32", "--batch-size", "8", "--max-files", "40",
                       "--vocab-size", "512", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "both.json")])
    assert [(r["variant"], r["optimizer"]) for r in both] == [("dense", "adamw"), ("dense", "muon")]
    assert both[0]["val_loss_mean"] == pytest.approx(first["val_loss"], abs=1e-6)  # the same AdamW run
    assert both[1]["val_loss_mean"] != both[0]["val_loss_mean"] and 0 < both[1]["val_loss_mean"] < 6.3
