"""The :class:`Symmetry` record: one continuous symmetry of the loss on named parameters.

A symmetry is a one-parameter family psi_s(q) with f(psi_s(q)) = f(q); its generator is
xi(q) = d psi_s / ds at s = 0 (docs/theory.md §3; Kunin et al., "Neural Mechanics", ICLR 2021).
noether-dyn handles the three families of that table, at layer level (the union of the
per-channel groups of one layer):

=============  =============================  ==========================================
kind           generator xi on its params     gradient-flow charge Q
=============  =============================  ==========================================
``scale``      q_A                            |q_A|^2
``rescale``    (+q_A1, -q_A2)                 |q_A1|^2 - |q_A2|^2
``translation``  1_A                          <q_A, 1>
=============  =============================  ==========================================

Each parameter of a symmetry carries a sign (+1 or -1): the generator is ``sign * q`` for scale
and rescale, ``sign * 1`` for translation. That makes every layer-level charge a signed sum of
per-tensor reductions, which is how the monitor computes them in one stacked reduction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Real

import numpy as np
import torch

from noether_dyn.symmetries.kinds import kind_names, kind_of

KINDS = kind_names()
"""The built-in kinds (more can be registered: :mod:`noether_dyn.symmetries.kinds`)."""


@dataclass(frozen=True)
class Symmetry:
    """A continuous symmetry of the loss, on parameters named as in ``model.named_parameters()``.

    Args:
        name: unique name in the run, e.g. ``"scale:layer1.conv"``.
        kind: ``"scale"``, ``"rescale"`` or ``"translation"``.
        params: parameter names the generator acts on.
        signs: one sign (+1.0 or -1.0) per parameter; defaults to all +1 (scale, translation).
            For rescale the incoming weights and bias are +1 and the outgoing weights -1.
        verified: True/False when checked numerically, None when not checked.
        defect: the largest measured symmetry defect |<g, xi>| / (|g| |xi|) (dimensionless),
            None when not checked.
        note: free text on how it was found or why it failed.
        exactness: ``"exact"`` (defect at the level of float rounding), ``"approximate"`` (broken
            only by a normalization's eps: the defect falls to rounding when eps is shrunk), or
            ``""`` when not verified.
        parent: for a per-unit symmetry (``find_symmetries(..., granularity="unit")``), the name
            of the layer-level symmetry it refines (whose charge is the sum of its units'
            charges); ``""`` for a layer-level one.
        slices: one entry per parameter, ``None`` for the whole tensor or ``(dim, index)`` for
            the slice ``q.select(dim, index)`` the generator acts on (zero elsewhere in that
            tensor); ``()`` (the default) is every tensor whole.

    To declare your own symmetry, build one and pass ``watch(..., symmetries=[...])``::

        Symmetry("scale:fc1", "scale", ("fc1.weight", "fc1.bias"))
    """

    name: str
    kind: str
    params: tuple[str, ...]
    signs: tuple[float, ...] = ()
    verified: bool | None = None
    defect: float | None = None
    note: str = field(default="", compare=False)
    exactness: str = field(default="", compare=False)
    parent: str = ""
    slices: tuple[tuple[int, int] | None, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise (ValueError if isinstance(self.name, str) else TypeError)(
                f"Symmetry: name must be a non-empty string, got {self.name!r}."
            )
        if not isinstance(self.kind, str) or self.kind not in kind_names():
            raise (ValueError if isinstance(self.kind, str) else TypeError)(
                f"Symmetry {self.name!r}: kind must be one of {kind_names()}, got {self.kind!r}."
            )
        # one name given as a str is that one parameter, never its characters
        params = (self.params,) if isinstance(self.params, str) else self.params
        if not isinstance(params, (list, tuple)) or not all(
            isinstance(n, str) and n for n in params
        ):
            raise TypeError(
                f"Symmetry {self.name!r}: params must be a tuple of parameter names (str), got "
                f"{self.params!r}."
            )
        params = tuple(params)
        if not params:
            raise ValueError(f"Symmetry {self.name!r}: params is empty; name at least one.")
        if len(set(params)) != len(params):
            raise ValueError(f"Symmetry {self.name!r}: params repeat a name: {params}.")
        object.__setattr__(self, "params", params)
        if not isinstance(self.signs, (list, tuple)) or not all(map(_is_real, self.signs)):
            raise TypeError(
                f"Symmetry {self.name!r}: signs must be a tuple of numbers (+1.0 or -1.0), got "
                f"{self.signs!r}."
            )
        signs = tuple(float(s) for s in self.signs) if self.signs else (1.0,) * len(params)
        if len(signs) != len(params):
            raise ValueError(
                f"Symmetry {self.name!r}: {len(signs)} signs for {len(params)} params; "
                "give one sign per parameter."
            )
        if any(s not in (1.0, -1.0) for s in signs):
            raise ValueError(f"Symmetry {self.name!r}: signs must be +1 or -1, got {signs}.")
        object.__setattr__(self, "signs", signs)
        if self.verified is not None and not isinstance(self.verified, (bool, np.bool_)):
            raise TypeError(
                f"Symmetry {self.name!r}: verified must be True, False or None, got "
                f"{self.verified!r}."
            )
        if self.verified is not None:
            object.__setattr__(self, "verified", bool(self.verified))
        if self.defect is not None and not _is_real(self.defect):
            raise TypeError(
                f"Symmetry {self.name!r}: defect must be a float or None, got {self.defect!r}."
            )
        object.__setattr__(self, "slices", _check_slices(self.name, self.slices, len(params)))
        for field_name in ("note", "exactness", "parent"):
            if not isinstance(getattr(self, field_name), str):
                raise TypeError(
                    f"Symmetry {self.name!r}: {field_name} must be a str, got "
                    f"{getattr(self, field_name)!r}."
                )

    def generator(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """xi(q) on exactly ``self.params``: ``sign * q`` (scale, rescale) or ``sign * 1``
        (translation). Same shapes and dtypes as the inputs."""
        missing = [n for n in self.params if n not in params]
        if missing:
            raise KeyError(f"Symmetry {self.name!r}: no tensor given for {missing}.")
        kind = kind_of(self.kind)
        out = {n: kind.generator(params[n], s) for n, s in zip(self.params, self.signs)}
        for name, where in zip(self.params, self.slices):
            if where is not None:
                mask = torch.zeros_like(out[name])
                mask.select(*where).fill_(1.0)
                out[name] = out[name] * mask
        return out

    @property
    def is_unit(self) -> bool:
        """Whether the generator acts on a slice of some tensor (a per-unit symmetry)."""
        return any(w is not None for w in self.slices)

    def charge(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The gradient-flow charge Q: <q, xi(q)> for scale and rescale, <q, xi> = signed sum
        of entries for translation (docs/theory.md §3 table). A 0-dim tensor."""
        xi = self.generator(params)
        return sum((params[n] * xi[n]).sum() for n in self.params)


def _check_slices(name: str, slices: object, n_params: int) -> tuple:
    """``slices`` as a tuple of None or (dim, index) int pairs, one per parameter (``()`` stays
    ``()``: every tensor whole)."""
    if not isinstance(slices, (list, tuple)):
        raise TypeError(f"Symmetry {name!r}: slices must be a tuple, got {slices!r}.")
    if not slices:
        return ()
    if len(slices) != n_params:
        raise ValueError(
            f"Symmetry {name!r}: {len(slices)} slices for {n_params} params; give one (None or "
            "(dim, index)) per parameter."
        )
    out: list[tuple[int, int] | None] = []
    for where in slices:
        if where is None:
            out.append(None)
            continue
        if (
            not isinstance(where, (list, tuple))
            or len(where) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in where)
        ):
            raise ValueError(
                f"Symmetry {name!r}: each slice is None or (dim, index) with non-negative ints, "
                f"got {where!r}."
            )
        out.append((int(where[0]), int(where[1])))
    return tuple(out) if any(w is not None for w in out) else ()


def _is_real(value: object) -> bool:
    """A real number that is not a bool (numpy and 0-d torch numbers included)."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_))
