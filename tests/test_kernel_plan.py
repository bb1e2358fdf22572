"""bench/kernel_plan.py on a CPU: inductor plans the compiled graphs for its Triton (GPU) backend,
and the launches of a training step and of cached decoding are counted by kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # the bench sets it
    done = subprocess.run([sys.executable, "-m", "bench.kernel_plan", "--model", "tiny", "--layers", "1", "2",
                           "--decode-batch", "4", "--new-tokens", "4", "--out", str(out)],
                          cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "launches per step" in done.stdout and "per call of the compiled decode step" in done.stdout
    return json.loads(out.read_text())


def rows(plan: dict, section: str, n: int) -> tuple[dict, dict]:
    """The 1-layer and 2-layer rows of ``section`` for n streams."""
    one, two = (next(r for r in plan[section] if r["layers"] == layers and r["n_streams"] == n) for layers in (1, 2))
    return one, two


def test_the_compiled_blocks_are_planned_as_triton_kernels_not_run_eagerly(plan):
    for section in ("training", "decode"):
        for n in (1, 4):
            one, two = rows(plan, section, n)
            assert one["inductor triton kernels"] > 0
            # a layer more adds Triton kernels but only the GEMMs and attention as ATen calls (eager blocks: dozens)
            assert two["inductor triton kernels"] > one["inductor triton kernels"]
    one, two = rows(plan, "training", 1)
    assert two["aten"]["mm"] - one["aten"]["mm"] == 21  # 7 projections: forward, and dX and dW in backward


def test_each_mhc_sublayer_launches_its_kernels_and_the_gradient_matmul_and_sums(plan):
    one, two = rows(plan, "training", 4)
    assert two["mHC triton kernels"] - one["mHC triton kernels"] == 16  # 2 sublayers x (4 forward + 4 backward)
    # each backward op: the dphi matmul (CUDA's one, not the CPU's casts) and the sums for alpha and b
    matmuls = [row["aten_inside_mhc"]["mhc_boundary_backward: mm"] for row in (one, two)]
    assert matmuls[1] - matmuls[0] == 2
    assert two["aten ops inside mHC ops"] - one["aten ops inside mHC ops"] == 6
    assert not any("_to_copy" in op for op in two["aten_inside_mhc"])  # phi reaches the kernels as it is
    assert plan["training_per_layer"]["4"] - plan["training_per_layer"]["1"] >= 22


def test_a_decode_step_adds_one_entry_kernel_per_mhc_sublayer(plan):
    dense_one, dense_two = rows(plan, "decode", 1)
    one, two = rows(plan, "decode", 4)
    assert (two["decode step"] - one["decode step"]) - (dense_two["decode step"] - dense_one["decode step"]) == 2
    assert two["aten ops inside mHC ops"] == 0
    # 3 boundaries per forward, 4 forwards (the prompt's, 3 decode steps) for 4 new tokens
    assert two["mhc_ops"]["mhc_boundary"] == 3
