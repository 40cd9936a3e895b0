"""What a symmetry kind is: its generator, the statistics it reads, its charge and the exact split
of the charge's change, and how the theory predicts it (docs/theory.md §3, §3.1-3.3).

A kind acts on signed tensors: the generator on a tensor q_A with sign s_A is ``xi_A(q_A)``, and
every charge is a signed sum over the symmetry's tensors, so that the charge of every symmetry of
a kind is one product of its rows of the sign matrix S (or |S| = A) with a per-tensor statistic
(:data:`noether_dyn.records.STATS`). ``columns`` returns, for the kind's symmetries, the stored
charge columns (:data:`noether_dyn.records.CHARGE_COLUMNS`) that depend on the kind, plus
``g_xi`` = <g, xi> and ``xi_sq`` = |xi|^2, from which the charge matrix forms the defect.
"""

from __future__ import annotations

from typing import ClassVar

import torch

Stats = dict[str, torch.Tensor]
"""Per-tensor statistics by name, each (n_tensors,) float64."""


class Kind:
    """One family of symmetries. Subclasses set the class attributes and implement the methods.

    Attributes:
        name: the ``Symmetry.kind`` string.
        linear: the charge is linear in q (``Q = <q, xi>`` with xi constant): it decays at first
            order in eta lambda, has no kinetic breaking and no forcing in the prediction
            (docs/theory.md §3.2-3.3); else it is quadratic (``Q = <q, xi(q)>``, xi linear in q).
        stats: the per-tensor statistics its columns read beyond QQ, GG, DD and GDD.
        normalized: the layer's output is normalized (scale invariance): docs/theory.md §4 reads its
            charge r^2 = |q_A|^2 as the accumulator of an adaptive rule.
    """

    name: ClassVar[str] = ""
    linear: ClassVar[bool] = False
    stats: ClassVar[frozenset[str]] = frozenset()
    normalized: ClassVar[bool] = False

    def generator(self, q: torch.Tensor, sign: float) -> torch.Tensor:
        """xi on one tensor (same shape and dtype as ``q``)."""
        raise NotImplementedError

    def charge(self, signs: torch.Tensor, x: Stats) -> torch.Tensor:
        """Q per symmetry of this kind from the per-tensor statistics (``signs``: its rows)."""
        raise NotImplementedError

    def columns(
        self,
        signs: torch.Tensor,
        x: Stats,
        eta: torch.Tensor,
        lam: torch.Tensor,
        half_m: torch.Tensor,
        lead: tuple[torch.Tensor, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The kind's columns of a logged step, per symmetry of this kind.

        Args:
            signs: (n_kind, n_tensors) its rows of the sign matrix.
            x: the step's per-tensor statistics.
            eta, lam, half_m: (n_tensors,) rate, weight decay and m / eta = (1 + beta) / 2 of
                each tensor's group.
            lead: (eta, beta) of each symmetry's lead tensor, (n_kind,) each.
        Returns ``charge``, ``decay``, ``rule``, ``ksb``, ``nld_charge``, ``nld_ksb``, ``g_xi``,
        ``xi_sq`` and optionally ``effective_lr`` and ``angular_update`` (NaN when absent).
        """
        raise NotImplementedError


class Quadratic(Kind):
    """Q = <q, xi(q)> with xi_A = s_A q_A (scale, rescale): ``Q_{n+1} - Q_n = decay + rule + ksb``
    with ``decay = -2 sum_A s_A eta lambda |q_A|^2``, ``rule = 2 <q_n, dq_n>_xi - decay`` and
    ``ksb = |dq_n|^2_xi``; NLD charge ``m <G q', xi>``, its kinetic breaking ``m |q'|^2_{G,xi}``."""

    stats = frozenset({"GQ", "DQ", "GDQ"})

    def generator(self, q: torch.Tensor, sign: float) -> torch.Tensor:
        return q * sign

    def charge(self, signs: torch.Tensor, x: Stats) -> torch.Tensor:
        return signs @ x["QQ"]

    def columns(self, signs, x, eta, lam, half_m, lead):
        decay = -2.0 * (signs @ (eta * lam * x["QQ"]))
        return {
            "charge": signs @ x["QQ"],
            "decay": decay,
            "rule": 2.0 * (signs @ x["DQ"]) - decay,
            "ksb": signs @ x["DD"],
            "nld_charge": signs @ (half_m * x["GDQ"]),
            "nld_ksb": signs @ (half_m / eta * x["GDD"]),
            "g_xi": signs @ x["GQ"],
            "xi_sq": signs.abs() @ x["QQ"],
        }
