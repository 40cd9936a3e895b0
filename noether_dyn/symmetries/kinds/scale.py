"""Scale symmetry: f(a q_A) = f(q_A) for a > 0 (a layer feeding a normalization); xi = q_A,
Q = |q_A|^2 (Kunin et al., "Neural Mechanics", ICLR 2021). Its direction qhat = q / |q| turns by the
angle between q_n and q_{n+1} (``angular_update``); its effective rate, which depends on the
optimizer family, is formed by the charge matrix (``noether_dyn.quantities.effective_rate``)."""

from __future__ import annotations

import torch

from noether_dyn.symmetries.kinds.base import Quadratic


class Scale(Quadratic):
    name = "scale"
    normalized = True

    def columns(self, signs, x, eta, lam, half_m, lead):
        out = super().columns(signs, x, eta, lam, half_m, lead)
        a = signs.abs()
        norm_sq, cross, step_sq = a @ x["QQ"], a @ x["DQ"], a @ x["DD"]
        sine = torch.sqrt(torch.clamp(norm_sq * step_sq - cross.square(), min=0.0))
        out["angular_update"] = torch.atan2(sine, norm_sq + cross)
        return out
