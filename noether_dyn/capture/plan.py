"""The step plan: what a step computes, and the one place that chooses eager or compiled.

Before each optimizer step the :class:`Planner` reads the groups' constants and decides whether
the step is logged, whether each group's update is rebuilt from the optimizer's state (else a
snapshot), and whether the compiled program computes the statistics; after the step
:meth:`Planner.statistics` runs the chosen backend and falls back to the eager one where the
compiled one cannot run (warning once when it cannot even compile).

With ``fused=None`` the program is compiled in a background thread (:class:`BackgroundCompile`)
while the eager backend serves the logged steps, and the steps switch to it once it is ready: a
cold compile (tens of seconds to minutes on a CPU for tens of tensors) never blocks a step. Only
its trace runs in the step that starts it (1.3 s for 10 tensors, 5.5 s for 54 on a 2-core CPU):
FX tracing patches process-wide state and reads the optimizer's state, so it cannot overlap the
training (:meth:`~noether_dyn.quantities.fused.StatsProgram.prepare`). Both
backends compute the same statistics (tests/test_fused.py), so the rows mean the same on either
side of the switch. The compile starts after :data:`COMPILE_AFTER_STEPS` optimizer steps, so a
short run never compiles, and the interpreter waits for a compile still running at exit (with the
progress line saying so). ``fused=True`` compiles on the first logged step, in the step, as asked.

When the compile starts is a rent-or-buy choice (the ski-rental rule): below
:data:`FUSED_MIN_NUMEL` parameter entries the eager statistics cost little per step, so the
compile, which costs about :data:`COMPILE_RENT_SECONDS` of CPU on a small machine, starts only
once the eager statistics have taken that much time. Whatever the run's length, it then pays at
most about twice what the better of "never compile" and "compile at once" would have cost it. From
:data:`FUSED_MIN_NUMEL` entries on the eager statistics cost enough per step that the compile starts
at :data:`COMPILE_AFTER_STEPS`.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from collections.abc import Callable

import torch

from noether_dyn.capture.compiled import CompiledStats, CompileFailed, CompileNeeded
from noether_dyn.capture.eager import EagerStats
from noether_dyn.capture.tracked import Tracked
from noether_dyn.optimizers import OptimizerAdapter
from noether_dyn.quantities.step_rows import hyper_matrix
from noether_dyn.records import GroupHyper, StepPlan

FUSED_MIN_NUMEL = 1_000_000
"""With ``fused=None`` the background compile starts after :data:`COMPILE_AFTER_STEPS` steps from
this many parameter entries on; below, once the eager statistics have cost
:data:`COMPILE_RENT_SECONDS`."""

COMPILE_RENT_SECONDS = 30.0
"""With ``fused=None`` below :data:`FUSED_MIN_NUMEL` entries, the eager path's accumulated time
(its reads, statistics and rows, measured per logged step) after which the background compile
starts: about what a cold compile of a small program costs on a 2-core CPU (30-80 s measured,
issue 18), so that a run pays at most about twice the better choice in hindsight. The compiled
statistics of a 0.06-0.27M-parameter MLP cost 0.36-0.65x the eager ones (docs/performance.md)."""

FUSED_MAX_TENSORS = 128
"""With ``fused=None`` no program is compiled for more tracked tensors than this: Inductor's cold
compile grows with the tensors (2-6 minutes on a 2-core CPU for resnet18's 62, 9 minutes for a
ViT-tiny with SGD and over 17 with AdamW, issue 18), which a run of a few hundred steps never
earns back, and which a background compile takes from the training on a small machine."""

COMPILE_AFTER_STEPS = 200
"""With ``fused=None`` the background compile starts only once the monitor has seen this many
optimizer steps: a short run (a test, a smoke run, a notebook cell) never pays for a compile it
would not earn back, nor competes with one for the CPU (issue 18, target 2)."""

PROGRESS_SECONDS = 5.0
"""A background compile still running after this many seconds prints one line saying so (and
one when it is ready)."""


class BackgroundCompile:
    """One compile run in a background thread: ``build()`` (which raises on a failed compile)
    returns True when the program is ready, False when the steps cannot be compiled this way.

    ``state``: "running", "ready", "unavailable" (build returned False) or "failed" (then
    ``error`` holds the exception). ``seconds``: how long the compile took (once finished).
    ``progress``: where the progress lines go (a callable taking one line; None: silent)."""

    def __init__(
        self,
        build: Callable[[], bool],
        what: str,
        progress: Callable[[str], None] | None,
        after: float = PROGRESS_SECONDS,
    ) -> None:
        self.state = "running"
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._what, self._progress, self._after = what, progress, after
        self._announced = False
        self._start = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(build,), name="noether-dyn-compile", daemon=False
        )  # not a daemon: the interpreter waits for it at exit (killing Inductor mid-compile
        # aborts the process: "terminate called without an active exception")
        self._timer = threading.Timer(after, self._announce)
        self._timer.daemon = True
        self._timer.start()
        self._thread.start()

    def _run(self, build: Callable[[], bool]) -> None:
        try:
            with torch.no_grad():
                ok = build()
            self.state = "ready" if ok else "unavailable"
        except BaseException as exc:  # reported to the training thread by the planner
            self.error, self.state = exc, "failed"
        self.seconds = time.monotonic() - self._start
        self._timer.cancel()
        self._done.set()
        if self._announced and self.state == "ready" and self._progress is not None:
            self._progress(
                f"noether-dyn: the fused statistics of {self._what} compiled in "
                f"{self.seconds:.0f} s; the logged steps use them from now on."
            )

    def _announce(self) -> None:
        if self._done.is_set() or self._progress is None:
            return
        self._announced = True
        self._progress(
            f"noether-dyn: compiling the fused statistics of {self._what} in the background "
            f"(more than {self._after:.0f} s so far); the eager statistics serve the logged steps "
            "until it is ready (pass fused=False to skip compiling, fused=True to wait for it)."
        )

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the compile to finish; whether it has."""
        return self._done.wait(timeout)


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Planner:
    """Plans steps and runs their statistics backend.

    Args:
        fused: True/False, or None for compiled in the background on a CPU or CUDA device,
            up to :data:`FUSED_MAX_TENSORS` tensors, once the run has gone long enough to earn
            the compile back (see the module's docstring); always off with ``snapshot``.

    Attributes:
        background: None, or the :class:`BackgroundCompile` under way or finished (fused=None).
        progress: where a background compile's progress lines go (stderr by default).
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
        self.in_background = fused is None
        self.rent_seconds = 0.0
        """Eager statistics time after which the background compile starts (fused=None)."""
        if fused is None:
            fused = tracked.device.type in ("cpu", "cuda") and len(tracked) <= FUSED_MAX_TENSORS
            if sum(p.numel() for p in tracked.params) < FUSED_MIN_NUMEL:
                self.rent_seconds = COMPILE_RENT_SECONDS
        # per-unit slices are reduced by the eager path only: units make every step eager
        if fused is True and eager.matrix.sliced:
            warnings.warn(
                "noether-dyn: fused=True is ignored while per-unit symmetries are tracked (the "
                "compiled statistics reduce whole tensors only); the eager path computes them.",
                RuntimeWarning,
                stacklevel=5,
            )
        self.fused = bool(fused) and not snapshot and not eager.matrix.sliced
        self.background: BackgroundCompile | None = None
        self.steps_seen = 0
        """Optimizer steps planned so far (the background compile waits for
        :data:`COMPILE_AFTER_STEPS` of them)."""
        self.eager_seconds = 0.0
        """Time the eager path has taken so far (its reads before the steps, its statistics and
        the monitor's rows from them); compared with :attr:`rent_seconds`."""
        self.progress: Callable[[str], None] | None = _stderr_line
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
        self.steps_seen += 1
        hypers = [self.adapter.hyper(optimizer, g) for g in optimizer.param_groups]
        logged = step % self.every == 0 or must_log
        # a 16-bit group's rebuilt update misses the rounding of q_{n+1}: measure it from a copy
        rebuild = [
            self.adapter.can_reconstruct(g) and not self.snapshot and not widened
            for g, widened in zip(optimizer.param_groups, self.t.widened_groups)
        ]
        fused = (
            self.fused
            and self._program_ready()
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
                start = time.perf_counter()
                self.eager.read_before(plan, closure)
                self.eager_seconds += time.perf_counter() - start
        return plan

    def _program_ready(self) -> bool:
        """Whether a logged step may run the compiled program now: always when compiling in the
        step; in the background, once the compile is ready (or could not run there, and the
        program compiles in the step as before). A failed background compile turns ``fused``
        off with the warning of a failed compile in the step."""
        if not self.in_background:
            return True
        job = self.background
        if job is None or job.state == "running":
            return False
        if job.state == "unavailable":  # compiled by running it, in the step, as fused=True
            self.in_background = False
            return True
        if job.state == "failed":
            self.background = None
            first = str(job.error).splitlines()[0] if str(job.error) else ""
            self._compile_failed(f"{type(job.error).__name__}: {first}")
            return False
        return True

    def start_background(self, optimizer: torch.optim.Optimizer, inputs: tuple) -> None:
        """Trace the program of this step's signature now, in the training thread (FX tracing
        patches process-wide state, see :meth:`StatsProgram.prepare`, and reads the optimizer's
        state, which the next steps change), and compile it in a background thread. A failed
        trace turns ``fused`` off as a failed compile does."""
        what = f"{len(self.t)} tensors"
        progress = self.progress
        timer = threading.Timer(
            PROGRESS_SECONDS,
            lambda: (
                progress is not None
                and progress(
                    f"noether-dyn: tracing the fused statistics of {what} in this step (more than "
                    f"{PROGRESS_SECONDS:.0f} s so far, once); they are compiled in the background next."
                )
            ),
        )
        timer.daemon = True
        timer.start()
        try:
            compile_ = self.compiled.prepare(optimizer, inputs)
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            self._compile_failed(f"{type(exc).__name__}: {first}")
            return
        finally:
            timer.cancel()
        self.background = BackgroundCompile(compile_, what, progress)

    def _compile_failed(self, reason: str) -> None:
        self.fused = False
        warnings.warn(
            f"noether-dyn: the fused statistics could not be compiled ({reason}); the "
            "monitor goes on with the eager path (pass fused=False to skip the attempt).",
            RuntimeWarning,
            stacklevel=7,
        )

    def statistics(
        self, optimizer: torch.optim.Optimizer, plan: StepPlan, inputs: tuple
    ) -> tuple[torch.Tensor, tuple | None]:
        """The step's (n_tensors, len(STATS)) statistics and, from the compiled program, its
        stored rows (None from the eager backend)."""
        if plan.fused:
            try:
                out = self.compiled(optimizer, plan, inputs, compile_missing=not self.in_background)
            except CompileFailed as exc:
                self._compile_failed(str(exc))
                out = None
            except CompileNeeded:  # a new signature (say, the prediction's inputs appeared)
                self.background = out = None
            if out is not None:
                return out
        start = time.perf_counter()
        out = self.eager(optimizer, plan, inputs)
        self.eager_seconds += time.perf_counter() - start
        if (
            self.fused
            and self.in_background
            and self.background is None
            and self.steps_seen >= COMPILE_AFTER_STEPS
            and self.eager_seconds >= self.rent_seconds
        ):  # after the eager statistics: the optimizer's state (the program's inputs) exists
            self.start_background(optimizer, inputs)
        return out
