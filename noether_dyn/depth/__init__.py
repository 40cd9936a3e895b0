"""Depth dynamics: deep networks as integrators (docs/theory.md §5).

Public API: :class:`SymplecticNet`, :class:`EulerResNet`, :class:`TanhMLP`, :func:`profile`, the
training-stability diagnostic :func:`stability_profile` (with :class:`Residual` and
:class:`ResidualStack` to wrap your own residual blocks, and :func:`stable_step`), and
the two invariants :func:`adjoint_pairing` (conserved by every net) and :func:`symplectic_form`
(conserved by symplectic nets only).
"""

from noether_dyn.depth.nets import EulerResNet, SymplecticNet, TanhMLP
from noether_dyn.depth.profile import adjoint_pairing, profile, symplectic_form
from noether_dyn.depth.stability import Residual, ResidualStack, stability_profile, stable_step

__all__ = [
    "EulerResNet",
    "Residual",
    "ResidualStack",
    "SymplecticNet",
    "TanhMLP",
    "adjoint_pairing",
    "profile",
    "stability_profile",
    "stable_step",
    "symplectic_form",
]
