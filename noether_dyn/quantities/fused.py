"""All per-tensor statistics of a logged step in one compiled program (Inductor).

The eager path (:mod:`noether_dyn.capture.eager`) runs the same rules tensor by tensor, forms dq
and G as tensors and then reads them again for every statistic
(:mod:`noether_dyn.quantities.reductions`): 10 to 25 passes over parameter-sized memory per
logged step. Here each optimizer family states its update as an elementwise *rule*
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

import contextlib
import itertools
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

from noether_dyn.records import COEF_WIDTH, STATS, Rule

__all__ = ["COEF_WIDTH", "MAX_VARIANTS", "Rule", "StatsProgram", "tensor_stats"]


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


MAX_VARIANTS = 8
"""Compiled variants one program keeps (a new dtype, shape or layout of an input compiles one
more); a call that matches none of them once this many exist runs eagerly."""


class _Variant(NamedTuple):
    layout: tuple  # (n_params, state lengths, the inputs' tree spec)
    check: Callable[[list[torch.Tensor]], bool]
    fn: Callable[..., list[torch.Tensor]]
    out_spec: object


class StatsProgram:
    """The compiled statistics of one monitor's tensors, for a fixed list of rules.

    Args:
        rules: one rule per tensor, in the monitor's tensor order.
        translation: per tensor, whether a translation symmetry touches it.
        symmetric: per tensor, whether any symmetry touches it.
        rows: a :class:`~noether_dyn.quantities.step_rows.StepRows` to compile into the same
            program (None when the statistics must first be reduced over ranks).
        compile: compile (False runs the same program eagerly, for tests).

    Calling it with the parameters, gradients, state tuples, the (n_tensors, COEF_WIDTH)
    coefficient matrix and a tuple of further inputs for ``rows`` returns the
    (n_tensors, len(STATS)) float64 statistics and ``rows(stats, *inputs)`` (or None without
    ``rows``).

    The program is traced (``make_fx``) and compiled by Inductor once per input signature
    (``torch._inductor.standalone_compile``); a call checks its inputs' dtypes, devices, shapes
    and strides against the compiled variants and compiles a new one on a mismatch, as
    ``torch.compile``'s guards would, without the per-call cost of its wrappers (about 0.2 ms
    per call on a CPU right after an optimizer step). Where that API is missing, it falls back
    to ``torch.compile``.
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
        code = _entry.__code__.replace(co_name="noether_dyn_fused_stats")
        self._entry = types.FunctionType(code, _entry.__globals__, code.co_name, (*self.key, rows))
        self._compile = compile
        self._variants: list[_Variant] = []
        self._dynamo: Callable | None = None
        if compile and getattr(_inductor(), "standalone_compile", None) is None:
            self._dynamo = torch.compile(
                self._entry, dynamic=False, fullgraph=True, options=_OPTIONS
            )

    @property
    def variants(self) -> int:
        """How many compiled variants the program holds."""
        return len(self._variants)

    def __call__(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[tuple[torch.Tensor, ...]],
        coef: torch.Tensor,
        inputs: tuple = (),
    ) -> tuple[torch.Tensor, tuple | None]:
        if not self._compile:
            return self._entry(params, grads, states, coef, inputs)
        if self._dynamo is not None:
            with _quiet_tf32():
                return self._dynamo(params, grads, states, coef, inputs)
        flat, layout = _call_layout(params, grads, states, coef, inputs)
        variant = self._find(flat, layout)
        if variant is None:
            if len(self._variants) >= MAX_VARIANTS:
                return self._entry(params, grads, states, coef, inputs)
            variant = self._build(flat, layout, (params, grads, states, coef, inputs))
            self._variants.append(variant)
        return _unflatten(variant.out_spec, iter(variant.fn(*flat)))

    def has_variant(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[tuple[torch.Tensor, ...]],
        coef: torch.Tensor,
        inputs: tuple = (),
    ) -> bool:
        """Whether a call with these inputs runs without compiling (always True where programs
        are not compiled variant by variant)."""
        if not self._compile or self._dynamo is not None:
            return True
        flat, layout = _call_layout(params, grads, states, coef, inputs)
        return self._find(flat, layout) is not None

    def build(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[tuple[torch.Tensor, ...]],
        coef: torch.Tensor,
        inputs: tuple = (),
    ) -> bool:
        """Compile the variant for these inputs' signature without running it (a no-op when it
        exists); False where programs are only compiled by running them (``compile=False``, or
        the ``torch.compile`` fallback). :meth:`prepare` and its compile, in one thread."""
        compile_ = self.prepare(params, grads, states, coef, inputs)
        return compile_()

    def prepare(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[tuple[torch.Tensor, ...]],
        coef: torch.Tensor,
        inputs: tuple = (),
    ) -> Callable[[], bool]:
        """Trace the variant for these inputs' signature now, and return the compile of the
        traced graph, which may run in another thread while the training goes on: it reads only
        the inputs' dtypes, devices, shapes and strides and writes to none of them. The compile
        returns True once the variant exists (at once when it already does), False where
        programs are only compiled by running them (``compile=False``, or the ``torch.compile``
        fallback) or when ``MAX_VARIANTS`` are built.

        The trace must run in the training thread: FX tracing patches process-wide state (among
        others ``nn.Module.__call__`` and ``__getattr__``) while it runs, so a trace in another
        thread races with the training's own module calls (measured: a background trace of
        Adam's program failed inside the rule in 4 of 11 runs while another monitor stepped)."""
        if not self._compile or self._dynamo is not None:
            return lambda: False
        flat, layout = _call_layout(params, grads, states, coef, inputs)
        if self._find(flat, layout) is not None:
            return lambda: True
        if len(self._variants) >= MAX_VARIANTS:
            return lambda: False
        graph, out_spec = self._trace(flat, (params, grads, states, coef, inputs))
        check = _input_check(flat)

        def compile_() -> bool:
            self._variants.append(_Variant(layout, check, _compile(graph, flat), out_spec))
            return True

        return compile_

    def _find(self, flat: list[torch.Tensor], layout: tuple) -> _Variant | None:
        """The compiled variant for this signature, None when there is none yet."""
        return next((v for v in self._variants if v.layout == layout and v.check(flat)), None)

    def _build(self, flat: list[torch.Tensor], layout: tuple, args: tuple) -> _Variant:
        """Trace and compile the program for the signature of ``flat`` (``args`` flattened)."""
        graph, out_spec = self._trace(flat, args)
        return _Variant(layout, _input_check(flat), _compile(graph, flat), out_spec)

    def _trace(self, flat: list[torch.Tensor], args: tuple) -> tuple[Any, object]:
        """The program traced on ``flat`` (``make_fx``: an FX graph of aten calls) and the spec
        of its outputs."""
        arg_spec = _flatten(args, [])
        out_spec = None

        def flat_entry(*leaves: torch.Tensor) -> list[torch.Tensor]:
            nonlocal out_spec
            out: list[torch.Tensor] = []
            out_spec = _flatten(self._entry(*_unflatten(arg_spec, iter(leaves))), out)
            return out

        with torch.no_grad(), _quiet_tf32():
            from torch.fx.experimental.proxy_tensor import make_fx

            graph = make_fx(flat_entry)(*flat)
        return graph, out_spec


_OPTIONS = {"cpp_wrapper": True}


def _compile(graph: Any, flat: list[torch.Tensor]) -> Callable[..., Any]:
    """Inductor's standalone compile of a traced program for the signature of ``flat``."""
    with torch.no_grad(), _quiet_tf32():
        return _inductor().standalone_compile(
            graph,
            list(flat),
            dynamic_shapes="from_example_inputs",
            options={"config_patches": _OPTIONS},
        )


def _call_layout(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[tuple[torch.Tensor, ...]],
    coef: torch.Tensor,
    inputs: tuple,
) -> tuple[list[torch.Tensor], tuple]:
    """A call's inputs flattened in the program's argument order, and its layout (tensor count,
    state count per slot, the spec of ``inputs``): what picks a compiled variant."""
    leaves: list[torch.Tensor] = []
    spec = _flatten(inputs, leaves)
    flat = [*params, *grads, *itertools.chain.from_iterable(states), coef, *leaves]
    return flat, (len(params), tuple(map(len, states)), spec)


def _inductor():
    """``torch._inductor``, imported on the first program built (about a second of import time
    that ``import noether_dyn`` does not pay)."""
    import torch._inductor

    return torch._inductor


_LEAF = 0


def _flatten(tree: object, leaves: list[torch.Tensor]) -> object:
    """Appends the tensors of a nest of tuples, lists and None to ``leaves``; returns its
    structure, hashable and comparable (a few microseconds, where torch's general pytree takes
    tens)."""
    if isinstance(tree, torch.Tensor):
        leaves.append(tree)
        return _LEAF
    if tree is None:
        return None
    if type(tree) in (tuple, list):
        return (type(tree), tuple(_flatten(item, leaves) for item in tree))
    raise TypeError(f"the fused program takes tensors, tuples, lists and None, got {tree!r}")


def _unflatten(spec: object, leaves: Iterator[torch.Tensor]) -> Any:
    if spec is None:
        return None
    if spec == _LEAF:
        return next(leaves)
    kind, items = spec
    return kind(_unflatten(item, leaves) for item in items)


@contextlib.contextmanager
def _quiet_tf32():
    """Tracing reads the TF32 setting, which warns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TensorFloat32.*")
        yield


def _signature(flat: list[torch.Tensor]) -> tuple:
    return tuple((t.dtype, t.device, t.shape, t.stride(), t.requires_grad) for t in flat)


def _input_check(flat: list[torch.Tensor]) -> Callable[[list[torch.Tensor]], bool]:
    """A check that inputs match ``flat``'s dtypes, devices, shapes and strides: dynamo's
    C++ tensor check where this torch has it (a few microseconds for 50 tensors), else the same
    comparison in Python."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        guards = TensorGuards(
            *flat,
            dynamic_dims_sizes=[list(t.shape) for t in flat],
            dynamic_dims_strides=[list(t.stride()) for t in flat],
        )
        if guards.check(*flat):
            return lambda inputs: guards.check(*inputs)
    except Exception:  # a torch without it, or with another signature
        pass
    expected = _signature(flat)
    return lambda inputs: _signature(inputs) == expected
