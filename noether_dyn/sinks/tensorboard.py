"""TensorBoard: scalars written with ``torch.utils.tensorboard.SummaryWriter`` (needs the
``tensorboard`` package: ``pip install 'noether-dyn[tensorboard]'``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from noether_dyn.sinks.rows import check_charge_columns

_MISSING = (
    "TensorBoardSink needs the tensorboard package: pip install 'noether-dyn[tensorboard]' "
    "(or pip install tensorboard)"
)


def _summary_writer_class() -> Any:
    """``SummaryWriter``; an ImportError naming the extra without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(_MISSING) from None
    return SummaryWriter


class TensorBoardSink:
    """Writes each logged step's scalars as one TensorBoard event (one ``Summary`` holding every
    tag of the step, about 10x faster than one ``add_scalar`` per tag); a writer without
    ``_get_file_writer`` gets ``add_scalar(tag, value, global_step=step)`` per tag.

    TensorBoard stores a scalar as a 32-bit float (``Summary.Value.simple_value``), so it reads
    back as the float64 value rounded to the nearest float32.

    Args:
        log_dir: a directory (a ``SummaryWriter`` is made there at the first write, so a rank
            that never streams leaves no file, and closed with the sink), or a
            ``SummaryWriter`` of yours (flushed at each flush, left open: you close it).
        charge_columns: the charge columns to stream per symmetry (default: all eleven); each
            scalar costs about 15 us in TensorBoard's writer (``benchmarks/sinks_overhead.py``).
    """

    def __init__(
        self, log_dir: str | Path | Any, *, charge_columns: Sequence[str] | None = None
    ) -> None:
        self.charge_columns = check_charge_columns(charge_columns)
        self.log_dir: Path | None = None
        if callable(getattr(log_dir, "add_scalar", None)):
            self.writer, self.owned = log_dir, False
        elif isinstance(log_dir, (str, Path)):
            self._writer_class = _summary_writer_class()
            self.writer, self.owned, self.log_dir = None, True, Path(log_dir)
        else:
            raise TypeError(
                f"TensorBoardSink: log_dir must be a directory path or a SummaryWriter, "
                f"got {type(log_dir).__name__}"
            )
        self._summary = None
        if self.owned or callable(getattr(self.writer, "_get_file_writer", None)):
            from tensorboard.compat.proto.summary_pb2 import Summary

            self._summary = Summary

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if self.writer is None:
            self.writer = self._writer_class(log_dir=str(self.log_dir))
        if self._summary is not None:
            value = self._summary.Value
            summary = self._summary(
                value=[value(tag=tag, simple_value=v) for tag, v in scalars.items()]
            )
            self.writer._get_file_writer().add_summary(summary, step)
            return
        add = self.writer.add_scalar
        for tag, v in scalars.items():
            add(tag, v, global_step=step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is None:
            return
        if self.owned:
            self.writer.close()
        else:
            self.writer.flush()
