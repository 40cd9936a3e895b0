"""What a logged step stores, computed from its per-tensor statistics (all on the device).

One function of the (n_tensors, len(STATS)) statistics and a (n_groups, len(HYPER_COLUMNS))
matrix of the step's constants, so that it can run eagerly or inside the compiled statistics
program (:mod:`noether_dyn.quantities.fused`) without a host round trip. The Lagrangian terms
follow docs/theory.md §2 (see :mod:`noether_dyn.quantities.lagrangian`), the charge rows §3
(:meth:`ChargeMatrix.rows`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from noether_dyn.quantities.charges import ChargeMatrix
from noether_dyn.quantities.lagrangian import kinetic_coefficients, l2_coefficients
from noether_dyn.quantities.theory import advance_charge
from noether_dyn.records import COL, S_, STATS, GroupHyper

HYPER_COLUMNS = ("kinetic", "l2", "lr", "decay_weight", "beta")
"""Per group: T / (dq^T G dq), V_L2 / |q|^2, eta, lambda (``GroupHyper.decay_weight``: a
decoupled decay's rate is torch's lr, without Adam's bias correction that eta carries), beta."""


def hyper_matrix(hypers: Sequence[GroupHyper], device: torch.device) -> torch.Tensor:
    """The (n_groups, len(HYPER_COLUMNS)) float64 constants of a step, copied without a sync."""
    values = [
        [k, l2, h.lr, h.decay_weight, h.beta]
        for k, l2, h in zip(kinetic_coefficients(hypers), l2_coefficients(hypers), hypers)
    ]
    matrix = torch.tensor(values, dtype=torch.float64).reshape(-1, len(HYPER_COLUMNS))
    return matrix.to(device, non_blocking=True)


class StepRows:
    """Turns a step's statistics into its stored rows, and rolls the charge prediction forward.

    Args:
        matrix: the symmetries' sign matrix over the tensors.
        group_index: (n_tensors,) long, each tensor's param group, on the device.
        n_groups: number of param groups.
        regime: the prediction regime (:data:`~noether_dyn.quantities.theory.REGIMES`).

    Calling it with ``stats`` (n_tensors, len(STATS)), ``hyper`` (n_groups, 5), the step's
    ``loss`` (a 0-d tensor of any float dtype, NaN when not logged) and ``prediction`` (the
    predictor's (value, velocity, constants, exact value or None) before the step, or None) returns
    ``(row, groups, charges, tensors, advanced)``: row (6,) = loss, L2 term of V, kinetic T,
    |q|, |g|, |dq| over all tensors; groups (n_groups, 2) = kinetic, L2 per group; charges
    (n_symmetries, len(CHARGE_COLUMNS)) with the prediction in its ``predicted`` (and
    ``predicted_ode``) column (0 and NaN without one), or None
    without symmetries; tensors (n_tensors, 5) = |q|^2, |g|^2, |dq|^2, dq^T G dq, mean 1/G_ii;
    advanced: the predictor's (value, velocity) after the step, or None.
    """

    def __init__(
        self,
        matrix: ChargeMatrix,
        group_index: torch.Tensor,
        n_groups: int,
        regime: str = "flow",
    ) -> None:
        self.matrix = matrix
        self.group_index = group_index
        self.n_groups = n_groups
        self.regime = regime

    def __call__(
        self,
        stats: torch.Tensor,
        hyper: torch.Tensor,
        loss: torch.Tensor,
        prediction: tuple | None = None,
    ) -> tuple[
        torch.Tensor,
        torch.Tensor,
        torch.Tensor | None,
        torch.Tensor,
        tuple[torch.Tensor, torch.Tensor] | None,
    ]:
        n_t = self.group_index.shape[0]  # per-unit slots follow the tensors' rows
        col = dict(zip(STATS, stats[:n_t].unbind(1)))  # one unbind, not a select per column
        per_tensor = hyper[self.group_index]
        zeros = torch.zeros(self.n_groups, dtype=torch.float64, device=stats.device)
        kinetic = zeros.index_add(0, self.group_index, per_tensor[:, 0] * col["GDD"])
        l2 = zeros.index_add(0, self.group_index, per_tensor[:, 1] * col["QQ"])
        row = torch.stack(
            [
                loss.to(torch.float64),
                l2.sum(),
                kinetic.sum(),
                col["QQ"].sum().sqrt(),
                col["GG"].sum().sqrt(),
                col["DD"].sum().sqrt(),
            ]
        )
        charges = advanced = None
        if len(self.matrix):
            eta, lam, beta = per_tensor[:, 2], per_tensor[:, 3], per_tensor[:, 4]
            charges = self.matrix.rows(stats, eta, lam, beta)
            if prediction is not None:
                value, velocity, constants, exact = prediction
                if exact is None:
                    charges[:, COL["predicted"]] = value
                else:  # the exact discrete prediction, and the continuous ODE beside it
                    charges[:, COL["predicted"]] = exact
                    charges[:, COL["predicted_ode"]] = value
                signs = self.matrix.signs
                advanced = advance_charge(
                    self.regime,
                    self.matrix.linear,
                    value,
                    velocity,
                    constants,
                    grad_sq=signs @ (self.matrix.expand(eta.square()) * stats[:, S_["GG"]]),
                    update_sq=signs @ stats[:, S_["DD"]],
                )
        tensors = torch.stack(
            [col["QQ"], col["GG"], col["DD"], col["GDD"], col["IG"] / col["NUMEL"]], dim=1
        )
        return row, torch.stack([kinetic, l2], dim=1), charges, tensors, advanced
