"""The GPU targets of llmkit's training and decode speed, declared once for bench/throughput.py and
bench/gpu_check.py (docs/performance.md says where each comes from). Judged only on CUDA, in
bf16-mixed. No imports: gpu_check reads these before it decides which device torch may see."""

TIME_RATIO = {"120m": 1.20, "350m": 1.15, "900m": 1.10}
"""n = 4 / n = 1 training step time, at most, by model."""
MEM_RATIO = 1.25
"""n = 4 / n = 1 CUDA peak memory, at most, for every model."""
DENSE_MFU = {"350m": 0.45}
"""Dense (n = 1) model FLOPs utilisation, at least, by model."""
FIRST_STEP_S = {"350m": 90.0}
"""Seconds of the first n = 4 training step (compile included), at most, by model."""
DECODE = {"model": "120m", "n_streams": 4, "batch": 64, "bound": 40_000.0}
"""Compiled decode new tokens/s, at least."""
