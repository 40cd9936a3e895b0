"""Symmetry detection on any model that runs: candidates from one recorded forward pass, each one
verified numerically from a few gradients, exact told apart from eps-approximate.

How (docs/symmetries.md has the long form):

1. One forward pass under :func:`noether_dyn.symmetries._trace.trace_flow` records units (modules
   owning parameters), who reads whose output, which outputs meet in attention scores, and which
   outputs are summed into streams (residual streams, embeddings summed into a norm).
2. Candidates, each a signed set of parameter tensors (generator ``sign * q`` for scale/rescale,
   ``sign * 1`` for translation): every unit alone (scale, with its weight or one tensor alone
   as fallbacks; as translation all its parameters, its biases alone, each tensor, largest
   first), every producer with each consumer and with all its consumers
   (rescale, fan-out), every pair that meets (q/k), every stream's writers (the residual-stream
   scale), alone and with the last norm or the stream's non-norm readers compensating.
3. Verification: the gradient of the loss at the real parameters and at ``n_perturb`` seeded
   random perturbations (one forward+backward each) gives per tensor <g, q>, |g|^2, |q|^2, sum g
   and numel; the defect |<g, xi>| / (|g_A| |xi|) of every candidate is then a few sums (THEORY.md
   §3; Kunin et al., "Neural Mechanics", ICLR 2021: a symmetry's generator is orthogonal to the
   gradient at every point); a translation whose |g_A| is nonzero but at rounding level,
   below :data:`VANISHING_ULPS` eps |g| (a bias before a train-mode BatchNorm), is measured
   against |g|. Candidates above the rounding
   tolerance but within ``eps_tol`` are
   measured again with every normalization's eps shrunk by :data:`EPS_SHRINK` (at the perturbed
   point: one more pass); those within it once more, at the real point, with eps grown to
   :data:`EPS_GROWN`. Each of these two passes takes the gradient of the rechecked candidates'
   tensors alone. The gradients are taken on the model itself with float64 copies of its
   parameters and buffers (no copy of the model).
4. The rule (one, per dtype): *exact* when defect <= tol (float rounding, :data:`DEFAULT_TOL`)
   both at the model's eps and with eps grown;
   *approximate* when the defect is at most ``eps_tol`` and falls to <= tol with eps shrunk (eps is
   its only cause); dropped otherwise, with the defect and the rule. Among verified candidates, one
   that is a linear combination of simpler ones already kept is dropped as redundant, so the
   result is a basis of the symmetries found, simplest first. Layer level: of the alternatives
   for one layer's scale (all its tensors, its weights alone, one tensor) or translation (all its
   tensors, its biases, one tensor) only the first verified is kept, so a layer has at most one
   record per kind.

Without a loss (no ``loss_fn`` and no ``output.loss``) the check uses a fixed random linear
function of the outputs: a symmetry of the model's function is one of every loss on it. Logits
translation is a symmetry of the softmax cross-entropy only, so it comes back unverified
(``verified=None``), for :mod:`noether_dyn.symmetries.step_check` on the first real training
steps, when the outputs shift by a per-sample constant along it: one more pass measures the head
translations' defect on a random linear function of the outputs centered along the class axis
(blind to exactly those shifts); the others are dropped (``not a logits translation``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from noether_dyn.symmetries._calls import Inputs, as_call, call_model, describe
from noether_dyn.symmetries._candidates import Candidate, propose
from noether_dyn.symmetries._trace import (
    NORM_EPS_ATTRIBUTES,
    Flow,
    RecordingError,
    find_units,
    is_norm,
    model_loss,
    output_tensors,
    trace_flow,
)
from noether_dyn.symmetries.symmetry import Symmetry
from noether_dyn.symmetries.verify import DEFAULT_TOL, EPS_SHRINK

EPS_GROWN = 1.0
"""Every normalization's eps for the exactness check (or 1e4 times its own, if larger): an eps of
the order of unit-scale activations. A symmetry within rounding at the model's eps whose defect
exceeds the tolerance at this eps depends on eps, so it is approximate (exact symmetries do not
involve eps at all; ViT's eps of 1e-12 hides the dependence at the model's own eps)."""

EPS_TOL = 1e-2
"""Largest defect accepted for an eps-approximate symmetry (eps breaks it by ~eps/(var + eps))."""


@dataclass(frozen=True)
class Dropped:
    """A candidate that is not reported: its ``defect`` (None when the gradient vanished) and
    the ``rule`` that dropped it."""

    name: str
    kind: str
    params: tuple[str, ...]
    signs: tuple[float, ...]
    defect: float | None
    rule: str


@dataclass
class Detection:
    """What :func:`detect` found.

    Args:
        symmetries: the verified symmetries (``verified=True``, ``exactness`` set), then the
            unverified candidates that need the training loss (``verified=None``).
        dropped: every candidate not reported, with its defect and the rule.
        notes: one line per thing the detection could not see (a module never called, a
            dataflow it could not record).
        passes: forward+backward passes spent (a forward alone counts 1/2): the trace on the
            whole batch, the rest on the checked examples in ``check_dtype``. Time ratios
            against one pass of the batch are measured by ``benchmarks/detection.py``.
        cached: True when the result came from the cache of a same-structure model.
    """

    symmetries: list[Symmetry]
    dropped: list[Dropped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    passes: float = 0.0
    cached: bool = False


_CACHE: dict[Any, Detection] = {}
_CACHE_SIZE = 32


def clear_cache() -> None:
    """Forget every cached detection."""
    _CACHE.clear()


def detect(
    model: nn.Module,
    inputs: Inputs,
    targets: Any = None,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    *,
    tol: float | None = None,
    eps_tol: float = EPS_TOL,
    n_perturb: int = 1,
    seed: int = 0,
    cache: bool = True,
    check_dtype: torch.dtype | None = torch.float64,
    max_examples: int | None = 2,
) -> Detection:
    """Find and verify the scale, rescale and translation symmetries of the model's loss.

    The loss is ``loss_fn(model(inputs), targets)`` when ``loss_fn`` is given, else the
    ``loss`` the model returns (HF models given ``labels``), else none (see the module
    docstring). Costs one forward pass of the batch, then on its first ``max_examples``
    examples in ``check_dtype`` (the whole batch when it does not split along its first
    dimension): ``1 + n_perturb`` forward+backward passes, one more when some candidate is
    between the rounding tolerance and ``eps_tol`` (norm eps shrunk, at the last perturbed
    point), and one for the exactness check of a model with normalizations (eps grown, at the
    real point): 4.5 with the defaults. A second call on a model of the same structure (class
    and settings of every module, parameter names, shapes, dtypes, train/eval mode, inputs' and
    targets' shapes, loss) costs one forward pass (the loss is still checked).

    Args:
        model: any ``nn.Module``; its parameters, buffers and the global RNG state are unchanged.
        inputs: one batch: a tensor (``model(x)``), a tuple (``model(*args)``), or a mapping of
            keyword arguments (a dict, an HF ``BatchEncoding``).
        targets: second argument of ``loss_fn``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``; optional.
        tol: the rounding tolerance; default :data:`DEFAULT_TOL` of ``check_dtype``.
        eps_tol: largest defect of an eps-approximate symmetry.
        n_perturb: perturbed points besides the real parameters (>= 1).
        seed: seeds the perturbations and every forward's RNG (dropout).
        cache: use and fill the per-structure cache.
        check_dtype: dtype of the copy of the model the gradients are taken on (float64 by
            default: in float32 an attention-mixing candidate can be broken by as little as
            1e-5 at initialization, as small as the rounding of exact ones); None for the
            model's own dtype, without a copy.
        max_examples: the gradients are taken on the first ``max_examples`` examples of the
            batch (every input tensor, and targets, whose first dimension is the batch size),
            which keeps the float64 check cheaper than one float32 pass of a large batch; None
            for the whole batch.

    Raises:
        ValueError: the inputs do not run through the model, ``targets`` come without
            ``loss_fn``, or ``loss_fn`` fails or does not return a scalar (checked on every call,
            also when there is no candidate).
    """
    if targets is not None and loss_fn is None:
        raise ValueError(
            "loss_fn: targets were given without a loss; pass loss_fn=nn.CrossEntropyLoss() "
            "(or your loss), or drop targets to use the model's own output.loss."
        )
    as_call(inputs)
    if (tol is not None and not tol > 0) or not eps_tol > 0:
        raise ValueError(f"tol, eps_tol: must be positive, got {tol} and {eps_tol}.")
    if n_perturb < 1:
        raise ValueError(f"n_perturb: must be at least 1, got {n_perturb}.")
    dtype = _param_dtype(model) if check_dtype is None else check_dtype
    if tol is None:
        tol = DEFAULT_TOL.get(dtype, 1e-4)
    params = {n: p.detach() for n, p in model.named_parameters()}
    key = _structure_key(model, inputs, targets, loss_fn, tol, eps_tol, dtype) if cache else None
    if key is not None and key in _CACHE:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            evaluate_loss(model, inputs, targets, loss_fn, call_model(model, params, inputs))
        hit = _CACHE[key]
        return Detection(list(hit.symmetries), list(hit.dropped), list(hit.notes), 0.5, True)

    notes: list[str] = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        try:
            live = dict(model.named_parameters())  # the recorder knows parameters by identity
            flow, out = trace_flow(model, lambda: call_model(model, live, inputs))
        except RecordingError as failed:  # a model that runs, but not under the recorder
            flow = None
            out = _run(model, params, inputs)
            err, where = failed.error, failed.module
            module = f"{where} ({type(model.get_submodule(where)).__name__})" if where else ""
            notes.append(
                f"{module or type(model).__name__}: the dataflow could not be recorded "
                f"({type(err).__name__}: {str(err)[:120]}); only per-module candidates were tried"
            )
        _, mode = evaluate_loss(model, inputs, targets, loss_fn, out)
    if flow is None:
        flow = _flat_flow(model)
    candidates = propose(flow)
    heads = {c.name for c in candidates if c.kind == "translation" and _is_head(flow, c)}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    checked, sub_inputs, sub_targets, cut = _check_setup(
        model, inputs, targets, dtype, max_examples, copy_model=False
    )
    params = {
        n: p.detach().to(dtype) if p.is_floating_point() else p.detach()
        for n, p in model.named_parameters()
    }
    generator = torch.Generator().manual_seed(seed)
    points = [params] + [_perturbed(params, 0.1, generator) for _ in range(n_perturb)]
    loss_at = _loss_function(checked, sub_inputs, sub_targets, loss_fn, mode, dtype)
    try:
        stats = _stats(loss_at, points, names, seed)
    except Exception:
        # the batch does not split along its first dimension, or the model keeps tensors of its
        # own dtype outside its buffers: the gradients on all of it, on a converted copy
        checked, sub_inputs, sub_targets, cut = _check_setup(
            model, inputs, targets, dtype, None, copy_model=True
        )
        loss_at = _loss_function(checked, sub_inputs, sub_targets, loss_fn, mode, dtype)
        stats = _stats(loss_at, points, names, seed)
    finite = bool(torch.isfinite(stats).all())
    if not finite:
        notes.append(
            f"{type(model).__name__}: non-finite parameters or gradients on this batch, so no "
            "candidate could be verified (the result is not cached)"
        )
    index = {n: i for i, n in enumerate(names)}
    notes += [
        f"{path}: no gradient reaches it on this batch (never called, or its output unused), "
        "so no symmetry acts on its parameters"
        for path, u in flow.units.items()
        if u.params and all(float(stats[:, index[n], 1].sum()) == 0.0 for n in u.params)
    ]
    passes = 0.5 + len(points)
    total = stats[..., 1].sum(dim=1)  # |g|^2 per point: the reference of a vanishing |g_A|
    floor = min(tol, VANISHING_ULPS * torch.finfo(dtype).eps)
    real = _defects(candidates, stats, names, floor)
    norms = any(is_norm(m) for m in model.modules())
    # eps can only explain a defect up to eps_tol: only those candidates are measured again, and
    # each eps pass takes the gradient of their tensors alone (backward stops where it can)
    above = [i for i, d in enumerate(real) if d is not None and tol < d <= eps_tol]
    shrunk: dict[int, float | None] = {}
    if above and norms:
        again = [candidates[i] for i in above]
        wanted = _tensors_of(again, names)
        with _shrunk_eps(checked):  # at the perturbed point: a generic one
            stats0 = _stats(loss_at, points[-1:], wanted, seed)
        passes += 1
        shrunk = dict(zip(above, _defects(again, stats0, wanted, floor, total[-1:])))
    grown: dict[int, float | None] = {}
    small = [i for i, d in enumerate(real) if d is not None and d <= tol]
    if small and norms:
        again = [candidates[i] for i in small]
        wanted = _tensors_of(again, names)
        with _shrunk_eps(checked, grown=EPS_GROWN):
            stats1 = _stats(loss_at, points[:1], wanted, seed)
        passes += 1
        grown = dict(zip(small, _defects(again, stats1, wanted, floor, total[:1])))
    # without a loss a head translation off by more than rounding is a logits translation (a
    # symmetry of the softmax cross-entropy, left to the training loss) only if the logits shift
    # by a per-sample constant along it: measured at the perturbed point on a random linear
    # function of the outputs centered along the class axis, which is blind to exactly those
    # shifts (a weight-normalized head's g, v or all its tensors shifted are not)
    logits_shift: dict[int, float | None] = {}
    undecided = [
        i
        for i, d in enumerate(real)
        if mode == "function" and d is not None and d > tol and candidates[i].name in heads
    ]
    if undecided:
        again = [candidates[i] for i in undecided]
        wanted = _tensors_of(again, names)
        class_dim = _class_dim(model, flow.head)
        centered = _loss_function(checked, sub_inputs, None, None, mode, dtype, class_dim)
        stats2 = _stats(centered, points[-1:], wanted, seed)
        passes += 1
        logits_shift = dict(zip(undecided, _defects(again, stats2, wanted, floor)))
    kept: list[tuple[Candidate, float, str]] = []
    dropped: list[Dropped] = []
    unverified: list[tuple[Candidate, float, Symmetry]] = []
    for i, c in enumerate(candidates):
        d = real[i]
        if d is None:
            dropped.append(_drop(c, None, "zero gradient on its parameters at every point"))
        elif d <= tol:
            g = grown.get(i)
            kept.append((c, d, "exact" if g is None or g <= tol else "approximate"))
        elif i in logits_shift:
            shift = logits_shift[i]
            if shift is not None and shift <= tol:
                unverified.append(
                    (
                        c,
                        d,
                        Symmetry(
                            c.name, c.kind, c.params, c.signs,
                            note=f"{c.why}; the logits shift by a per-sample constant along it "
                            f"(defect {shift:.1e} <= tol {tol:.0e} on class-centered outputs); "
                            "needs the training loss: check with gradient_defects",
                        ),
                    )
                )  # fmt: skip
            else:
                rule = (
                    f"not a logits translation: the outputs do not shift by a per-sample constant "
                    f"along it (defect {shift:.1e} > tol {tol:.0e} on a random linear function of "
                    "the outputs centered along the class axis)"
                    if shift is not None
                    else "not a logits translation: no gradient of the class-centered outputs"
                )
                dropped.append(_drop(c, d, rule))
        elif d <= eps_tol and shrunk.get(i) is not None and shrunk[i] <= tol:
            kept.append((c, d, "approximate"))
        else:
            d0 = shrunk.get(i)
            rule = f"defect {d:.1e} > tol {tol:.0e} (float rounding)" + (
                f" and > eps_tol {eps_tol:.0e}"
                if d > eps_tol
                else f" and {d0:.1e} > tol with norm eps x{EPS_SHRINK:.0e}"
                if d0 is not None
                else " (no normalization whose eps could explain it)"
            )
            dropped.append(_drop(c, d, rule))
    kept, alternatives = _one_per_family(kept)
    dropped += alternatives
    symmetries, redundant = _basis(kept, names, tol, eps_tol)
    dropped += redundant
    waiting, alternatives = _one_unverified_per_family(unverified, symmetries)
    dropped += alternatives
    result = Detection(symmetries + waiting, dropped, notes, passes)
    if key is not None and finite:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = result
    return result


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _check_setup(
    model: nn.Module,
    inputs: Inputs,
    targets: Any,
    dtype: torch.dtype,
    max_examples: int | None,
    copy_model: bool,
) -> tuple[nn.Module, Inputs, Any, bool]:
    """The model (itself, run on parameters and buffers in ``dtype``, or with ``copy_model`` a
    copy converted to ``dtype`` when its own dtype differs), inputs and targets the gradients
    are taken on, and whether the batch was cut to its first ``max_examples`` examples (every
    tensor whose first dimension is the batch size)."""
    checked = model
    if copy_model and dtype != _param_dtype(model):
        checked = copy.deepcopy(model).to(dtype)
    args, kwargs = as_call(inputs)
    first = next((t for t in _flat(args, kwargs) if t.ndim > 0), None)
    size = first.shape[0] if first is not None else 0
    keep = size if max_examples is None or size <= max_examples else max_examples
    if any(_batch_coupled(m) for m in model.modules()):
        keep = size  # batch statistics: a cut batch is another function (degenerate at 2 rows)

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            if v.ndim > 0 and v.shape[0] == size:
                v = v[:keep]
            return v.to(dtype) if v.is_floating_point() else v
        if isinstance(v, tuple | list):
            return type(v)(cut(x) for x in v)
        if isinstance(v, Mapping):
            return {k: cut(x) for k, x in v.items()}
        return v

    sub = cut(inputs) if not isinstance(inputs, Mapping) else cut(dict(inputs))
    return checked, sub, cut(targets), keep < size


def _batch_coupled(module: nn.Module) -> bool:
    """A BatchNorm1d normalizing with batch statistics: over (N,) or (N, L) values per
    channel, which a cut batch of 2 examples makes degenerate (outputs +-1)."""
    return isinstance(module, nn.BatchNorm1d) and (module.training or module.running_mean is None)


def _flat(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]


def _drop(c: Candidate, d: float | None, rule: str) -> Dropped:
    return Dropped(c.name, c.kind, c.params, c.signs, d, rule)


def _run(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Inputs) -> Any:
    try:
        return call_model(model, params, inputs)
    except Exception as err:
        raise ValueError(
            f"inputs: model(*inputs) failed on the given inputs ({describe(inputs)}) with "
            f"{type(err).__name__}: {err}. Pass one batch the model accepts: a tensor for "
            "model(x), a tuple for model(*args), or a dict / BatchEncoding for model(**kwargs)."
        ) from err


def evaluate_loss(
    model: nn.Module, inputs: Inputs, targets: Any, loss_fn: Callable | None, out: Any
) -> tuple[torch.Tensor | None, str]:
    """The loss on the model's output ``out`` and where it comes from: ``"fn"`` (``loss_fn``),
    ``"model"`` (the ``loss`` the model returned) or ``"function"`` (none: the value is None).

    Raises:
        ValueError: naming ``loss_fn`` when it fails or does not return a scalar tensor.
    """
    if loss_fn is not None:
        try:
            value = loss_fn(out, targets)
        except Exception as err:
            raise ValueError(
                f"loss_fn: loss_fn(outputs, targets) raised {type(err).__name__}: {err}. The model "
                f"returns {type(out).__name__}; pass a loss that takes it and the targets "
                "(e.g. lambda out, y: F.cross_entropy(out.logits, y)), or no loss_fn to use the "
                "model's own output.loss."
            ) from err
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"loss_fn: must return a scalar tensor, got {got}; use reduction='mean' or 'sum'."
            )
        return value, "fn"
    value = model_loss(out)
    if value is not None:
        return value, "model"
    return None, "function"


def _loss_function(
    model: nn.Module,
    inputs: Inputs,
    targets: Any,
    loss_fn: Callable | None,
    mode: str,
    dtype: torch.dtype | None,
    class_dim: int | None = None,
) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """The scalar whose gradients verify the candidates, as a function of the parameters.

    Without a loss (``mode == "function"``): sum(w * outputs) with fixed random weights w drawn
    (seeded) on the first call, from the shapes of the outputs it sees; with ``class_dim``, w
    has zero mean along that axis of every output (outputs with fewer axes weigh 0), so the
    function ignores any shift of the outputs that is constant along it (a logits translation)
    and sees every other change."""
    if mode == "fn":
        return lambda q: loss_fn(call_model(model, q, inputs, dtype), targets)
    if mode == "model":
        return lambda q: model_loss(call_model(model, q, inputs, dtype))
    weights: list[torch.Tensor] = []

    def projected(q: Mapping[str, torch.Tensor]) -> torch.Tensor:
        outs = output_tensors(call_model(model, q, inputs, dtype))
        if not outs:
            raise ValueError(
                "inputs: the model returns no floating tensor, so nothing can be checked; pass "
                "loss_fn= (and targets=) or inputs that make it return its logits or loss."
            )
        if not weights:
            g = torch.Generator().manual_seed(12345)
            for t in outs:
                w = torch.randn(t.shape, generator=g, dtype=torch.float64)
                if class_dim is not None:
                    if t.ndim > (class_dim if class_dim >= 0 else -class_dim - 1):
                        w -= w.mean(dim=class_dim, keepdim=True)
                    else:
                        w.zero_()
                weights.append(w.to(t) / math.sqrt(max(t.numel(), 1)))
        return sum((w * t).sum() for w, t in zip(weights, outs))

    return projected


_STATS = 5  # <g, q>, |g|^2, |q|^2, sum g, numel


def _stats(
    loss_at: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    points: Sequence[Mapping[str, torch.Tensor]],
    names: list[str],
    seed: int,
) -> torch.Tensor:
    """(points, tensors, 5) float64: per tensor <g, q>, |g|^2, |q|^2, sum(g), numel."""
    out = torch.zeros(len(points), len(names), _STATS, dtype=torch.float64)
    index = {n: i for i, n in enumerate(names)}
    for k, point in enumerate(points):
        leaves = {
            n: (t.detach().requires_grad_() if n in index and t.is_floating_point() else t)
            for n, t in point.items()
        }
        wanted = [n for n in names if leaves[n].requires_grad]
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            loss = loss_at(leaves)
            grads = torch.autograd.grad(loss, [leaves[n] for n in wanted], allow_unused=True)
        with torch.no_grad():
            rows = []
            for n, g in zip(wanted, grads):
                q = leaves[n].detach().reshape(-1).double()
                g = torch.zeros_like(q) if g is None else g.reshape(-1).double()
                rows.append(
                    torch.stack([g @ q, g @ g, q @ q, g.sum(), q.new_tensor(float(q.numel()))])
                )
            if rows:
                out[k, [index[n] for n in wanted]] = torch.stack(rows).cpu()
    return out


def _tensors_of(candidates: Sequence[Candidate], names: list[str]) -> list[str]:
    """The tensors the candidates act on, in the order of ``names``."""
    used = {n for c in candidates for n in c.params}
    return [n for n in names if n in used]


def _perturbed(
    params: Mapping[str, torch.Tensor], scale: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """q + scale * rms(q) * N(0, 1) per floating tensor (absolute ``scale`` for an all-zero
    tensor), the noise drawn in float32 on the CPU from ``generator`` (any generic point
    will do; float64 draws cost twice as much)."""
    out = {}
    for name, q in params.items():
        if not q.is_floating_point() or q.numel() == 0:
            out[name] = q
            continue
        rms = float(torch.linalg.vector_norm(q)) / math.sqrt(q.numel())
        noise = torch.empty(q.shape).normal_(generator=generator).to(q.device, q.dtype)
        out[name] = noise.mul_(scale * (rms if rms > 0 else 1.0)).add_(q)
    return out


VANISHING_ULPS = 64
"""A translation's |g_A| counts as rounding (its defect taken against |g|, :func:`_defects`) when
at most ``VANISHING_ULPS`` machine epsilons of the check dtype times |g|. A bias before a
train-mode BatchNorm measures at most 1.0e-16 |g| in float64 (tests of this engine); the
tensors inside a ConvNeXt block behind its layer scale (1e-6 at initialization) carry a real but
small gradient, 5e-15 to 2e-8 |g|, along which the loss does change (float64: by 1e-10 relative
under a shift of 0.5), so the floor sits between: 64 eps = 1.4e-14 in float64 (the earlier floor,
tol = 1e-8, kept those shifts as exact symmetries)."""


def _defects(
    candidates: Sequence[Candidate],
    stats: torch.Tensor,
    names: list[str],
    floor: float = 0.0,
    reference: torch.Tensor | None = None,
) -> list[float | None]:
    """The largest defect of each candidate over the points with a nonzero gradient on it.

    A translation whose tensors' gradient |g_A| is nonzero but at most ``floor`` times
    |g| (``reference``: |g|^2 per point, over every tensor; by default over those in ``stats``)
    has its defect taken against |g| instead (THEORY.md §3's |g|): the loss depends on those
    tensors only through rounding (a bias before a train-mode BatchNorm, whose per-channel mean
    cancels in the backward pass too), where the cosine against |g_A| is rounding over rounding.
    An exactly zero gradient (a module whose output is unused) still gives no defect."""
    if not candidates:
        return []
    index = {n: i for i, n in enumerate(names)}
    coef = torch.zeros(len(candidates), len(names), dtype=torch.float64)
    for j, c in enumerate(candidates):
        for n, s in zip(c.params, c.signs):
            coef[j, index[n]] = s
    support = coef.abs()
    translation = torch.tensor([c.kind == "translation" for c in candidates])
    dot = torch.where(translation[:, None], coef @ stats[..., 3].T, coef @ stats[..., 0].T)
    gg = support @ stats[..., 1].T
    if reference is None:
        reference = stats[..., 1].sum(dim=1)
    vanishing = translation[:, None] & (gg > 0) & (gg <= floor**2 * reference[None, :])
    gg = torch.where(vanishing, reference[None, :].expand_as(gg), gg)
    xx = torch.where(translation[:, None], support @ stats[..., 4].T, support @ stats[..., 2].T)
    ratio = dot.abs() / (gg * xx).sqrt()
    ratio = torch.where((gg > 0) & (xx > 0), ratio, torch.nan)
    out: list[float | None] = []
    for row in ratio:
        valid = row[~row.isnan()]
        out.append(float(valid.max()) if valid.numel() else None)
    return out


@contextmanager
def _shrunk_eps(
    model: nn.Module, factor: float = EPS_SHRINK, grown: float | None = None
) -> Iterator[None]:
    """Every normalization's eps multiplied by ``factor``, or with ``grown`` set to
    max(grown, 1e4 eps), for the duration (restored after)."""
    saved = []
    try:
        for m in model.modules():
            if not is_norm(m):
                continue
            for attr in NORM_EPS_ATTRIBUTES:
                if hasattr(m, attr) and (attr == "eps" or isinstance(getattr(m, attr), float)):
                    old = getattr(m, attr)
                    if old is None:  # nn.RMSNorm: the dtype's machine eps
                        dtype = next((p.dtype for p in m.parameters()), torch.float32)
                        base = torch.finfo(dtype).eps
                    elif isinstance(old, float | int):
                        base = float(old)
                    else:
                        continue
                    new = base * factor if grown is None else max(grown, 1e4 * base)
                    saved.append((m, attr, old))
                    setattr(m, attr, new)
        yield
    finally:
        for m, attr, old in saved:
            setattr(m, attr, old)


def _one_per_family(
    kept: list[tuple[Candidate, float, str]],
) -> tuple[list[tuple[Candidate, float, str]], list[Dropped]]:
    """Layer level: of the verified candidates of one family (a layer's scale on all its
    tensors, on its weights alone, on one tensor), only the first proposed is kept."""
    first: dict[str, str] = {}
    out: list[tuple[Candidate, float, str]] = []
    dropped: list[Dropped] = []
    for c, d, exactness in kept:
        if c.family and c.family in first:
            rule = f"layer level: one record per layer, {first[c.family]} is reported"
            dropped.append(_drop(c, d, rule))
            continue
        if c.family:
            first[c.family] = c.name
        out.append((c, d, exactness))
    return out, dropped


def _one_unverified_per_family(
    unverified: list[tuple[Candidate, float, Symmetry]], reported: list[Symmetry]
) -> tuple[list[Symmetry], list[Dropped]]:
    """Layer level for the translations waiting for the training loss: none for a layer whose
    translation is reported verified, else the first proposed of its family (the largest set)."""
    verified = {s.name for s in reported}
    first: set[str] = set()
    out: list[Symmetry] = []
    dropped: list[Dropped] = []
    for c, d, s in unverified:
        if c.name in verified or c.name in first:
            status = "verified" if c.name in verified else "waiting for the training loss"
            rule = f"layer level: one record per layer, {c.name} on other tensors is {status}"
            dropped.append(_drop(c, d, rule))
            continue
        first.add(c.name)
        out.append(s)
    return out, dropped


def _class_dim(model: nn.Module, head: str | None) -> int:
    """The class axis of the logits: 1 after a convolution head (N, C, *spatial), as in
    ``F.cross_entropy``, else the last (a Linear's output features, (N, C) or (N, T, C))."""
    try:
        module = model.get_submodule(head) if head else None
    except AttributeError:  # a loose parameter
        module = None
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def _basis(
    kept: list[tuple[Candidate, float, str]], names: list[str], tol: float, eps_tol: float
) -> tuple[list[Symmetry], list[Dropped]]:
    """Keep the verified candidates that are linearly independent of the simpler ones kept
    before them (fewest tensors first, exact before approximate); the others are redundant."""
    index = {n: i for i, n in enumerate(names)}
    order = sorted(
        range(len(kept)),
        key=lambda j: (len(kept[j][0].params), kept[j][2] != "exact", j),
    )
    bases: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    chosen: list[int] = []
    dropped: list[Dropped] = []
    for j in order:
        c, d, exactness = kept[j]
        v = torch.zeros(len(names), dtype=torch.float64)
        for n, s in zip(c.params, c.signs):
            v[index[n]] = s
        basis = bases[c.kind == "translation"]
        r = v.clone()
        for b in basis:
            r -= (r @ b) * b
        if r.norm() <= 1e-9 * v.norm():
            dropped.append(
                _drop(c, d, "redundant: a linear combination of simpler symmetries reported")
            )
            continue
        basis.append(r / r.norm())
        chosen.append(j)
    out = []
    for j in sorted(chosen):
        c, d, exactness = kept[j]
        bound = f"<= tol {tol:.0e}" if exactness == "exact" else f"<= eps_tol {eps_tol:.0e}"
        note = f"{c.why}; verified {exactness}: defect {d:.1e} {bound}"
        out.append(
            Symmetry(c.name, c.kind, c.params, c.signs, True, d, note=note, exactness=exactness)
        )
    return out, dropped


def _is_loose(flow: Flow, path: str) -> bool:
    return flow.units[path].params == (path,)


def _is_head(flow: Flow, c: Candidate) -> bool:
    return flow.head is not None and set(c.params) <= set(flow.units[flow.head].params)


def _flat_flow(model: nn.Module) -> Flow:
    units, _, _ = find_units(model)
    calls = {p: 1 for p in units}
    return Flow(units, {}, set(), [], None, [], calls)


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("t", tuple(value.shape), value.dtype, str(value.device))
    if isinstance(value, tuple | list):
        return tuple(_signature(v) for v in value)
    if isinstance(value, Mapping):
        return tuple((k, _signature(v)) for k, v in value.items())
    return type(value).__name__


def _loss_identity(loss_fn: Any) -> Any:
    """Same for the same loss: a module loss by its type and settings (its repr), a function by
    its code object (one lambda re-created per call is the same loss; two lambdas are not)."""
    if loss_fn is None:
        return None
    if isinstance(loss_fn, nn.Module):
        return type(loss_fn).__qualname__, repr(loss_fn)
    code = getattr(loss_fn, "__code__", None)
    return type(loss_fn).__qualname__, id(code) if code is not None else id(loss_fn)


def _settings(module: nn.Module) -> tuple:
    """The module's public attributes that are plain values (bool, int, float, str, None)."""
    return tuple(
        (k, v)
        for k, v in vars(module).items()
        if not k.startswith("_") and (v is None or isinstance(v, bool | int | float | str))
    )


def _structure_key(
    model: nn.Module,
    inputs: Inputs,
    targets: Any,
    loss_fn: Any,
    tol: float,
    eps_tol: float,
    dtype: Any,
) -> Any:
    args, kwargs = as_call(inputs)
    return (
        _signature(targets),
        type(model).__module__,
        type(model).__qualname__,
        tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()),
        # every module's class and plain settings (a LeakyReLU's slope, a norm's eps, a flag
        # its forward reads), parameter-free ones included
        tuple(
            (type(m).__module__, type(m).__qualname__, m.extra_repr(), _settings(m))
            for m in model.modules()
        ),
        _signature(args),
        _signature(kwargs),
        _loss_identity(loss_fn),
        tol,
        eps_tol,
        dtype,
    )
