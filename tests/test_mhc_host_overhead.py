"""bench/mhc_host_overhead.py on a CPU: the Triton launches recorded, not run; a figure and its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, interpret: bool) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), **({"TRITON_INTERPRET": "1"} if interpret else {}))
    return subprocess.run([sys.executable, "-m", "bench.mhc_host_overhead", "--calls", "5", "--repeats", "2",
                           "--out", str(tmp_path / "host.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_host_time_of_one_sublayer_with_the_launches_recorded(tmp_path):
    done = run(tmp_path, interpret=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "host.json").read_text())
    assert report["launched"] is False and len(report["repeats_us"]) == 2
    assert report["triton_launches_per_sublayer"] == 8  # 4 forward (apply, project, coefficients, pre), 4 backward
    low, high = sorted(report["repeats_us"])
    assert report["host_us_per_sublayer"] == pytest.approx((low + high) / 2, rel=1e-12)  # the median of two
    assert 0 < report["host_us_per_sublayer"] < 1e6
    assert len(report["direct_repeats_us"]) == 2 and 0 < report["direct_us_per_sublayer"] < 1e6
    assert report["dispatch_us_per_sublayer"] == report["host_us_per_sublayer"] - report["direct_us_per_sublayer"]
    assert "Triton launches recorded, not run" in done.stdout


def test_without_a_gpu_or_the_interpreter_it_says_what_to_set(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    done = run(tmp_path, interpret=False)
    assert done.returncode == 1 and "set TRITON_INTERPRET=1" in done.stderr
    assert not (tmp_path / "host.json").exists()
