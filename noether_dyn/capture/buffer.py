"""The row buffer: logged steps held on the device until a flush, and the flush policy.

A flush moves every held row to the host in one stacked copy per table (one host-device sync),
lays the rows out in the store's column order (:mod:`noether_dyn.records`) and turns non-finite
losses, parameters and gradients into events (warning once per kind). The same host rows go
to the sinks (:mod:`noether_dyn.sinks`): streaming costs no device sync of its own.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from noether_dyn.records import (
    GROUP_COLUMNS,
    GROUP_DEVICE,
    GROUP_HOST,
    STEP_COLUMNS,
    STEP_DEVICE,
    STEP_HOST,
    GroupHyper,
    StepPlan,
    StepRecord,
)
from noether_dyn.sinks import SinkSet
from noether_dyn.symmetries.symmetry import Symmetry

_NONFINITE = (("nonfinite_loss", "loss"), ("nonfinite_params", "param_norm"),
              ("nonfinite_grads", "grad_norm"))  # fmt: skip


def record(
    plan: StepPlan,
    step: int,
    time_: float,
    log_prefactor: list[float],
    wall: float,
    rows: tuple,
) -> StepRecord:
    """A logged step's record from the host values before the step and the device rows
    ``(row, groups, charges, tensors)`` of :class:`~noether_dyn.quantities.step_rows.StepRows`."""
    hypers = plan.hypers
    h0 = hypers[0] if hypers else GroupHyper(0.0, 0.0, 0.0, False)
    host = [float(step), time_, h0.lr, log_prefactor[0] if hypers else 0.0, wall]
    groups = [
        [float(g), h.lr, h.beta, h.weight_decay, h.mass, log_prefactor[g]]
        for g, h in enumerate(hypers)
    ]
    row, group_rows, charges, tensors = rows
    return StepRecord(host, row, groups, group_rows, charges, plan.loss_logged, tensors)


class HostRows:
    """One flush's rows on the host, as :meth:`RunWriter.append` takes them."""

    def __init__(self, steps, groups, charge_steps, charges, events, tensors) -> None:
        self.steps, self.groups = steps, groups
        self.charge_steps, self.charges = charge_steps, charges
        self.events, self.tensors = events, tensors


class RowBuffer:
    """Holds :class:`StepRecord` rows; due for a flush after ``flush_every`` rows or
    ``flush_seconds`` seconds since the last flush. ``sinks`` (checked here) receive the host
    rows of every flush (:class:`~noether_dyn.sinks.SinkSet`)."""

    def __init__(
        self,
        flush_every: int,
        flush_seconds: float,
        n_symmetries: int,
        sinks: Sequence[Any] | None = (),
        symmetries: Sequence[Symmetry] = (),
    ) -> None:
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.n_symmetries = n_symmetries
        self.sinks = SinkSet(sinks, [s.name for s in symmetries])
        self.rows: list[StepRecord] = []
        self.last_flush = time.monotonic()
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, record: StepRecord) -> None:
        self.rows.append(record)

    def due(self) -> bool:
        return (
            len(self.rows) >= self.flush_every
            or time.monotonic() - self.last_flush >= self.flush_seconds
        )

    def take(self) -> list[StepRecord]:
        """The held rows, leaving the buffer empty."""
        rows, self.rows = self.rows, []
        return rows

    def flushed(self) -> None:
        self.last_flush = time.monotonic()

    def to_host(self, rows: list[StepRecord]) -> HostRows:
        """The rows in the store's layout, with the events of non-finite values."""
        device = torch.stack([r.row for r in rows]).cpu().numpy()
        groups = torch.stack([r.groups for r in rows]).cpu().numpy()
        charged = [r for r in rows if r.charges is not None]
        charges = (
            torch.stack([r.charges for r in charged]).cpu().numpy()
            if charged
            else np.zeros((0, self.n_symmetries, 0))
        )
        charge_steps = np.array([int(r.host[0]) for r in charged], dtype=np.int64)
        tensors = torch.stack([r.tensors for r in rows]).cpu().numpy()
        step_rows, group_rows, events = [], [], []
        for r, d, gd in zip(rows, device, groups):
            values = dict(zip(STEP_HOST, r.host))
            values.update(zip(STEP_DEVICE, d.tolist()))
            values["potential"] = values["loss"] + values["l2"]
            step_rows.append([values[c] for c in STEP_COLUMNS])
            step = values["step"]
            for gh, gdev in zip(r.groups_host, gd.tolist()):
                group = dict(zip(GROUP_HOST, gh))
                group.update(zip(GROUP_DEVICE, gdev))
                group["step"] = step
                group_rows.append([group[c] for c in GROUP_COLUMNS])
            for kind, column in _NONFINITE:
                value = values[column]
                if (column != "loss" or r.loss_logged) and not math.isfinite(value):
                    events.append(self._event(int(step), kind, value))
        host = HostRows(
            np.array(step_rows, dtype=np.float64).reshape(-1, len(STEP_COLUMNS)),
            np.array(group_rows, dtype=np.float64).reshape(-1, len(GROUP_COLUMNS)),
            charge_steps,
            charges,
            events,
            tensors,
        )
        self.sinks.emit(host.steps, host.charge_steps, host.charges)
        return host

    def _event(self, step: int, kind: str, value: float) -> tuple[int, str, str]:
        what = kind.split("_", 1)[1]
        msg = f"non-finite {what} at step {step} ({value})"
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(
                f"noether-dyn: {msg}; recorded in the run's events, training goes on.",
                RuntimeWarning,
                stacklevel=5,
            )
        return step, kind, msg
