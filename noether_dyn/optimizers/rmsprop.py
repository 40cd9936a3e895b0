"""RMSprop, plain or centered, with or without momentum: G = diag(sqrt(v) + eps) (THEORY.md §2).

Centered RMSprop preconditions with sqrt(v - gbar^2) + eps, gbar the running mean gradient.
beta is the optional heavy-ball momentum applied to the preconditioned gradient.
"""

from __future__ import annotations

import torch

from noether_dyn.optimizers.base import GroupHyper, Metric, OptimizerAdapter, scalar


class RMSpropAdapter(OptimizerAdapter):
    name = "rmsprop"
    metric_name = "G = diag(sqrt(v) + eps)"
    optimizers = (torch.optim.RMSprop,)

    def hyper(self, optimizer: torch.optim.Optimizer, group: dict) -> GroupHyper:
        return GroupHyper(
            lr=scalar(group["lr"]),
            beta=scalar(group.get("momentum", 0.0)),
            weight_decay=scalar(group.get("weight_decay", 0.0)),
            decoupled=False,
        )

    def metric(
        self, optimizer: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]
    ) -> Metric:
        eps = float(group["eps"])
        centered = bool(group.get("centered", False))
        out = []
        for p in params:
            state = optimizer.state.get(p)
            if not state or "square_avg" not in state:
                out.append(torch.ones_like(p))
                continue
            v = state["square_avg"]
            if centered:
                v = torch.addcmul(v, state["grad_avg"], state["grad_avg"], value=-1)
            out.append(v.sqrt().add_(eps))
        return out
