"""One metric convention for every learning rule, dampening included (docs/conventions.md).

NLD (Tanaka & Kunin, NeurIPS 2021, §2) reads a rule written as the heavy ball

    dq_n = rho_n dq_{n-1} - eta_n G_n^{-1} u_n,      rho_n = beta eta_n / eta_{n-1},

(u the force: gradient plus coupled L2) as ``m q'' + mu q' = -G^{-1} grad V`` with
``m = eta (1 + beta) / 2``, ``mu = 1 - beta``, ``T = (m/2) q'^T G q'`` and ``C = m <G q', xi>``.
Every rule is brought to that form by writing its buffer as ``b_n = beta b_{n-1} +
(1 - d) P_n^{-1} u_n`` and its step as ``dq_n = -eta_n b_n`` (P the elementwise preconditioner,
d the dampening of the buffer's input). Then ``dq_n = rho_n dq_{n-1} - eta_n (1 - d) P_n^{-1} u_n``
exactly while P is constant, so

    G = P / (1 - d),    eta_n the rate that multiplies the buffer.

Per family:

========  =====================================  ==========  =============================
family    buffer                                 d           G
========  =====================================  ==========  =============================
sgd       b = beta b + (1 - d) u                 dampening   I / (1 - d)
adam      m = beta1 m + (1 - beta1) u            beta1       (sqrt(v_hat) + eps) / (1 - beta1)
rmsprop   b = mu b + u / P (or none)             0           sqrt(v [- gbar^2]) + eps
adagrad   none                                   0           sqrt(sum g^2) + eps
========  =====================================  ==========  =============================

Adam's rate is ``eta_n = lr / (1 - beta1^k)``: the bias correction is a rate schedule that
multiplies the whole buffer, so it enters rho_n like any scheduler. The first step of torch's
SGD (``b_0 = u_0``, undamped) is the one place the buffer is not of this form: there
``b_0 = (1 - d) u_0 / (1 - d)``, i.e. the first step has G = I. Adam's first moment starts at 0,
so Adam has no such exception. With G = P omitting 1 / (1 - beta1) (the earlier adapter),
Adam's ``kinetic``, ``nld_charge`` and ``nld_ksb`` were (1 - beta1) times the convention's:
10x off at beta1 = 0.9.

Only T (and eta G^{-1}) is independent of how a constant factor is split between eta and G:
(eta, G) -> (eta / c, G / c) leaves ``eta G^{-1}`` and T unchanged but scales C by 1/c. The
convention fixes the split: eta is the rate that multiplies the buffer (torch's ``lr``, after
schedulers and Adam's bias correction).
"""

from __future__ import annotations

import torch

FAMILIES = ("sgd", "adam", "rmsprop", "adagrad")


def metric(
    family: str,
    *,
    dampening: float = 0.0,
    first_step: bool = False,
    preconditioner: list[torch.Tensor] | None = None,
    beta1: float = 0.0,
) -> list[torch.Tensor] | float:
    """The diagonal of G under the convention: a float c (G = c I) for sgd, else one tensor per
    parameter. ``preconditioner``: P per parameter (adam: sqrt(v_hat) + eps; rmsprop, adagrad:
    their denominators). ``first_step``: torch SGD's undamped first buffer (G = I)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
    if family == "sgd":
        if not 0.0 <= dampening < 1.0:
            raise ValueError(f"dampening must be in [0, 1), got {dampening}.")
        return 1.0 if first_step else 1.0 / (1.0 - dampening)
    if preconditioner is None:
        raise ValueError(f"family {family!r}: pass preconditioner=P, one tensor per parameter.")
    if family == "adam":
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1 must be in [0, 1), got {beta1}.")
        return torch._foreach_div(preconditioner, 1.0 - beta1)
    return list(preconditioner)


def adam_rate(lr: float, beta1: float, step: int) -> float:
    """eta_n of Adam under the convention: ``lr / (1 - beta1^k)``, k the step count (1 first)."""
    return lr / (1.0 - beta1**step)


def kinetic(
    lr: float, beta: float, metric_diag: list[torch.Tensor] | float, update: list[torch.Tensor]
) -> float:
    """``T = (m/2) q'^T G q' = (1 + beta) <G dq, dq> / (4 eta)`` (m = eta (1 + beta)/2,
    q' = dq / eta), summed over parameters (units of the loss)."""
    if isinstance(metric_diag, float):
        total = sum(float(d.double().square().sum()) for d in update) * metric_diag
    else:
        total = sum(float((g * d * d).double().sum()) for g, d in zip(metric_diag, update))
    return (1.0 + beta) * total / (4.0 * lr)


def nld_charge(
    beta: float,
    metric_diag: list[torch.Tensor] | float,
    update: list[torch.Tensor],
    generator: list[torch.Tensor],
) -> float:
    """``C = m <G q', xi> = ((1 + beta) / 2) <G dq, xi>`` (the rate cancels), summed over the
    symmetry's parameters; ``generator`` is xi on them (signs included)."""
    if isinstance(metric_diag, float):
        total = metric_diag * sum(float((d * x).double().sum()) for d, x in zip(update, generator))
    else:
        total = sum(
            float((g * d * x).double().sum()) for g, d, x in zip(metric_diag, update, generator)
        )
    return (1.0 + beta) / 2.0 * total
