"""Callbacks: throughput now; EMA teacher, replay and regression gate come with SDFT."""

from llmkit.callbacks.throughput import TokenThroughput

__all__ = ["TokenThroughput"]
