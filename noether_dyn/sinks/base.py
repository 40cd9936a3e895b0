"""The sink protocol and the set of sinks a monitor feeds at each flush."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from noether_dyn.sinks.rows import scalar_rows


class SinkFailure(RuntimeWarning):
    """A sink raised; it was dropped and training went on (the run store is unaffected)."""


@runtime_checkable
class Sink(Protocol):
    """Receives the scalars of each logged step, at each flush, in step order.

    ``write`` is called once per logged step with ``{tag: value}`` (floats; tags in
    :mod:`noether_dyn.sinks.rows`), then ``flush`` once per flush. ``close`` is called when the
    monitor closes. An optional attribute ``charge_columns`` (a tuple of charge column names)
    limits the charge scalars the sink receives; without it, it receives all of them.
    """

    def write(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def as_sink(obj: Any) -> Sink:
    """``obj`` as a :class:`Sink`: a sink itself, a ``torch.utils.tensorboard.SummaryWriter``
    (wrapped in a :class:`~noether_dyn.sinks.TensorBoardSink`, which flushes but never closes
    it), or a W&B run (any object with ``log(dict, step=)``, wrapped in a
    :class:`~noether_dyn.sinks.WandbSink`)."""
    if isinstance(obj, Sink):
        return obj
    if callable(getattr(obj, "add_scalar", None)):
        from noether_dyn.sinks.tensorboard import TensorBoardSink

        return TensorBoardSink(obj)
    if callable(getattr(obj, "log", None)):
        from noether_dyn.sinks.wandb_sink import WandbSink

        return WandbSink(obj)
    raise TypeError(
        f"sinks: {type(obj).__name__} is not a sink; pass a noether_dyn.sinks.TensorBoardSink, "
        "a WandbSink, a SummaryWriter, a wandb run, or an object with write(step, scalars), "
        "flush() and close()"
    )


class SinkSet:
    """The sinks of one monitor. A sink that raises is warned about once and dropped.

    Args:
        sinks: sinks, or objects :func:`as_sink` accepts (checked here, before any training).
        symmetries: the names of the tracked symmetries, in the order of the charge rows.
        strict: raise a sink's error instead of warning and dropping it (a replay, where
            nothing else runs).
    """

    def __init__(
        self, sinks: Iterable[Any] | None, symmetries: Sequence[str], strict: bool = False
    ) -> None:
        if sinks is None:
            sinks = ()
        elif isinstance(sinks, (str, bytes)) or not isinstance(sinks, Iterable):
            raise TypeError(
                f"sinks must be a list of sinks, got {type(sinks).__name__}; "
                "e.g. sinks=[TensorBoardSink('runs/tb')]"
            )
        self.sinks: list[Sink] = [as_sink(s) for s in sinks]
        self.symmetries = list(symmetries)
        self.strict = strict

    def __len__(self) -> int:
        return len(self.sinks)

    def emit(self, steps: np.ndarray, charge_steps: np.ndarray, charges: np.ndarray) -> None:
        """Send one flush's host rows (the store's layout) to every sink."""
        if not self.sinks:
            return
        rows: dict = {}  # by charge_columns: built once for all the sinks that share them
        for sink in list(self.sinks):
            try:
                key = getattr(sink, "charge_columns", None)
                if key not in rows:
                    rows[key] = scalar_rows(steps, charge_steps, charges, self.symmetries, key)
                for step, scalars in rows[key]:
                    sink.write(step, scalars)
                sink.flush()
            except Exception as exc:  # a sink must never stop the training
                if self.strict:
                    raise
                self._drop(sink, "writing", exc)

    def close(self) -> None:
        """Close every sink (each failure warned about); the set is empty afterwards."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception as exc:
                if self.strict:
                    raise
                self._drop(sink, "closing", exc)

    def _drop(self, sink: Sink, what: str, exc: Exception) -> None:
        if sink in self.sinks:
            self.sinks.remove(sink)
        warnings.warn(
            f"noether-dyn: sink {type(sink).__name__} failed while {what} "
            f"({type(exc).__name__}: {exc}); it is dropped, training and the run store go on.",
            SinkFailure,
            stacklevel=2,
        )
