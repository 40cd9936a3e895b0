"""RMSprop, plain or centered, with or without momentum: G = diag(sqrt(v) + eps) (docs/theory.md
§2).

Centered RMSprop preconditions with sqrt(v - gbar^2) + eps, gbar the running mean gradient.
beta is the optional heavy-ball momentum applied to the preconditioned gradient.
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


def _rms_metric(state, c):
    v = state[0]
    if len(state) == 2:  # centered: v - gbar^2
        v = v - state[1] * state[1]
    return v.sqrt().add_(coefficient(c, 3, v.dtype))


def rms_momentum_rule(q1, g, state, c):
    """dq = c0 b (c0 = -lr); G = sqrt(v [- gbar^2]) + c3; state (b, v[, gbar])."""
    return state[0] * coefficient(c, 0, q1.dtype), _rms_metric(state[1:], c), None


def preconditioned_rule(q1, g, state, c):
    """dq = c0 (c1 g + c2 q1) / (G - c4) with c0 = -lr, c1 = -1 when maximizing else 1,
    c2 = lambda, c4 = lr lambda; G = sqrt(v [- gbar^2]) + c3; state (v[, gbar])."""
    dt = q1.dtype
    metric = _rms_metric(state, c)
    num = (g * coefficient(c, 1, dt)).add_(q1 * coefficient(c, 2, dt))
    return num.div_(metric - coefficient(c, 4, dt)).mul_(coefficient(c, 0, dt)), metric, None


def undecayed_rule(q1, g, state, c):
    """:func:`preconditioned_rule` without weight decay (one division per entry)."""
    metric = _rms_metric(state, c)
    inverse = metric.reciprocal()
    return (g * inverse).mul_((c[0] * c[1]).to(q1.dtype)), metric, inverse


class RMSpropAdapter(OptimizerAdapter):
    name = "rmsprop"
    family = "rmsprop"
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

    def fused_step(
        self,
        optimizer: torch.optim.Optimizer,
        group: dict,
        params: list[torch.Tensor],
        device: torch.device,
        eager: bool = False,
    ) -> FusedStep | None:
        lr = scalar(group["lr"])
        eps = float(group["eps"])
        centered = bool(group.get("centered", False))
        momentum = scalar(group.get("momentum", 0.0))
        keys = ["square_avg"] + (["grad_avg"] if centered else [])
        if momentum:
            keys = ["momentum_buffer", *keys]
        states = [optimizer.state.get(p) for p in params]
        if not all(st and all(k in st for k in keys) for st in states):
            return None
        tensors = [tuple(st[k] for k in keys) for st in states]
        if momentum:
            row = [-lr, 0.0, 0.0, eps]
            return FusedStep(rms_momentum_rule, tensors, coef_rows([row] * len(params), device))
        return preconditioned_step(group, tensors, device)


def preconditioned_step(
    group: dict, states: list[tuple[torch.Tensor, ...]], device: torch.device
) -> FusedStep:
    """The :func:`preconditioned_rule` (or :func:`undecayed_rule`) step of ``q <- q - lr (g +
    lambda q_n) / G`` (RMSprop without momentum, Adagrad) over tensors with these states."""
    lr = scalar(group["lr"])
    wd = scalar(group.get("weight_decay", 0.0))
    sign = -1.0 if group.get("maximize", False) else 1.0
    row = [-lr, sign, wd, float(group["eps"]), lr * wd]
    rule = preconditioned_rule if wd else undecayed_rule
    return FusedStep(rule, states, coef_rows([row] * len(states), device))
