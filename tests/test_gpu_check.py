"""bench/gpu_check.py on a CPU: the smoke run of every section without jsonargparse or llmkit.cli,
the wrapper's exit without CUDA, and the target, JUnit and table logic on made-up rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check, throughput

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--models", "tiny", "--seq-len", "32", "--batch-size", "2", "--steps", "1", "--warmup", "1",
         "--device", "cpu", "--no-compile", "--skip-pytest"]
HEADERS = ["**1. Training throughput", "**2. CPU op events", "**3. Memory", "**4. Generation", "**5. GPU tests"]


@pytest.mark.slow
def test_smoke_run_fills_every_section_without_jsonargparse_or_the_cli(tmp_path):
    poison = tmp_path / "poison"
    poison.mkdir()  # imported at start-up: `import jsonargparse` (or of llmkit.cli) then raises
    (poison / "sitecustomize.py").write_text("import sys\nsys.modules['jsonargparse'] = None\n"
                                             "sys.modules['llmkit.cli'] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(poison), str(ROOT)]))
    env.pop("OUT", None)
    out = tmp_path / "x.json"
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", *SMOKE, "--float32-matmul-precision", "high",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["section_errors"] == [] and report["device_type"] == "cpu"
    assert report["args"]["float32_matmul_precision"] == "high" and "fp32 matmuls high" in done.stdout
    assert report["device"].startswith("CPU")

    training = report["training"]["rows"]
    assert [(r["model"], r["n_streams"]) for r in training] == [("tiny", 1), ("tiny", 4)]
    dense, mhc = training
    for r in training:
        assert r["mode"] == "bare" and r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["device"] == report["device"]
        assert r["mfu"] is None and r["peak_mem_GiB"] is None and not r["gradient_checkpointing"]
    assert mhc["time_ratio"] == pytest.approx(mhc["step_s"] / dense["step_s"])

    kernels = report["kernels"]
    assert [(k["model"], k["n_streams"]) for k in kernels["rows"]] == [("tiny", 1), ("tiny", 4)]
    for k in kernels["rows"]:
        assert k["counted"] == "cpu_op_events" and isinstance(k["count"], int) and k["count"] > 0
    (sub,) = kernels["per_sublayer"]
    k1, k4 = (k["count"] for k in kernels["rows"])
    assert sub["n_streams"] == 4 and sub["value"] == pytest.approx((k4 - k1) / (2 * 4))  # tiny: 4 layers

    memory = report["memory"]["rows"]
    assert [(m["n_streams"], m["peak_mem_GiB"], m["held_after_forward_GiB"]) for m in memory] == [(1, None, None),
                                                                                                  (4, None, None)]
    assert report["memory"]["eager"] == []  # measured on CUDA only
    assert all(isinstance(m["saved_act_bytes"], int) and m["saved_act_bytes"] > 0 for m in memory)
    assert memory[1]["act_ratio"] == pytest.approx(memory[1]["saved_act_bytes"] / memory[0]["saved_act_bytes"])
    assert memory[1]["act_ratio"] > 1  # four streams keep more than one

    generation = report["generation"]
    assert generation["mode"] == "cached" and generation["skipped"] == []
    assert [(g["n_streams"], g["batch"]) for g in generation["rows"]] == [(4, 1), (4, 4), (1, 1), (1, 4)]
    for g in generation["rows"]:
        assert g["new_tokens_per_s"] == pytest.approx(g["batch"] * 8 / g["seconds"])
        assert g["kernels_per_token"] is None and "top_kernels" not in g  # profiled on CUDA only

    assert report["pytest"] == {"skipped": "--skip-pytest"}
    assert [t["result"] for t in report["targets"]] == ["-"]  # tiny's memory ratio: no CUDA peak to judge
    assert sum(line.startswith("|---") for line in done.stdout.splitlines()) == 1  # one table
    assert out.with_suffix(".md").read_text() in done.stdout  # also beside the JSON
    for header in HEADERS:
        assert header in done.stdout


@pytest.mark.slow
def test_a_generation_that_hangs_is_killed_and_the_report_still_written(tmp_path):
    """On an H200 the compiled decode of 120m n=4 at batch 1 hung, and the run's remaining minutes
    (and the GPU tests) went with it. Section 4's child is killed after --gen-timeout; it prints
    its stacks first, and the other sections' rows, the table and the JSON remain."""
    hang = tmp_path / "hang"
    hang.mkdir()  # every generate call of the child process sleeps past its timeout
    (hang / "sitecustomize.py").write_text("import time\nimport llmkit.model.generation as g\n"
                                           "g.generate = lambda *args, **kwargs: time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hang), str(ROOT)]))
    env.pop("OUT", None)
    out = tmp_path / "x.json"
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", *SMOKE, "--gen-timeout", "30", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["section_errors"] == ["generation"] and len(report["training"]["rows"]) == 2
    assert report["generation"]["rows"] == []
    assert report["generation"]["errors"] == [{"model": "tiny", "error": "timed out after 30 s (the stacks the "
                                               "child printed before its kill are in the console log)"}]
    assert "sitecustomize.py\", line 3, in <lambda>" in done.stderr  # the stack, printed before the kill
    assert "killed after 30 s" in done.stdout and "| tiny | timed out after 30 s" in done.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("python", ["python3", sys.executable])
def test_wrapper_exits_2_with_one_line_without_cuda(python, tmp_path):
    if python == sys.executable and torch.cuda.is_available():
        pytest.skip("this python sees a CUDA device")
    env = dict(os.environ, PYTHON=python, OUT=str(tmp_path))
    done = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--skip-pytest"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    if python == "python3" and done.returncode == 0:
        pytest.skip("python3 here sees a CUDA device")
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2
    assert len(output) == 1 and "CUDA" in output[0]
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("limit_s, extras_run", [(540, True), (20, False)])
def test_wrapper_logs_its_console_and_runs_the_extras_only_where_they_fit(limit_s, extras_run, tmp_path):
    """A stand-in python that 'sees' CUDA and liger and echoes what it is asked to run."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nif [ "$1" = "-c" ]; then exit 0; fi\necho "ran $*"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), OUT=str(tmp_path / "out"), LIMIT_S=str(limit_s))
    done = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--skip-pytest"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ran = [line for line in done.stdout.splitlines() if line.startswith("ran ")]
    assert ran == ["ran -m bench.gpu_check --skip-pytest"] + (
        ["ran -m bench.mhc_host_overhead", "ran -m bench.mhc_liger", "ran -m bench.mhc_kernel_variants"]
        if extras_run else [])
    if not extras_run:
        assert "bench/mhc_host_overhead.py (about 30 s) not run" in done.stdout
        assert "bench/mhc_liger.py (about 60 s) not run" in done.stdout
        assert "bench/mhc_kernel_variants.py (about 150 s) not run" in done.stdout
    assert (tmp_path / "out" / "gpu_check_console.log").read_text() == done.stdout + done.stderr


def test_a_dead_cuda_context_in_a_row_costs_that_row_not_the_report(monkeypatch):
    """After an illegal memory access, freeing memory raises too: from inside the handler it ended the run
    before anything was written."""
    def dead(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check, "release_memory", dead)
    errors: list[dict] = []
    assert gpu_check.attempt(errors, {"model": "120m"}, dead) is None
    assert errors == [{"model": "120m", "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}]


def test_flags_that_would_leave_a_section_empty_are_refused(capsys):
    for flags in (["--models", "tiny", "--kernel-model", "120m"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.parse_args(flags)
        assert exit_info.value.code == 2
    assert "--kernel-model 120m must be one of --models (tiny)" in capsys.readouterr().err


def made_up_report(device_type: str) -> dict:
    args = gpu_check.parse_args(["--out", "unused.json"])
    args.device, args.precision, args.compile, args.optimizer = device_type, "bf16-mixed", True, "fused"
    args.gen_batch_sizes, args.gen_tokens, args.gen_repeats = [1, 64], 128, 3
    report = gpu_check.new_report(args, "NVIDIA H200" if device_type == "cuda" else "CPU")

    def train(model, n, step, peak, time_ratio=1.0, mem_ratio=1.0):
        return {"model": model, "n_streams": n, "step_s": step, "tokens_per_s": 16384 / step, "mfu": 0.4,
                "peak_mem_GiB": peak, "saved_act_GiB": 1.0, "time_ratio": time_ratio, "mem_ratio": mem_ratio,
                "act_ratio": 1.0, "device": report["device"]}

    report["training"]["rows"] = [train("120m", 1, 0.1, 20.0), train("120m", 4, 0.115, 26.0, 1.15, 1.30),
                                  train("350m", 1, 0.3, 40.0), train("350m", 4, 0.36, 48.0, 1.20, 1.20)]
    # with CUDA graphs: shown, never judged (the targets are the default compile mode's)
    report["training"]["cuda_graph_rows"] = [dict(train("120m", 1, 0.09, 21.0), cudagraph_skips=0),
                                             dict(train("120m", 4, 0.117, 20.0, 1.30, 1.00), cudagraph_skips=2)]
    fused = dict(train("120m", 4, 0.105, 25.0, 1.05), settings="APPLY_PROJECT_FUSED=True")
    report["training"]["setting_rows"] = [fused]
    report["memory"]["rows"] = [dict(r, saved_act_bytes=2**30, held_after_forward_GiB=r["peak_mem_GiB"] / 4,
                                     step_peak_GiB=r["peak_mem_GiB"] / 2) for r in report["training"]["rows"]]
    sites = [{"site": f"c{i}.py:{i} call", "code": f"buf{i} = empty_strided_cuda(...)", "GiB": 1.0 / (i + 1),
              "blocks": 24} for i in range(8)]
    report["memory"]["rows"][1].update(step_peak_traced_GiB=12.9, step_peak_sites=sites)
    report["memory"]["eager"] = [{"model": "120m", "n_streams": 4, "held_after_forward_GiB": 5.0,
                                  "step_peak_GiB": 9.5, "step_peak_traced_GiB": 9.4, "step_peak_sites": sites[:1],
                                  "device": report["device"]}]
    report["memory"]["errors"] = [{"model": "120m", "n_streams": 1, "error": "OutOfMemoryError: CUDA out of memory"}]
    report["generation"]["rows"] = [
        {"model": "120m", "n_streams": 4, "batch": 64, "mode": "compiled", "seconds": 0.2,
         "new_tokens_per_s": 40960.0, "kernels_per_token": 301.25, "kernel_us_per_token": 1200.0,
         "gpu_idle": {"busy_ms": 160.0, "idle_ms": 40.5, "gaps_ms": 30.0,
                      "by_op": [{"op": f"op{i}", "gaps": 128, "ms": 10.0 - i} for i in range(5)]},
         "top_kernels": [{"kernel": "_entry_kernel", "launches_per_token": 24.0, "us_per_token": 300.0,
                          "share": 0.25},
                         {"kernel": "sm90_xmma_gemm_" + "x" * 100, "launches_per_token": 48.0,
                          "us_per_token": 240.5, "share": 0.2}],
         "device": report["device"]},
        {"model": "120m", "n_streams": 4, "batch": 1, "mode": "compiled", "seconds": 0.5,
         "new_tokens_per_s": 256.0, "device": report["device"]},
        {"model": "120m", "n_streams": 4, "settings": "ENTRY_ONE_KERNEL_TOKENS=0", "batch": 64, "mode": "compiled",
         "seconds": 0.25, "new_tokens_per_s": 32768.0, "device": report["device"]},  # shown, not judged
    ]
    report["pytest"] = {"skipped": "--skip-pytest"}
    report["targets"] = gpu_check.judge_targets(report)
    return report


def test_targets_are_the_issue_bounds_and_judged_on_cuda_only():
    verdicts = {(t["target"], t["model"]): t["result"] for t in made_up_report("cuda")["targets"]}
    assert verdicts == {
        ("time_ratio", "120m"): "PASS",  # 1.15 <= 1.20
        ("mem_ratio", "120m"): "FAIL",  # 1.30 > 1.25
        ("time_ratio", "350m"): "FAIL",  # 1.20 > 1.15
        ("mem_ratio", "350m"): "PASS",
        ("decode_tokens_per_s", "120m"): "PASS",  # 40,960 >= 40,000 at batch 64
    }
    assert {t["result"] for t in made_up_report("cpu")["targets"]} == {"n/a"}


def test_table_has_one_header_row_per_section_and_the_verdicts():
    text = gpu_check.table(made_up_report("cuda"))
    lines = text.splitlines()
    assert lines[0] == "| case | measured | target | result | device |"
    assert sum(line.startswith("| **") for line in lines) == 5
    assert "**2. CUDA kernels" in text
    assert "| 120m n=4 / n=1 | time 1.150x, peak memory 1.300x | time <= 1.20x | PASS | NVIDIA H200 |" in lines
    assert "| 120m n=4 / n=1 | peak 1.300x, saved activations 1.000x | peak <= 1.25x | FAIL | NVIDIA H200 |" in lines
    assert ("| 120m n=4 | peak 26.00 GiB, saved activations 1.000 GiB; held after forward 6.50 GiB, step peak "
            "13.00 GiB |  |  | NVIDIA H200 |") in lines
    assert "| 120m n=4 eager blocks | held after forward 5.00 GiB, step peak 9.50 GiB |  |  | NVIDIA H200 |" in lines
    # what was live at the step's peak, by allocation site: the first PEAK_SITES_SHOWN of the JSON's 8
    at = lines.index("| 120m n=4: live at the step's peak | 12.90 GiB allocated in the step, by where |  |  | "
                     "NVIDIA H200 |")
    assert lines[at + 1] == ("|   c0.py:0 call | 1.00 GiB in 24 blocks: buf0 = empty_strided_cuda(...) |  |  | "
                             "NVIDIA H200 |")
    assert [line.split("|")[1].strip() for line in lines[at + 1:at + 7]] == [
        "c0.py:0 call", "c1.py:1 call", "c2.py:2 call", "c3.py:3 call", "c4.py:4 call",
        "120m n=4 eager blocks: live at the step's peak"]
    assert "| 120m n=1 | OutOfMemoryError: CUDA out of memory |  | ERROR | NVIDIA H200 |" in lines  # shown
    assert ("| 120m n=4 batch 64 | 40,960 new tok/s (0.200 s, 301 kernels/token) | >= 40,000 new tok/s | PASS "
            "| NVIDIA H200 |") in lines
    assert ("| 120m n=4 batch 64 ENTRY_ONE_KERNEL_TOKENS=0 | 32,768 new tok/s (0.250 s) |  |  | NVIDIA H200 |"
            in lines)
    # where a decode step's time goes: kernel time beside the timed step (0.2 s / 128 steps), the first waits,
    # the costliest kernels (long names cut)
    at = lines.index("| 120m n=4 batch 64: GPU per step | kernels 1,200 us of the 1,562 us step (timed); profiled "
                     "call: busy 160.0 ms, idle 40.5 ms |  |  | NVIDIA H200 |")
    assert [line.split("|")[1].strip() for line in lines[at + 1:at + 6]] == [
        "waited on op0", "waited on op1", "waited on op2", "_entry_kernel", "sm90_xmma_gemm_" + "x" * 55]
    assert lines[at + 4] == ("|   _entry_kernel | 24.0 x, 300.0 us per step (25% of kernel time) |  |  | "
                             "NVIDIA H200 |")
    assert ("| 120m n=4, CUDA graphs | 117.0 ms/step, peak 20.00 GiB, time 1.300x n=1's, 2 graphs skipped |  |  | "
            "NVIDIA H200 |") in lines  # skipped: those blocks ran without graphs
    assert ("| 120m n=4, APPLY_PROJECT_FUSED=True | 105.0 ms/step, peak 25.00 GiB, time 1.050x n=1's |  |  | "
            "NVIDIA H200 |") in lines
    assert all(line.count(" | ") == 4 for line in lines if not line.startswith("|---"))  # five cells each


CPU = torch.autograd.DeviceType.CPU


class FakeEvent:
    """What step_time_by_kernel reads of a profiler event."""

    def __init__(self, name: str, us: float, device_type=torch.autograd.DeviceType.CUDA) -> None:
        self.name, self.device_type, self.us = name, device_type, us
        self.time_range = self

    def elapsed_us(self) -> float:
        return self.us


def test_step_time_by_kernel_sums_the_mhc_kernels_and_their_bandwidth_from_their_tensor_bytes():
    pytest.importorskip("triton")
    events = [FakeEvent("_project_fwd_kernel", 100.0), FakeEvent("_project_fwd_kernel", 100.0),
              FakeEvent("_apply_bwd_kernel", 40.0), FakeEvent("triton_poi_fused_add_0", 50.0),
              FakeEvent("Memcpy HtoD (Pageable -> Device)", 10.0), FakeEvent("aten::mm", 999.0, CPU),
              FakeEvent("_apply_project_fwd_kernel", 10.0)]  # the fused kernel: not project_fwd's
    t, n, c = 64, 4, 32
    got = gpu_check.step_time_by_kernel(events, True, n, c, t, torch.bfloat16)
    assert got["kernel_ms"] == pytest.approx(0.30) and got["mhc_ms"] == pytest.approx(0.25)
    assert list(got["by_kernel"]) == ["apply_bwd", "apply_project_fwd", "project_fwd"]
    project = got["by_kernel"]["project_fwd"]
    # x [t, nC] bf16; phi [2n + n^2, nC], proj [t, 24] and sum x^2 [t] fp32, the last two once per split of
    # nC: 64 tokens are one token block, so project_forward splits nC = 128 into its column tiles
    from llmkit.model import mhc_triton

    splits = n * c // mhc_triton.PROJECT_BLOCK_K
    expected = t * n * c * 2 + 24 * n * c * 4 + splits * (t * 24 * 4 + t * 4)
    assert project["launches"] == 2 and project["ms"] == pytest.approx(0.2)
    assert project["bytes_per_launch"] == expected
    assert project["GB_per_s"] == pytest.approx(expected * 2 / 0.2e6)
    cpu = gpu_check.step_time_by_kernel([FakeEvent("llmkit::mhc_pre", 30.0, CPU)] + events, False, n, c, t,
                                        torch.float32)
    assert cpu == {"kernel_ms": None, "mhc_ms": pytest.approx(0.03),
                   "by_kernel": {"mhc_pre": {"launches": 1, "ms": pytest.approx(0.03)}}}


def test_table_shows_where_the_step_time_goes():
    report = made_up_report("cuda")
    report["kernels"]["rows"] = [{"model": "120m", "n_streams": 4, "counted": "cuda_kernels", "count": 900,
                                  "cuda_memcpy_memset": 2, "device": "NVIDIA H200", "kernel_ms": 52.5, "mhc_ms": 9.25,
                                  "by_kernel": {"apply_fwd": {"launches": 24, "ms": 1.5, "GB_per_s": 3200.4}}}]
    lines = gpu_check.table(report).splitlines()
    assert "| 120m n=4 time | all kernels 52.5 ms, of which mHC kernels 9.2 ms |  |  | NVIDIA H200 |" in lines
    assert "|   apply_fwd | 24 x, 1.50 ms, 3,200 GB/s |  |  | NVIDIA H200 |" in lines


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="" name="tests.test_sdft"><error message="collection failure">Traceback:
E   ModuleNotFoundError: No module named 'jsonargparse'</error></testcase>
<testcase classname="" name="tests.test_no_such_module"><error message="collection failure">
E   ModuleNotFoundError: No module named 'tokenizers'</error></testcase>
<testcase classname="tests.test_gpu" name="test_a" />
<testcase classname="tests.test_gpu" name="test_b"><failure message="assert 0">E assert 0</failure></testcase>
<testcase classname="tests.test_gpu" name="test_c"><skipped message="no flash_attn" /></testcase>
<testcase classname="tests.test_fsdp.TestSome" name="test_d"><error message="failed on setup">E</error></testcase>
</testsuite></testsuites>"""


def test_pytest_results_are_read_per_file_and_import_failures_reported():
    summary = gpu_check.summarize_junit(JUNIT)
    assert summary["files"] == {
        "tests/test_gpu.py": {"passed": 1, "failed": 1, "errors": 0, "skipped": 1},
        "tests/test_fsdp.py": {"passed": 0, "failed": 0, "errors": 1, "skipped": 0},
    }
    assert [(m["file"], m["missing_module"], m["has_gpu_tests"]) for m in summary["not_collected"]] == [
        ("tests/test_sdft.py", "jsonargparse", True),  # it holds a gpu test: shown as not collected
        ("tests/test_no_such_module.py", "tokenizers", False),
    ]
    report = made_up_report("cuda")
    report["pytest"] = {"returncode": 1, **summary}
    lines = gpu_check.table(report).splitlines()
    assert "| tests/test_gpu.py | 1 passed, 1 failed, 1 skipped |  | FAIL | NVIDIA H200 |" in lines
    assert ("| tests/test_sdft.py | not collected: No module named 'jsonargparse' |  | NOT COLLECTED "
            "| NVIDIA H200 |") in lines
    assert any(line.startswith("| other test modules | 1 without gpu tests") for line in lines)


def test_setting_rows_parse_python_literals_and_refuse_what_is_not_a_setting(monkeypatch):
    import argparse

    from llmkit.model import mhc_triton

    assert gpu_check.setting_row_spec("APPLY_PROJECT_FUSED=True, STREAM_BLOCK_C=512") == {
        "APPLY_PROJECT_FUSED": True, "STREAM_BLOCK_C": 512}
    for bad in ("APPLY_PROJECT_FUSED", "APPLY_PROJECT_FUSED=yes", "=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            gpu_check.setting_row_spec(bad)
    seen = []
    monkeypatch.setattr("bench.throughput.measure", lambda name, n, mode, ns: seen.append(
        (mhc_triton.STREAM_BLOCK_C, throughput.model_config(name, n, ns).mhc.recompute_stream)) or {"step_s": 1.0})
    before = mhc_triton.STREAM_BLOCK_C
    ns = gpu_check.bench_namespace(gpu_check.parse_args(["--models", "tiny", "--kernel-model", "tiny"]), "tiny")
    assert gpu_check.measure_with_settings({"STREAM_BLOCK_C": 64}, "tiny", 4, ns) == {"step_s": 1.0}
    assert seen == [(64, False)] and mhc_triton.STREAM_BLOCK_C == before  # set for the measurement, then restored
    # the one model-config setting: the row's model recomputes its stream
    gpu_check.measure_with_settings(gpu_check.setting_row_spec("mhc.recompute_stream=True"), "tiny", 4, ns)
    assert seen[-1] == (before, True)
    with pytest.raises(ValueError, match="no setting NO_SUCH_KNOB"):
        gpu_check.measure_with_settings({"NO_SUCH_KNOB": 1}, "tiny", 4, ns)


def test_decode_setting_rows_follow_the_first_n_streams_on_cuda_with_their_settings_set(monkeypatch):
    from llmkit.model import mhc_triton

    args = gpu_check.parse_args(["--models", "tiny", "--gen-n-streams", "4", "1"])
    assert gpu_check.generation_runs(args, cuda=True) == [(4, {}), (4, {"ENTRY_ONE_KERNEL_TOKENS": 0}), (1, {})]
    assert gpu_check.generation_runs(args, cuda=False) == [(4, {}), (1, {})]  # the Triton kernels run on CUDA only
    none = gpu_check.parse_args(["--models", "tiny", "--gen-setting-rows"])
    assert gpu_check.generation_runs(none, cuda=True) == [(4, {}), (1, {})]
    seen = []
    monkeypatch.setattr(gpu_check, "decode_rate", lambda *a: seen.append(mhc_triton.ENTRY_ONE_KERNEL_TOKENS) or {})
    before = mhc_triton.ENTRY_ONE_KERNEL_TOKENS
    gpu_check.decode_rate_with_settings({"ENTRY_ONE_KERNEL_TOKENS": 0}, None, 64, "compiled", args)
    gpu_check.decode_rate_with_settings({}, None, 64, "compiled", args)
    assert seen == [0, before] and mhc_triton.ENTRY_ONE_KERNEL_TOKENS == before != 0


def test_top_kernels_rank_names_by_summed_time_per_new_token():
    timed = [("mm", 10.0), ("entry", 4.0), ("mm", 10.0), ("add", 1.0), ("entry", 4.0), ("entry", 4.0),
             ("norm", 2.0)]
    got = gpu_check.top_kernels(timed, new_tokens=2, top=3)
    assert got == [{"kernel": "mm", "launches_per_token": 1.0, "us_per_token": 10.0, "share": pytest.approx(20 / 35)},
                   {"kernel": "entry", "launches_per_token": 1.5, "us_per_token": 6.0,
                    "share": pytest.approx(12 / 35)},
                   {"kernel": "norm", "launches_per_token": 0.5, "us_per_token": 1.0, "share": pytest.approx(2 / 35)}]
    assert gpu_check.top_kernels([], new_tokens=4) == []


def test_idle_gaps_credit_each_wait_to_the_innermost_host_op_running_when_it_ended():
    gpu = [(0.0, 100.0), (103.0, 200.0), (150.0, 180.0), (260.0, 300.0), (350.0, 360.0)]  # (150, 180) overlaps
    host = [("step", 0.0, 400.0), ("llmkit::mhc_boundary_backward", 240.0, 270.0),
            ("aten::empty", 245.0, 252.0), ("Optimizer.step", 300.0, 355.0)]
    got = gpu_check.idle_gaps(gpu, host)
    assert got["busy_ms"] == pytest.approx(0.197 + 0.05)  # 100 + 97 + 40 + 10 us
    assert got["idle_ms"] == pytest.approx((3 + 60 + 50) / 1e3)
    assert got["gaps_ms"] == pytest.approx(0.110)  # the 3 us launch gap is not credited
    assert got["by_op"] == [{"op": "llmkit::mhc_boundary_backward", "gaps": 1, "ms": pytest.approx(0.06)},
                            {"op": "Optimizer.step", "gaps": 1, "ms": pytest.approx(0.05)}]
