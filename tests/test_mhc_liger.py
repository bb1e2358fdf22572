"""bench/mhc_liger.py on a CPU (both sides' Triton kernels in the interpreter): the facts
docs/performance.md states about liger-kernel's mHC ops, which are why llmkit does not use them.
liger-kernel is in the dev extra; a newer liger that changes its math fails here, and the page
must then be rewritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("liger_kernel")
ROOT = Path(__file__).resolve().parents[1]
N, C = 4, 64


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("liger") / "mhc_liger.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "bench.mhc_liger", "--d-model", str(C), "--n-streams", str(N), "--tokens", "16",
         "--math-tokens", "32", "--alphas", "0.01", "1", "40", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text())


def rows(report: dict, impl: str) -> dict[float, dict]:
    return {r["alpha"]: r for r in report["math"] if r["impl"] == impl}


def test_h_pre_and_h_post_are_the_same_math(report):
    for impl in ("llmkit", "liger-kernel"):
        for r in rows(report, impl).values():
            assert r["h_pre_err"] < 1e-5 and r["h_post_err"] < 1e-5, r


def test_liger_sinkhorn_is_a_variant_that_departs_from_eq_9_as_the_logits_grow(report):
    ours, liger, exact = rows(report, "llmkit"), rows(report, "liger-kernel"), rows(report, "fp64 llmkit")
    assert all(r["h_res_err"] < 1e-5 for r in ours.values())
    # ends on a column normalisation where Eq. 9 ends on a row one: columns exact, rows not
    assert all(r["col_sum_err"] < 1e-5 for r in liger.values()) and all(r["row_sum_err"] < 1e-5 for r in exact.values())
    assert liger[0.01]["h_res_err"] < 1e-3 < liger[1.0]["h_res_err"] < 1e-1
    assert exact[40.0]["max_logit"] > 15 and liger[40.0]["h_res_err"] > 0.1  # no clamp: exact row-max shift instead


def test_liger_saves_every_sinkhorn_iterate(report):
    saved = {r["impl"]: r["saved_bytes_per_token"] for r in report["saved"]}
    stream = report["saved"][0]["stream_bytes_per_token"]
    # llmkit: X, the sublayer output y (C floats) and the 2n + n^2 projections, Sigma x^2 and H (49 floats)
    # per token; the alphas and biases are saved as the parameters they are, no copy
    assert saved["llmkit"] == stream + 4 * C + 4 * (2 * N + N * N + 1 + 2 * N + N * N)
    assert saved["liger-kernel"] >= stream + 4 * C + 4 * 20 * N * N  # X, y and the 20 iterates of n x n fp32
    assert report["speed"] == []  # CUDA only
