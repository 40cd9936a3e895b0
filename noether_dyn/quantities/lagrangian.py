"""The Lagrangian of a learning rule, per param group (docs/theory.md §2; Tanaka & Kunin 2021).

``L = e^{t/tau} (T - V)`` with ``T = (m/2) q'^T G q'``, ``q' = dq / eta``, ``m = eta (1 + beta)/2``,
so ``T = ((1 + beta) / (4 eta)) dq^T G dq``; ``V = loss + sum (lambda/2) |q|^2`` over the groups
whose decay is coupled (L2). The prefactor e^{t/tau} is never materialized: its logarithm t/tau
grows by ``eta / tau = 2 (1 - beta) / (1 + beta)`` per step.
"""

from __future__ import annotations

from collections.abc import Sequence

from noether_dyn.records import GroupHyper


def kinetic_coefficients(hypers: Sequence[GroupHyper]) -> list[float]:
    """Per group, T / (dq^T G dq) = (1 + beta) / (4 eta); NaN for a zero rate (T undefined)."""
    return [(1.0 + h.beta) / (4.0 * h.lr) if h.lr > 0 else float("nan") for h in hypers]


def l2_coefficients(hypers: Sequence[GroupHyper]) -> list[float]:
    """Per group, V_L2 / |q|^2 = lambda / 2 for coupled decay, 0 for decoupled (a friction)."""
    return [0.0 if h.decoupled else h.weight_decay / 2.0 for h in hypers]
