"""Charges of layer-level symmetries from per-tensor statistics, with the exact decomposition of
their change (THEORY.md §3 and §3.1; Kunin et al., "Neural Mechanics", ICLR 2021; Tanaka & Kunin,
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

from noether_dyn.records import CHARGE_COLUMNS, COL, S_, STATS
from noether_dyn.symmetries.symmetry import Symmetry

__all__ = ["COL", "STATS", "S_", "ChargeMatrix"]


class ChargeMatrix:
    """The sign matrix of a list of symmetries over the monitor's parameter tensors.

    Args:
        symmetries: the symmetries, each naming parameters in ``index``.
        index: parameter name -> position in the monitor's tensor list.
        device: where the per-tensor statistics live.

    Attributes:
        signs: (n_symmetries, n_tensors) float64, the generator's sign on each tensor (0 off it).
        translation: (n_symmetries,) bool, True for translation symmetries.
        scale: (n_symmetries,) bool, True for scale symmetries.
        lead: per symmetry, the position of its first tensor (whose param group gives the
            symmetry's eta, beta, lambda for predictions and effective rates).
        tensors: sorted positions of every tensor some symmetry touches.
        translation_tensors: sorted positions of tensors of translation symmetries.
    """

    def __init__(
        self, symmetries: Sequence[Symmetry], index: dict[str, int], device: torch.device
    ) -> None:
        n_t = len(set(index.values()))
        self.symmetries = list(symmetries)
        signs = torch.zeros(len(self.symmetries), max(n_t, 1), dtype=torch.float64)
        self.lead: list[int] = []
        for i, sym in enumerate(self.symmetries):
            for name, sign in zip(sym.params, sym.signs):
                signs[i, index[name]] = sign
            self.lead.append(index[sym.params[0]])
        self.signs = signs[:, :n_t].to(device)
        self.lead_index = torch.tensor(self.lead, dtype=torch.long).to(device)
        self.abs = self.signs.abs()
        self.translation = torch.tensor(
            [s.kind == "translation" for s in self.symmetries], dtype=torch.bool, device=device
        )
        self.scale = torch.tensor(
            [s.kind == "scale" for s in self.symmetries], dtype=torch.bool, device=device
        )
        touched = signs.abs().sum(0) > 0
        self.tensors = [int(i) for i in torch.nonzero(touched[:n_t]).flatten()]
        trans_rows = [i for i, s in enumerate(self.symmetries) if s.kind == "translation"]
        trans_touched = signs[trans_rows].abs().sum(0) > 0 if trans_rows else touched & False
        self.translation_tensors = [int(i) for i in torch.nonzero(trans_touched[:n_t]).flatten()]

    def __len__(self) -> int:
        return len(self.symmetries)

    def charges(self, qq: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
        """Q per symmetry from per-tensor |q|^2 and sum(q), each (n_tensors,)."""
        return torch.where(self.translation, self.signs @ qs, self.signs @ qq)

    def rows(
        self,
        stats: torch.Tensor,
        eta: torch.Tensor,
        lam: torch.Tensor,
        beta: torch.Tensor,
    ) -> torch.Tensor:
        """The (n_symmetries, len(CHARGE_COLUMNS)) float64 rows of one logged step.

        Args:
            stats: (n_tensors, len(STATS)) per-tensor statistics of the step.
            eta, lam, beta: (n_tensors,) rate, weight decay and momentum of each tensor's group.
        """
        S, A = self.signs, self.abs
        x = {name: stats[:, i] for name, i in S_.items()}
        trans = self.translation
        eta_lead, beta_lead = eta[self.lead_index], beta[self.lead_index]
        out = torch.zeros(len(self), len(CHARGE_COLUMNS), dtype=torch.float64, device=S.device)

        charge = torch.where(trans, S @ x["QS"], S @ x["QQ"])
        decay = torch.where(trans, -(S @ (eta * lam * x["QS"])), -2.0 * (S @ (eta * lam * x["QQ"])))
        first = torch.where(trans, S @ x["DS"], 2.0 * (S @ x["DQ"]))
        ksb = torch.where(trans, torch.zeros_like(charge), S @ x["DD"])
        half_m = (1.0 + beta) / 2.0  # m / eta
        nld_charge = torch.where(trans, S @ (half_m * x["GDS"]), S @ (half_m * x["GDQ"]))
        nld_ksb = torch.where(trans, torch.zeros_like(charge), S @ (half_m / eta * x["GDD"]))
        xi_sq = torch.where(trans, A @ x["NUMEL"], A @ x["QQ"])
        g_xi = torch.where(trans, S @ x["GS"], S @ x["GQ"])
        defect = g_xi.abs() / torch.sqrt((A @ x["GG"]) * xi_sq)

        norm_sq, cross, step_sq = A @ x["QQ"], A @ x["DQ"], A @ x["DD"]
        nan = torch.full_like(charge, float("nan"))
        effective_lr = torch.where(self.scale, eta_lead / ((1.0 - beta_lead) * norm_sq), nan)
        sine = torch.sqrt(torch.clamp(norm_sq * step_sq - cross.square(), min=0.0))
        angular = torch.where(self.scale, torch.atan2(sine, norm_sq + cross), nan)

        out[:, COL["charge"]] = charge
        out[:, COL["decay"]] = decay
        out[:, COL["rule"]] = first - decay
        out[:, COL["ksb"]] = ksb
        out[:, COL["defect"]] = defect
        out[:, COL["nld_charge"]] = nld_charge
        out[:, COL["nld_ksb"]] = nld_ksb
        out[:, COL["grad_sq"]] = S @ x["GG"]
        out[:, COL["effective_lr"]] = effective_lr
        out[:, COL["angular_update"]] = angular
        return out
