"""The monitor's parts that depend on the tracked symmetries, built in one place: the monitor
builds them at ``watch()`` and once more when zero-config detection picks the symmetries at the
first optimizer step (:mod:`.sample`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from noether_dyn.capture.buffer import RowBuffer
from noether_dyn.capture.compiled import CompiledStats
from noether_dyn.capture.eager import EagerStats
from noether_dyn.capture.plan import Planner
from noether_dyn.capture.predict import Prediction
from noether_dyn.capture.tracked import Tracked
from noether_dyn.optimizers import OptimizerAdapter
from noether_dyn.quantities.charges import ChargeMatrix
from noether_dyn.quantities.step_rows import StepRows
from noether_dyn.quantities.theory import ChargePredictor, regime_for
from noether_dyn.records import GroupHyper


@dataclass
class Parts:
    """Charge matrix, predictor, row builders, statistics backends, planner, prediction and row
    buffer of one set of tracked symmetries, and the param groups' hyperparameters."""

    matrix: ChargeMatrix
    predictor: ChargePredictor
    step_rows: StepRows
    eager: EagerStats
    compiled: CompiledStats
    planner: Planner
    prediction: Prediction
    buffer: RowBuffer
    hypers: list[GroupHyper]

    def members(self) -> tuple:
        """The parts in the order the monitor holds them (all but ``hypers``)."""
        return (self.matrix, self.predictor, self.step_rows, self.eager, self.compiled,
                self.planner, self.prediction, self.buffer)  # fmt: skip


def assemble(
    tracked: Tracked,
    optimizer: torch.optim.Optimizer,
    adapter: OptimizerAdapter,
    options: tuple[int, bool, bool | None, int, float, Sequence[Any] | None, bool],
    reduced: Callable[[torch.Tensor], torch.Tensor],
) -> Parts:
    """The parts for ``tracked.symmetries``; ``options`` are watch()'s (every, snapshot, fused,
    flush_every, flush_seconds, sinks, exact_decay), ``reduced`` the monitor's cross-rank sum."""
    every, snapshot, fused, flush_every, flush_seconds, sinks, exact_decay = options
    t = tracked
    shapes = {n: tuple(p.shape) for n, p in zip(t.names, t.params)}
    matrix = ChargeMatrix(t.symmetries, t.index, t.device, adapter.family, shapes)
    hypers = [adapter.hyper(optimizer, g) for g in optimizer.param_groups]
    predictor = ChargePredictor(
        regime_for(adapter.name, [h.beta for h in hypers]), matrix.linear_flags
    )
    step_rows = StepRows(matrix, t.group_index, t.n_groups, predictor.regime)
    eager = EagerStats(t, matrix, adapter)
    compiled = CompiledStats(t, matrix, adapter, step_rows)
    planner = Planner(t, adapter, eager, compiled, every, snapshot, fused)
    prediction = Prediction(
        t, matrix, eager, predictor, reduced, optimizer, exact_decay, snapshot=snapshot
    )
    buffer = RowBuffer(flush_every, flush_seconds, len(t.symmetries), sinks, t.symmetries)
    return Parts(matrix, predictor, step_rows, eager, compiled, planner, prediction, buffer, hypers)
