"""RMSprop, plain or centered, with or without momentum: G = diag(sqrt(v) + eps) (THEORY.md §2).

Centered RMSprop preconditions with sqrt(v - gbar^2) + eps, gbar the running mean gradient.
beta is the optional heavy-ball momentum applied to the preconditioned gradient.
"""

from __future__ import annotations

import torch

from noether_dyn.optimizers.base import (
    GroupHyper,
    Metric,
    OptimizerAdapter,
    Update,
    grads_of,
    scalar,
)


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

    def can_reconstruct(self, group: dict) -> bool:
        return True

    def update(
        self, optimizer: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]
    ) -> Update:
        """With momentum q <- q - lr b; without, q <- q - lr (g + lambda q_n) / G, solved for
        dq = -lr (g + lambda q_{n+1}) / (G - lr lambda)."""
        lr = scalar(group["lr"])
        wd = scalar(group.get("weight_decay", 0.0))
        metric = self.metric(optimizer, group, params)
        if scalar(group.get("momentum", 0.0)):
            bufs = [optimizer.state[p]["momentum_buffer"] for p in params]
            return torch._foreach_mul(bufs, -lr), metric
        return _preconditioned_step(
            lr, wd, grads_of(params, group.get("maximize", False)), params, metric
        ), metric


def _preconditioned_step(
    lr: float,
    wd: float,
    grads: list[torch.Tensor],
    params: list[torch.Tensor],
    metric: list[torch.Tensor],
) -> list[torch.Tensor]:
    """dq of ``q <- q - lr (g + wd q_n) / G``: -lr (g + wd q_{n+1}) / (G - lr wd)."""
    if wd:
        num = torch._foreach_add(grads, params, alpha=wd)
        den = torch._foreach_sub(metric, lr * wd)
    else:
        num, den = grads, metric
    out = torch._foreach_div(num, den)
    torch._foreach_mul_(out, -lr)
    return out
