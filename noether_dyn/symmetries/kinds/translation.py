"""Translation symmetry: f(q_A + a 1) = f(q_A) (logits into a softmax); xi = 1_A, Q = <q_A, 1>
(Kunin et al., "Neural Mechanics", 2021). Linear in q: ``Q_{n+1} - Q_n = <dq_n, 1> = decay + rule``
with ``decay = -sum_A eta lambda <q_A, 1>`` and no kinetic breaking."""

from __future__ import annotations

import torch

from noether_dyn.symmetries.kinds.base import Kind


class Translation(Kind):
    name = "translation"
    linear = True
    stats = frozenset({"QS", "GS", "DS", "GDS"})

    def generator(self, q: torch.Tensor, sign: float) -> torch.Tensor:
        return torch.full_like(q, sign)

    def charge(self, signs: torch.Tensor, x):
        return signs @ x["QS"]

    def columns(self, signs, x, eta, lam, half_m, lead):
        decay = -(signs @ (eta * lam * x["QS"]))
        zero = torch.zeros(signs.shape[0], dtype=signs.dtype, device=signs.device)
        return {
            "charge": signs @ x["QS"],
            "decay": decay,
            "rule": signs @ x["DS"] - decay,
            "ksb": zero,
            "nld_charge": signs @ (half_m * x["GDS"]),
            "nld_ksb": zero,
            "g_xi": signs @ x["GS"],
            "xi_sq": signs.abs() @ x["NUMEL"],
        }
