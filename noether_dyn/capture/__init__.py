"""Capture: optimizer step hooks that read each step of a training run."""

from noether_dyn.capture.monitor import Monitor
from noether_dyn.capture.watch import watch

__all__ = ["Monitor", "watch"]
