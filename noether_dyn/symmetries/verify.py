"""Numerical verification of symmetries: the defect |<g, xi>| / (|g_A| |xi|) (docs/theory.md §3).

A symmetry psi_s of the loss f has f(psi_s(q)) = f(q) for all s, so its generator xi(q) is
orthogonal to the gradient at every q: <g, xi> = 0 (Kunin et al., "Neural Mechanics", ICLR 2021;
Tanaka & Kunin, NeurIPS 2021). :func:`verify` measures the cosine between the loss gradient
restricted to the symmetry's parameters, g_A, and xi at the real parameters and at a few seeded
random perturbations of all parameters, and keeps the largest value as the symmetry's ``defect``.
The gradient is one ``torch.func.grad`` of ``functional_call`` per point, shared by all symmetries.

Tolerances (:data:`DEFAULT_TOL`, for rounding only). An exact symmetry (rescale through ReLU,
translation under softmax cross-entropy, the direction of a weight-normalized layer) leaves a
defect made of rounding: the gradient is a sum of products each with relative error ~ the unit
roundoff u, so the cosine is a few hundred u at most on small models (measured on the test zoo: at
most 2e-7 in float32, u = 6e-8, and 2e-16 in float64, u = 1.1e-16). Hence 1e-5 (float32) and 1e-8
(float64), with a wide margin for longer reductions. A scale symmetry through a normalization is
not exact: the eps in 1/sqrt(var + eps) breaks it by about eps/(var + eps), whatever the dtype
(measured 6e-7 to 2e-5 with eps = 1e-5 and unit-scale pre-activations). It is accepted as
*approximate* when the defect falls below ``tol`` once every normalization eps is shrunk by
:data:`EPS_SHRINK` (so eps is the only cause) and the real defect is below ``eps_tol``. A broken
candidate (a residual add, tanh or GELU, a second consumer) has a defect of 2e-3 to 0.4 on the zoo.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import grad

from noether_dyn.symmetries._calls import Inputs, as_call, make_loss
from noether_dyn.symmetries.symmetry import Symmetry

DEFAULT_TOL: Mapping[torch.dtype, float] = {
    torch.float64: 1e-8,
    torch.float32: 1e-5,
    torch.bfloat16: 3e-2,
    torch.float16: 1e-2,
}
"""Default defect tolerance per parameter dtype (see the module docstring for the reasoning)."""


def default_tol(model: nn.Module) -> float:
    """The tolerance of :data:`DEFAULT_TOL` for the dtype of the model's floating parameters."""
    for p in model.parameters():
        if p.is_floating_point():
            return DEFAULT_TOL.get(p.dtype, 1e-4)
    return DEFAULT_TOL[torch.float32]


def perturbed(
    params: Mapping[str, torch.Tensor], scale: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """q + scale * rms(q) * N(0, 1) per floating tensor (an absolute ``scale`` for an all-zero
    tensor such as a fresh bias): a nearby generic point, seeded by ``generator``."""
    out = {}
    for name, q in params.items():
        if not q.is_floating_point():
            out[name] = q
            continue
        rms = q.detach().double().pow(2).mean().sqrt().item() if q.numel() else 0.0
        noise = torch.randn(q.shape, generator=generator, dtype=torch.float64).to(q)
        out[name] = q + scale * (rms if rms > 0 else 1.0) * noise
    return out


def defect(symmetry: Symmetry, params: Mapping[str, torch.Tensor], g: Mapping[str, Any]) -> float:
    """|<g_A, xi_A>| / (|g_A| |xi_A|) on the symmetry's parameters A, accumulated in float64.

    NaN when g_A or xi_A is zero (the point says nothing about the symmetry)."""
    xi = symmetry.generator(params)
    dot = gg = xx = 0.0
    for name in symmetry.params:
        gi, xii = g[name].detach().double(), xi[name].detach().double()
        dot += float((gi * xii).sum())
        gg += float((gi * gi).sum())
        xx += float((xii * xii).sum())
    if gg == 0.0 or xx == 0.0:
        return math.nan
    return abs(dot) / math.sqrt(gg * xx)


EPS_SHRINK = 1e-8
"""Factor on every normalization eps for the check of approximate (eps-broken) symmetries."""

NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)


def shrink_norm_eps(model: nn.Module, factor: float = EPS_SHRINK) -> nn.Module | None:
    """A deep copy of ``model`` with the eps of every normalization module multiplied by
    ``factor`` (None if the model has no such module). Parameter names are unchanged."""
    if not any(isinstance(m, NORM_MODULES) for m in model.modules()):
        return None
    clone = copy.deepcopy(model)
    for m in clone.modules():
        if isinstance(m, NORM_MODULES):
            eps = m.eps
            if eps is None:
                dtype = next((p.dtype for p in m.parameters()), torch.get_default_dtype())
                eps = torch.finfo(dtype).eps
            m.eps = float(eps) * factor
    return clone


def _defects(
    model: nn.Module,
    symmetries: Sequence[Symmetry],
    points: Sequence[Mapping[str, torch.Tensor]],
    inputs: Inputs,
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    seed: int,
) -> dict[str, list[float]]:
    """Defects of every symmetry at every point with a nonzero gradient on its parameters."""
    gradient = grad(make_loss(model, inputs, targets, loss_fn))
    found: dict[str, list[float]] = {s.name: [] for s in symmetries}
    for i, q in enumerate(points):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            g = gradient(q)
        for s in symmetries:
            d = defect(s, q, g)
            if not math.isnan(d):
                found[s.name].append(d)
    return found


def verify(
    model: nn.Module,
    symmetries: Sequence[Symmetry],
    inputs: Inputs,
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    tol: float | None = None,
    eps_tol: float = 1e-2,
    n_perturb: int = 3,
    perturb_scale: float = 0.1,
    seed: int = 0,
) -> list[Symmetry]:
    """Check each symmetry numerically and return copies with ``verified`` and ``defect`` set.

    A symmetry is verified when its defect is at most ``tol`` (rounding). One whose defect is
    larger is verified as *approximate* when the excess comes from normalization eps: the defect
    recomputed with every normalization module's eps shrunk by :data:`EPS_SHRINK` is at most
    ``tol``, and the real defect is at most ``eps_tol``. ``defect`` is always the real one.

    Args:
        model: the model; its parameters, buffers (BatchNorm running statistics) and the global
            RNG state are left unchanged.
        symmetries: candidates, from :func:`find_symmetries` or declared by hand. None is
            dropped: a failing one comes back with ``verified=False`` and its defect.
        inputs: one batch: a tensor for ``model(x)``, a tuple for ``model(*args)`` or a dict of
            keyword arguments.
        targets: second argument of ``loss_fn``.
        loss_fn: ``loss_fn(model(*inputs), targets)`` must return a scalar tensor.
        tol: largest defect accepted from rounding; default :func:`default_tol`.
        eps_tol: largest defect accepted from normalization eps (1e-2: the eps breaks the
            symmetry by about eps/(var + eps), under 1% while the pre-normalization variance is
            above ~100 eps).
        n_perturb: random points besides the real parameters.
        perturb_scale: relative size of the perturbations (see :func:`perturbed`).
        seed: seeds the perturbations and the RNG during each loss evaluation (dropout).

    Returns:
        One :class:`Symmetry` per input, in order: ``defect`` is the largest defect over the
        points with a nonzero gradient on the symmetry's parameters; ``verified`` is True or
        False, or None when that gradient vanished at every point.
    """
    if tol is None:
        tol = default_tol(model)
    if not tol > 0 or not eps_tol > 0:
        raise ValueError(f"tol, eps_tol: must be positive, got {tol} and {eps_tol}.")
    params = {name: p.detach() for name, p in model.named_parameters()}
    for s in symmetries:
        missing = [n for n in s.params if n not in params]
        if missing:
            raise ValueError(
                f"symmetries: {s.name!r} names {missing}, not in model.named_parameters(); "
                "use the names it lists (a tied weight appears once, under its first name)."
            )
    as_call(inputs)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        value = make_loss(model, inputs, targets, loss_fn)(params)
    if not isinstance(value, torch.Tensor) or value.ndim != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"loss_fn: must return a scalar tensor, got {shape}; use reduction='mean' or 'sum'."
        )
    generator = torch.Generator().manual_seed(seed)
    points = [params] + [perturbed(params, perturb_scale, generator) for _ in range(n_perturb)]
    where = f"real + {n_perturb} perturbed points (seed {seed})"
    real = _defects(model, symmetries, points, inputs, targets, loss_fn, seed)
    large = [s for s in symmetries if real[s.name] and max(real[s.name]) > tol]
    shrunk_model = shrink_norm_eps(model) if large else None
    shrunk = (
        _defects(shrunk_model, large, points, inputs, targets, loss_fn, seed)
        if shrunk_model is not None
        else {}
    )
    out = []
    for s in symmetries:
        if not real[s.name]:
            note = f"not verified: zero gradient on its parameters at all {len(points)} points"
            out.append(dataclasses.replace(s, verified=None, defect=None, note=_join(s.note, note)))
            continue
        d = max(real[s.name])
        if d <= tol:
            ok, note = True, f"verified: defect {d:.1e} <= tol {tol:.0e} over {where}"
        elif shrunk.get(s.name):
            d0 = max(shrunk[s.name])
            ok = d0 <= tol and d <= eps_tol
            verdict = "verified (approximate)" if ok else "FAILED"
            note = (
                f"{verdict}: defect {d:.1e} (eps_tol {eps_tol:.0e}); {d0:.1e} with normalization "
                f"eps x{EPS_SHRINK:.0e} (tol {tol:.0e}), over {where}"
            )
        else:
            ok, note = False, f"FAILED: defect {d:.1e} > tol {tol:.0e} over {where}"
        out.append(dataclasses.replace(s, verified=ok, defect=d, note=_join(s.note, note)))
    return out


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)
