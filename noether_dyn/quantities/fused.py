"""All per-tensor statistics of a logged step in one compiled program (``torch.compile``).

The eager path (:mod:`noether_dyn.quantities.reductions`) forms the update dq and the metric G as
tensors and then reads them again for every statistic: 10 to 25 passes over parameter-sized
memory per logged step. Here each optimizer family states its update as an elementwise *rule*
``rule(q1, g, state, c) -> (dq, G)`` of the parameter after the step q1, its gradient g, the
optimizer's state tensors and a row c of per-tensor coefficients (float64, shape (COEF_WIDTH,))
(returning also 1/G where it formed it, so that no entry is divided twice),
and :class:`StatsProgram` compiles rule and statistics together, so that Inductor emits one loop
per tensor that reads q1, g and the state once and accumulates every statistic of
:data:`~noether_dyn.quantities.charges.STATS` in float64 (the products of float32 entries are
exact in float64). q_n is solved as ``q1 - dq``, like the eager rebuilt path does.

G is returned as a tensor shaped like q1 (a diagonal metric) or as a 0-d tensor (G = c I).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Sequence

import torch

from noether_dyn.quantities.charges import STATS

COEF_WIDTH = 6
"""Columns of the per-tensor coefficient matrix a rule reads (unused columns hold 0)."""

Rule = Callable[
    [torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
]
"""``rule(q1, g, state, c) -> (dq, G, 1/G or None)``."""


def tensor_stats(
    q1: torch.Tensor,
    g: torch.Tensor,
    dq: torch.Tensor,
    metric: torch.Tensor,
    inverse: torch.Tensor | None,
    translation: bool,
    symmetric: bool,
) -> torch.Tensor:
    """The statistics of one tensor, a float64 vector of shape (len(STATS),) in STATS order.

    ``translation`` adds the plain sums (QS, GS, DS, GDS), ``symmetric`` the inner products with
    q_n (GQ, DQ, GDQ); both are static (known when the program is built), and the columns they
    leave out are 0, as on the eager path."""
    f64 = torch.float64
    q0 = q1 - dq
    x, y, u = q0.to(f64), g.to(f64), dq.to(f64)
    zero = torch.zeros((), dtype=f64, device=q1.device)
    dd = (u * u).sum()
    isotropic = metric.dim() == 0
    if isotropic:
        c = metric.to(f64)
        gdd = c * dd
        ig = q1.numel() / c
    else:
        w = (metric * dq).to(f64)
        gdd = (w * u).sum()
        ig = (metric.reciprocal() if inverse is None else inverse).to(f64).sum()
    if symmetric:
        gq = (y * x).sum()
        dqq = (u * x).sum()
        gdq = c * dqq if isotropic else (w * x).sum()
    else:
        gq = dqq = gdq = zero
    if translation:
        qs, gs, ds = x.sum(), y.sum(), u.sum()
        gds = c * ds if isotropic else w.sum()
    else:
        qs = gs = ds = gds = zero
    numel = torch.full((), float(q1.numel()), dtype=f64, device=q1.device)
    values = {
        "QQ": (x * x).sum(),
        "QS": qs,
        "GG": (y * y).sum(),
        "GQ": gq,
        "GS": gs,
        "NUMEL": numel,
        "DD": dd,
        "DQ": dqq,
        "DS": ds,
        "GDD": gdd,
        "GDQ": gdq,
        "GDS": gds,
        "IG": ig,
    }
    return torch.stack([values[k] for k in STATS])


def _program(
    rules: Sequence[Rule],
    translation: Sequence[bool],
    symmetric: Sequence[bool],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[tuple[torch.Tensor, ...]],
    coef: torch.Tensor,
) -> torch.Tensor:
    rows = []
    for k, rule in enumerate(rules):
        dq, metric, inverse = rule(params[k], grads[k], states[k], coef[k])
        rows.append(
            tensor_stats(params[k], grads[k], dq, metric, inverse, translation[k], symmetric[k])
        )
    return torch.stack(rows)


def _entry(params, grads, states, coef, inputs, rules=(), translation=(), symmetric=(), rows=None):
    stats = _program(rules, translation, symmetric, params, grads, states, coef)
    return stats, (None if rows is None else rows(stats, *inputs))


class StatsProgram:
    """The compiled statistics of one monitor's tensors, for a fixed list of rules.

    Args:
        rules: one rule per tensor, in the monitor's tensor order.
        translation: per tensor, whether a translation symmetry touches it.
        symmetric: per tensor, whether any symmetry touches it.
        rows: a :class:`~noether_dyn.quantities.step_rows.StepRows` to compile into the same
            program (None when the statistics must first be reduced over ranks).
        compile: compile with ``torch.compile`` (False runs the same program eagerly, for tests).

    Calling it with the parameters, gradients, state tuples, the (n_tensors, COEF_WIDTH)
    coefficient matrix and a tuple of further inputs for ``rows`` returns the
    (n_tensors, len(STATS)) float64 statistics and ``rows(stats, *inputs)`` (or None without
    ``rows``).
    Each program gets its own copy of the traced function, so that many monitors in one process
    never share (and never exhaust) one compile cache.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        translation: Sequence[bool],
        symmetric: Sequence[bool],
        rows: Callable | None = None,
        compile: bool = True,
    ) -> None:
        self.key = (tuple(rules), tuple(translation), tuple(symmetric))
        self._traced = False
        code = _entry.__code__.replace(co_name="noether_dyn_fused_stats")
        entry = types.FunctionType(code, _entry.__globals__, code.co_name, (*self.key, rows))
        self._fn = (
            torch.compile(entry, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
            if compile
            else entry
        )

    def __call__(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[tuple[torch.Tensor, ...]],
        coef: torch.Tensor,
        inputs: tuple = (),
    ) -> tuple[torch.Tensor, tuple | None]:
        if self._traced:
            return self._fn(params, grads, states, coef, inputs)
        with warnings.catch_warnings():  # tracing reads the TF32 setting, which warns
            warnings.filterwarnings("ignore", message=".*TensorFloat32.*")
            out = self._fn(params, grads, states, coef, inputs)
        self._traced = True
        return out
