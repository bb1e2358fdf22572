"""Training callbacks: throughput (tokens/s, MFU) and mHC stability monitoring."""

from llmkit.callbacks.mhc_monitor import MHCMonitor
from llmkit.callbacks.throughput import TokenThroughput

__all__ = ["MHCMonitor", "TokenThroughput"]
