"""The Monitor: optimizer step hooks that turn each step into Lagrangian and charge rows.

Per step n (THEORY.md §1-3) the pre-hook plans the step (:mod:`.plan`) and reads or copies q_n
where the plan needs it; the post-hook reduces q, g, dq and the optimizer's metric G to per-tensor
float64 statistics (:mod:`.eager` or :mod:`.compiled`), keeps the rows on the device
(:mod:`.buffer`) and rolls the prediction (:mod:`.predict`). Nothing crosses to the host until a
flush (``flush_every`` rows, ``flush_seconds``, ``state_dict()``, ``close()``), written through
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

from noether_dyn.capture import checks
from noether_dyn.capture import state as mstate
from noether_dyn.capture.buffer import RowBuffer, record
from noether_dyn.capture.closure import has_closure, wrap_closure
from noether_dyn.capture.compiled import CompiledStats
from noether_dyn.capture.eager import EagerStats
from noether_dyn.capture.meta import run_meta
from noether_dyn.capture.plan import FUSED_MIN_NUMEL, Planner
from noether_dyn.capture.predict import Prediction
from noether_dyn.capture.tracked import Tracked
from noether_dyn.optimizers import adapter_for
from noether_dyn.quantities.charges import ChargeMatrix
from noether_dyn.quantities.step_rows import StepRows
from noether_dyn.quantities.theory import ChargePredictor, regime_for
from noether_dyn.records import StepPlan
from noether_dyn.store.writer import RunWriter
from noether_dyn.symmetries.symmetry import Symmetry

_ATTR = "_noether_dyn_monitor"
STATE_VERSION = mstate.STATE_VERSION
__all__ = ["FUSED_MIN_NUMEL", "STATE_VERSION", "Monitor", "MonitorFailure"]


class MonitorFailure(RuntimeWarning):
    """The monitor hit an error inside a step and stopped; training went on."""


class Monitor:
    """Watches one optimizer of one model; create it with :func:`noether_dyn.watch`.

    Attributes: run_dir (the store), step (steps seen), symmetries, adapter (``name``,
        ``metric_name``, ``fallback``), fused (compiled statistics in use), compiled (its backend:
        ``compiled_ok``, ``programs``), sharded (FSDP2), writes (rank 0 writes), on_stats (None or
        a callable given each logged step's (n_tensors, len(STATS)) statistics before any
        cross-rank reduction: a seam for tests).
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
        exact_decay: bool = False,
    ) -> None:
        checks.check_arguments(model, optimizer, every, (flush_every, flush_seconds), resume,
                               overwrite, fused, getattr(optimizer, _ATTR, None))  # fmt: skip
        self.optimizer, self.run_dir, self.every = optimizer, Path(run_dir), every
        self.snapshot, self.adapter = snapshot, adapter_for(optimizer)
        self._closed, self._depth, self.on_stats = False, 0, None
        self.tracked = t = Tracked(model, optimizer, symmetries)
        self.device, self.sharded = t.device, t.sharded
        self.names, self.params, self.group_of = t.names, t.params, t.group_of
        self._matrix = ChargeMatrix(t.symmetries, t.index, t.device, self.adapter.family)
        hypers = [self.adapter.hyper(optimizer, g) for g in optimizer.param_groups]
        predictor = ChargePredictor(
            regime_for(self.adapter.name, [h.beta for h in hypers]),
            self._matrix.linear_flags,
        )
        self._step_rows = StepRows(self._matrix, t.group_index, t.n_groups, predictor.regime)
        self._eager = eager = EagerStats(t, self._matrix, self.adapter)
        self.compiled = CompiledStats(t, self._matrix, self.adapter, self._step_rows)
        self._planner = Planner(t, self.adapter, eager, self.compiled, every, snapshot, fused)
        self._prediction = Prediction(t, self._matrix, eager, predictor, self._reduced,
                                      optimizer, exact_decay)  # fmt: skip
        self._buffer = RowBuffer(flush_every, flush_seconds, len(t.symmetries))
        self._state = mstate.monitor_states(t.n_groups)
        self._plan: StepPlan | None = None
        self._nan, self._t0 = t.to_device(float("nan"), torch.float64), time.monotonic()
        self.writes = checks.is_rank_zero()
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
                                               self._checkpoint(), exact_decay))  # fmt: skip
                self._writer.set_symmetries(t.symmetries)
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        setattr(optimizer, _ATTR, self_ref := weakref.ref(self))
        self._atexit = lambda: self_ref() is not None and self_ref().close()
        atexit.register(self._atexit)

    step = property(lambda self: self._state.step, doc="Optimizer steps seen so far.")
    time = property(lambda self: self._state.time, doc="t_n: the sum of the rates so far.")
    fused = property(lambda self: self._planner.fused, doc="Compiled statistics in use.")
    flush_every = property(lambda self: self._buffer.flush_every, doc="Rows per flush.")
    flush_seconds = property(lambda self: self._buffer.flush_seconds, doc="Seconds per flush.")
    snapshot_bytes = property(lambda self: self._eager.snapshot_bytes, doc="Bytes in q copies.")

    @property
    def symmetries(self) -> list[Symmetry]:
        """The symmetries whose charges this monitor tracks."""
        return list(self.tracked.symmetries)

    def log_loss(self, loss: torch.Tensor | float) -> None:
        """Record the loss V of the coming step (no sync); inside ``step(closure)`` it wins."""
        self._state.loss = checks.as_loss(loss)

    def log_depth_profile(self, profile: Any, step: int | None = None) -> None:
        """Store a per-layer depth profile (the DataFrame of ``noether_dyn.depth.profile``, with
        columns layer, sigma_max, sigma_min, defect, transmission and optionally stability)
        taken at ``step`` (default: the current step). Writes at once."""
        rows = checks.depth_rows(profile)
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
        mstate.check_checkpoint(state, [s.name for s in self.symmetries])
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
            self._state.closure_loss, self._loss_at_pre = None, self._state.loss
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
            c = s.closure_loss if s.loss is self._loss_at_pre else None  # a log_loss in step wins
            loss, s.loss, s.closure_loss = (s.loss if c is None else c), None, None
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

    def _log_step(self, optimizer: torch.optim.Optimizer, plan: StepPlan, loss) -> None:
        hypers, t = plan.hypers, self.tracked
        hyper = self._planner.hyper_matrix(hypers)
        loss = self._nan if loss is None else loss.to(t.device, non_blocking=True)
        prediction = self._prediction.inputs(hypers)
        stats, rows = self._planner.statistics(optimizer, plan, (hyper, loss, prediction))
        if self.on_stats is not None:
            self.on_stats(stats)
        if t.sharded:  # every statistic but the entry counts is a sum over entries
            stats = mstate.sync_stats(stats, t.numel.unsqueeze(1), True)
            if plan.loss_logged:
                loss = mstate.sync(loss, checks.reduction("loss"), True)
        if rows is None:
            rows = self._step_rows(stats, hyper, loss, prediction)
        self._prediction.logged(plan, stats, rows[2], rows[4])
        s = self._state
        self._buffer.append(
            record(plan, s.step, s.time, s.log_prefactor, time.monotonic() - self._t0, rows[:4])
        )

    def _reduced(self, values: torch.Tensor) -> torch.Tensor:
        """Per-tensor sums over entries, summed over ranks when parameters are sharded."""
        return mstate.sync(values, "sum", self.sharded)

    def _checkpoint(self) -> dict[str, Any]:
        names = [s.name for s in self.tracked.symmetries]
        return mstate.checkpoint(self._state, self._prediction.predictor, names)

    def _resume_from_store(self) -> None:
        checks.check_resume(self._writer.symmetry_names(), self.symmetries, self.run_dir)
        state = self._writer.get_meta("monitor_state")
        if state is not None:
            self.load_state_dict(state)
