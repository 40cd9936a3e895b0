"""Rescale symmetry: f(a q_A1, q_A2 / a) = f (a positively homogeneous activation between two
layers); xi = (+q_A1, -q_A2), Q = |q_A1|^2 - |q_A2|^2 (Kunin et al., "Neural Mechanics", 2021)."""

from __future__ import annotations

from noether_dyn.symmetries.kinds.base import Quadratic


class Rescale(Quadratic):
    name = "rescale"
