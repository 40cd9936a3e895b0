"""Verification on real training steps, for symmetries detected without a loss: the defect of
each symmetry from the gradients the training loop computed, and the drop rule of
:mod:`noether_dyn.symmetries.engine` applied to it. The capture layer calls these on the first
steps, before the optimizer's update."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch

from noether_dyn.symmetries.engine import EPS_TOL, Dropped
from noether_dyn.symmetries.symmetry import Symmetry
from noether_dyn.symmetries.verify import DEFAULT_TOL


def gradient_defects(
    symmetries: Sequence[Symmetry],
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
    *,
    floor: float | None = None,
) -> dict[str, float | None]:
    """The defect |<g, xi(q)>| / (|g_A| |xi_A|) of each symmetry at one training step.

    As in :func:`noether_dyn.symmetries.engine.detect`, a translation whose |g_A| is nonzero but
    at most ``floor`` (default: the rounding tolerance of the gradients' dtype) times |g| over
    every gradient given is measured against |g|: the loss depends on its tensors through
    rounding only (a bias before a train-mode BatchNorm).

    For the capture layer: call it with the parameters and the real gradients of the first steps
    (before the optimizer's update) and drop what :func:`judge_defects` rejects. Accumulated in
    float64. None for a symmetry whose gradient (or generator) is zero or missing at this step.

    Args:
        symmetries: the symmetries to check.
        params: ``{name: tensor}`` as in ``model.named_parameters()``.
        grads: ``{name: gradient}`` (``p.grad``), same names; None entries count as zero.
    """
    given = [g.detach() for g in grads.values() if g is not None]
    total = sum(float(g.double().pow(2).sum()) for g in given)
    if floor is None:
        floor = DEFAULT_TOL.get(given[0].dtype, 1e-4) if given else 0.0
    out: dict[str, float | None] = {}
    for s in symmetries:
        missing = [n for n in s.params if n not in params]
        if missing:
            raise KeyError(f"params: no tensor for {missing} of symmetry {s.name!r}.")
        xi = s.generator(params)
        dot = gg = xx = 0.0
        for n in s.params:
            g = grads.get(n)
            x = xi[n].detach().double()
            xx += float((x * x).sum())
            if g is None:
                continue
            g = g.detach().double()
            dot += float((g * x).sum())
            gg += float((g * g).sum())
        if s.kind == "translation" and 0 < gg <= floor**2 * total:
            gg = total
        out[s.name] = abs(dot) / math.sqrt(gg * xx) if gg > 0 and xx > 0 else None
    return out


def judge_defects(
    symmetries: Sequence[Symmetry],
    defects: Sequence[Mapping[str, float | None]],
    *,
    dtype: torch.dtype = torch.float32,
    eps_tol: float = EPS_TOL,
) -> tuple[list[Symmetry], list[Dropped]]:
    """Apply the drop rule to defects measured on real training steps (:func:`gradient_defects`).

    A symmetry is kept as exact when its largest defect is <= the rounding tolerance of ``dtype``
    (:data:`DEFAULT_TOL`), unless :func:`detect` found it eps-approximate (it stays approximate:
    in float32 the eps's break can be below rounding); kept as approximate when it is <=
    ``eps_tol`` and the symmetry was already known as eps-approximate
    (``exactness="approximate"`` from :func:`detect`: the eps check needs the shrunk-eps model,
    which training steps do not have); dropped otherwise.
    Symmetries with no defect measured (zero gradient at every step) are returned unchanged.

    Returns:
        (kept symmetries with ``verified``, ``defect`` and ``exactness`` set, dropped ones).
    """
    tol = DEFAULT_TOL.get(dtype, 1e-4)
    kept: list[Symmetry] = []
    dropped: list[Dropped] = []
    for s in symmetries:
        values = [d[s.name] for d in defects if d.get(s.name) is not None]
        if not values:
            kept.append(s)
            continue
        d = max(values)
        steps = f"over {len(values)} training steps"
        if d <= tol:  # an eps-approximate symmetry (detect's eps check) can be within rounding
            exactness = "approximate" if s.exactness == "approximate" else "exact"
            note = (
                f"verified {exactness} on training gradients: defect {d:.1e} <= tol {tol:.0e} "
                f"{steps}"
            )
            kept.append(_verified(s, d, exactness, note))
        elif s.exactness == "approximate" and d <= eps_tol:
            note = f"verified approximate on training gradients: defect {d:.1e} {steps}"
            kept.append(_verified(s, d, "approximate", note))
        else:
            rule = (
                f"defect {d:.1e} > tol {tol:.0e} (float rounding) on training gradients {steps}"
                + ("" if s.exactness != "approximate" else f" and > eps_tol {eps_tol:.0e}")
            )
            dropped.append(Dropped(s.name, s.kind, s.params, s.signs, d, rule))
    return kept, dropped


def _verified(s: Symmetry, d: float, exactness: str, note: str) -> Symmetry:
    joined = "; ".join(x for x in (s.note, note) if x)
    return dataclasses.replace(s, verified=True, defect=d, exactness=exactness, note=joined)
