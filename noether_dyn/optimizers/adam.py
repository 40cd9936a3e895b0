"""Adam and AdamW: G = diag(sqrt(v_hat) + eps) / (1 - beta1), v_hat = v / (1 - beta2^k)
(docs/theory.md §2; the metric convention of docs/conventions.md: Adam's first moment is a buffer
dampened by d = beta1, and the dampening belongs in G = P / (1 - d) as for SGD).

beta = beta1 is the momentum of the Lagrangian. With ``amsgrad`` the running maximum of v is the
one that preconditions the step. AdamW (or Adam with ``decoupled_weight_decay=True``) applies
``q <- q (1 - eta lambda)``: a friction on q, not a term of the potential.
"""

from __future__ import annotations

import math

import torch

from noether_dyn.optimizers.base import (
    FusedStep,
    GroupHyper,
    Metric,
    OptimizerAdapter,
    coef_rows,
    coefficient,
    scalar,
    step_count,
)
from noether_dyn.records import COEF_WIDTH


def adam_rule(q1, g, state, c):
    """P = sqrt(v) c1 + c3 (c1 = 1 / sqrt(1 - beta2^k), c3 = eps); dq = c0 m / P + c2 q1, with
    c0 = -lr / (1 - beta1^k) / (1 - d) and c2 = -d / (1 - d), d = lr lambda when decoupled;
    G = P / c4 with c4 = 1 - beta1 (the metric convention)."""
    m, v = state
    dt = q1.dtype
    # in place on the rule's own temporaries: the same roundings, fewer buffers when run eagerly
    precond = v.sqrt().mul_(coefficient(c, 1, dt)).add_(coefficient(c, 3, dt))
    inverse = precond.reciprocal()
    dq = (m * inverse).mul_(coefficient(c, 0, dt)).add_(q1 * coefficient(c, 2, dt))
    keep = coefficient(c, 4, dt)
    return dq, precond.div_(keep), inverse.mul_(keep)


def adam_count_rule(q1, g, state, c):
    """:func:`adam_rule` with the bias corrections formed inside the program from the step count
    k (a 0-d CPU tensor of the optimizer's state, so that no host read is needed), in float64 as
    plain Adam forms them on the host; state (m, v, k), c = (-lr, beta1, beta2, eps, 1 - d,
    -d / (1 - d))."""
    m, v, k = state
    k = k.to(torch.float64)
    step_size = c[0] / (1.0 - c[1] ** k) / c[4]
    bc2_sqrt_inv = 1.0 / torch.sqrt(1.0 - c[2] ** k)
    row = torch.stack([step_size, bc2_sqrt_inv, c[5], c[3], 1.0 - c[1]])
    return adam_rule(q1, g, (m, v), row)


def _counts_in_program(group: dict, counts: list, device: torch.device) -> bool:
    """Whether the step counts can go into the compiled program as they are (CPU tensors beside
    CPU parameters, bias corrections in float64): then no count is read on the host per step."""
    return (
        device.type == "cpu"
        and not group.get("capturable", False)
        and all(isinstance(k, torch.Tensor) and k.device.type == "cpu" for k in counts)
    )


def _step(group: dict, state: dict) -> float | torch.Tensor:
    """A parameter's step count as the optimizer does its bias corrections with: a host float
    (plain Adam), a device tensor in its own dtype (capturable: float32 arithmetic), or a
    float64 device tensor (``fused=True``, whose kernels form the corrections in double)."""
    k = step_count(state)
    if isinstance(k, torch.Tensor) and group.get("fused"):
        return k.to(torch.float64)
    return k


class AdamAdapter(OptimizerAdapter):
    name = "adam"
    family = "adam"
    metric_name = "G = diag(sqrt(v_hat) + eps) / (1 - beta1)"
    optimizers = (torch.optim.Adam, torch.optim.AdamW)
    normalization = "decoupled"

    def hyper(self, optimizer: torch.optim.Optimizer, group: dict) -> GroupHyper:
        decoupled = bool(group.get("decoupled_weight_decay", False)) or isinstance(
            optimizer, torch.optim.AdamW
        )
        beta1 = scalar(group["betas"][0])
        correction = 1.0
        k = _coming_step(optimizer, group)
        if k is not None and beta1:
            correction = 1.0 / (1.0 - beta1**k)
        return GroupHyper(
            lr=scalar(group["lr"]) * correction,
            beta=beta1,
            weight_decay=scalar(group.get("weight_decay", 0.0)),
            decoupled=decoupled,
            bias_correction=correction,
        )

    def metric(
        self, optimizer: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]
    ) -> Metric:
        return _to_metric(self._preconditioner(optimizer, group, params), group)

    def _preconditioner(
        self, optimizer: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """P = sqrt(v_hat) + eps per parameter (fresh tensors: the caller may scale them)."""
        beta2 = scalar(group["betas"][1])
        eps = float(group["eps"])
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        states = [optimizer.state.get(p) for p in params]
        if not all(st and key in st for st in states):  # before the first step of some param
            return [
                _denominator(st[key], _step(group, st), beta2, eps)
                if st and key in st
                else torch.ones_like(p)
                for p, st in zip(params, states)
            ]
        steps = [_step(group, st) for st in states]
        if any(isinstance(k, torch.Tensor) for k in steps):  # capturable: counts on the device
            return [_denominator(st[key], k, beta2, eps) for st, k in zip(states, steps)]
        out = torch._foreach_sqrt([st[key] for st in states])
        torch._foreach_div_(out, [math.sqrt(1.0 - beta2**k) for k in steps])
        torch._foreach_add_(out, eps)
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
        hyper = self.hyper(optimizer, group)
        lr = scalar(group["lr"])  # torch's own rate: the bias corrections are formed below
        beta1, beta2 = scalar(group["betas"][0]), scalar(group["betas"][1])
        eps = float(group["eps"])
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        states = [optimizer.state.get(p) for p in params]
        if not all(st and key in st and "exp_avg" in st for st in states):
            return None
        d = lr * hyper.weight_decay if hyper.decoupled else 0.0
        tensors = [(st["exp_avg"], st[key]) for st in states]
        counts = [st["step"] for st in states]
        if not eager and _counts_in_program(group, counts, device):
            row = [-lr, beta1, beta2, eps, 1.0 - d, -d / (1.0 - d)]
            tensors = [(m, v, k) for (m, v), k in zip(tensors, counts)]
            return FusedStep(adam_count_rule, tensors, coef_rows([row] * len(params), device))
        steps = [_step(group, st) for st in states]
        if not any(isinstance(k, torch.Tensor) for k in steps):
            rows = [
                [
                    -lr / (1.0 - beta1**k) / (1.0 - d),
                    1.0 / math.sqrt(1.0 - beta2**k),
                    -d / (1.0 - d),
                    eps,
                    1.0 - beta1,
                ]
                for k in steps
            ]
            return FusedStep(adam_rule, tensors, coef_rows(rows, device))
        # capturable or fused Adam: step counts live on the device; the bias corrections are
        # formed in the dtype the optimizer uses (see _step), then widened
        k = torch.stack(
            [
                s.to(device) if isinstance(s, torch.Tensor) else torch.tensor(s).to(device)
                for s in steps
            ]
        )
        step_size = (-lr / (1.0 - torch.pow(beta1, k))).to(torch.float64)
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, k)).to(torch.float64)
        coef = torch.zeros(len(params), COEF_WIDTH, dtype=torch.float64, device=device)
        coef[:, 0] = step_size / (1.0 - d)
        coef[:, 1] = bc2_sqrt.reciprocal()
        coef[:, 2] = -d / (1.0 - d)
        coef[:, 3] = eps
        coef[:, 4] = 1.0 - beta1
        return FusedStep(adam_rule, tensors, coef)


def _coming_step(optimizer: torch.optim.Optimizer, group: dict) -> float | None:
    """k of the step about to run (1 before the first), read in the pre-hook from the first
    parameter with state; None when the count lives on an accelerator (capturable or fused
    Adam: reading it would sync every step, so the stored rate is then torch's lr)."""
    for p in group["params"]:
        state = optimizer.state.get(p)
        if state and "step" in state:
            k = step_count(state)
            return None if isinstance(k, torch.Tensor) else k + 1.0
    return 1.0


def _to_metric(precond: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
    """G = P / (1 - beta1) (docs/conventions.md), in place on the fresh preconditioner tensors."""
    beta1 = scalar(group["betas"][0])
    if beta1:
        torch._foreach_div_(precond, 1.0 - beta1)
    return precond


def _denominator(
    v: torch.Tensor, step: float | torch.Tensor, beta2: float, eps: float
) -> torch.Tensor:
    """sqrt(v / (1 - beta2^step)) + eps, the step count a host float or a device tensor."""
    bc2_sqrt = (
        torch.sqrt(1.0 - beta2**step)
        if isinstance(step, torch.Tensor)
        else math.sqrt(1.0 - beta2**step)
    )
    return v.sqrt().div_(bc2_sqrt).add_(eps)
