"""bench/mhc_kernel_variants.py on a CPU: every mHC kernel, in every variant the GPU run times,
computes its math (the interpreter, fp32 stream, against fp64), and the dot-precision override
reaches the projection kernels' launches."""

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
TOKENS, N, C = 40, 4, 24


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("variants") / "mhc_kernel_variants.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "bench.mhc_kernel_variants", "--tokens", str(TOKENS), "--n-streams", str(N),
         "--d-model", str(C), "--dtype", "fp32", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text())


def test_every_kernel_in_every_variant_matches_fp64(report):
    from llmkit.model import mhc_triton

    kernels = {r["kernel"] for r in report["rows"]}
    assert len(kernels) == len([name for name in vars(mhc_triton) if name.endswith("_kernel")]) == 10
    for r in report["rows"]:
        assert r["error"] < 1e-5, r
        assert r["ms"] is None and r["GB_per_s"] is None  # no times in the interpreter
    for case in {(r["kernel"], r["setting"]) for r in report["rows"]}:  # exactly one row of each is in force
        assert sum(r["in_force"] for r in report["rows"] if (r["kernel"], r["setting"]) == case) == 1, case
    tiles = [r["value"] for r in report["rows"]
             if r["setting"] == "PROJECT_BWD_(DOT, BLOCK_M, BLOCK_K, WARPS)"]
    assert len(tiles) == 7 and tiles[0] == [True, 64, 64, 4]  # the settings in force come first
    assert sum(t[0] for t in tiles) == 5  # dot rows (an fp32 stream takes the FMAs; test_mhc_triton checks the dots)


def test_the_bandwidth_counts_each_tensor_of_the_launch_once(report):
    """apply forward reads X, y, H_post, H_res and writes X' (fp32 here)."""
    (row,) = [r for r in report["rows"] if r["kernel"] == "apply forward" and r["in_force"]]
    assert row["bytes"] == 4 * TOKENS * (2 * N * C + C + N + N * N)


def test_the_dot_precision_setting_reaches_the_fp32_projection_launch(monkeypatch):
    from bench.mhc_triton_compile import record_launches
    from llmkit.model import mhc_triton

    if mhc_triton.INTERPRETED:
        pytest.skip("needs the compiled module (another test left the interpreted one imported)")
    for setting, expected in ((None, "ieee"), ("tf32x3", "tf32x3")):
        monkeypatch.setattr(mhc_triton, "FP32_DOT_PRECISION", setting)
        (forward,) = record_launches(torch.float32, 32, 4, 16)["_project_fwd_kernel"].launches
        assert forward[1]["DOT_PRECISION"] == expected and forward[1]["DOT_FP32"]
    monkeypatch.setattr(mhc_triton, "FP32_DOT_PRECISION", None)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        (forward,) = record_launches(torch.float32, 32, 4, 16)["_project_fwd_kernel"].launches
        assert forward[1]["DOT_PRECISION"] == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_the_project_backward_tiles_reach_its_launch():
    from bench.mhc_kernel_variants import setting
    from bench.mhc_triton_compile import record_launches
    from llmkit.model import mhc_triton

    if mhc_triton.INTERPRETED:
        pytest.skip("needs the compiled module (another test left the interpreted one imported)")
    names = ("PROJECT_BWD_BLOCK_M", "PROJECT_BWD_BLOCK_K", "PROJECT_BWD_WARPS")
    with setting(names, (32, 64, 8)):
        (launch,) = record_launches(torch.bfloat16, 1000, 4, 64)["_project_bwd_kernel"].launches
    kernel = record_launches(torch.bfloat16, 1000, 4, 64)["_project_bwd_kernel"]
    assert (launch[1]["BLOCK_M"], launch[1]["BLOCK_K"], launch[1]["num_warps"]) == (32, 64, 8)
    (default,) = kernel.launches
    assert (default[1]["BLOCK_M"], default[1]["BLOCK_K"], default[1]["num_warps"]) == (64, 64, 4)  # put back


def test_a_variant_that_fails_is_a_row_not_the_end_of_the_run():
    from bench.mhc_kernel_variants import Case, measure

    def fails():
        raise RuntimeError("PassManager::run failed\nmore lines")

    case = Case("pre forward", "_pre_fwd_kernel", "STREAM_BLOCK_C", (256,), fails, (torch.ones(1),))
    row = measure(case, 256, timed=False)
    assert row["failed"] == "RuntimeError: PassManager::run failed" and row["error"] is None and row["ms"] is None
