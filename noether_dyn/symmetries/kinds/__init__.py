"""Symmetry kinds as plug-ins: the registry from a ``Symmetry.kind`` string to its :class:`Kind`.

Adding a kind: one new file here with a :class:`Kind` subclass, and one line in ``_BUILTIN``
below (or :func:`register` from outside the package). Everything downstream (the charge matrix,
the compiled statistics, the prediction, the monitor) reads the kind through :func:`kind_of`.
"""

from __future__ import annotations

from noether_dyn.symmetries.kinds.base import Kind, Quadratic
from noether_dyn.symmetries.kinds.rescale import Rescale
from noether_dyn.symmetries.kinds.scale import Scale
from noether_dyn.symmetries.kinds.translation import Translation

_BUILTIN: tuple[type[Kind], ...] = (
    Scale,
    Rescale,
    Translation,
)
_REGISTRY: dict[str, Kind] = {cls.name: cls() for cls in _BUILTIN}


def register(kind: Kind) -> Kind:
    """Make ``kind`` usable as ``Symmetry(..., kind.name, ...)``; returns it."""
    if not isinstance(kind, Kind) or not kind.name:
        raise TypeError("register: pass an instance of a Kind subclass that sets a name.")
    if kind.name in _REGISTRY and type(_REGISTRY[kind.name]) is not type(kind):
        raise ValueError(f"register: a kind named {kind.name!r} is already registered.")
    _REGISTRY[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a registered kind (built-in kinds cannot be removed)."""
    if name in {cls.name for cls in _BUILTIN}:
        raise ValueError(f"unregister: {name!r} is a built-in kind.")
    _REGISTRY.pop(name, None)


def kind_names() -> tuple[str, ...]:
    """The registered kinds' names, built-in first."""
    return tuple(_REGISTRY)


def normalized_kinds() -> tuple[str, ...]:
    """The names of the kinds of normalized (scale-invariant) layers (docs/theory.md §4)."""
    return tuple(name for name, kind in _REGISTRY.items() if kind.normalized)


def kind_of(name: str) -> Kind:
    """The registered kind named ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown symmetry kind {name!r}; registered: {kind_names()}. Register a new kind "
            "with noether_dyn.symmetries.kinds.register."
        ) from None


__all__ = [
    "Kind",
    "Quadratic",
    "kind_names",
    "kind_of",
    "normalized_kinds",
    "register",
    "unregister",
]
