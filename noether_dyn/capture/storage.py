"""The monitor's side of its run store: the writer (which raises a
:class:`~noether_dyn.store.StoreError` naming the path for every storage failure), the lock
every flush holds (a flush from another thread, such as ``state_dict()`` in a checkpointing
thread, never interleaves with the training thread's), and a close that never raises."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from noether_dyn.capture.buffer import HostRows
from noether_dyn.records import GROUP_COLUMNS, STEP_COLUMNS
from noether_dyn.store.schema import STORE_FILENAME
from noether_dyn.store.writer import RunWriter


class MonitorFailure(RuntimeWarning):
    """The monitor hit an error inside a step and stopped; training went on."""


class StoreHandle:
    """The :class:`RunWriter` of one monitor (rank 0), and the lock its flushes hold.

    Attributes:
        path: the store file. writer: the RunWriter (tests patch its methods, e.g. ``append``,
            to inject a write failure). lock: a re-entrant lock held by every flush.
    """

    def __init__(
        self,
        run_dir: Path,
        mode: str,
        meta: dict[str, Any] | None = None,
        symmetries: Any = None,
    ) -> None:
        self.path = Path(run_dir) / STORE_FILENAME
        self.lock = threading.RLock()
        # a new store is created with its meta and symmetries at once; the writer turns every
        # storage failure into a StoreError naming the path
        self.writer = RunWriter(run_dir, mode, meta=meta, symmetries=symmetries)

    def write(
        self,
        rows: HostRows | None,
        meta: dict[str, Any],
        matrix: tuple[np.ndarray, Sequence[str]] | None = None,
    ) -> None:
        """One flush: ``rows`` (or only ``meta`` when None) and the flush's matrix-charge rows
        ``matrix = (rows, names)`` (``noether_dyn.capture.matrix``), in one transaction."""
        if rows is None and matrix is None:
            self.writer.set_meta(meta)
        elif rows is None:
            self.writer.append(np.zeros((0, len(STEP_COLUMNS))), np.zeros((0, len(GROUP_COLUMNS))),
                               np.zeros(0, dtype=np.int64), np.zeros((0, 0, 0)), (), meta,
                               matrix=matrix)  # fmt: skip
        else:
            self.writer.append(rows.steps, rows.groups, rows.charge_steps, rows.charges,
                               rows.events, meta, tensors=rows.tensors, matrix=matrix)  # fmt: skip

    def event(self, step: int, kind: str, message: str) -> None:
        """Record an event if the store still takes writes; never raises."""
        try:
            self.writer.add_event(step, kind, message)
        except Exception:  # the store itself may be what failed
            pass

    def close(self) -> None:
        """Close the connection; a failure warns (with the path) instead of raising."""
        try:
            self.writer.close()
        except Exception as exc:
            warnings.warn(
                f"noether-dyn: closing the run store '{self.path}' failed ({type(exc).__name__}: "
                f"{exc}); it keeps every flush that completed. Training goes on.",
                MonitorFailure,
                stacklevel=3,
            )
