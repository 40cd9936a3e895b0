"""Zero-config symmetries: the model's first real forward call is the sample batch, and the
symmetries are detected and checked at the first optimizer step, before its update.

:class:`FirstForward` keeps the arguments of the first forward call (references, no copy) through
a forward pre-hook, then removes the hook. :func:`detect_at_step` runs
:func:`~noether_dyn.symmetries.engine.detect` on them (with the model's own ``output.loss`` when it
returns one, else without a loss) and checks every candidate on the real gradients ``p.grad`` of
that step (:func:`~noether_dyn.symmetries.step_check.gradient_defects`, judged by
:func:`~noether_dyn.symmetries.step_check.judge_defects`). Training is not disturbed: parameter
gradients, buffers, the CPU and CUDA RNG states and every module's train/eval mode are as before.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from noether_dyn.capture.tracked import Tracked
from noether_dyn.store.reader import load_run
from noether_dyn.store.writer import RunWriter
from noether_dyn.symmetries.engine import Dropped, detect
from noether_dyn.symmetries.step_check import gradient_defects, judge_defects
from noether_dyn.symmetries.symmetry import Symmetry

NO_FORWARD = (
    "zero-config symmetry detection saw no forward call of the model before the first optimizer "
    "step (training with step(closure) only, or the forward ran on another module than the one "
    "given to watch()); no symmetry is tracked. Pass inputs= (one batch) or symmetries= to "
    "watch()."
)


class FirstForward:
    """A forward pre-hook (with kwargs) on ``model`` that keeps its first call's arguments.

    Attributes:
        inputs: None until the first call; then a tensor, a tuple of positional arguments or a
            dict of keyword arguments (positional ones bound to their names when both come), as
            :func:`~noether_dyn.symmetries.engine.detect` takes them. ``note``: why the call
            could not be kept, or "".
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.inputs, self.note = model, None, ""
        self.handle = model.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.remove()
        try:
            self.inputs = as_inputs(module, args, kwargs)
        except (TypeError, ValueError) as err:
            self.note = f"the first forward call's arguments could not be kept: {err}"

    def remove(self) -> None:
        """Remove the hook (idempotent)."""
        self.handle.remove()


def as_inputs(module: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> Any:
    """A forward call's ``(args, kwargs)`` as one ``inputs`` value of ``detect``: the tensor or
    tuple when there are no keywords, the dict when there are no positionals, else the
    positionals bound to their parameter names in ``module.forward``'s signature."""
    if not kwargs:
        return args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else tuple(args)
    if not args:
        return dict(kwargs)
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    positional = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    kinds = {n: p.kind for n, p in inspect.signature(module.forward).parameters.items()}
    if any(kinds[n] in positional for n in bound.arguments):
        raise ValueError("forward takes *args/**kwargs, so its positionals have no names")
    return dict(bound.arguments)


@dataclass
class FirstStepDetection:
    """What :func:`detect_at_step` found: the symmetries to track, the dropped candidates (from
    detection and from the training gradients) and notes."""

    symmetries: list[Symmetry]
    dropped: list[Dropped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def detect_at_step(
    model: torch.nn.Module,
    inputs: Any,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
) -> FirstStepDetection:
    """Detect on ``inputs`` and keep what the real gradients of this step confirm.

    Args:
        model: the watched model, in the state of this step (before the optimizer's update).
        inputs: the sample batch (:class:`FirstForward`'s).
        names, params: the optimizer's parameters and their names; their ``.grad`` is this
            step's gradient. Candidates naming any other parameter are dropped.
    """
    grads = [p.grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            found = detect(model, inputs)
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                if not torch.equal(b, saved):
                    b.copy_(saved)
        for p, g in zip(params, grads):
            if p.grad is not g:
                p.grad = g
    tracked = set(names)
    dropped = list(found.dropped)
    candidates = []
    for s in found.symmetries:
        if all(n in tracked for n in s.params):
            candidates.append(s)
        else:
            rule = "names parameters the optimizer does not update"
            dropped.append(Dropped(s.name, s.kind, s.params, s.signs, s.defect, rule))
    named = dict(zip(names, params))
    defects = gradient_defects(candidates, named, {n: p.grad for n, p in named.items()})
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    kept, failed = judge_defects(candidates, [defects], dtype=dtype)
    return FirstStepDetection(kept, dropped + failed, list(found.notes))


def first_step(
    sample: FirstForward, tracked: Tracked, writer: RunWriter | None, step: int
) -> list[Symmetry]:
    """Zero-config detection at the first optimizer step (``step``) on ``sample``'s batch: the
    symmetries to track from this step. Removes the hook; stores the symmetries, the dropped
    candidates, ``symmetries_from_step`` and the ``symmetry_note`` through ``writer`` (None off
    rank 0). Never raises: when nothing can be detected it warns, records a ``no_symmetries``
    event and tracks none."""
    sample.remove()
    warning = ""
    found = FirstStepDetection([])
    if sample.inputs is None:
        warning = f"{NO_FORWARD} ({sample.note})" if sample.note else NO_FORWARD
    else:
        try:
            found = detect_at_step(sample.model, sample.inputs, tracked.names, tracked.params)
        except Exception as err:  # a model detection cannot run on: training goes on untracked
            warning = (
                f"zero-config symmetry detection failed on the first batch ({type(err).__name__}"
                f": {str(err)[:200]}); no symmetry is tracked. Pass symmetries= to watch()."
            )
    note = warning or "; ".join(
        [
            f"{len(found.symmetries)} symmetries detected on the first training batch (step "
            f"{step}) and checked on its gradients; {len(found.dropped)} candidates dropped",
            *found.notes,
        ]
    )
    if warning:
        warnings.warn(f"noether-dyn: {warning}", UserWarning, stacklevel=5)
    if writer is not None:
        writer.set_symmetries(found.symmetries, found.dropped)
        writer.set_meta({"symmetries_from_step": step, "symmetry_note": note})
        if warning:
            writer.add_event(step, "no_symmetries", warning)
    return found.symmetries


def stored_symmetries(run_dir: str | Path) -> list[Symmetry] | None:
    """The symmetries a zero-config run tracks, as its store holds them, for ``resume=True``;
    None when the run never reached its first step (detect again)."""
    run = load_run(run_dir)
    if run.meta.get("symmetries_from_step") is None:
        return None
    return [
        Symmetry(r.symmetry, r.kind, tuple(r.params), tuple(r.signs),
                 verified=None if r.verified is None else bool(r.verified),
                 defect=None if r.defect != r.defect else float(r.defect), note=r.note,
                 exactness=r.exactness)
        for r in run.symmetries.itertuples()
    ]  # fmt: skip
