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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from noether_dyn.symmetries.symmetry import Symmetry


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
