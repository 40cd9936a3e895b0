"""The Monitor: optimizer step hooks that turn each step into Lagrangian and charge rows.

Per step n (docs/theory.md §1-3) the pre-hook plans the step (:mod:`.plan`) and reads or copies q_n
where the plan needs it; the post-hook reduces q, g, dq and the optimizer's metric G to per-tensor
float64 statistics (:mod:`.eager` or :mod:`.compiled`), keeps the rows on the device
(:mod:`.buffer`) and rolls the prediction (:mod:`.predict`). Nothing crosses to the host until a
flush (``flush_every`` rows, ``flush_seconds``, ``state_dict()``, ``close()``), written through
:class:`~noether_dyn.store.writer.RunWriter` only.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from noether_dyn.capture import checks
from noether_dyn.capture import state as mstate
from noether_dyn.capture.buffer import record
from noether_dyn.capture.closure import has_closure, wrap_closure
from noether_dyn.capture.matrix import MatrixCharges, decay_rule
from noether_dyn.capture.meta import run_meta
from noether_dyn.capture.parts import assemble
from noether_dyn.capture.plan import FUSED_MIN_NUMEL
from noether_dyn.capture.sample import zero_config
from noether_dyn.capture.storage import MonitorFailure, StoreHandle
from noether_dyn.capture.tracked import Tracked
from noether_dyn.optimizers import adapter_for
from noether_dyn.records import StepPlan
from noether_dyn.symmetries.matrix import MatrixSymmetry
from noether_dyn.symmetries.symmetry import Symmetry

_ATTR = "_noether_dyn_monitor"
STATE_VERSION = mstate.STATE_VERSION
__all__ = ["FUSED_MIN_NUMEL", "STATE_VERSION", "Monitor", "MonitorFailure"]


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
        detect_first: bool = False,
        flush_every: int = 100,
        flush_seconds: float = 10.0,
        resume: bool = False,
        overwrite: bool = False,
        snapshot: bool = False,
        fused: bool | None = None,
        sinks: Sequence[Any] | None = (),
        exact_decay: bool = False,
        matrix_charges: Sequence[MatrixSymmetry] = (),
        granularity: str = "layer",
    ) -> None:
        checks.check_arguments(model, optimizer, every, (flush_every, flush_seconds), resume,
                               overwrite, fused, getattr(optimizer, _ATTR, None), snapshot,
                               symmetries)  # fmt: skip
        self.optimizer, self.run_dir, self.every = optimizer, checks.run_dir_path(run_dir), every
        self.snapshot, self.adapter = snapshot, adapter_for(optimizer)
        self._closed, self._failed, self._depth, self.on_stats = False, False, 0, None
        self.tracked = t = Tracked(model, optimizer, symmetries, granularity)
        self.device, self.sharded = t.device, t.sharded
        self.names, self.params, self.group_of = t.names, t.params, t.group_of
        self._options = (every, snapshot, fused, flush_every, flush_seconds, sinks, exact_decay)
        self._plan, hypers = None, self._track(t.symmetries)
        self._gl = MatrixCharges(matrix_charges, t, self.adapter.name) if matrix_charges else None
        self._state = mstate.monitor_states(t.n_groups)
        self._sample = zero_config(model, t, detect_first)
        self._nan, self._t0 = t.to_device(float("nan"), torch.float64), time.monotonic()
        self.writes = checks.is_rank_zero()
        # DDP replicates parameters: rank 0 alone computes and writes. FSDP2 shards them: every
        # rank reduces its shards and rank 0 writes the all-reduced statistics.
        self._active = self.writes or self.sharded
        self._store, self._writer, self._lock = None, None, contextlib.nullcontext()
        if self.writes:  # storage errors: the store's StoreError, naming the path
            meta = None if resume else run_meta(model, optimizer, t, self.adapter, hypers,
                                                self._predictor.regime, every, symmetry_note,
                                                self._checkpoint(), exact_decay)  # fmt: skip
            self._store = StoreHandle(self.run_dir, "resume" if resume else "overwrite" if
                                      overwrite else "new", meta, None if resume else
                                      t.symmetries)  # fmt: skip
            self._writer, self._lock = self._store.writer, self._store.lock
            if self._gl is not None:  # GL records and each group's decay rule (capture.matrix)
                rules = [decay_rule(self.adapter.name, h.weight_decay, h.beta, h.decoupled)
                         for h in hypers]  # fmt: skip
                self._writer.set_meta({**self._gl.meta(), "matrix_decay": rules})
            if resume and (state := checks.stored_state(self._writer, t.symmetries)):
                self.load_state_dict(state)
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
            *(self._sample.handles if self._sample is not None else []),  # zero-config's
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
    matrix_snapshot_bytes = property(
        lambda self: 0 if self._gl is None else self._gl.snapshot_bytes,
        doc="Bytes in the q_n copies of the GL records' parameters (watch(matrix_charges=)).",
    )

    symmetries = property(lambda self: list(self.tracked.symmetries), doc="Tracked symmetries.")

    def log_loss(self, loss: torch.Tensor | float) -> None:
        """Record the loss V of the coming step (no sync); inside ``step(closure)`` it wins."""
        self._state.loss = checks.as_loss(loss)

    def log_depth_profile(self, profile: Any, step: int | None = None) -> None:
        """Store a per-layer depth profile (the DataFrame of ``noether_dyn.depth.profile``, with
        columns layer, sigma_max, sigma_min, defect, transmission and optionally stability)
        taken at ``step`` (default: the current step). Writes at once."""
        rows = checks.depth_rows(profile)
        with self._lock:
            if self._writer is not None:
                self._writer.write_depth_profile(self.step if step is None else int(step), rows)

    def flush(self) -> None:
        """Write the pending rows to the store (one host-device sync). Never raises: a failed
        write stops monitoring with :class:`MonitorFailure` (the store keeps the flushes before)."""
        with self._lock:
            rows = self._buffer.take()
            if self._store is not None and not self._failed:
                try:
                    host = self._buffer.to_host(rows) if rows else None
                    matrix = None if self._gl is None else self._gl.take_for_store()
                    # one transaction: the steps and their matrix rows land together or not at all
                    self._store.write(host, {"monitor_state": self._checkpoint()}, matrix)
                except Exception as exc:
                    self._fail("flush", exc)
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
        with self._lock:
            self._buffer.take()
            if self._gl is not None:  # unflushed matrix rows belong to the dropped steps too
                self._gl.pending.clear()
            self._state.load_state_dict(state)
            self._t0 = time.monotonic() - self._state.wall_time  # wall_time goes on from there
            self._prediction.predictor.load_state_dict(state["predictor"], self.device)
            if self._store is not None:  # one transaction: no window without the resume event
                meta, event = {"monitor_state": self._checkpoint()}, f"resumed at step {self.step}"
                self._writer.truncate(self.step, meta=meta, event=(self.step, "resume", event))

    def close(self) -> None:
        """Flush, detach the hooks and close the store. Idempotent; never raises (a failed
        final flush or close warns with the store's path, the training code goes on)."""
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
            self._buffer.sinks.close()
            if self._store is not None:
                self._store.close()

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
            if self._sample is not None:  # zero-config: detect on the first forward's batch
                args, kwargs, ready = self._sample.at_step(args, kwargs, self._writer, self.step)
                if ready is not None:  # track from this step (from the next after a closure)
                    self.flush()
                    self._sample, _ = None, self._track(ready)
            pred, closure = self._prediction, has_closure(args, kwargs)
            self._plan = self._planner.plan(optimizer, self.step, pred.waiting,
                                            pred.predictor.needs_update_sq, closure)  # fmt: skip
            self._state.closure_loss, self._loss_at_pre = None, self._state.loss
            if self._gl is not None and self._plan.logged:
                self._gl.before(self._plan)
            return wrap_closure(args, kwargs, lambda v: setattr(self._state, "closure_loss", v))
        except Exception as exc:  # never let the monitor stop the training
            # the pending rows are of whole earlier steps (this step has changed no state): keep
            # them, so a change such as add_param_group loses no step logged before it
            self.flush()
            if not self._failed:  # a failed flush has already stopped and warned
                self._fail("pre-step", exc)
            return None

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if not self._active:
            return
        with _ctrl_c_after():  # the update is done: its rows complete before a Ctrl-C lands
            self._post_step(optimizer)

    def _post_step(self, optimizer: torch.optim.Optimizer) -> None:
        try:
            self._depth -= 1
            if self._depth > 0 or self._plan is None:
                return
            with self._lock:  # a flush from another thread waits for the step
                plan, self._plan, s = self._plan, None, self._state
                # a log_loss inside the step wins over the closure's loss
                c = s.closure_loss if s.loss is self._loss_at_pre else None
                loss, s.loss, s.closure_loss = (s.loss if c is None else c), None, None
                plan.loss_logged = loss is not None
                with torch.no_grad():
                    if plan.logged:
                        self._log_step(optimizer, plan, loss)
                        if self._gl is not None:
                            self._gl.after(s.step)
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
        self._active, self._failed, self._depth, self._plan = False, True, 0, None
        message = f"monitoring stopped at step {self.step} ({where}): {type(exc).__name__}: {exc}"
        self._buffer.take()
        if self._gl is not None:
            self._gl.pending.clear()
        if self._store is not None:
            self._store.event(self.step, "monitor_error", message)
        warnings.warn(
            f"noether-dyn: {message}. Training goes on; the run at '{self.run_dir}' keeps the "
            "steps flushed before it.",
            MonitorFailure,
            stacklevel=3,
        )

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
        if rows is None:  # the eager path: its rows count toward the compile's rent (plan.py)
            start = time.perf_counter()
            rows = self._step_rows(stats, hyper, loss, prediction)
            self._planner.eager_seconds += time.perf_counter() - start
        self._prediction.logged(plan, stats, rows[2], rows[4])
        s = self._state
        self._buffer.append(
            record(plan, s.step, s.time, s.log_prefactor, time.monotonic() - self._t0, rows[:4])
        )

    def _track(self, symmetries: Sequence[Symmetry]) -> list:
        """(Re)build what depends on the tracked symmetries; the groups' hyperparameters."""
        self.tracked.symmetries = list(symmetries)
        p = assemble(self.tracked, self.optimizer, self.adapter, self._options, self._reduced)
        (self._matrix, self._predictor, self._step_rows, self._eager, self.compiled,
         self._planner, self._prediction, self._buffer) = p.members()  # fmt: skip
        return p.hypers

    def _reduced(self, values: torch.Tensor) -> torch.Tensor:
        """Per-tensor sums over entries, summed over ranks when parameters are sharded."""
        return mstate.sync(values, "sum", self.sharded)

    def _checkpoint(self) -> dict[str, Any]:
        self._state.wall_time = time.monotonic() - self._t0
        names = [s.name for s in self.tracked.symmetries]
        return mstate.checkpoint(self._state, self._prediction.predictor, names)


@contextlib.contextmanager
def _ctrl_c_after():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise its KeyboardInterrupt when
    the block ends. The optimizer's update is already applied when the post-step hook runs: an
    interrupt in the middle of its statistics would leave that update uncounted (step numbers one
    behind the optimizer, and a stored charge change no split accounts for). Only in the main
    thread and only when Python's default handler is installed (a framework's own handler is
    left alone); costs two ``signal.signal`` calls per step."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if held:
            raise KeyboardInterrupt
