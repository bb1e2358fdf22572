"""bench/mhc_live_memory.py on a CPU: the Triton kernels (interpreted) hold per sublayer what the ops'
PyTorch code holds, X_l + y_l + O(n^2) floats more than the dense model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, interpret: bool) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), **({"TRITON_INTERPRET": "1"} if interpret else {}))
    return subprocess.run([sys.executable, "-m", "bench.mhc_live_memory", "--d-model", "32", "--n-heads", "2",
                           "--tokens", "16", "--layers", "1", "2", "--out", str(tmp_path / "live.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_kernels_hold_what_the_pytorch_code_holds_per_sublayer(tmp_path):
    done = run(tmp_path, interpret=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "live.json").read_text())
    n, c = 4, 32
    accounting = n * c * 2 + c * 2 + 4 * (2 * (2 * n + n * n) + 1)  # 516 B: X_l, y_l in bf16, 49 fp32
    assert report["accounting_per_token_per_sublayer"] == accounting == 516
    for code in ("kernels", "pytorch"):
        assert report["per_sublayer"][code]["n_minus_dense_per_token_per_sublayer"] == accounting, code
    rows = {(r["code"], r["layers"]): r for r in report["rows"]}
    assert len(rows) == 6 and all(r["peak"] >= r["held_after_forward"] > 0 for r in rows.values())
    assert "X_l + y_l + O(n^2) floats: 516" in done.stdout


def test_without_the_interpreter_it_says_what_to_set(tmp_path):
    done = run(tmp_path, interpret=False)
    assert done.returncode == 1 and "set TRITON_INTERPRET=1" in done.stderr
    assert not (tmp_path / "live.json").exists()
