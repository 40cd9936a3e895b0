"""The step plan: what a step computes, and the one place that chooses eager or compiled.

Before each optimizer step the :class:`Planner` reads the groups' constants and decides whether
the step is logged, whether each group's update is rebuilt from the optimizer's state (else a
snapshot), and whether the compiled program computes the statistics; after the step
:meth:`Planner.statistics` runs the chosen backend and falls back to the eager one where the
compiled one cannot run (warning once when it cannot even compile).
"""

from __future__ import annotations

import warnings

import torch

from noether_dyn.capture.compiled import CompiledStats, CompileFailed
from noether_dyn.capture.eager import EagerStats
from noether_dyn.capture.tracked import Tracked
from noether_dyn.optimizers import OptimizerAdapter
from noether_dyn.quantities.step_rows import hyper_matrix
from noether_dyn.records import GroupHyper, StepPlan

FUSED_MIN_NUMEL = 1_000_000
"""With ``fused=None`` the compiled statistics are used from this many parameter entries on."""


class Planner:
    """Plans steps and runs their statistics backend.

    Args:
        fused: True/False, or None for on from :data:`FUSED_MIN_NUMEL` parameter entries on a
            CPU or CUDA device; always off with ``snapshot``.
    """

    def __init__(
        self,
        tracked: Tracked,
        adapter: OptimizerAdapter,
        eager: EagerStats,
        compiled: CompiledStats,
        every: int,
        snapshot: bool,
        fused: bool | None,
    ) -> None:
        self.t = tracked
        self.adapter = adapter
        self.eager = eager
        self.compiled = compiled
        self.every = every
        self.snapshot = snapshot
        if fused is None:
            fused = (
                tracked.device.type in ("cpu", "cuda")
                and sum(p.numel() for p in tracked.params) >= FUSED_MIN_NUMEL
            )
        # per-unit slices are reduced by the eager path only: units make every step eager
        if fused is True and eager.matrix.sliced:
            warnings.warn(
                "noether-dyn: fused=True is ignored while per-unit symmetries are tracked (the "
                "compiled statistics reduce whole tensors only); the eager path computes them.",
                RuntimeWarning,
                stacklevel=5,
            )
        self.fused = bool(fused) and not snapshot and not eager.matrix.sliced
        self._hyper: tuple[list[GroupHyper], torch.Tensor] | None = None

    def hyper_matrix(self, hypers: list[GroupHyper]) -> torch.Tensor:
        """The step's hyperparameter matrix, rebuilt only when a constant changed (a schedule)."""
        if self._hyper is None or self._hyper[0] != hypers:
            self._hyper = (hypers, hyper_matrix(hypers, self.t.device))
        return self._hyper[1]

    def plan(
        self,
        optimizer: torch.optim.Optimizer,
        step: int,
        must_log: bool,
        need_dq: bool,
        closure: bool,
    ) -> StepPlan:
        """The plan of step ``step`` (``must_log``: the predictor waits for a first measurement;
        ``need_dq``: the prediction needs this step's update), with q_n read or copied as the
        plan needs, before the step."""
        hypers = [self.adapter.hyper(optimizer, g) for g in optimizer.param_groups]
        logged = step % self.every == 0 or must_log
        # a 16-bit group's rebuilt update misses the rounding of q_{n+1}: measure it from a copy
        rebuild = [
            self.adapter.can_reconstruct(g) and not self.snapshot and not widened
            for g, widened in zip(optimizer.param_groups, self.t.widened_groups)
        ]
        fused = (
            self.fused
            and logged
            and all(rebuild)
            and (closure or all(p.grad is not None for p in self.t.params))
        )
        next_logged = (step + 1) % self.every == 0
        plan = StepPlan(hypers, logged, rebuild, fused, next_logged=next_logged)
        with torch.no_grad():
            if (logged or need_dq) and not all(rebuild):
                self.eager.take_snapshot(rebuild)
            if logged and not fused:
                self.eager.read_before(plan, closure)
        return plan

    def statistics(
        self, optimizer: torch.optim.Optimizer, plan: StepPlan, inputs: tuple
    ) -> tuple[torch.Tensor, tuple | None]:
        """The step's (n_tensors, len(STATS)) statistics and, from the compiled program, its
        stored rows (None from the eager backend)."""
        if plan.fused:
            try:
                out = self.compiled(optimizer, plan, inputs)
            except CompileFailed as exc:
                self.fused = False
                warnings.warn(
                    f"noether-dyn: the fused statistics could not be compiled ({exc}); the "
                    "monitor goes on with the eager path (pass fused=False to skip the attempt).",
                    RuntimeWarning,
                    stacklevel=6,
                )
                out = None
            if out is not None:
                return out
        return self.eager(optimizer, plan, inputs)
