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

import dataclasses
import inspect
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from noether_dyn.capture.checks import is_rank_zero
from noether_dyn.capture.tracked import Tracked
from noether_dyn.store.reader import load_run
from noether_dyn.store.schema import STORE_FILENAME
from noether_dyn.store.writer import RunWriter
from noether_dyn.symmetries.engine import Dropped, detect
from noether_dyn.symmetries.step_check import gradient_defects, judge_defects
from noether_dyn.symmetries.symmetry import Symmetry
from noether_dyn.symmetries.units import units_at_step

NO_FORWARD = (
    "zero-config symmetry detection saw no forward call of the model (or of one of its direct "
    "children) between watch() and the first optimizer step's update (the batch ran before "
    "watch(), or through a module outside the watched one); no symmetry is tracked. Pass inputs= "
    "(one batch) or symmetries= to watch()."
)
SHARDED = (
    "zero-config symmetry detection does not run on sharded (FSDP2) parameters; no symmetry is "
    "tracked. Pass symmetries= (or inputs=, detected before sharding) to watch()."
)


class FirstForward:
    """Forward pre-hooks (with kwargs) on ``model`` and its direct children that keep the first
    call's arguments, then remove themselves.

    Calls under ``torch.no_grad()`` (evaluation, a framework's sanity check) are passed over: the
    sample is the first call that builds a graph. The model's own call fires first when there is
    one; a training step that calls a child
    instead (a LightningModule's ``self.net(x)``) gives that child's call, and detection runs
    on the child (its symmetries only, each still checked on the real gradients).

    Attributes:
        inputs: None until the first call; then a tensor, a tuple of positional arguments or a
            dict of keyword arguments (positional ones bound to their names when both come), as
            :func:`~noether_dyn.symmetries.engine.detect` takes them. module, prefix: the module
            called (the model or a child) and its name with a trailing dot ("" for the model).
            note: why the call could not be kept, or "". handles: the hooks' handles.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.inputs, self.note = model, None, ""
        self.module, self.prefix = model, ""
        modules = [("", model), *((f"{n}.", m) for n, m in model.named_children())]
        self.handles = [
            m.register_forward_pre_hook(self._keeper(m, prefix), with_kwargs=True)
            for prefix, m in modules
        ]

    def _keeper(self, module: torch.nn.Module, prefix: str):
        def keep(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not torch.is_grad_enabled():  # an evaluation pass (a sanity check), not training
                return
            self.remove()
            self.module, self.prefix = module, prefix
            try:
                self.inputs = as_inputs(module, args, kwargs)
            except (TypeError, ValueError) as err:
                self.note = f"the first forward call's arguments could not be kept: {err}"

        return keep

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self.handles:
            handle.remove()


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
    prefix: str = "",
) -> FirstStepDetection:
    """Detect on ``inputs`` and keep what the real gradients of this step confirm.

    Args:
        model: the module called (the watched model or its child ``prefix``), in the state of
            this step (before the optimizer's update).
        inputs: the sample batch (:class:`FirstForward`'s).
        names, params: the optimizer's parameters and their names in the watched model; their
            ``.grad`` is this step's gradient. Candidates naming any other parameter are dropped.
        prefix: the child's name with a trailing dot, prepended to every parameter name found.
    """
    grads = [p.grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda), _hooks_set_aside(model):
            found = detect(model, inputs)
        if prefix:
            found.symmetries = [_prefixed(s, prefix) for s in found.symmetries]
            found.dropped = [_prefixed(d, prefix) for d in found.dropped]
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


_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks",
)  # fmt: skip


@contextmanager
def _hooks_set_aside(model: torch.nn.Module) -> Iterator[None]:
    """The model's forward/backward hooks (the user's, a framework callback's) set aside while
    detection runs: they neither see its passes nor get deep-copied with the model."""
    saved = [(m, name, getattr(m, name)) for m in model.modules() for name in _HOOK_DICTS
             if hasattr(m, name)]  # fmt: skip
    for m, name, hooks in saved:
        setattr(m, name, type(hooks)())
    try:
        yield
    finally:
        for m, name, hooks in saved:
            setattr(m, name, hooks)


def _prefixed(record: Any, prefix: str) -> Any:
    """A Symmetry or Dropped of a child module, renamed into the watched model's names."""
    name = re.sub(r"(?<=[:@>~])(?!weight$|\*|stream@)", prefix, record.name)
    params = tuple(prefix + n for n in record.params)
    return dataclasses.replace(record, name=name, params=params)


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
            found = detect_at_step(
                sample.module, sample.inputs, tracked.names, tracked.params, sample.prefix
            )
            if tracked.granularity == "unit":  # per-unit split on this step's real gradients
                found.symmetries = units_at_step(found.symmetries, tracked.names, tracked.params)
            if sample.prefix:
                found.notes.insert(
                    0,
                    f"the model's forward was not called before the first step; detected on its "
                    f"child '{sample.prefix[:-1]}' (the first one called)",
                )
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


class ZeroConfig:
    """Zero-config detection's state in a monitor: the :class:`FirstForward` sample, then the
    symmetries to track once detected.

    At an optimizer step whose forward already ran (a plain loop, the HF Trainer) detection
    runs at once and tracking starts at that step. A step that runs its forward inside
    ``step(closure)`` (Lightning, LBFGS) has no batch yet at the pre-hook: the closure is wrapped
    so that detection runs right after it returns (the real gradients of that step, before the
    update), and tracking starts at the next step (the monitor planned this one already).
    """

    def __init__(self, model: torch.nn.Module, tracked: Tracked) -> None:
        self.sample, self.tracked = FirstForward(model), tracked
        self.handles, self.ready = self.sample.handles, None

    def at_step(
        self, args: tuple, kwargs: dict, writer: RunWriter | None, step: int
    ) -> tuple[tuple, dict, list[Symmetry] | None]:
        """At the optimizer pre-hook of ``step``: the step's (args, kwargs), the closure wrapped
        when detection waits for it, and the symmetries to track from this step (or None)."""
        if self.ready is not None:
            return args, kwargs, self.ready
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1:2] or [None])[0]
        if self.sample.inputs is not None or closure is None:
            return args, kwargs, first_step(self.sample, self.tracked, writer, step)

        def detecting():
            loss = closure()
            if self.ready is None:  # LBFGS calls the closure several times: detect once
                self.ready = first_step(self.sample, self.tracked, writer, step + 1)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": detecting}, None
        return (args[0], detecting, *args[2:]), kwargs, None


def zero_config(model: torch.nn.Module, tracked: Tracked, wanted: bool) -> ZeroConfig | None:
    """The monitor's zero-config state when ``wanted`` (no inputs, no symmetries given): on the
    rank that writes (DDP replicates the model, rank 0 detects); None with a warning for sharded
    parameters, whose ranks would have to agree on one detection."""
    if not wanted or not is_rank_zero():
        return None
    if tracked.sharded:
        warnings.warn(f"noether-dyn: {SHARDED}", UserWarning, stacklevel=4)
        return None
    return ZeroConfig(model, tracked)


def stored_symmetries(run_dir: str | Path) -> list[Symmetry] | None:
    """The symmetries a zero-config run tracks, as its store holds them, for ``resume=True``;
    None when the run never reached its first step (detect again) or there is no run (the
    writer then says so)."""
    if not (Path(run_dir) / STORE_FILENAME).is_file():
        return None
    run = load_run(run_dir)
    if run.meta.get("symmetries_from_step") is None:
        return None
    return [
        Symmetry(r.symmetry, r.kind, tuple(r.params), tuple(r.signs),
                 verified=None if r.verified is None else bool(r.verified),
                 defect=None if r.defect != r.defect else float(r.defect), note=r.note,
                 exactness=r.exactness, parent=r.parent, slices=r.slices)
        for r in run.symmetries.itertuples()
    ]  # fmt: skip
