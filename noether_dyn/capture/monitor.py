"""The Monitor: optimizer step hooks that turn each step into Lagrangian and charge rows.

Data flow per step n (THEORY.md §1-3): the pre-hook plans the step (:mod:`.plan`: rates after
schedulers, logged or not, eager or compiled) and reads or copies q_n where the plan needs it; the
post-hook reduces q, g, dq and the metric G the optimizer used to per-tensor float64 statistics
(:mod:`.eager`, or one compiled program, :mod:`.compiled`), forms the stored rows and keeps them
on the device (:mod:`.buffer`), and rolls the charge prediction (:mod:`.predict`). Nothing crosses
to the host until a flush (every ``flush_every`` logged steps or ``flush_seconds`` seconds, at
``state_dict()`` and at ``close()``). The store is written through
:class:`~noether_dyn.store.writer.RunWriter` only.
"""

from __future__ import annotations

import atexit
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from noether_dyn.capture.buffer import RowBuffer
from noether_dyn.capture.checks import (
    check_arguments,
    check_fused,
    check_unwatched,
    depth_rows,
    is_rank_zero,
    reduction,
)
from noether_dyn.capture.closure import has_closure, wrap_closure
from noether_dyn.capture.compiled import CompiledStats
from noether_dyn.capture.eager import EagerStats
from noether_dyn.capture.meta import run_meta
from noether_dyn.capture.plan import FUSED_MIN_NUMEL, Planner
from noether_dyn.capture.predict import Prediction
from noether_dyn.capture.state import State, States, sync, sync_stats
from noether_dyn.capture.tracked import Tracked
from noether_dyn.optimizers import OptimizerAdapter, adapter_for
from noether_dyn.quantities.charges import ChargeMatrix
from noether_dyn.quantities.step_rows import StepRows, hyper_matrix
from noether_dyn.quantities.theory import ChargePredictor, regime_for
from noether_dyn.records import GroupHyper, StepPlan, StepRecord
from noether_dyn.store.writer import RunWriter
from noether_dyn.symmetries.symmetry import Symmetry

_ATTR = "_noether_dyn_monitor"
STATE_VERSION = 1
__all__ = ["FUSED_MIN_NUMEL", "STATE_VERSION", "Monitor", "MonitorFailure"]


class MonitorFailure(RuntimeWarning):
    """The monitor hit an error inside a step and stopped; training went on."""


class Monitor:
    """Watches one optimizer of one model; create it with :func:`noether_dyn.watch`.

    Attributes:
        run_dir: where the run store lives. step: optimizer steps seen so far (the next step's
        number). symmetries: the tracked symmetries. adapter: the optimizer adapter (its
        ``name``, ``metric_name`` and ``fallback``). fused: whether logged steps use the
        compiled statistics. compiled: the compiled backend (``compiled_ok``: a compiled call
        succeeded; ``programs``). sharded: parameters are sharded (FSDP2). writes: whether this
        rank writes the store (rank 0). on_stats: None, or a callable given each logged step's
        (n_tensors, len(STATS)) statistics before any cross-rank reduction (a seam for tests).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        run_dir: str | Path,
        every: int = 1,
        *,
        symmetries: Sequence[Symmetry] = (),
        symmetry_note: str = "",
        flush_every: int = 100,
        flush_seconds: float = 10.0,
        resume: bool = False,
        overwrite: bool = False,
        snapshot: bool = False,
        fused: bool | None = None,
    ) -> None:
        check_arguments(model, optimizer, every, flush_every, flush_seconds, resume, overwrite)
        check_fused(fused)
        previous = getattr(optimizer, _ATTR, None)
        check_unwatched(optimizer, previous() if previous is not None else None)
        self.optimizer, self.run_dir, self.every = optimizer, Path(run_dir), every
        self.snapshot = snapshot
        self.adapter: OptimizerAdapter = adapter_for(optimizer)
        self._closed, self._depth, self.on_stats = False, 0, None
        self.tracked = t = Tracked(model, optimizer, symmetries)
        self.device, self.sharded = t.device, t.sharded
        self._matrix = ChargeMatrix(t.symmetries, t.index, t.device)
        hypers = [self.adapter.hyper(optimizer, g) for g in optimizer.param_groups]
        predictor = ChargePredictor(
            regime_for(self.adapter.name, [h.beta for h in hypers]),
            [s.kind == "translation" for s in t.symmetries],
        )
        self._step_rows = StepRows(self._matrix, t.group_index, t.n_groups, predictor.regime)
        eager = EagerStats(t, self._matrix, self.adapter)
        self.compiled = CompiledStats(t, self._matrix, self.adapter, self._step_rows)
        self._planner = Planner(t, self.adapter, eager, self.compiled, every, snapshot, fused)
        self._eager = eager
        self._prediction = Prediction(t, self._matrix, eager, predictor, self._reduced)
        self._buffer = RowBuffer(flush_every, flush_seconds, len(t.symmetries))
        self._state = States(
            State("step", int, "host", True, int),
            State("time", float, "host", True, float),
            State(
                "log_prefactor",
                lambda: [0.0] * t.n_groups,
                "host",
                True,
                lambda v: [float(x) for x in v],
            ),  # fmt: skip
            State("loss", lambda: None, reduction("loss"), False),
            State("closure_loss", lambda: None, reduction("loss"), False),
        )
        self._hyper: tuple[list[GroupHyper], torch.Tensor] | None = None
        self._plan: StepPlan | None = None
        self._nan = t.to_device(float("nan"), torch.float64)
        self._t0 = time.monotonic()
        self.writes = is_rank_zero()
        # DDP replicates parameters: rank 0 alone computes and writes. FSDP2 shards them: every
        # rank reduces its shards and rank 0 writes the all-reduced statistics.
        self._active = self.writes or self.sharded
        self._writer: RunWriter | None = None
        if self.writes:
            self._writer = RunWriter(self.run_dir, "resume" if resume else
                                     "overwrite" if overwrite else "new")  # fmt: skip
            if resume:
                self._resume_from_store()
            else:
                self._writer.set_meta(run_meta(model, optimizer, t, self.adapter, hypers,
                                               predictor.regime, every, symmetry_note,
                                               self._checkpoint()))  # fmt: skip
                self._writer.set_symmetries(t.symmetries)
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        setattr(optimizer, _ATTR, weakref.ref(self))
        self_ref = weakref.ref(self)
        self._atexit = lambda: self_ref() is not None and self_ref().close()
        atexit.register(self._atexit)

    # ------------------------------------------------------------------ public API
    step = property(lambda self: self._state.step, doc="Optimizer steps seen so far.")
    time = property(lambda self: self._state.time, doc="t_n: the sum of the rates so far.")
    fused = property(lambda self: self._planner.fused, doc="Compiled statistics in use.")
    snapshot_bytes = property(lambda self: self._eager.snapshot_bytes, doc="Bytes in q copies.")

    @property
    def symmetries(self) -> list[Symmetry]:
        """The symmetries whose charges this monitor tracks."""
        return list(self.tracked.symmetries)

    def log_loss(self, loss: torch.Tensor | float) -> None:
        """Record the loss (the potential V) of the coming step. No host-device sync."""
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"log_loss: expected a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
                    "pass loss.mean() or the reduced loss."
                )
            self._state.loss = loss.detach().reshape(())
        else:
            self._state.loss = torch.tensor(float(loss), dtype=torch.float64)

    def log_depth_profile(self, profile: Any, step: int | None = None) -> None:
        """Store a per-layer depth profile (the DataFrame of ``noether_dyn.depth.profile``, with
        columns layer, sigma_max, sigma_min, defect, transmission and optionally stability)
        taken at ``step`` (default: the current step). Writes at once."""
        rows = depth_rows(profile)
        if self._writer is not None:
            self._writer.write_depth_profile(self.step if step is None else int(step), rows)

    def flush(self) -> None:
        """Write the pending rows to the store (one host-device sync)."""
        rows = self._buffer.take()
        if rows and self._writer is None:
            return
        if self._writer is not None:
            meta = {"monitor_state": self._checkpoint()}
            if rows:
                h = self._buffer.to_host(rows)
                self._writer.append(h.steps, h.groups, h.charge_steps, h.charges, h.events,
                                    meta, tensors=h.tensors)  # fmt: skip
            else:
                self._writer.set_meta(meta)
        self._buffer.flushed()

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state, to save beside the model's and optimizer's in a checkpoint.
        Flushes first, so the store holds every step the checkpoint has seen."""
        self.flush()
        return self._checkpoint()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: restores step, time and predictions, and drops any stored
        steps at or after the checkpoint's step (they belong to the run that crashed)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"load_state_dict: monitor state version {state.get('version')!r}, expected "
                f"{STATE_VERSION}. Was it saved by monitor.state_dict()?"
            )
        names, mine = list(state.get("symmetries", [])), [s.name for s in self.symmetries]
        if names != mine:
            raise ValueError(
                f"load_state_dict: the checkpoint tracked symmetries {names} but this monitor "
                f"tracks {mine}. Resume with the same symmetries (pass symmetries= as in the "
                "first run)."
            )
        self._buffer.take()
        self._state.load_state_dict(state)
        self._prediction.predictor.load_state_dict(state["predictor"], self.device)
        if self._writer is not None:  # one transaction: no window without the resume event
            self._writer.truncate(self.step, meta={"monitor_state": self._checkpoint()},
                                  event=("resume", f"resumed at step {self.step}"))  # fmt: skip

    def close(self) -> None:
        """Flush, detach the hooks and close the store. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            for handle in self._handles:
                handle.remove()
            if getattr(self.optimizer, _ATTR, None) is not None:
                delattr(self.optimizer, _ATTR)
            atexit.unregister(self._atexit)
            if self._writer is not None:
                self._writer.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Monitor(run_dir='{self.run_dir}', optimizer={type(self.optimizer).__name__}, "
            f"adapter={self.adapter.name}, every={self.every}, step={self.step}, "
            f"symmetries={len(self.tracked.symmetries)})"
        )

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict):
        if not self._active:
            return None
        try:
            self._depth += 1
            if self._depth > 1:  # a subclass's step calling super().step(): count once
                return None
            self.tracked.check_unchanged(optimizer)
            pred, closure = self._prediction, has_closure(args, kwargs)
            self._plan = self._planner.plan(optimizer, self.step, pred.waiting,
                                            pred.predictor.needs_update_sq, closure)  # fmt: skip
            self._state.closure_loss = None
            return wrap_closure(args, kwargs, lambda v: setattr(self._state, "closure_loss", v))
        except Exception as exc:  # never let the monitor stop the training
            self._fail("pre-step", exc)
            return None

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if not self._active:
            return
        try:
            self._depth -= 1
            if self._depth > 0 or self._plan is None:
                return
            plan, self._plan, s = self._plan, None, self._state
            loss = s.closure_loss if s.closure_loss is not None else s.loss
            s.loss = s.closure_loss = None
            plan.loss_logged = loss is not None
            with torch.no_grad():
                if plan.logged:
                    self._log_step(optimizer, plan, loss)
                self._prediction.advance(optimizer, plan)
            s.step += 1
            s.time += plan.hypers[0].lr if plan.hypers else 0.0
            for g, h in enumerate(plan.hypers):
                s.log_prefactor[g] += h.log_prefactor_rate
            if self._buffer.due():
                self.flush()
        except Exception as exc:
            self._fail("post-step", exc)

    def _fail(self, where: str, exc: Exception) -> None:
        """Stop monitoring (training goes on), keep every flushed step, record why."""
        self._active, self._depth, self._plan = False, 0, None
        message = f"monitoring stopped at step {self.step} ({where}): {type(exc).__name__}: {exc}"
        warnings.warn(
            f"noether-dyn: {message}. Training goes on; the run keeps the steps before it.",
            MonitorFailure,
            stacklevel=3,
        )
        try:
            self._buffer.take()
            if self._writer is not None:
                self._writer.add_event(self.step, "monitor_error", message)
        except Exception:  # the store itself may be what failed
            pass

    # ------------------------------------------------------------------ one logged step
    def _log_step(self, optimizer: torch.optim.Optimizer, plan: StepPlan, loss) -> None:
        hypers, t = plan.hypers, self.tracked
        hyper = self._hyper_matrix(hypers)
        loss = self._nan if loss is None else loss.to(t.device, non_blocking=True)
        prediction = self._prediction.inputs(hypers)
        stats, rows = self._planner.statistics(optimizer, plan, (hyper, loss, prediction))
        if self.on_stats is not None:
            self.on_stats(stats)
        if t.sharded:  # every statistic but the entry counts is a sum over entries
            stats = sync_stats(stats, t.numel.unsqueeze(1), True)
            if plan.loss_logged:
                loss = sync(loss, reduction("loss"), True)
        if rows is None:
            rows = self._step_rows(stats, hyper, loss, prediction)
        device_row, group_device, charges, tensors, advanced = rows
        self._prediction.logged(plan, stats, charges, advanced)
        s, h0 = self._state, hypers[0] if hypers else GroupHyper(0.0, 0.0, 0.0, False)
        host = [float(s.step), s.time, h0.lr, s.log_prefactor[0] if hypers else 0.0,
                time.monotonic() - self._t0]  # fmt: skip
        groups = [[float(g), h.lr, h.beta, h.weight_decay, h.mass, s.log_prefactor[g]]
                  for g, h in enumerate(hypers)]  # fmt: skip
        self._buffer.append(StepRecord(host, device_row, groups, group_device, charges,
                                       plan.loss_logged, tensors))  # fmt: skip

    def _hyper_matrix(self, hypers: list[GroupHyper]) -> torch.Tensor:
        """The step's hyperparameter matrix, rebuilt only when a constant changed (a schedule)."""
        if self._hyper is None or self._hyper[0] != hypers:
            self._hyper = (hypers, hyper_matrix(hypers, self.device))
        return self._hyper[1]

    def _reduced(self, values: torch.Tensor) -> torch.Tensor:
        """Per-tensor sums over entries, summed over ranks when parameters are sharded."""
        return sync(values, "sum", self.sharded)

    # ------------------------------------------------------------------ checkpoint and resume
    def _checkpoint(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            **self._state.state_dict(),
            "predictor": self._prediction.predictor.state_dict(),
            "symmetries": [s.name for s in self.tracked.symmetries],
        }

    def _resume_from_store(self) -> None:
        stored, mine = self._writer.symmetry_names(), [s.name for s in self.symmetries]
        if stored != mine:
            raise ValueError(
                f"watch(resume=True): the run at '{self.run_dir}' tracks symmetries {stored}, "
                f"this monitor {mine}. Pass the same symmetries= (or the same inputs=) as the "
                "first run."
            )
        state = self._writer.get_meta("monitor_state")
        if state is not None:
            self.load_state_dict(state)
