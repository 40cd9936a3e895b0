"""Section-4 theory per optimizer family: how fast a scale-invariant direction moves, which
accumulator the norm implies, and where the angular update settles (docs/theory.md §4).

Setting: a weight group q (e.g. the weights feeding a BatchNorm channel) with f(c q) = f(q) for
c > 0. Write q = r qhat, r = |q|. The gradient is orthogonal to q and scales as
``g = ghat / r`` (ghat: the gradient at unit norm), so |ghat| does not depend on r.

SGD with momentum beta (Tanaka & Kunin, NLD §4; Wan et al., SMD)
    In steady state the buffer amplifies a slowly varying gradient by 1 / (1 - beta), so the
    step is ``|dq| = eta |ghat| / ((1 - beta) r)`` orthogonal to q and the direction turns by
    ``|dq| / r = eta_eff |ghat|`` with ``eta_eff = eta / ((1 - beta) r^2)`` [rad per step per
    unit of |ghat|]: a weight 4x larger turns 16x slower. The implied accumulator is r^4:
    ``(r^4)' = -(4 lambda / (1 - beta)) r^4 + (2 eta (1 + beta) / (1 - beta)^3) |ghat|^2`` (first
    order in eta, coherent gradients), an EMA with per-step decay
    ``rho_eff = 1 - 4 eta lambda / (1 - beta)`` (Adagrad's sum when lambda = 0). Equilibrium
    angular update with L2 decay and independent minibatch noise: ``sqrt(2 eta lambda /
    (1 + beta))`` (SMD).
Adam / AdamW, RMSprop, Adagrad (Kosson, Messmer & Jaggi, "Rotational Equilibrium", ICML 2024;
Gould & Tanaka, 2024, on Adam with scale-invariant weights)
    The preconditioner rescales with the gradient: sqrt(v) ~ 1/r coordinate by coordinate, so
    (eps aside) the normalized update ``u = m_hat / (sqrt(v_hat) + eps)`` does not depend on r.
    The step is ``dq = -eta u`` (Adam: u = P^{-1} m, the buffer of docs/conventions.md, and eta
    the stored rate lr / (1 - beta1^k) that multiplies it, so that eta u = lr m_hat / P: no
    1/(1 - beta1) amplification once the bias correction is spent; RMSprop's heavy ball mu on u
    amplifies by 1 / (1 - mu)), and the direction turns by ``eta_eff |u|`` with
    ``eta_eff = eta / r`` [rad per step per unit of |u|]; |u| is of order sqrt(numel) (every
    entry of m_hat / P is O(1): exactly ±1 on Adam's first step, where u = (1 - beta1) sign(g)
    and eta = lr / (1 - beta1)). A weight 4x larger turns 4x slower, not 16x. The norm obeys
    ``r^2_{n+1} = (1 - eta lambda)^2 r^2_n + eta^2 |u|^2 + 2 eta <q, u>`` (AdamW's decoupled
    decay, steady state: eta = lr); the last term is zero on average for a
    scale-invariant group, so r^2 (not r^4) is the implied accumulator, an EMA of
    ``eta |u|^2 / (2 lambda)`` with ``rho_eff = 1 - 2 eta lambda``. Equilibrium angular update
    (RE): ``sqrt(2 eta lambda (1 - beta1) / (1 + beta1))`` (RMSprop without momentum: beta1 = 0).
    Adagrad never forgets (no equilibrium). Coupled L2 under a preconditioner passes through it
    (see :mod:`noether_dyn.quantities.momentum`) and is not covered by these formulas.

Keyed by the optimizer-family string an adapter declares: ``"sgd"``, ``"adam"`` (Adam and AdamW),
``"rmsprop"``, ``"adagrad"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FAMILIES = ("sgd", "adam", "rmsprop", "adagrad")


def _check(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")


def rate_exponent(family: str) -> int:
    """p in ``eta_eff ∝ r^-p``: 2 for SGD(M), 1 for the adaptive families."""
    _check(family)
    return 2 if family == "sgd" else 1


RATE_RULES = {
    "sgd": "eta_eff = eta / ((1 - beta) r^2), rad per step per unit |ghat| (SGD(M): r^-2)",
    "adam": (
        "eta_eff = eta / r, eta = lr / (1 - beta1^k), rad per step per unit |u|, u = m / P "
        "(Adam/AdamW: r^-1)"
    ),
    "rmsprop": "eta_eff = eta / ((1 - beta) r), rad per step per unit |u| (RMSprop: r^-1)",
    "adagrad": "eta_eff = eta / r, rad per step per unit |u| (Adagrad: r^-1)",
}
"""The effective-rate formula of each family, in words (stored in a run's metadata)."""


def effective_rate(
    family: str, lr: torch.Tensor | float, norm_sq: torch.Tensor | float, beta: float = 0.0
) -> torch.Tensor:
    """eta_eff of a scale-invariant group with squared norm ``norm_sq`` = r^2 (any shape).

    sgd: ``lr / ((1 - beta) r^2)`` per unit |ghat|; adam: ``lr / r`` per unit |u| (beta1 does not
    amplify a bias-corrected EMA); rmsprop: ``lr / ((1 - beta) r)`` (beta = its momentum);
    adagrad: ``lr / r``.
    """
    _check(family)
    norm_sq = torch.as_tensor(norm_sq, dtype=torch.float64)
    if family == "sgd":
        return lr / ((1.0 - beta) * norm_sq)
    amplification = 1.0 / (1.0 - beta) if family == "rmsprop" else 1.0
    return lr * amplification / norm_sq.sqrt()


def angular_update(
    family: str,
    lr: torch.Tensor | float,
    norm_sq: torch.Tensor | float,
    drive: torch.Tensor | float,
    beta: float = 0.0,
) -> torch.Tensor:
    """Predicted angle (rad) turned per step: ``atan(eta_eff * drive)``, with ``drive`` = |ghat|
    = r |g| (sgd) or |u|, the normalized update's norm (adaptive; for Adam either torch's lr
    with u = m_hat / P or the stored eta = lr / (1 - beta1^k) with u = m / P: the product is the
    same). Exact for the first step of SGD (dq = -eta g, orthogonal to q) and of Adam
    (m_hat / P = sign(g), eps aside)."""
    return torch.atan(effective_rate(family, lr, norm_sq, beta) * drive)


@dataclass(frozen=True)
class ImpliedAccumulator:
    """The accumulator a normalized layer's norm implements.

    power: the state is r^power (4 for SGD(M), 2 for adaptive rules). rho: per-step decay of
    that state (1: a sum, like Adagrad). equilibrium_angle: the equilibrium angular update per
    step (rad) with independent minibatch noise, or None when there is none (no decay, Adagrad).
    """

    power: int
    rho: float
    equilibrium_angle: float | None


def implied_accumulator(
    family: str, lr: float, weight_decay: float, beta: float = 0.0
) -> ImpliedAccumulator:
    """The implied accumulator and equilibrium of the module docstring. ``weight_decay``: L2
    for sgd, decoupled for the adaptive families; ``beta``: SGD's momentum, Adam's beta1,
    RMSprop's momentum."""
    _check(family)
    if lr <= 0 or weight_decay < 0 or not 0.0 <= beta < 1.0:
        raise ValueError(
            f"need lr > 0, weight_decay >= 0, 0 <= beta < 1; got lr={lr}, "
            f"weight_decay={weight_decay}, beta={beta}."
        )
    if family == "sgd":
        rho = 1.0 - 4.0 * lr * weight_decay / (1.0 - beta)
        angle = math.sqrt(2.0 * lr * weight_decay / (1.0 + beta)) if weight_decay else None
        return ImpliedAccumulator(4, rho, angle)
    rho = 1.0 - 2.0 * lr * weight_decay
    if family == "adagrad" or not weight_decay:
        return ImpliedAccumulator(2, rho, None)
    b1 = beta if family == "adam" else 0.0
    if family == "rmsprop" and beta:
        raise ValueError(
            "implied_accumulator: RMSprop with momentum has no equilibrium formula here; "
            "pass beta=0.0 or use family='adam' for a bias-corrected EMA."
        )
    return ImpliedAccumulator(2, rho, math.sqrt(2.0 * lr * weight_decay * (1 - b1) / (1 + b1)))
