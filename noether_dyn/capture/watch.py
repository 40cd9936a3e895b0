"""``watch``: the one line a training loop adds."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from noether_dyn.capture import checks
from noether_dyn.capture.monitor import Monitor
from noether_dyn.capture.sample import stored_symmetries
from noether_dyn.capture.wrappers import unwrap_optimizer
from noether_dyn.symmetries.symmetry import Symmetry
from noether_dyn.symmetries.units import check_granularity, choose_units, split_units


def watch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    run_dir: str | Path | None = None,
    every: int = 1,
    *,
    inputs: Any = None,
    targets: Any = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    symmetries: Sequence[Symmetry] | None = None,
    flush_every: int = 100,
    flush_seconds: float = 10.0,
    resume: bool = False,
    overwrite: bool = False,
    snapshot: bool = False,
    fused: bool | None = None,
    sinks: Sequence[Any] | None = None,
    exact_decay: bool = False,
    matrix_charges: bool | Sequence[Any] = False,
    granularity: str = "layer",
) -> Monitor:
    """Watch ``optimizer`` training ``model``; returns the :class:`Monitor` (a context manager).

    The optimizer is neither replaced nor subclassed: the monitor attaches step pre/post hooks.
    Add ``monitor.log_loss(loss)`` before ``optimizer.step()`` to record the potential V.

    With no ``inputs`` and no ``symmetries`` (zero-config), the model's first forward call after
    ``watch`` is the sample batch: at the first optimizer step, before its update, the symmetries
    are detected on it (with the model's own ``output.loss`` when it returns one), each candidate
    is checked on that step's real gradients and the ones that fail are dropped (listed in
    ``run.dropped``); charges are tracked from that step on (``meta["symmetries_from_step"]``).
    Detection leaves gradients, buffers, RNG states and train/eval modes as they were. Training
    that never calls the model's forward before the first ``step`` (``step(closure)`` only) gets
    a warning and a ``no_symmetries`` event, and tracks none.

    Args:
        model: the module whose parameters ``optimizer`` updates (names come from it).
        optimizer: any ``torch.optim.Optimizer``; SGD, RMSprop, Adam, AdamW and Adagrad have
            their own kinetic metric, any other falls back to G = I and the run records it.
        run_dir: directory of the run store (default ``runs/noether-<UTC timestamp>``); a path
            ending in ``run.sqlite`` names the store file itself, its directory is the run_dir.
            An empty string is refused (it would write into the working directory).
        every: store one row every ``every`` steps (accumulators that the theory's predictions
            need still see every step).
        inputs, targets, loss_fn: a sample batch; with ``inputs`` the model's symmetries are
            detected (``find_symmetries``) and, with ``targets`` and ``loss_fn`` too, verified.
        symmetries: your own list instead of detection (verified when a batch is given);
            ``[]`` tracks none (no detection).
        flush_every, flush_seconds: write to the store after this many logged steps or seconds,
            whichever comes first (a crash loses at most the steps since the last flush).
        resume: continue the run already in ``run_dir`` (its step numbers and accumulators).
        overwrite: replace the run already in ``run_dir``.
        snapshot: copy the parameters before each logged step and take dq as the difference
            (1x parameter memory), instead of rebuilding dq from the optimizer's state (SGD,
            RMSprop, Adam, AdamW, Adagrad; no memory held). Both agree to the rounding of
            q_{n+1}; other optimizers always use snapshots.
        fused: compute a logged step's statistics in one compiled program (Inductor:
            one pass over q, g and the optimizer's state instead of 10-25) for SGD, RMSprop,
            Adam, AdamW and Adagrad when dq is rebuilt. True: the first logged step compiles it,
            in the step (seconds to minutes, cached on disk by Inductor). None (default): on a
            CPU or CUDA device with at most 128 tracked tensors it is compiled in a background
            thread while the eager statistics serve the steps, once the run has gone long enough
            to earn the compile back (after 200 steps from 1M parameter entries on; below, once
            the eager statistics have taken 30 s: capture/plan.py). If compiling fails the
            monitor warns once and goes on with the eager path.
        sinks: where else to stream the step scalars and per-symmetry charges, at each flush
            (from the same host rows as the store): ``noether_dyn.sinks.TensorBoardSink(dir)``,
            ``WandbSink()``, a ``SummaryWriter``, a wandb run, or any object with
            ``write(step, scalars)``, ``flush()`` and ``close()`` (tags in docs/guide.md,
            "Sinks"). A sink that raises warns once (``SinkFailure``) and is dropped; training
            and the store go on. Sinks are closed with the monitor (a writer or run you passed
            is flushed, not closed). Only the rank that writes the store (rank 0) streams.
        exact_decay: store weight decay's true share in ``decay`` for every rule with coupled
            L2 (SGD heavy ball and Nesterov, Adam, RMSprop, Adagrad): through the buffer and the
            preconditioner (capture/decay.py, docs/theory.md §3.1). Costs one accumulator per
            tracked tensor under a rule with a buffer (+1x their memory; none for RMSprop without
            momentum or Adagrad) and a rebuild of the update every step (benchmarks/
            decay_share.py: x1.4 the monitored SGD step, x1.7-2 the adaptive ones, every=10).
            Needs an optimizer that has not stepped and updates rebuilt from its state (no
            ``snapshot``, no 16-bit parameters). Off: ``decay`` is the instantaneous
            -2 eta lambda Q_n, only part of the share under momentum or a preconditioner
            (``run.meta["decay"]`` says which rule each row uses). Translation's true share
            under SGD(M) is stored either way (no memory).
        matrix_charges: also store the matrix-valued charges of GL(n) symmetries (opt-in:
            n(n+1)/2 rows per record and logged step, in the table ``matrix_charges``; read
            with ``run.matrix_charges`` / ``run.matrix_charge(name)``). True: find them with
            ``find_matrix_symmetries`` on ``inputs`` (and ``targets``, ``loss_fn``; needs
            ``inputs``); a list: these :class:`~noether_dyn.symmetries.matrix.MatrixSymmetry`
            records. Holds a copy of the parameters they read during each logged step
            (``monitor.matrix_snapshot_bytes``); see :mod:`noether_dyn.capture.matrix`.
        granularity: ``"layer"`` (default) tracks one charge per layer-level symmetry;
            ``"unit"`` also tracks one per hidden unit, channel or head input column (each
            naming its ``parent``; ``find_symmetries(..., granularity="unit")``), with the
            same columns and exact split as the layer rows. Declared ``symmetries`` are split
            too (checked on the batch when one is given). Units make every logged step use
            the eager statistics (the compiled program reduces whole tensors only).
    """
    optimizer = unwrap_optimizer(optimizer)
    check_granularity(granularity)
    if exact_decay and granularity == "unit":
        raise ValueError(
            "exact_decay=True does not support granularity='unit' yet (its accumulators are "
            "reduced per tensor); pass exact_decay=False or granularity='layer'."
        )
    if run_dir is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"noether-{stamp}"
    run_dir = checks.run_dir_path(run_dir)  # checked before detection spends any time
    checks.check_symmetry_list(symmetries)
    checks.check_detection(inputs, targets, loss_fn)
    _check_matrix_charges(matrix_charges)
    note, detect_first = "", False
    if symmetries is None:
        if inputs is None:
            stored = stored_symmetries(run_dir) if resume else None
            detect_first = stored is None
            symmetries = [] if stored is None else stored
            note = (
                "zero-config: symmetries are detected at the first optimizer step, on the "
                "model's first forward call"
                if stored is None
                else f"{len(stored)} symmetries as stored by the resumed zero-config run"
            )
        else:
            from noether_dyn.symmetries.detect import find_symmetries

            symmetries = find_symmetries(
                model, inputs, targets=targets, loss_fn=loss_fn, granularity=granularity
            )
            note = f"{len(symmetries)} symmetries detected from the model's dataflow"
            if not symmetries:
                note = "the model's loss has no symmetry that noether-dyn detects"
    else:
        symmetries = list(symmetries)
        note = f"{len(symmetries)} symmetries declared by the user"
        if inputs is not None and targets is not None and loss_fn is not None:
            from noether_dyn.symmetries.verify import verify

            symmetries = verify(model, symmetries, inputs, targets, loss_fn)
            note += " and verified numerically"
        if granularity == "unit":
            symmetries = _units_of(model, symmetries, inputs, targets, loss_fn)
            note += "; split into per-unit symmetries"
    gl_records: list[Any] = []
    if matrix_charges is True:
        if inputs is None:
            raise ValueError(
                "watch: matrix_charges=True finds the GL symmetries on a sample batch; pass "
                "inputs= (and targets=, loss_fn=), or a list of MatrixSymmetry records."
            )
        from noether_dyn.symmetries.matrix import find_matrix_symmetries

        layer = [s for s in symmetries if not s.is_unit]  # detection's layer-level records
        rescales = layer or None
        gl_records = find_matrix_symmetries(model, inputs, targets, loss_fn, rescales=rescales)
    elif matrix_charges is not False:
        gl_records = list(matrix_charges)
    if exact_decay and any(s.is_unit for s in symmetries):
        raise ValueError(
            "exact_decay=True does not support per-unit symmetries yet (its accumulators are "
            "reduced per tensor); pass exact_decay=False."
        )
    return Monitor(
        model,
        optimizer,
        run_dir,
        every,
        symmetries=symmetries,
        symmetry_note=note,
        detect_first=detect_first,
        flush_every=flush_every,
        flush_seconds=flush_seconds,
        resume=resume,
        overwrite=overwrite,
        snapshot=snapshot,
        fused=fused,
        sinks=sinks,
        exact_decay=exact_decay,
        matrix_charges=gl_records,
        granularity=granularity,
    )


def _units_of(
    model: torch.nn.Module,
    symmetries: list[Symmetry],
    inputs: Any,
    targets: Any,
    loss_fn: Callable[..., torch.Tensor] | None,
) -> list[Symmetry]:
    """Declared layer-level symmetries followed by their units: checked on the batch when one is
    given, else split by structure alone (unverified)."""
    if inputs is not None:
        return split_units(model, symmetries, inputs, targets, loss_fn)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return choose_units(symmetries, shapes, [])


def _check_matrix_charges(matrix_charges: Any) -> None:
    """Raise unless ``matrix_charges`` is a bool or a list/tuple of ``MatrixSymmetry`` records
    (checked before detection spends any time; a string would otherwise be read as records)."""
    from noether_dyn.symmetries.matrix import MatrixSymmetry

    if isinstance(matrix_charges, bool):
        return
    if isinstance(matrix_charges, (list, tuple)) and all(
        isinstance(r, MatrixSymmetry) for r in matrix_charges
    ):
        return
    raise TypeError(
        "watch: matrix_charges must be True (find them on inputs=), False, or a list of "
        "noether_dyn.symmetries.matrix.MatrixSymmetry records (find_matrix_symmetries), got "
        f"{matrix_charges!r:.80}."
    )
