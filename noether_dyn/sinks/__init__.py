"""Sinks: stream a run's step scalars and per-symmetry charges to the tools people already use.

A sink receives the host rows of each flush (never a device value), as one mapping of tag ->
float per logged step (tags in :mod:`noether_dyn.sinks.rows`). Pass sinks to
``watch(..., sinks=[...])``; a failing sink warns once (:class:`SinkFailure`) and is dropped,
training goes on. Importing this package imports neither tensorboard nor wandb.
"""

from noether_dyn.sinks.base import Sink, SinkFailure, SinkSet, as_sink
from noether_dyn.sinks.rows import PREFIX, scalar_rows, step_tag, symmetry_tag
from noether_dyn.sinks.tensorboard import TensorBoardSink
from noether_dyn.sinks.wandb_sink import WandbSink

__all__ = [
    "PREFIX",
    "Sink",
    "SinkFailure",
    "SinkSet",
    "TensorBoardSink",
    "WandbSink",
    "as_sink",
    "scalar_rows",
    "step_tag",
    "symmetry_tag",
]
