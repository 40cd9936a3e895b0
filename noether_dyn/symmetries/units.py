"""Per-unit symmetries: one conservation law per hidden unit, channel or head-input column.

A layer-level symmetry of :mod:`noether_dyn.symmetries.symmetry` is the sum of finer ones
(Kunin et al., "Neural Mechanics", ICLR 2021, §3; Marcotte, Gribonval & Peyré, "Abide by the law
and follow the flow: conservation laws for gradient flows", NeurIPS 2023):

* rescale: a ReLU unit j is invariant under ``(w_in[j], b[j], w_out[:, j]) -> (a w_in[j],
  a b[j], w_out[:, j] / a)``, so each hidden unit has its own charge
  ``|w_in[j]|^2 + b[j]^2 - |w_out[:, j]|^2``. The incoming tensors (sign +1) are split along
  dim 0 (output units of a Linear or Conv), the outgoing ones (sign -1) along dim 1 (their
  input units).
* translation: softmax is invariant under adding a constant to every logit, so each input column
  j of the head, ``w[:, j] -> w[:, j] + c 1``, and the bias, ``b -> b + c 1``, are separate laws
  with charges ``sum_i w[i, j]`` and ``sum_i b[i]``.
* scale: a BatchNorm channel makes each output row of the weights feeding it scale-invariant
  (``per_channel_scale=True``); a LayerNorm makes only the whole layer so, which is why scale is
  split only on request.

For a 6-8-8-4 ReLU MLP trained with cross-entropy that is 16 rescale laws (MGP's count: one per
hidden neuron, and no others for ReLU networks) and 9 translation laws (8 head columns and the
bias); ``analysis/per_unit_laws.py`` checks both counts numerically.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from noether_dyn.symmetries._calls import Inputs, call_model
from noether_dyn.symmetries.kinds import kind_of
from noether_dyn.symmetries.symmetry import Symmetry

GRANULARITIES = ("layer", "unit")
"""``find_symmetries``/``watch`` granularity: one symmetry per layer, or also one per unit."""

UNIT_TOL = 1e-8
"""Largest per-unit defect |<g, xi_u>| / (|g_u| |xi_u|) accepted as rounding when the gradients
are float64 (the layer-level float64 tolerance of :mod:`~noether_dyn.symmetries.verify`)."""

UNIT_EPS_TOL = 1e-2
"""Largest per-unit defect accepted for the units of an eps-approximate (normalization) parent."""

MAX_AXIS_CHOICES = 64
"""At most this many combinations of unit axes are tried per layer-level symmetry."""


def check_granularity(granularity: object) -> str:
    """``granularity`` itself when it is one of :data:`GRANULARITIES`; ValueError otherwise."""
    if not isinstance(granularity, str) or granularity not in GRANULARITIES:
        raise ValueError(f"granularity: must be one of {GRANULARITIES}, got {granularity!r}.")
    return granularity


@dataclass(frozen=True)
class UnitPart:
    """One slice of a parameter: ``param.select(dim, index)``, or the whole tensor when ``dim``
    is None; ``sign`` is the generator's sign there (+1 or -1)."""

    param: str
    dim: int | None
    index: int
    sign: float


@dataclass(frozen=True)
class UnitSymmetry:
    """A per-unit symmetry: its generator acts on ``parts`` only.

    name: e.g. ``"rescale:fc2.weight[3]"``. kind: as :class:`Symmetry`. parent: the name of the
    layer-level symmetry it refines (the parent's charge is the sum of its units').
    """

    name: str
    kind: str
    parent: str
    parts: tuple[UnitPart, ...]

    def mask(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Signed 0/±1 masks, one per parameter the unit touches (same shapes as the params)."""
        out: dict[str, torch.Tensor] = {}
        for part in self.parts:
            m = out.setdefault(part.param, torch.zeros_like(params[part.param]))
            (m if part.dim is None else m.select(part.dim, part.index)).fill_(part.sign)
        return out

    def generator(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """xi(q): ``mask * q`` (scale, rescale) or ``mask`` (translation)."""
        masks = self.mask(params)
        if self.kind == "translation":
            return masks
        return {n: m * params[n] for n, m in masks.items()}

    def charge(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """<q, xi(q)> (quadratic) or <q, xi> (translation), a 0-dim tensor."""
        xi = self.generator(params)
        return sum((params[n] * x).sum() for n, x in xi.items())


def unit_symmetries(
    model: nn.Module, symmetries: Sequence[Symmetry], per_channel_scale: bool = False
) -> list[UnitSymmetry]:
    """Split layer-level ``symmetries`` of ``model`` into per-unit ones (module docstring).

    Args:
        model: the network (its ``named_parameters`` give the shapes).
        symmetries: layer-level records, e.g. from ``find_symmetries``.
        per_channel_scale: split scale symmetries per output channel (True when they come from
            BatchNorm/GroupNorm-per-channel; False keeps one unit per scale symmetry).

    Raises:
        ValueError: a rescale symmetry whose outgoing tensors do not have as many input units as
            the incoming ones have output units (e.g. a flatten between them).
    """
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out: list[UnitSymmetry] = []
    for sym in symmetries:
        missing = [n for n in sym.params if n not in shapes]
        if missing:
            raise ValueError(f"symmetry {sym.name!r}: {missing} are not parameters of the model.")
        if sym.kind == "rescale":
            out.extend(_rescale_units(sym, shapes))
        elif sym.kind == "translation":
            out.extend(_translation_units(sym, shapes))
        elif per_channel_scale:
            out.extend(_split(sym, shapes, lambda n, s: 0, "scale"))
        else:
            parts = tuple(UnitPart(n, None, 0, s) for n, s in zip(sym.params, sym.signs))
            out.append(UnitSymmetry(sym.name, sym.kind, sym.name, parts))
    return out


def _split(sym, shapes, dim_of, label) -> list[UnitSymmetry]:
    dims = {n: dim_of(n, s) for n, s in zip(sym.params, sym.signs)}
    sizes = {n: shapes[n][d] if len(shapes[n]) > d else 1 for n, d in dims.items()}
    if len(set(sizes.values())) != 1:
        detail = ", ".join(f"{n}: {sizes[n]} along dim {dims[n]}" for n in sym.params)
        raise ValueError(
            f"symmetry {sym.name!r}: its tensors disagree on the number of units ({detail}); "
            "per-unit splitting needs the unit axis to match (no flatten or reshape between)."
        )
    (n_units,) = set(sizes.values())
    first = sym.params[0]
    units = []
    for j in range(n_units):
        parts = tuple(UnitPart(n, dims[n], j, s) for n, s in zip(sym.params, sym.signs))
        units.append(UnitSymmetry(f"{label}:{first}[{j}]", sym.kind, sym.name, parts))
    return units


def _rescale_units(sym: Symmetry, shapes) -> list[UnitSymmetry]:
    return _split(sym, shapes, lambda n, s: 0 if s > 0 else 1, "rescale")


def _translation_units(sym: Symmetry, shapes) -> list[UnitSymmetry]:
    units = []
    for n, s in zip(sym.params, sym.signs):
        if len(shapes[n]) >= 2:
            for j in range(shapes[n][1]):
                part = (UnitPart(n, 1, j, s),)
                units.append(UnitSymmetry(f"translation:{n}[:, {j}]", sym.kind, sym.name, part))
        else:
            part = (UnitPart(n, None, 0, s),)
            units.append(UnitSymmetry(f"translation:{n}", sym.kind, sym.name, part))
    return units


class UnitCharges:
    """All per-unit charges from one reduction per (parameter, unit axis) and one sign-matrix
    product (no per-unit Python loop per step).

    Args:
        units: from :func:`unit_symmetries`.
        params: name -> tensor (only shapes are read).

    ``signs``: (n_units, n_slots) float64 sparse-in-practice sign matrix over the concatenated
    per-axis reductions.
    """

    def __init__(self, units: Sequence[UnitSymmetry], params: Mapping[str, torch.Tensor]) -> None:
        self.units = list(units)
        self.keys: list[tuple[str, int | None]] = []
        offsets: dict[tuple[str, int | None], int] = {}
        total = 0
        for u in self.units:
            for part in u.parts:
                key = (part.param, part.dim)
                if key not in offsets:
                    offsets[key] = total
                    self.keys.append(key)
                    total += 1 if part.dim is None else params[part.param].shape[part.dim]
        self.signs = torch.zeros(len(self.units), total, dtype=torch.float64)
        for i, u in enumerate(self.units):
            for part in u.parts:
                self.signs[i, offsets[(part.param, part.dim)] + part.index] = part.sign
        self.linear = torch.tensor([u.kind == "translation" for u in self.units])

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(n_units,) float64 charges: quadratic (scale, rescale) or linear (translation);
        differentiable in ``params`` (pass detached tensors for plain values)."""
        return torch.where(self._linear(params), self.sums(params), self.inner(params, params))

    def inner(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(n_units,) signed inner products ``<a, b>_S`` over each unit's slices, e.g.
        ``inner(q, dq)`` and ``inner(dq, dq)`` for the per-unit split
        ``Q_{n+1} - Q_n = 2 <q, dq>_S + |dq|^2_S``."""
        return self.signs.to(self._device(a)) @ torch.cat(
            [self._reduce(a[n].to(torch.float64) * b[n].to(torch.float64), d) for n, d in self.keys]
        )

    def sums(self, a: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(n_units,) signed sums ``<a, 1>_S`` over each unit's slices (translation charges and
        their changes)."""
        return self.signs.to(self._device(a)) @ torch.cat(
            [self._reduce(a[n].to(torch.float64), d) for n, d in self.keys]
        )

    @staticmethod
    def _reduce(t: torch.Tensor, dim: int | None) -> torch.Tensor:
        if dim is None:
            return t.sum().reshape(1)
        other = [d for d in range(t.dim()) if d != dim]
        return t.sum(other) if other else t

    def _device(self, a: Mapping[str, torch.Tensor]) -> torch.device:
        return a[self.keys[0][0]].device if self.keys else self.signs.device

    def _linear(self, a: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.linear.to(self._device(a))


# --------------------------------------------------------------------------------------------
# Per-unit symmetries as Symmetry records (slices), with the split decided numerically.


def axis_choices(sym: Symmetry, shapes: Mapping[str, tuple[int, ...]]) -> list[list[Symmetry]]:
    """The candidate splits of a layer-level symmetry into per-unit :class:`Symmetry` records
    (``slices`` set, ``parent`` = ``sym.name``, named ``"<parent>[j]"`` for unit j of a rescale
    or scale, ``"<parent>:<param>[:, j]"``, ``"<parent>:<param>[j]"`` or ``"<parent>:<param>"``
    for translation), most plausible first; ``[]`` when it has no
    finer split (a single unit, an unknown kind, or tensors without a common unit axis).

    * rescale: the units are the entries of dim 0 of the first +1 (incoming) tensor; every other
      tensor is cut along dim 0 or dim 1, whichever has that size (both tried when both do: the
      outgoing weights of a square layer, attention's q/k pair cut along dim 0 on both sides).
    * scale: one unit per entry of dim 0 of every tensor (a BatchNorm channel).
    * translation: one unit per column (dim 1) of each 2-D tensor (a softmax head: adding c
      to column j of its weight moves every logit by c x_j), else per row (dim 0: an embedding
      whose rows feed a mean-centering norm), plus each 1-D tensor whole.
    """
    if sym.is_unit or sym.kind not in ("rescale", "scale", "translation"):
        return []
    if sym.kind == "translation":
        if any(len(shapes[n]) > 2 for n in sym.params):
            return []
        per_tensor = [(1, 0) if len(shapes[n]) == 2 else (None,) for n in sym.params]
        out = []
        for combo in itertools.islice(itertools.product(*per_tensor), MAX_AXIS_CHOICES):
            units: list[Symmetry] = []
            for name, sign, dim in zip(sym.params, sym.signs, combo):
                if dim is None:
                    units.append(Symmetry(f"{sym.name}:{name}", "translation", (name,),
                                          (sign,), parent=sym.name))  # fmt: skip
                    continue
                label = "[:, {}]" if dim == 1 else "[{}]"
                units += [
                    Symmetry(f"{sym.name}:{name}{label.format(j)}", "translation", (name,),
                             (sign,), parent=sym.name, slices=((dim, j),))
                    for j in range(shapes[name][dim])
                ]  # fmt: skip
            if len(units) > 1:
                out.append(units)
        return out
    first = next((n for n, s in zip(sym.params, sym.signs) if s > 0), sym.params[0])
    if not shapes[first]:
        return []
    n_units = shapes[first][0]
    axes: list[list[int]] = []
    for name, sign in zip(sym.params, sym.signs):
        shape = shapes[name]
        fits = [d for d in (0, 1) if d < len(shape) and shape[d] == n_units]
        if sym.kind == "scale" or name == first:
            fits = [d for d in fits if d == 0]
        elif sign < 0:
            fits.sort(key=lambda d: -d)  # outgoing weights: their input axis first
        if not fits:
            return []
        axes.append(fits)
    if n_units < 2:
        return []
    out = []
    for combo in itertools.islice(itertools.product(*axes), MAX_AXIS_CHOICES):
        out.append(
            [
                Symmetry(f"{sym.name}[{j}]", sym.kind, sym.params, sym.signs,
                         parent=sym.name, slices=tuple((d, j) for d in combo))
                for j in range(n_units)
            ]
        )  # fmt: skip
    return out


def unit_defects(
    units: Sequence[Symmetry],
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
) -> torch.Tensor:
    """(n_units,) float64 defects |<g, xi_u>| / (|g_u| |xi_u|) at one point (NaN where g_u or
    xi_u is zero), g_u being g on the unit's slices: every unit's value from one per-axis
    reduction of g xi, g^2 and xi^2 per (tensor, axis), not one pass per unit."""
    cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def reduced(kind: str, name: str, sign: float, dim: int | None) -> tuple[torch.Tensor, ...]:
        key = (kind, name, sign, dim)
        if key not in cache:
            q = params[name].detach().double()
            g = grads.get(name)
            g = torch.zeros_like(q) if g is None else g.detach().double()
            xi = kind_of(kind).generator(q, sign)
            cache[key] = tuple(slice_sums(t, dim) for t in (g * xi, g * g, xi * xi))
        return cache[key]

    n = len(units)
    dot = torch.zeros(n, dtype=torch.float64)
    gg = torch.zeros(n, dtype=torch.float64)
    xx = torch.zeros(n, dtype=torch.float64)
    for i, u in enumerate(units):
        slices = u.slices or (None,) * len(u.params)
        for name, sign, where in zip(u.params, u.signs, slices):
            d, j = (None, 0) if where is None else where
            a, b, c = reduced(u.kind, name, sign, d)
            dot[i] += a[j]
            gg[i] += b[j]
            xx[i] += c[j]
    norm = torch.sqrt(gg * xx)
    return torch.where(norm > 0, dot.abs() / norm, torch.full_like(norm, math.nan))


def slice_sums(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Sums of ``t`` over every dim but ``dim``: (t.shape[dim],); the whole sum as (1,) for
    ``dim=None``."""
    if dim is None:
        return t.sum().reshape(1)
    other = [d for d in range(t.dim()) if d != dim]
    return t.sum(other) if other else t


def choose_units(
    symmetries: Sequence[Symmetry],
    shapes: Mapping[str, tuple[int, ...]],
    samples: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor | None]]],
    tol: float = UNIT_TOL,
    eps_tol: float = UNIT_EPS_TOL,
) -> list[Symmetry]:
    """The layer-level ``symmetries`` followed, after each, by its per-unit symmetries: for each
    parent the first split of :func:`axis_choices` whose every unit has a defect within ``tol``
    (``eps_tol`` for the units of an eps-approximate parent: so marked, or verified with a
    defect above ``tol``) at every sample; a parent no split
    passes keeps no units (its note says so). Without samples (``[]``) the first split is taken
    unverified (``verified=None``).

    Args:
        symmetries: layer-level records (already verified or not).
        shapes: parameter name -> shape.
        samples: (parameters, their loss gradient) pairs, name -> tensor; every unit's defect
            is read from the same few gradients (:func:`unit_defects`).
    """
    out: list[Symmetry] = []
    for sym in symmetries:
        choices = axis_choices(sym, shapes) if all(n in shapes for n in sym.params) else []
        if not choices:
            out.append(sym)
            continue
        if not samples:
            out.append(sym)
            out += choices[0]
            continue
        # an eps-approximate parent (so marked, or verified with a defect above rounding)
        approximate = sym.exactness == "approximate" or (
            sym.verified and sym.defect is not None and sym.defect > tol
        )
        limit = eps_tol if approximate else tol
        for units in choices:
            values = torch.stack([unit_defects(units, q, g) for q, g in samples])
            seen = ~torch.isnan(values)
            worst = torch.where(seen, values, torch.zeros_like(values)).amax(0)
            if bool((worst <= limit).all()):
                out.append(sym)
                for u, d, ok in zip(units, worst.tolist(), seen.any(0).tolist()):
                    note = (
                        f"unit of {sym.name}: defect {d:.1e} <= {limit:.0e} over "
                        f"{len(samples)} gradient(s)"
                        if ok
                        else f"unit of {sym.name}: zero gradient on it at every point"
                    )
                    out.append(dataclasses.replace(
                        u, verified=True if ok else None, defect=d if ok else None,
                        exactness=("exact" if d <= tol else "approximate") if ok else "",
                        note=note,
                    ))  # fmt: skip
                break
        else:
            note = "no per-unit split: every split's units break the symmetry"
            out.append(dataclasses.replace(sym, note="; ".join(x for x in (sym.note, note) if x)))
    return out


def split_units(
    model: nn.Module,
    symmetries: Sequence[Symmetry],
    inputs: Inputs,
    targets: Any = None,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    *,
    n_perturb: int = 1,
    seed: int = 0,
) -> list[Symmetry]:
    """:func:`choose_units` with gradients of the loss taken on ``inputs`` in a float64 copy of
    ``model``, at the real parameters and ``n_perturb`` seeded perturbations of them (one
    ``torch.func.grad`` per point, shared by every unit). The loss is
    ``loss_fn(model(inputs), targets)``, else the model's own ``loss`` output (HF models given
    ``labels``); without either the splits come back unverified (structure only). The model
    (parameters, buffers, RNG state) is left unchanged.
    """
    from noether_dyn.symmetries.verify import perturbed

    checked = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in checked.named_parameters()}
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    sub_inputs, sub_targets = _float64(inputs), _float64(targets)

    def loss(p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = call_model(checked, p, sub_inputs)
        if loss_fn is not None:
            return loss_fn(out, sub_targets)
        value = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if value is None:
            raise LookupError("the model returns no loss and no loss_fn was given")
        return value

    generator = torch.Generator().manual_seed(seed)
    points = [params] + [perturbed(params, 0.1, generator) for _ in range(n_perturb)]
    samples = []
    try:
        with torch.random.fork_rng(devices=[]):
            for i, q in enumerate(points):
                torch.manual_seed(seed + i)
                samples.append((q, torch.func.grad(loss)(q)))
    except LookupError:
        samples = []
    return choose_units(symmetries, shapes, samples)


def _float64(v: Any) -> Any:
    """``v`` with every floating tensor (in tuples, lists, mappings) in float64."""
    if isinstance(v, torch.Tensor):
        return v.double() if v.is_floating_point() else v
    if isinstance(v, (tuple, list)):
        return type(v)(_float64(x) for x in v)
    if isinstance(v, Mapping):
        return {k: _float64(x) for k, x in v.items()}
    return v


def units_at_step(
    symmetries: Sequence[Symmetry], names: Sequence[str], params: Sequence[torch.Tensor]
) -> list[Symmetry]:
    """:func:`choose_units` on one training step's real gradients (``p.grad`` of ``params``,
    named ``names``), with the rounding tolerance of the parameters' dtype (zero-config
    detection at the first optimizer step, ``watch(..., granularity="unit")``)."""
    from noether_dyn.symmetries.verify import DEFAULT_TOL

    named = dict(zip(names, params))
    shapes = {n: tuple(p.shape) for n, p in named.items()}
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    sample = ({n: p.detach() for n, p in named.items()}, {n: p.grad for n, p in named.items()})
    return choose_units(symmetries, shapes, [sample], tol=DEFAULT_TOL.get(dtype, 1e-4))
