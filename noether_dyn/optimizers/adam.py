"""Adam and AdamW: G = diag(sqrt(v_hat) + eps), v_hat = v / (1 - beta2^k) (THEORY.md §2).

beta = beta1 is the momentum of the Lagrangian. With ``amsgrad`` the running maximum of v is the
one that preconditions the step. AdamW (or Adam with ``decoupled_weight_decay=True``) applies
``q <- q (1 - eta lambda)``: a friction on q, not a term of the potential.
"""

from __future__ import annotations

import math

import torch

from noether_dyn.optimizers.base import (
    GroupHyper,
    Metric,
    OptimizerAdapter,
    Update,
    scalar,
    solve_decay,
    step_count,
)


class AdamAdapter(OptimizerAdapter):
    name = "adam"
    metric_name = "G = diag(sqrt(v_hat) + eps)"
    optimizers = (torch.optim.Adam, torch.optim.AdamW)

    def hyper(self, optimizer: torch.optim.Optimizer, group: dict) -> GroupHyper:
        decoupled = bool(group.get("decoupled_weight_decay", False)) or isinstance(
            optimizer, torch.optim.AdamW
        )
        return GroupHyper(
            lr=scalar(group["lr"]),
            beta=scalar(group["betas"][0]),
            weight_decay=scalar(group.get("weight_decay", 0.0)),
            decoupled=decoupled,
        )

    def metric(
        self, optimizer: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]
    ) -> Metric:
        beta2 = scalar(group["betas"][1])
        eps = float(group["eps"])
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        out = []
        for p in params:
            state = optimizer.state.get(p)
            if not state or key not in state:
                out.append(torch.ones_like(p))
                continue
            step = step_count(state)
            bc2_sqrt = (
                torch.sqrt(1.0 - beta2**step)
                if isinstance(step, torch.Tensor)
                else math.sqrt(1.0 - beta2**step)
            )
            out.append(state[key].sqrt().div_(bc2_sqrt).add_(eps))
        return out

    def can_reconstruct(self, group: dict) -> bool:
        return True

    def update(
        self, optimizer: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]
    ) -> Update:
        """q <- q (1 - lr lambda) [decoupled] - (lr / bc1) m / G, with G the metric."""
        hyper = self.hyper(optimizer, group)
        beta1 = scalar(group["betas"][0])
        metric = self.metric(optimizer, group, params)
        step = []
        for p, denom in zip(params, metric):
            state = optimizer.state[p]
            k = step_count(state)
            bc1 = 1.0 - beta1**k
            step.append(torch.div(state["exp_avg"], denom).mul_(-hyper.lr / bc1))
        if hyper.decoupled:
            return solve_decay(hyper.lr, hyper.weight_decay, step, params), metric
        return step, metric  # coupled L2 is inside m already
