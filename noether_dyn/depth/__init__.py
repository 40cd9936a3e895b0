"""Depth dynamics: deep networks as integrators (THEORY.md §5).

Public API: :class:`SymplecticNet`, :class:`EulerResNet`, :class:`TanhMLP`, :func:`profile`, and
the two invariants :func:`adjoint_pairing` (conserved by every net) and :func:`symplectic_form`
(conserved by symplectic nets only).
"""

from noether_dyn.depth.nets import EulerResNet, SymplecticNet, TanhMLP
from noether_dyn.depth.profile import adjoint_pairing, profile, symplectic_form

__all__ = [
    "EulerResNet",
    "SymplecticNet",
    "TanhMLP",
    "adjoint_pairing",
    "profile",
    "symplectic_form",
]
