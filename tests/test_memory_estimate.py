"""bench/memory_estimate.py: at its peak, an n = 4 training step holds exactly the mHC ops' saved
state more than n = 1, per token per sublayer X_l (n C in the stream's dtype), y_l (C in bf16,
the sublayer's output under autocast) and the 2n + n^2 projections, sum(x^2), H_pre, H_post and
H_res (4n + 2n^2 + 1 fp32): nothing else grows with n (docs/performance.md)."""

from __future__ import annotations

import pytest

from bench import memory_estimate

N, C = 4, 256  # configs/model/tiny.yaml's d_model


@pytest.mark.parametrize("bf16_residual, stream_bytes", [("on", 2), ("off", 4)])
def test_n4_holds_the_stream_the_output_and_order_n_squared_floats_more(tmp_path, bf16_residual, stream_bytes):
    rows = memory_estimate.main(["--models", "tiny", "--bf16-residual", bf16_residual, "--out",
                                 str(tmp_path / "m.json")])
    dense, mhc = rows
    expected = stream_bytes * N * C + 2 * C + 4 * (4 * N + 2 * N * N + 1)
    assert mhc["extra_activation_bytes_per_token_sublayer"] == pytest.approx(expected, abs=1.0)
    assert mhc["ratio"] == pytest.approx(mhc["Total"] / dense["Total"])
    assert dense["Activation"] > dense["Parameter"] > 0  # the peak is the step's activation peak
    assert (tmp_path / "m.json").is_file()


def test_at_a_small_shape_the_peak_is_the_optimizer_step_and_the_extra_is_still_measured(tmp_path):
    """seq 32 x batch 2: next to no activation is alive at the step's peak (AdamW's), so the extra is read at
    the end of the forward, not from the peak (where it was 0)."""
    dense, mhc = memory_estimate.main(["--models", "tiny", "--bf16-residual", "off", "--seq-len", "32",
                                       "--batch-size", "2", "--out", str(tmp_path / "m.json")])
    assert max(dense["Activation"], mhc["Activation"]) < dense["Saved"] / 1000  # a scalar or so at the peak
    expected = 4 * N * C + 2 * C + 4 * (4 * N + 2 * N * N + 1)
    assert mhc["extra_activation_bytes_per_token_sublayer"] == pytest.approx(expected, rel=1e-3)
