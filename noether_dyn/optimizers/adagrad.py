"""Adagrad: G = diag(sqrt(sum g^2) + eps), no momentum (docs/theory.md §2).

The rate of step k is ``lr / (1 + (k - 1) lr_decay)``, read from the optimizer's step counter.
"""

from __future__ import annotations

import torch

from noether_dyn.optimizers.base import (
    FusedStep,
    GroupHyper,
    Metric,
    OptimizerAdapter,
    scalar,
)
from noether_dyn.optimizers.rmsprop import preconditioned_step


class AdagradAdapter(OptimizerAdapter):
    name = "adagrad"
    family = "adagrad"
    metric_name = "G = diag(sqrt(sum g^2) + eps)"
    optimizers = (torch.optim.Adagrad,)

    def hyper(self, optimizer: torch.optim.Optimizer, group: dict) -> GroupHyper:
        lr = scalar(group["lr"])
        lr_decay = float(group.get("lr_decay", 0.0))
        if lr_decay:
            step = 0.0
            for p in group["params"]:
                state = optimizer.state.get(p)
                if state and "step" in state:
                    step = scalar(state["step"])
                    break
            lr = lr / (1.0 + step * lr_decay)  # the coming step is number step + 1
        return GroupHyper(
            lr=lr,
            beta=0.0,
            weight_decay=scalar(group.get("weight_decay", 0.0)),
            decoupled=False,
        )

    def metric(
        self, optimizer: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]
    ) -> Metric:
        eps = float(group["eps"])
        out = []
        for p in params:
            state = optimizer.state.get(p)
            if not state or "sum" not in state:
                out.append(torch.ones_like(p))
                continue
            out.append(state["sum"].sqrt().add_(eps))
        return out

    def can_reconstruct(self, group: dict) -> bool:
        return not group.get("lr_decay", 0.0)

    def fused_step(
        self,
        optimizer: torch.optim.Optimizer,
        group: dict,
        params: list[torch.Tensor],
        device: torch.device,
        eager: bool = False,
    ) -> FusedStep | None:
        if not self.can_reconstruct(group):
            return None
        states = [optimizer.state.get(p) for p in params]
        if not all(st and "sum" in st for st in states):
            return None
        return preconditioned_step(group, [(st["sum"],) for st in states], device)
