"""bench/throughput.py at a toy size on CPU: rows, ratios and the target checks."""

import argparse
import gc
import json
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import yaml

from bench import throughput as bench
from llmkit.profiling import dense_bf16_peak_flops, saved_activation_bytes


def test_throughput_benchmark_measures_both_modes_and_both_residuals(tmp_path, capsys):
    model = tmp_path / "micro.yaml"
    model.write_text(yaml.safe_dump({"vocab_size": 256, "n_layers": 2, "d_model": 32, "n_heads": 2, "d_ff": 64,
                                     "max_seq_len": 64}))
    out = tmp_path / "throughput.json"
    rows = bench.main(["--models", str(model), "--seq-len", "32", "--batch-size", "2", "--steps", "2",
                       "--warmup", "1", "--no-compile", "--out", str(out)])
    assert [(r["mode"], r["n_streams"]) for r in rows] == [("trainer", 1), ("trainer", 4), ("bare", 1), ("bare", 4)]
    for dense, mhc in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert mhc["act_ratio"] > 1.2  # four streams keep more activations than one
        assert mhc["params_M"] > dense["params_M"]  # the mappings' parameters
        assert mhc["step_s"] > 0 and mhc["tokens_per_s"] > 0
        assert dense["mfu"] is None and dense["peak_mem_GiB"] is None  # no GPU: no peak FLOPs, no allocator
    assert rows[1]["params_M"] == rows[3]["params_M"]  # both modes measure the same model
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["targets"] == []  # the H100 targets are not checked on a CPU
    assert "time x" in capsys.readouterr().out


def test_targets_are_judged_on_a_gpu_run(monkeypatch):
    monkeypatch.setattr(bench, "CUDA", True)

    def row(model, n, mode="trainer", **values):
        return {"model": model, "n_streams": n, "mode": mode, "mfu": None, "time_ratio": None, "mem_ratio": None,
                "first_step_s": None, **values}

    rows = [row("350m", 1, mfu=0.46), row("350m", 4, time_ratio=1.2, mem_ratio=1.1, first_step_s=95.0),
            row("350m", 4, "bare", time_ratio=1.1, first_step_s=5.0), row("120m", 4, time_ratio=1.19)]
    results = bench.check_targets(rows, argparse.Namespace(precision="bf16-mixed"))
    verdicts = {(r["model"], r["mode"], r["target"]): r["met"] for r in results}
    assert verdicts == {
        ("350m", "trainer", "dense_mfu"): True,
        ("350m", "trainer", "time_ratio"): False,
        ("350m", "bare", "time_ratio"): True,
        ("350m", "trainer", "mem_ratio"): True,
        ("350m", "trainer", "first_step_s"): False,  # only the trainer row: the bare one reuses compiled kernels
        ("120m", "trainer", "time_ratio"): True,
    }
    assert bench.check_targets(rows, argparse.Namespace(precision="32-true")) == []


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA B200", 2.25e15), ("Tesla T4", None),
])
def test_dense_bf16_peaks_by_device_name(name, peak):
    assert dense_bf16_peak_flops(name) == peak


def test_measuring_the_saved_activations_frees_them():
    """Each benchmark row measures its saved activations with one more forward; that forward's
    activations were kept alive (a cycle through autograd's nodes that gc cannot see), so on an
    H200 every later row's peak memory held every earlier row's: 120m n = 4 peaked 7.6 GiB above
    its own step, reported as mHC's memory excess."""
    layer = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64)
    outputs: list[weakref.ref] = []

    def forward() -> None:
        y = layer(x).relu()  # relu saves its own output: the node -> tensor -> node cycle
        outputs.append(weakref.ref(y))

    assert saved_activation_bytes(layer, forward) == 2 * 32 * 64 * 4  # x (for the weight's gradient), relu's output
    gc.collect()
    assert outputs[0]() is None


def test_token_throughput_fills_the_peak_lightning_lacks(monkeypatch):
    """On an H200 Lightning finds no FLOPs entry (MFU '-') and warns so; TokenThroughput takes the
    datasheet peak, and the warning, no longer true, is not shown."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision
    from lightning.pytorch.trainer.states import RunningStage, TrainerFn

    from llmkit.callbacks import TokenThroughput

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), precision="bf16-mixed",
                              precision_plugin=MixedPrecision("bf16-mixed", "cuda"), enable_validation=True,
                              state=SimpleNamespace(stage=RunningStage.TRAINING), world_size=1)
    monitor = TokenThroughput()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.setup(trainer, None, TrainerFn.FITTING)
    assert monitor.available_flops == 989e12
    assert {t.available_flops for t in monitor._throughputs.values()} == {989e12}
    assert not [w for w in caught if "FLOPs not found" in str(w.message)]

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B300")  # in neither table
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TokenThroughput().setup(trainer, None, TrainerFn.FITTING)
    assert [str(w.message) for w in caught if "FLOPs not found" in str(w.message)]  # Lightning's warning stays



def test_every_benchmark_takes_a_model_by_name_or_yaml_path():
    from bench.models import CONFIGS, model_name, model_yaml

    assert model_yaml("tiny") == CONFIGS / "tiny.yaml" and model_yaml("my/model.yml") == Path("my/model.yml")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'tiy': no such model; give a name in configs/model/ "
                                                         r"\(.*\btiny\b.*\) or a YAML path"):
        model_yaml("tiy")
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=model_name)
    assert parser.parse_args(["--model", "120m"]).model == "120m"  # as given, for the tables and JSON
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "tiy"])


def test_the_memory_live_at_a_steps_peak_is_grouped_by_where_it_was_allocated(tmp_path):
    """A recorded allocator trace replayed: the peak counts only the step's own blocks (a block from
    before the recording, freed during it, changes nothing), and the blocks live at that moment
    are grouped by their innermost frame outside torch, with that line's code."""
    source = tmp_path / "ops.py"
    source.write_text("def enter():\n    x = torch.empty(4)\n    y = torch.empty(8)\n")
    torch_frame = {"filename": str(Path(torch.__file__).parent / "nn" / "functional.py"), "line": 10, "name": "f"}

    def at(line: int) -> list[dict]:
        return [torch_frame, {"filename": str(source), "line": line, "name": "enter"}]

    def alloc(addr: int, size: int, frames: list[dict]) -> dict:
        return {"action": "alloc", "addr": addr, "size": size, "frames": frames}

    def free(addr: int) -> dict:
        return {"action": "free_requested", "addr": addr, "size": 0}

    trace = [alloc(1, 100, at(2)), alloc(2, 300, at(3)), free(99), alloc(3, 50, at(2)), free(2),  # peak: 450
             alloc(4, 120, [torch_frame]), free(1), free(3), free(4)]
    result = bench.peak_allocation_sites(trace)
    assert result["peak_bytes"] == 450
    assert result["sites"] == [
        {"site": "ops.py:3 enter", "code": "y = torch.empty(8)", "bytes": 300, "blocks": 1},
        {"site": "ops.py:2 enter", "code": "x = torch.empty(4)", "bytes": 150, "blocks": 2},
    ]
    assert bench.allocation_site([torch_frame])[0] == "functional.py:10 f"  # torch's frame when there is no other
    assert bench.allocation_site([]) == ("(no traceback)", "")
