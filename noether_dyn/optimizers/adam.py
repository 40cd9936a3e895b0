"""Adam and AdamW: G = diag(sqrt(v_hat) + eps), v_hat = v / (1 - beta2^k) (THEORY.md §2).

beta = beta1 is the momentum of the Lagrangian. With ``amsgrad`` the running maximum of v is the
one that preconditions the step. AdamW (or Adam with ``decoupled_weight_decay=True``) applies
``q <- q (1 - eta lambda)``: a friction on q, not a term of the potential.
"""

from __future__ import annotations

import math

import torch

from noether_dyn.optimizers.base import GroupHyper, Metric, OptimizerAdapter, scalar


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
            step = state["step"]
            if isinstance(step, torch.Tensor) and step.device.type != "cpu":
                bc2_sqrt = torch.sqrt(1.0 - beta2**step)
            else:
                bc2_sqrt = math.sqrt(1.0 - beta2 ** float(step))
            out.append(state[key].sqrt().div_(bc2_sqrt).add_(eps))
        return out
