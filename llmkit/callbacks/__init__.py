"""Trainer add-ons: safe checkpoints, throughput (tokens/s, MFU), mHC stability, MoE expert load,
SDFT's EMA teacher, replay and gates, and FSDP for the backbone."""

from llmkit.callbacks.checkpoint import AtomicCheckpointIO, Checkpoint
from llmkit.callbacks.ema_teacher import EMATeacher
from llmkit.callbacks.fsdp import BlockFSDPStrategy
from llmkit.callbacks.mhc_monitor import MHCMonitor
from llmkit.callbacks.moe_monitor import MoEMonitor
from llmkit.callbacks.regression_gate import RegressionGate
from llmkit.callbacks.replay import Replay
from llmkit.callbacks.throughput import TokenThroughput

__all__ = [
    "AtomicCheckpointIO", "BlockFSDPStrategy", "Checkpoint", "EMATeacher", "MHCMonitor", "MoEMonitor",
    "RegressionGate", "Replay", "TokenThroughput",
]
