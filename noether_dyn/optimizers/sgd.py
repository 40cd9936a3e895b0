"""SGD with momentum, Nesterov, dampening and coupled weight decay: G = I (docs/theory.md §2).

Heavy ball ``b <- beta b + (1 - d)(g + lambda q)``, ``q <- q - eta b``. Dampening d scales the
force by (1 - d), which is the isotropic metric G = I / (1 - d) (docs/conventions.md); torch's
first step fills the buffer undamped (``b_0 = u_0``), so that step has G = I. Nesterov is the
same flow to first order in eta (Tanaka & Kunin 2021, §2), with the same m and tau.
"""

from __future__ import annotations

import torch

from noether_dyn.optimizers.base import (
    FusedStep,
    GroupHyper,
    Metric,
    OptimizerAdapter,
    coef_rows,
    coefficient,
    scalar,
)


def heavy_ball_rule(q1, g, state, c):
    """dq = c0 b (c0 = -lr, b the momentum buffer after the step); G = c1 I."""
    (buf,) = state
    return buf * coefficient(c, 0, buf.dtype), c[1], None


def direct_rule(q1, g, state, c):
    """Plain SGD or Nesterov with the decay solved for: dq = c0 g [+ c1 b] + c2 q1; G = c3 I."""
    dt = q1.dtype
    step = g * coefficient(c, 0, dt)
    if state:
        step.add_(state[0] * coefficient(c, 1, dt))
    return step.add_(q1 * coefficient(c, 2, dt)), c[3], None


class SGDAdapter(OptimizerAdapter):
    name = "sgd"
    family = "sgd"
    metric_name = "G = I / (1 - dampening); G = I on torch's undamped first step"
    optimizers = (torch.optim.SGD,)
    normalization = "l2"

    def __init__(self) -> None:
        self._first: dict[int, bool] = {}  # per group: the coming step is torch's first

    def hyper(self, optimizer: torch.optim.Optimizer, group: dict) -> GroupHyper:
        # read before each step: whether its buffers are still empty (the undamped first step)
        self._first[id(group)] = all(
            optimizer.state.get(p, {}).get("momentum_buffer") is None for p in group["params"]
        )
        return GroupHyper(
            lr=scalar(group["lr"]),
            beta=scalar(group.get("momentum", 0.0)),
            weight_decay=scalar(group.get("weight_decay", 0.0)),
            decoupled=False,
        )

    def metric(
        self, optimizer: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]
    ) -> Metric:
        dampening = scalar(group.get("dampening", 0.0))
        first = self._first.get(id(group), False)
        if dampening and scalar(group.get("momentum", 0.0)) and not first:
            return 1.0 / (1.0 - dampening)
        return None

    def can_reconstruct(self, group: dict) -> bool:
        return True

    def momentum_buffers(
        self, optimizer: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]
    ) -> list[torch.Tensor] | None:
        if not scalar(group.get("momentum", 0.0)):
            return None
        return [optimizer.state[p]["momentum_buffer"] for p in params]

    def fused_step(
        self,
        optimizer: torch.optim.Optimizer,
        group: dict,
        params: list[torch.Tensor],
        device: torch.device,
        eager: bool = False,
    ) -> FusedStep | None:
        lr = scalar(group["lr"])
        momentum = scalar(group.get("momentum", 0.0))
        wd = scalar(group.get("weight_decay", 0.0))
        metric = self.metric(optimizer, group, params)
        c_metric = 1.0 if metric is None else float(metric)
        if momentum and not group.get("nesterov", False):
            states = [(optimizer.state[p]["momentum_buffer"],) for p in params]
            return FusedStep(
                heavy_ball_rule, states, coef_rows([[-lr, c_metric]] * len(params), device)
            )
        sign = -1.0 if group.get("maximize", False) else 1.0
        k = 1.0 - lr * wd  # dq = (-lr (s g + momentum b) - lr wd q_{n+1}) / (1 - lr wd)
        row = [-lr * sign / k, -lr * momentum / k, -lr * wd / k, c_metric]
        states = [(optimizer.state[p]["momentum_buffer"],) if momentum else () for p in params]
        return FusedStep(direct_rule, states, coef_rows([row] * len(params), device))
