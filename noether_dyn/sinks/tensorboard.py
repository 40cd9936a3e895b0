"""TensorBoard: scalars written with ``torch.utils.tensorboard.SummaryWriter`` (needs the
``tensorboard`` package: ``pip install 'noether-dyn[tensorboard]'``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

_MISSING = (
    "TensorBoardSink needs the tensorboard package: pip install 'noether-dyn[tensorboard]' "
    "(or pip install tensorboard)"
)


def summary_writer(log_dir: str | Path) -> Any:
    """A new ``SummaryWriter`` on ``log_dir``; an ImportError naming the extra without
    tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(_MISSING) from None
    return SummaryWriter(log_dir=str(log_dir))


class TensorBoardSink:
    """Writes each scalar with ``add_scalar(tag, value, global_step=step)``.

    TensorBoard stores a scalar as a 32-bit float (``Summary.Value.simple_value``), so it reads
    back as the float64 value rounded to the nearest float32.

    Args:
        log_dir: a directory (a ``SummaryWriter`` is made there and closed with the sink), or a
            ``SummaryWriter`` of yours (flushed at each flush, left open: you close it).
    """

    def __init__(self, log_dir: str | Path | Any) -> None:
        if callable(getattr(log_dir, "add_scalar", None)):
            self.writer, self.owned = log_dir, False
        elif isinstance(log_dir, (str, Path)):
            self.writer, self.owned = summary_writer(log_dir), True
        else:
            raise TypeError(
                f"TensorBoardSink: log_dir must be a directory path or a SummaryWriter, "
                f"got {type(log_dir).__name__}"
            )

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        add = self.writer.add_scalar
        for tag, value in scalars.items():
            add(tag, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self.owned:
            self.writer.close()
        else:
            self.writer.flush()
