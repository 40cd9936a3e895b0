"""The compiled statistics backend: one program per logged step (noether_dyn.quantities.fused)
that reads q, g and the optimizer's state once, with the stored rows compiled into it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from noether_dyn.capture.tracked import Tracked
from noether_dyn.optimizers import OptimizerAdapter
from noether_dyn.quantities.charges import ChargeMatrix
from noether_dyn.quantities.fused import StatsProgram
from noether_dyn.quantities.reductions import local
from noether_dyn.quantities.step_rows import StepRows
from noether_dyn.records import StepPlan


class CompileFailed(Exception):
    """The program could not be compiled before any compiled call succeeded."""


class CompileNeeded(Exception):
    """The step's signature has no compiled program yet, and the caller asked not to compile
    it in the step."""


class CompiledStats:
    """The compiled programs of one monitor, one per list of update rules.

    Attributes:
        programs: rules -> :class:`StatsProgram` (its ``variants`` say how many signatures were
            compiled).
        compiled_ok: whether a compiled call has succeeded (after that, an error is raised, not
            turned into a fallback).
    """

    def __init__(
        self,
        tracked: Tracked,
        matrix: ChargeMatrix,
        adapter: OptimizerAdapter,
        step_rows: StepRows,
    ) -> None:
        self.t = tracked
        self.matrix = matrix
        self.adapter = adapter
        self.step_rows = step_rows
        self.programs: dict[tuple, StatsProgram] = {}
        self.compiled_ok = False

    def _program(self, optimizer: torch.optim.Optimizer) -> tuple | None:
        """The program of this step's rules and its array inputs ``(params, grads, states,
        coef)``, or None when the step has no elementwise form."""
        t = self.t
        if any(p.grad is None for p in t.params) or any(t.widened):
            return None  # 16-bit parameters: measured from a snapshot (tracked.accumulation_dtype)
        steps = []
        for group, params in zip(optimizer.param_groups, t.group_params):
            if not params:
                continue
            step = self.adapter.fused_step(optimizer, group, params, t.device)
            if step is None:
                return None
            steps.append((step, len(params)))
        rules = [s.rule for s, n in steps for _ in range(n)]
        states = [st for s, _ in steps for st in s.states]
        grads = t.grads()
        params = t.params
        if t.sharded:
            states = [tuple(local(list(st))) for st in states]
            params, grads = local(params), local(grads)
        coef = steps[0][0].coef if len(steps) == 1 else torch.cat([s.coef for s, _ in steps])
        key = tuple(rules)
        program = self.programs.get(key)
        if program is None:
            sym = set(self.matrix.tensors)
            trans = set(self.matrix.sum_tensors)
            program = StatsProgram(
                rules,
                [i in trans for i in range(len(t))],
                [i in sym for i in range(len(t))],
                rows=None if t.sharded else self.step_rows,
            )
            self.programs[key] = program
        return program, (params, grads, states, coef)

    def prepare(self, optimizer: torch.optim.Optimizer, inputs: tuple) -> Callable[[], bool]:
        """Read this step's program inputs and trace its program now, in the training thread
        (:meth:`StatsProgram.prepare`); returns the compile, which is safe in another thread
        while training goes on and returns False when the step has no elementwise form or the
        program can only be compiled by running it. Both raise what the tracer or the compiler
        raises."""
        found = self._program(optimizer)
        if found is None:
            return lambda: False
        program, arrays = found
        return program.prepare(*arrays, inputs)

    def __call__(
        self,
        optimizer: torch.optim.Optimizer,
        plan: StepPlan,
        inputs: tuple,
        compile_missing: bool = True,
    ) -> tuple[torch.Tensor, tuple | None] | None:
        """The statistics (and, unless they must first be reduced over ranks, the stored rows),
        or None when this step has no elementwise form (a tensor without gradient or state, a
        group without a rule). Raises :class:`CompileFailed` when the first compile fails, and
        (without ``compile_missing``) :class:`CompileNeeded` where the step's signature has no
        compiled program yet."""
        found = self._program(optimizer)
        if found is None:
            return None
        program, arrays = found
        if not compile_missing and not program.has_variant(*arrays, inputs):
            raise CompileNeeded
        try:
            out = program(*arrays, inputs)
        except Exception as exc:
            if self.compiled_ok:
                raise
            raise CompileFailed(
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        self.compiled_ok = True
        return out
