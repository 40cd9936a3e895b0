"""Charges of layer-level symmetries from per-tensor statistics, with the exact decomposition of
their change (docs/theory.md §3 and §3.1; Kunin et al., "Neural Mechanics", ICLR 2021; Tanaka &
Kunin,
"Noether's Learning Dynamics", NeurIPS 2021).

Every layer-level charge is a signed sum over the parameter tensors of the symmetry, so one
(n_symmetries x n_tensors) sign matrix S turns a (n_tensors,) vector of per-tensor reductions
into the (n_symmetries,) vector of charges. With q_n the parameters before update n, dq_n the
update, g_n the gradient and G the metric of the update, the per-tensor statistics are the
columns of :data:`STATS`:

====== =====================  ====== =====================
QQ     |q_n|^2                DD     |dq_n|^2
QS     sum(q_n)               DQ     <q_n, dq_n>
GG     |g_n|^2                DS     sum(dq_n)
GQ     <g_n, q_n>             GDD    <G dq_n, dq_n>
GS     sum(g_n)               GDQ    <G dq_n, q_n>
NUMEL  number of entries      GDS    sum(G dq_n)
IG     sum(1 / G_ii)
====== =====================  ====== =====================

For scale and rescale (Q = <q, xi(q)>), exactly:
``Q_{n+1} - Q_n = 2 <q_n, dq_n>_xi + |dq_n|^2_xi = decay + rule + ksb`` with
``decay = -2 sum_A eta lambda |q_A|^2``, ``rule = 2<q_n, dq_n>_xi - decay`` and
``ksb = |dq_n|^2_xi`` (the finite-step kinetic symmetry breaking). For translation (Q = <q, 1>):
``Q_{n+1} - Q_n = <dq_n, 1> = decay + rule`` with ``decay = -sum_A eta lambda <q_A, 1>`` and
``ksb = 0``. The NLD charge is ``C = m <G q', xi> = ((1 + beta)/2) <G dq, xi>`` and its kinetic
breaking term ``d_s T = m |q'|^2_{G, xi}`` (0 for translation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from noether_dyn.quantities.effective_rate import FAMILIES, effective_rate
from noether_dyn.records import CHARGE_COLUMNS, COL, S_, STATS
from noether_dyn.symmetries.kinds import kind_of
from noether_dyn.symmetries.symmetry import Symmetry

__all__ = ["COL", "STATS", "S_", "ChargeMatrix"]


class ChargeMatrix:
    """The sign matrix of a list of symmetries over the monitor's parameter tensors, and the
    charge rows of each symmetry by its kind (:mod:`noether_dyn.symmetries.kinds`).

    Args:
        symmetries: the symmetries, each naming parameters in ``index``.
        index: parameter name -> position in the monitor's tensor list.
        device: where the per-tensor statistics live.
        family: the optimizer family (``OptimizerAdapter.family``) whose effective rate
            (:func:`~noether_dyn.quantities.effective_rate.effective_rate`) fills the
            ``effective_lr`` column of normalized kinds: eta/((1 - beta) r^2) for SGD(M),
            eta/r for Adam, eta/((1 - beta) r) for RMSprop, eta/r for Adagrad.

    Attributes:
        signs: (n_symmetries, n_tensors) float64, the generator's sign on each tensor (0 off it).
        kinds: per symmetry, its :class:`~noether_dyn.symmetries.kinds.Kind`.
        linear: (n_symmetries,) bool, True for kinds whose charge is linear in q (translation).
        lead: per symmetry, the position of its first tensor (whose param group gives the
            symmetry's eta, beta, lambda for predictions and effective rates).
        tensors: sorted positions of every tensor some symmetry touches.
        sum_tensors: sorted positions of tensors of symmetries whose kind reads plain sums
            (QS, GS, DS, GDS: translation).
    """

    def __init__(
        self,
        symmetries: Sequence[Symmetry],
        index: dict[str, int],
        device: torch.device,
        family: str = "sgd",
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
        self.family = family
        n_t = len(set(index.values()))
        self.symmetries = list(symmetries)
        self.kinds = [kind_of(s.kind) for s in self.symmetries]
        signs = torch.zeros(len(self.symmetries), max(n_t, 1), dtype=torch.float64)
        self.lead: list[int] = []
        for i, sym in enumerate(self.symmetries):
            for name, sign in zip(sym.params, sym.signs):
                signs[i, index[name]] = sign
            self.lead.append(index[sym.params[0]])
        self.signs = signs[:, :n_t].to(device)
        self.lead_index = torch.tensor(self.lead, dtype=torch.long).to(device)
        self.linear_flags = [k.linear for k in self.kinds]
        self.linear = torch.tensor(self.linear_flags, dtype=torch.bool, device=device)
        touched = signs.abs().sum(0) > 0
        self.tensors = [int(i) for i in torch.nonzero(touched[:n_t]).flatten()]
        sum_rows = [i for i, k in enumerate(self.kinds) if k.stats & _SUMS]
        sum_touched = signs[sum_rows].abs().sum(0) > 0 if sum_rows else touched & False
        self.sum_tensors = [int(i) for i in torch.nonzero(sum_touched[:n_t]).flatten()]
        self._blocks = []  # per kind: (kind, its rows, its rows of the sign matrix, its leads)
        for kind in dict.fromkeys(self.kinds):
            rows = [i for i, k in enumerate(self.kinds) if k is kind]
            at = torch.tensor(rows, dtype=torch.long).to(device)
            self._blocks.append((kind, at, self.signs[at], self.lead_index[at]))

    def __len__(self) -> int:
        return len(self.symmetries)

    def charges(self, qq: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
        """Q per symmetry from per-tensor |q|^2 and sum(q), each (n_tensors,)."""
        x = {"QQ": qq, "QS": qs}
        out = torch.zeros(len(self), dtype=torch.float64, device=self.signs.device)
        for kind, at, signs, _ in self._blocks:
            out = out.index_copy(0, at, kind.charge(signs, x))
        return out

    def rows(
        self,
        stats: torch.Tensor,
        eta: torch.Tensor,
        lam: torch.Tensor,
        beta: torch.Tensor,
    ) -> torch.Tensor:
        """The (n_symmetries, len(CHARGE_COLUMNS)) float64 rows of one logged step, the
        ``predicted`` column 0.

        Args:
            stats: (n_tensors, len(STATS)) per-tensor statistics of the step.
            eta, lam, beta: (n_tensors,) rate, weight decay and momentum of each tensor's group.
        """
        x = {name: stats[:, i] for name, i in S_.items()}
        half_m = (1.0 + beta) / 2.0  # m / eta
        out = torch.zeros(len(self), len(CHARGE_COLUMNS), dtype=torch.float64, device=stats.device)
        for kind, at, signs, lead in self._blocks:
            cols = kind.columns(signs, x, eta, lam, half_m, (eta[lead], beta[lead]))
            g_xi, xi_sq = cols.pop("g_xi"), cols.pop("xi_sq")
            cols["defect"] = g_xi.abs() / torch.sqrt((signs.abs() @ x["GG"]) * xi_sq)
            cols["grad_sq"] = signs @ x["GG"]
            # docs/theory.md §4 by family: the direction's rate from r^2 = |q_A|^2
            if kind.normalized:
                cols["effective_lr"] = effective_rate(
                    self.family, eta[lead], signs.abs() @ x["QQ"], beta[lead]
                )
            zero = torch.zeros_like(g_xi)
            nan = torch.full_like(g_xi, float("nan"))
            block = torch.stack(
                [cols.get(c, nan if c in _OPTIONAL else zero) for c in CHARGE_COLUMNS], dim=1
            )
            out = out.index_copy(0, at, block)
        return out


_SUMS = frozenset({"QS", "GS", "DS", "GDS"})
_OPTIONAL = ("predicted_ode", "effective_lr", "angular_update")
"""Columns a kind may leave out (NaN for it); the others it leaves out are 0 (``predicted``)."""
