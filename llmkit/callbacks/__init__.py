"""Training callbacks: throughput (tokens/s, MFU), mHC stability, and SDFT's EMA teacher, replay and gates."""

from llmkit.callbacks.ema_teacher import EMATeacher
from llmkit.callbacks.mhc_monitor import MHCMonitor
from llmkit.callbacks.regression_gate import RegressionGate
from llmkit.callbacks.replay import Replay
from llmkit.callbacks.throughput import TokenThroughput

__all__ = ["EMATeacher", "MHCMonitor", "RegressionGate", "Replay", "TokenThroughput"]
