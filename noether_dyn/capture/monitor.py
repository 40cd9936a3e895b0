"""The Monitor: optimizer step hooks that turn each step into Lagrangian and charge rows.

Data flow per step n (THEORY.md §1-3): the pre-hook reads the rates of step n (after schedulers)
and, when step n is logged or a prediction needs the update, copies q_n; the post-hook forms
dq_n = q_{n+1} - q_n, reads g_n and the metric G the optimizer used, reduces everything to
per-tensor float64 statistics in a few stacked reductions (or, with ``fused``, in one compiled
program that reads q, g and the optimizer's state once: noether_dyn.quantities.fused), and keeps
the resulting rows on the device. Nothing crosses to the host until a flush (every
``flush_every`` logged steps or ``flush_seconds`` seconds, at ``state_dict()`` and at
``close()``).
"""

from __future__ import annotations

import atexit
import datetime as _dt
import math
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noether_dyn.optimizers import OptimizerAdapter, adapter_for
from noether_dyn.optimizers.base import GroupHyper
from noether_dyn.quantities.charges import COL, S_, STATS, ChargeMatrix
from noether_dyn.quantities.fused import StatsProgram
from noether_dyn.quantities.reductions import (
    DTensor,
    dots,
    inverse_sums,
    local,
    sq_norms,
    sums,
)
from noether_dyn.quantities.step_rows import StepRows, hyper_matrix
from noether_dyn.quantities.theory import ChargePredictor, regime_for
from noether_dyn.store.schema import SCHEMA_VERSION
from noether_dyn.store.writer import RunWriter
from noether_dyn.symmetries.symmetry import Symmetry

_ATTR = "_noether_dyn_monitor"
STATE_VERSION = 1
FUSED_MIN_NUMEL = 1_000_000
"""With ``fused=None`` the compiled statistics are used from this many parameter entries on."""


class MonitorFailure(RuntimeWarning):
    """The monitor hit an error inside a step and stopped; training went on."""


class Monitor:
    """Watches one optimizer of one model; create it with :func:`noether_dyn.watch`.

    Attributes:
        run_dir: where the run store lives.
        step: the number of optimizer steps seen so far (the next step's number).
        symmetries: the symmetries whose charges are tracked.
        adapter: the optimizer adapter (its ``name``, ``metric_name`` and ``fallback``).
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
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"watch: model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"watch: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
            )
        if not isinstance(every, int) or every < 1:
            raise ValueError(
                f"watch: every must be a positive int (log every k steps), got {every!r}."
            )
        if flush_every < 1 or flush_seconds <= 0:
            raise ValueError(
                f"watch: flush_every must be >= 1 and flush_seconds > 0, got {flush_every!r} and "
                f"{flush_seconds!r}."
            )
        if resume and overwrite:
            raise ValueError("watch: resume=True and overwrite=True contradict; choose one.")
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(f"watch: fused must be None, True or False, got {fused!r}.")
        previous = getattr(optimizer, _ATTR, None)
        if previous is not None and previous() is not None and not previous()._closed:
            raise RuntimeError(
                f"watch: this {type(optimizer).__name__} is already watched (run_dir "
                f"'{previous().run_dir}'). Close that monitor first (monitor.close()) or keep "
                "using it."
            )

        self.optimizer = optimizer
        self.run_dir = Path(run_dir)
        self.every = every
        self.snapshot = snapshot
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.adapter: OptimizerAdapter = adapter_for(optimizer)
        self._closed = False
        self._depth = 0

        self.names, self.params, self.group_of = _tracked_parameters(model, optimizer)
        self.device = self.params[0].device if self.params else torch.device("cpu")
        index = {name: i for i, name in enumerate(self.names)}
        self._symmetries = _check_symmetries(symmetries, index, model)
        self._matrix = ChargeMatrix(self._symmetries, index, self.device)
        self._group_index = self._to_device(self.group_of, torch.long)
        self._group_params = [
            [p for p, gi in zip(self.params, self.group_of) if gi == g]
            for g in range(len(optimizer.param_groups))
        ]
        self._numel = self._to_device([float(p.numel()) for p in self.params], torch.float64)
        self._local_numel = self._to_device(
            [float(p.numel()) for p in local(self.params)], torch.float64
        )
        self._nan = self._to_device(float("nan"), torch.float64)
        self._n_groups = len(optimizer.param_groups)
        hypers = [self.adapter.hyper(optimizer, g) for g in optimizer.param_groups]
        self._predictor = ChargePredictor(
            regime_for(self.adapter.name, [h.beta for h in hypers]),
            [s.kind == "translation" for s in self._symmetries],
        )
        self._step_rows = StepRows(
            self._matrix, self._group_index, self._n_groups, self._predictor.regime
        )
        # the predictor's stand-in before it starts: two tensors, not one view twice (under the
        # torch.compile fallback, aliased inputs recompile once the predictor's own replace them)
        self._zero_charges = torch.zeros(
            2, len(self._matrix), dtype=torch.float64, device=self.device
        ).unbind()
        self._hyper: tuple[list[GroupHyper], torch.Tensor] | None = None
        self._snap: dict[int, torch.Tensor] | None = None
        self._idx_cache: dict[tuple[int, ...], torch.Tensor] = {}
        if fused is None:
            fused = (
                self.device.type in ("cpu", "cuda")
                and sum(p.numel() for p in self.params) >= FUSED_MIN_NUMEL
            )
        self.fused = bool(fused) and not snapshot
        self._programs: dict[tuple, StatsProgram] = {}
        self._compiled_ok = False

        self.step = 0
        self.time = 0.0
        self._log_prefactor = [0.0] * self._n_groups
        self._t0 = time.monotonic()
        self._last_flush = self._t0
        self._pending_loss: torch.Tensor | None = None
        self._closure_loss: torch.Tensor | None = None
        self._step_ctx: dict[str, Any] | None = None
        self._rows: list[
            tuple[
                list[float],
                torch.Tensor,
                list[list[float]],
                torch.Tensor,
                torch.Tensor | None,
                bool,
            ]
        ] = []
        self._warned: set[str] = set()

        self._is_writer = _is_rank_zero()
        # DDP replicates parameters: rank 0 alone computes and writes. FSDP2 shards them: every
        # rank reduces its shards and rank 0 writes the all-reduced statistics.
        self._sharded = any(isinstance(p, DTensor) for p in self.params)
        self._active = self._is_writer or self._sharded
        self._writer: RunWriter | None = None
        if self._is_writer:
            mode = "resume" if resume else "overwrite" if overwrite else "new"
            self._writer = RunWriter(self.run_dir, mode)
            if resume:
                self._resume_from_store()
            else:
                self._writer.set_meta(self._initial_meta(model, hypers, symmetry_note))
                self._writer.set_symmetries(self._symmetries)

        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        setattr(optimizer, _ATTR, weakref.ref(self))
        self_ref = weakref.ref(self)
        self._atexit = lambda: self_ref() is not None and self_ref().close()
        atexit.register(self._atexit)

    # ------------------------------------------------------------------ public API
    @property
    def symmetries(self) -> list[Symmetry]:
        """The symmetries whose charges this monitor tracks."""
        return list(self._symmetries)

    def log_loss(self, loss: torch.Tensor | float) -> None:
        """Record the loss (the potential V) of the coming step. No host-device sync."""
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"log_loss: expected a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
                    "pass loss.mean() or the reduced loss."
                )
            self._pending_loss = loss.detach().reshape(())
        else:
            self._pending_loss = torch.tensor(float(loss), dtype=torch.float64)

    def log_depth_profile(self, profile: Any, step: int | None = None) -> None:
        """Store a per-layer depth profile (the DataFrame of ``noether_dyn.depth.profile``, with
        columns layer, sigma_max, sigma_min, defect, transmission and optionally stability)
        taken at ``step`` (default: the current step). Writes at once."""
        required = ("layer", "sigma_max", "sigma_min", "defect", "transmission")
        missing = [c for c in required if c not in getattr(profile, "columns", ())]
        if missing:
            raise ValueError(
                f"log_depth_profile: the profile lacks columns {missing}; pass the DataFrame "
                "returned by noether_dyn.depth.profile(model, x)."
            )
        cols = [*required, "stability"]
        frame = profile.reindex(columns=cols)
        if self._writer is not None:
            self._writer.write_depth_profile(
                self.step if step is None else int(step), frame.to_numpy(dtype=np.float64)
            )

    def flush(self) -> None:
        """Write the pending rows to the store (one host-device sync)."""
        if not self._rows:
            if self._writer is not None:
                self._writer.set_meta({"monitor_state": self._state()})
            self._last_flush = time.monotonic()
            return
        rows, self._rows = self._rows, []
        if self._writer is None:
            return
        step_rows, group_rows, charge_steps, charge_rows, events, tensors = self._to_host(rows)
        self._writer.append(
            step_rows,
            group_rows,
            charge_steps,
            charge_rows,
            events,
            {"monitor_state": self._state()},
            tensors=tensors,
        )
        self._last_flush = time.monotonic()

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state, to save beside the model's and optimizer's in a checkpoint.
        Flushes first, so the store holds every step the checkpoint has seen."""
        self.flush()
        return self._state()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: restores step, time and predictions, and drops any stored
        steps at or after the checkpoint's step (they belong to the run that crashed)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"load_state_dict: monitor state version {state.get('version')!r}, expected "
                f"{STATE_VERSION}. Was it saved by monitor.state_dict()?"
            )
        names = list(state.get("symmetries", []))
        if names != [s.name for s in self._symmetries]:
            raise ValueError(
                "load_state_dict: the checkpoint tracked symmetries "
                f"{names} but this monitor tracks {[s.name for s in self._symmetries]}. Resume "
                "with the same symmetries (pass symmetries= as in the first run)."
            )
        self._rows = []
        self.step = int(state["step"])
        self.time = float(state["time"])
        self._log_prefactor = [float(v) for v in state["log_prefactor"]]
        self._predictor.load_state_dict(state["predictor"], self.device)
        if self._writer is not None:
            self._writer.truncate(self.step)
            self._writer.con.execute(
                "INSERT INTO events VALUES (?, ?, ?)",
                (self.step, "resume", f"resumed at step {self.step}"),
            )
            self._writer.con.commit()
            self._writer.set_meta({"monitor_state": self._state()})

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
            f"symmetries={len(self._symmetries)})"
        )

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict):
        if not self._active:
            return None
        try:
            return self._pre_step(optimizer, args, kwargs)
        except Exception as exc:  # never let the monitor stop the training
            self._fail("pre-step", exc)
            return None

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if not self._active:
            return
        try:
            self._post_step(optimizer, args, kwargs)
        except Exception as exc:
            self._fail("post-step", exc)

    def _fail(self, where: str, exc: Exception) -> None:
        """Stop monitoring (training goes on), keep every flushed step, record why."""
        self._active = False
        self._depth = 0
        self._step_ctx = None
        message = f"monitoring stopped at step {self.step} ({where}): {type(exc).__name__}: {exc}"
        warnings.warn(
            f"noether-dyn: {message}. Training goes on; the run keeps the steps before it.",
            MonitorFailure,
            stacklevel=3,
        )
        try:
            self._rows = []
            if self._writer is not None:
                self._writer.con.execute(
                    "INSERT INTO events VALUES (?, ?, ?)", (self.step, "monitor_error", message)
                )
                self._writer.con.commit()
        except Exception:  # the store itself may be what failed
            pass

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict):
        self._depth += 1
        if self._depth > 1:  # a subclass's step calling super().step(): count once
            return None
        n_params = sum(len(g["params"]) for g in optimizer.param_groups)
        if n_params != len(self.params) or len(optimizer.param_groups) != self._n_groups:
            raise RuntimeError(
                "noether-dyn: the optimizer's parameters changed after watch() (add_param_group?). "
                "Call watch() after the optimizer has all its param groups."
            )
        hypers = [self.adapter.hyper(optimizer, g) for g in optimizer.param_groups]
        logged = self.step % self.every == 0 or (
            len(self._matrix) > 0 and self._predictor.value is None
        )
        need_dq = logged or self._predictor.needs_update_sq
        rebuild = [
            self.adapter.can_reconstruct(g) and not self.snapshot for g in optimizer.param_groups
        ]
        fused = (
            self.fused
            and logged
            and all(rebuild)
            and (_has_closure(args, kwargs) or all(p.grad is not None for p in self.params))
        )
        ctx: dict[str, Any] = {
            "hypers": hypers,
            "logged": logged,
            "rebuild": rebuild,
            "fused": fused,
        }
        with torch.no_grad():
            if need_dq and not all(rebuild):
                self._take_snapshot(rebuild)
            if logged and not fused:
                ctx["qq"] = sq_norms(self.params, self.device)
                ctx["qs"] = self._subset(sums, self._matrix.translation_tensors, self.params)
                if not _has_closure(args, kwargs):  # the step will use the gradients held now
                    sym = [i for i in self._matrix.tensors if self.params[i].grad is not None]
                    grads = [p.grad for p in self.params]
                    ctx["gq"] = (sym, self._subset(dots, sym, grads, self.params))
        self._step_ctx = ctx
        self._closure_loss = None
        return _wrap_closure(self, args, kwargs)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._depth -= 1
        if self._depth > 0 or self._step_ctx is None:
            return
        ctx, self._step_ctx = self._step_ctx, None
        loss = self._closure_loss if self._closure_loss is not None else self._pending_loss
        self._pending_loss = self._closure_loss = None
        hypers: list[GroupHyper] = ctx["hypers"]
        ctx["loss_logged"] = loss is not None
        with torch.no_grad():
            if ctx["logged"]:
                self._log_step(optimizer, hypers, ctx, loss)
            self._advance_prediction(optimizer, hypers, ctx)
        self.step += 1
        self.time += hypers[0].lr if hypers else 0.0
        for g, h in enumerate(hypers):
            self._log_prefactor[g] += h.log_prefactor_rate
        if (
            len(self._rows) >= self.flush_every
            or time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    # ------------------------------------------------------------------ per-step arithmetic
    def _log_step(
        self,
        optimizer: torch.optim.Optimizer,
        hypers: list[GroupHyper],
        ctx: dict[str, Any],
        loss: torch.Tensor | None,
    ) -> None:
        dev = self.device
        hyper = self._hyper_matrix(hypers)
        if loss is None:
            loss = self._nan
        elif loss.device != dev:
            loss = loss.to(dev, non_blocking=True)
        pred = self._predictor
        prediction = None
        if len(self._matrix):  # before the predictor starts, a stand-in (its output is unused)
            started = pred.value is not None
            value = pred.value if started else self._zero_charges[0]
            velocity = pred.velocity if started else self._zero_charges[1]
            prediction = (value, velocity, pred.constants(*self._lead_rates(hypers), dev))
        inputs = (hyper, loss, prediction)
        fused = self._fused_stats(optimizer, inputs) if ctx["fused"] else None
        if fused is None:
            stats, rows = self._eager_stats(optimizer, ctx), None
        else:
            stats, rows = fused
        if self._sharded:  # every statistic but NUMEL is a sum over entries: add the shards
            stats[:, S_["NUMEL"]] = 0.0
            torch.distributed.all_reduce(stats)
            stats[:, S_["NUMEL"]] = self._numel
            if ctx["loss_logged"]:
                loss = loss.to(dtype=torch.float64).clone()
                torch.distributed.all_reduce(loss)
                loss = loss / torch.distributed.get_world_size()
        if rows is None:
            rows = self._step_rows(stats, hyper, loss, prediction)
        device_row, group_device, charge_rows, tensor_rows, advanced = rows
        if advanced is not None and pred.value is not None:
            pred.value, pred.velocity = advanced
            ctx["advanced"] = True
        else:  # the predictor starts here, from this step's measured charge
            ctx["grad_sq"] = stats[:, S_["GG"]]
            ctx["update_sq"] = stats[:, S_["DD"]]
            if charge_rows is not None:
                pred.start(self._matrix.charges(stats[:, S_["QQ"]], stats[:, S_["QS"]]))
                charge_rows[:, COL["predicted"]] = pred.value
        h0 = hypers[0] if hypers else GroupHyper(0.0, 0.0, 0.0, False)
        host_row = [
            float(self.step),
            self.time,
            h0.lr,
            self._log_prefactor[0] if hypers else 0.0,
            time.monotonic() - self._t0,
        ]
        group_host = [
            [float(g), h.lr, h.beta, h.weight_decay, h.mass, self._log_prefactor[g]]
            for g, h in enumerate(hypers)
        ]
        self._rows.append(
            (
                host_row,
                device_row,
                group_host,
                group_device,
                charge_rows,
                ctx["loss_logged"],
                tensor_rows,
            )
        )

    def _hyper_matrix(self, hypers: list[GroupHyper]) -> torch.Tensor:
        """The step's hyperparameter matrix, rebuilt only when a constant changed (a schedule)."""
        if self._hyper is None or self._hyper[0] != hypers:
            self._hyper = (hypers, hyper_matrix(hypers, self.device))
        return self._hyper[1]

    def _eager_stats(self, optimizer: torch.optim.Optimizer, ctx: dict[str, Any]) -> torch.Tensor:
        """The (n_tensors, len(STATS)) statistics from foreach reductions over the rebuilt (or
        snapshot) update, with q_n's reductions read in the pre-hook when it ran them."""
        active = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = [p.grad for p in self.params]
        dq, gdq, inv_metric = self._updates(optimizer, ctx["rebuild"], active, with_metric=True)
        if "qq" not in ctx:  # the pre-hook left q_n to the fused path, which could not run
            self._read_solved_q(ctx, dq)

        has_grad = set(active)
        sym = [i for i in self._matrix.tensors if i in has_grad]
        trans = [i for i in self._matrix.translation_tensors if i in has_grad]

        cols = dict.fromkeys(STATS)
        cols["QQ"] = ctx["qq"]
        cols["QS"] = ctx["qs"]
        cols["NUMEL"] = self._numel
        cols["GG"] = self._subset(sq_norms, active, grads)
        cols["DD"] = self._subset(sq_norms, active, dq)
        cols["GDD"] = self._subset(dots, active, gdq, dq)
        dq_q1 = self._subset(dots, sym, dq, self.params)
        cols["DQ"] = dq_q1 - self._restrict(cols["DD"], sym)
        if "gq" in ctx and ctx["gq"][0] == sym:  # <g_n, q_n>, read before the step
            cols["GQ"] = ctx["gq"][1]
        else:  # a closure made the gradients inside the step: <g, q_n> = <g, q_{n+1} - dq>
            g_q1 = self._subset(dots, sym, grads, self.params)
            cols["GQ"] = g_q1 - self._subset(dots, sym, grads, dq)
        gdq_q1 = self._subset(dots, sym, gdq, self.params)
        cols["GDQ"] = gdq_q1 - self._restrict(cols["GDD"], sym)
        cols["GS"] = self._subset(sums, trans, grads)
        cols["DS"] = self._subset(sums, trans, dq)
        cols["GDS"] = self._subset(sums, trans, gdq)
        cols["IG"] = inv_metric
        return torch.stack([cols[k] for k in STATS], dim=1)

    def _read_solved_q(self, ctx: dict[str, Any], dq: list[torch.Tensor | None]) -> None:
        """|q_n|^2 and sum(q_n) with q_n = q_{n+1} - dq solved for (a tensor without an update
        kept q_n = q_{n+1})."""
        q0 = [p if u is None else p - u for p, u in zip(self.params, dq)]
        ctx["qq"] = sq_norms(q0, self.device)
        ctx["qs"] = self._subset(sums, self._matrix.translation_tensors, q0)

    def _fused_stats(
        self, optimizer: torch.optim.Optimizer, inputs: tuple
    ) -> tuple[torch.Tensor, tuple | None] | None:
        """The statistics (and, unless they must first be reduced over ranks, the stored rows)
        from the compiled program, or None when this step cannot use it (a tensor without
        gradient or state, a group without an elementwise rule, or a failed compile: then it
        warns once and the monitor stays on the eager path)."""
        if any(p.grad is None for p in self.params):
            return None
        steps = []
        for group, params in zip(optimizer.param_groups, self._group_params):
            if not params:
                continue
            step = self.adapter.fused_step(optimizer, group, params, self.device)
            if step is None:
                return None
            steps.append((step, len(params)))
        rules = [s.rule for s, n in steps for _ in range(n)]
        states = [st for s, _ in steps for st in s.states]
        grads = [p.grad for p in self.params]
        params = self.params
        if self._sharded:
            states = [tuple(local(list(st))) for st in states]
            params, grads = local(params), local(grads)
        coef = steps[0][0].coef if len(steps) == 1 else torch.cat([s.coef for s, _ in steps])
        key = tuple(rules)
        program = self._programs.get(key)
        if program is None:
            sym = set(self._matrix.tensors)
            trans = set(self._matrix.translation_tensors)
            n = len(self.params)
            program = StatsProgram(
                rules,
                [i in trans for i in range(n)],
                [i in sym for i in range(n)],
                rows=None if self._sharded else self._step_rows,
            )
            self._programs[key] = program
        try:
            stats, rows = program(params, grads, states, coef, inputs)
        except Exception as exc:
            if self._compiled_ok:
                raise
            self.fused = False
            warnings.warn(
                "noether-dyn: the fused statistics could not be compiled "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the "
                "monitor goes on with the eager path (pass fused=False to skip the attempt).",
                RuntimeWarning,
                stacklevel=5,
            )
            return None
        self._compiled_ok = True
        return stats, rows

    def _advance_prediction(
        self, optimizer: torch.optim.Optimizer, hypers: list[GroupHyper], ctx: dict[str, Any]
    ) -> None:
        """Roll the prediction to the next step; on a logged step, from the norms it computed
        (``ctx["grad_sq"]``, ``ctx["update_sq"]``: per tensor, already reduced over ranks)."""
        pred = self._predictor
        if pred.value is None or not len(self._matrix) or ctx.get("advanced"):
            return
        grad_sq = update_sq = None
        active = [i for i in self._matrix.tensors if self.params[i].grad is not None]
        if pred.needs_grad_sq:
            per_tensor = ctx.get("grad_sq")
            if per_tensor is None:
                grads = [p.grad for p in self.params]
                per_tensor = self._reduced(self._subset(sq_norms, active, grads))
            lr_sq = self._per_tensor([h.lr**2 for h in hypers])
            grad_sq = self._matrix.signs @ (lr_sq * per_tensor)
        if pred.needs_update_sq:
            per_tensor = ctx.get("update_sq")
            if per_tensor is None:
                per_tensor = self._reduced(self._update_sq(optimizer, ctx["rebuild"], active))
            update_sq = self._matrix.signs @ per_tensor
        pred.advance(*self._lead_rates(hypers), grad_sq=grad_sq, update_sq=update_sq)

    def _lead_rates(self, hypers: list[GroupHyper]) -> tuple[list[float], ...]:
        """Per symmetry, eta, beta and lambda of the group of its first parameter."""
        lead = [hypers[self.group_of[i]] for i in self._matrix.lead]
        return [h.lr for h in lead], [h.beta for h in lead], [h.weight_decay for h in lead]

    def _update_sq(
        self, optimizer: torch.optim.Optimizer, rebuild: list[bool], idx: list[int]
    ) -> torch.Tensor:
        """|dq|^2 per tensor at positions ``idx`` ((n_tensors,), zeros elsewhere), from the
        adapter's norms of its state when it has them (no update tensor is formed)."""
        out = torch.zeros(len(self.params), dtype=torch.float64, device=self.device)
        rest = []
        for g, group in enumerate(optimizer.param_groups):
            pos = [i for i in idx if self.group_of[i] == g]
            if not pos:
                continue
            norms = None
            if rebuild[g]:
                params = [self.params[i] for i in pos]
                norms = self.adapter.update_sq_norms(optimizer, group, params, self.device)
            if norms is None:
                rest += pos
            else:
                out[self._index(pos)] = norms
        if rest:
            dq, _, _ = self._updates(optimizer, rebuild, rest, with_metric=False)
            out = out + self._subset(sq_norms, rest, dq)
        return out

    def _reduced(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of per-shard values over ranks when parameters are sharded (FSDP2)."""
        if self._sharded:
            torch.distributed.all_reduce(values)
        return values

    def _take_snapshot(self, rebuild: list[bool]) -> None:
        """Copy q_n of the parameters whose update cannot be rebuilt from optimizer state."""
        idx = [i for i, g in enumerate(self.group_of) if not rebuild[g]]
        if self._snap is None:
            self._snap = {}
        for i in idx:
            if i not in self._snap:
                self._snap[i] = torch.empty_like(self.params[i])
        torch._foreach_copy_([self._snap[i] for i in idx], [self.params[i] for i in idx])

    def _updates(
        self,
        optimizer: torch.optim.Optimizer,
        rebuild: list[bool],
        idx: list[int],
        with_metric: bool,
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None], torch.Tensor | None]:
        """dq and G dq of the step just taken, at positions ``idx`` (None elsewhere): rebuilt from
        the optimizer's state where the adapter can, else the difference from the snapshot; with
        ``with_metric`` also sum(1/G_ii) per tensor ((n_tensors,), numel/c for G = c I)."""
        n = len(self.params)
        dq: list[torch.Tensor | None] = [None] * n
        gdq: list[torch.Tensor | None] = [None] * n
        inv = self._local_numel.clone() if with_metric else None
        for g, group in enumerate(optimizer.param_groups):
            pos = [i for i in idx if self.group_of[i] == g]
            if not pos:
                continue
            params = [self.params[i] for i in pos]
            if rebuild[g]:
                upd, metric = self.adapter.update(optimizer, group, params)
            else:
                upd = torch._foreach_sub(params, [self._snap[i] for i in pos])
                metric = self.adapter.metric(optimizer, group, params) if with_metric else None
            if not with_metric or metric is None:
                prods = upd
            elif isinstance(metric, float):
                prods = torch._foreach_mul(upd, metric)
                inv[self._index(pos)] /= metric
            else:
                prods = torch._foreach_mul(metric, upd)
                inv[self._index(pos)] = inverse_sums(metric, self.device)
            for i, u, v in zip(pos, upd, prods):
                dq[i], gdq[i] = u, v
        return dq, gdq, inv

    def _to_device(self, values: Any, dtype: torch.dtype) -> torch.Tensor:
        """Host values as a device tensor without a blocking copy (nothing waits on it)."""
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _per_tensor(self, per_group: list[float]) -> torch.Tensor:
        return self._to_device(per_group, torch.float64)[self._group_index]

    def _index(self, idx: list[int]) -> torch.Tensor:
        key = tuple(idx)
        if key not in self._idx_cache:
            self._idx_cache[key] = self._to_device(idx, torch.long)
        return self._idx_cache[key]

    def _subset(
        self, fn: Callable[..., torch.Tensor], idx: list[int], *lists: list
    ) -> torch.Tensor:
        """fn over the tensors at positions ``idx`` of each list, scattered into a (n_tensors,)
        vector with zeros elsewhere."""
        n = len(self.params)
        if len(idx) == n:
            return fn(*lists, self.device)
        out = torch.zeros(n, dtype=torch.float64, device=self.device)
        if idx:
            out[self._index(idx)] = fn(*[[lst[i] for i in idx] for lst in lists], self.device)
        return out

    def _restrict(self, values: torch.Tensor, idx: list[int]) -> torch.Tensor:
        if len(idx) == len(self.params):
            return values
        out = torch.zeros_like(values)
        if idx:
            sel = self._index(idx)
            out[sel] = values[sel]
        return out

    # ------------------------------------------------------------------ flush and state
    def _to_host(self, rows):
        host = torch.stack([r[1] for r in rows]).cpu().numpy()
        groups = torch.stack([r[3] for r in rows]).cpu().numpy()
        charge_list = [r[4] for r in rows if r[4] is not None]
        charges = (
            torch.stack(charge_list).cpu().numpy()
            if charge_list
            else np.zeros((0, len(self._symmetries), 0))
        )
        charge_steps = np.array([int(r[0][0]) for r in rows if r[4] is not None], dtype=np.int64)
        tensors = torch.stack([r[6] for r in rows]).cpu().numpy()
        step_rows, group_rows, events = [], [], []
        for (h, _, gh, _, _, loss_logged, _), d, gd in zip(rows, host, groups):
            step, t, lr, logp, wall = h
            loss, l2, kinetic, qn, gn, dn = d.tolist()
            step_rows.append([step, t, lr, loss, l2, loss + l2, kinetic, logp, qn, gn, dn, wall])
            for (g, glr, gbeta, gwd, gmass, glogp), (gkin, gl2) in zip(gh, gd.tolist()):
                group_rows.append([step, g, glr, gbeta, gwd, gmass, gkin, gl2, glogp])
            for kind, value, logged in (
                ("nonfinite_loss", loss, loss_logged),
                ("nonfinite_params", qn, True),
                ("nonfinite_grads", gn, True),
            ):
                if logged and not math.isfinite(value):
                    what = kind.split("_", 1)[1]
                    msg = f"non-finite {what} at step {int(step)} ({value})"
                    events.append((int(step), kind, msg))
                    if kind not in self._warned:
                        self._warned.add(kind)
                        warnings.warn(
                            f"noether-dyn: {msg}; recorded in the run's events, training goes on.",
                            RuntimeWarning,
                            stacklevel=3,
                        )
        return (
            np.array(step_rows, dtype=np.float64).reshape(-1, 12),
            np.array(group_rows, dtype=np.float64).reshape(-1, 9),
            charge_steps,
            charges,
            events,
            tensors,
        )

    def _state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "time": self.time,
            "log_prefactor": list(self._log_prefactor),
            "predictor": self._predictor.state_dict(),
            "symmetries": [s.name for s in self._symmetries],
        }

    def _resume_from_store(self) -> None:
        assert self._writer is not None
        stored = self._writer.symmetry_names()
        if stored != [s.name for s in self._symmetries]:
            raise ValueError(
                f"watch(resume=True): the run at '{self.run_dir}' tracks symmetries {stored}, "
                f"this monitor {[s.name for s in self._symmetries]}. Pass the same symmetries= "
                "(or the same inputs=) as the first run."
            )
        state = self._writer.get_meta("monitor_state")
        if state is not None:
            self.load_state_dict(state)

    def _initial_meta(self, model: torch.nn.Module, hypers: list[GroupHyper], note: str) -> dict:
        opt = self.optimizer
        groups = []
        for group, h in zip(opt.param_groups, hypers):
            groups.append(
                {
                    **{k: _jsonable(v) for k, v in group.items() if k != "params"},
                    "n_params": len(group["params"]),
                    "beta": h.beta,
                    "decoupled_weight_decay": h.decoupled,
                }
            )
        n_total = sum(p.numel() for p in model.parameters())
        summary = str(model)
        return {
            "schema_version": SCHEMA_VERSION,
            "noether_dyn_version": _package_version(),
            "torch_version": torch.__version__,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "model": {
                "class": type(model).__name__,
                "summary": summary if len(summary) < 20000 else summary[:20000] + "\n...",
                "n_parameters": n_total,
                "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            },
            "parameters": [
                {"name": n, "shape": list(p.shape), "group": g, "dtype": str(p.dtype)}
                for n, p, g in zip(self.names, self.params, self.group_of)
            ],
            "optimizer": {
                "class": type(opt).__name__,
                "adapter": self.adapter.name,
                "metric": self.adapter.metric_name,
                "metric_fallback": self.adapter.fallback,
                "prediction": self._predictor.regime,
                "param_groups": groups,
            },
            "every": self.every,
            "symmetry_note": note,
            "monitor_state": self._state(),
        }


def _has_closure(args: tuple, kwargs: dict) -> bool:
    return kwargs.get("closure") is not None or (len(args) > 1 and args[1] is not None)


def _wrap_closure(monitor: Monitor, args: tuple, kwargs: dict):
    """Wrap ``step(closure)``'s closure so that the loss it returns is logged."""
    if "closure" in kwargs and kwargs["closure"] is not None:
        kwargs = dict(kwargs)
        kwargs["closure"] = _capturing(monitor, kwargs["closure"])
        return args, kwargs
    if len(args) > 1 and args[1] is not None:
        return (args[0], _capturing(monitor, args[1]), *args[2:]), kwargs
    return None


def _capturing(monitor: Monitor, closure: Callable):
    def wrapped():
        loss = closure()
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            monitor._closure_loss = loss.detach().reshape(())
        elif isinstance(loss, (int, float)):
            monitor._closure_loss = torch.tensor(float(loss), dtype=torch.float64)
        return loss

    return wrapped


def _tracked_parameters(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[list[str], list[torch.Tensor], list[int]]:
    """Names (as in ``model.named_parameters()``), tensors and group index of every optimizer
    parameter, in the optimizer's order."""
    by_id = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), name)
    names, params, group_of = [], [], []
    for g, group in enumerate(optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            if id(p) not in by_id:
                raise ValueError(
                    f"watch: parameter {j} of param group {g} (shape {tuple(p.shape)}) is not a "
                    f"parameter of the {type(model).__name__} given. Pass the model whose "
                    "parameters the optimizer updates."
                )
            if p.is_sparse:
                raise ValueError(
                    f"watch: parameter '{by_id[id(p)]}' is sparse; noether-dyn handles dense "
                    "parameters only."
                )
            names.append(by_id[id(p)])
            params.append(p)
            group_of.append(g)
    return names, params, group_of


def _check_symmetries(
    symmetries: Sequence[Symmetry], index: dict[str, int], model: torch.nn.Module
) -> list[Symmetry]:
    seen: set[str] = set()
    out = []
    model_names = {n for n, _ in model.named_parameters()}
    for s in symmetries:
        if not isinstance(s, Symmetry):
            raise TypeError(
                f"watch: symmetries must be noether_dyn.Symmetry records, got {type(s).__name__}."
            )
        if s.name in seen:
            raise ValueError(f"watch: two symmetries are named {s.name!r}; names must be unique.")
        seen.add(s.name)
        unknown = [n for n in s.params if n not in index]
        if unknown:
            where = (
                "not parameters of the model"
                if any(n not in model_names for n in unknown)
                else "not updated by the optimizer"
            )
            raise ValueError(
                f"watch: symmetry {s.name!r} names {unknown}, {where}. Use names from "
                "model.named_parameters() of parameters the optimizer updates."
            )
        out.append(s)
    return out


def _is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.device.type == "cpu" else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _package_version() -> str:
    from noether_dyn import __version__

    return __version__
