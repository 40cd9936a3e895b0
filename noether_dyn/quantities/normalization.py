"""Normalization as implicit adaptive optimization: the theory of docs/theory.md §4 per learning
rule
(Tanaka & Kunin 2021 NLD §4, Wan et al. 2021 SMD, Kosson et al. 2024 RE).

For a scale-invariant group write q = r qhat with r^2 = |q_A|^2 (the stored ``charge``). Which
results apply depends on how the rule applies weight decay, which the optimizer adapter declares
(``OptimizerAdapter.normalization``):

``"l2"`` (SGD with heavy-ball momentum and coupled L2 decay)
    r^4 follows an accumulator like RMSprop's v with per-step decay
    rho_eff = 1 - 4 eta lambda / (1 - beta) (a plain sum, Adagrad-like, without decay);
    equilibrium angular update sqrt(2 eta lambda / (1 + beta)) (SMD); noise-dominated
    equilibrium norm r*^4 = eta E|ghat|^2 / (2 lambda (1 - beta)) (SMD, RE).
``"decoupled"`` (AdamW, or Adam with decoupled decay)
    equilibrium angular update sqrt(2 eta lambda (1 - beta1) / (1 + beta1)) and |q|^2 decaying
    over 1 / (2 eta lambda) steps (RE).

Any other rule (or ``None``) is not covered: the functions return NaN. eta (lr), lambda (wd) and
beta are those of the group; ``decoupled`` says whether the run applied its decay decoupled.
"""

from __future__ import annotations

import math

RULES = ("l2", "decoupled")


def _sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else math.nan


def covered(rule: str | None, decoupled: bool) -> bool:
    """Whether docs/theory.md §4 covers a group under ``rule`` with this form of weight decay."""
    return (rule == "l2" and not decoupled) or (rule == "decoupled" and decoupled)


def equilibrium_angle(
    rule: str | None, lr: float, wd: float, beta: float, decoupled: bool
) -> float:
    """Equilibrium angular update per step of a scale-invariant group (radians), NaN when the
    theory does not cover the rule or there is no decay."""
    if not (wd > 0 and lr > 0) or not covered(rule, decoupled):
        return math.nan
    if rule == "l2":
        return _sqrt(2 * lr * wd / (1 + beta))
    return _sqrt(2 * lr * wd * (1 - beta) / (1 + beta))


def implied_decay(rule: str | None, lr: float, wd: float, beta: float, decoupled: bool) -> float:
    """rho_eff = 1 - 4 eta lambda / (1 - beta), the per-step decay of the r^4 accumulator under
    ``"l2"`` (1 without weight decay: a sum); NaN for the other rules."""
    if rule != "l2" or decoupled or not beta < 1:
        return math.nan
    return 1.0 - 4.0 * lr * wd / (1.0 - beta)


def time_constant(rho: float) -> float:
    """Steps over which an accumulator with per-step decay ``rho`` forgets: 1/(1 - rho); inf for a
    sum (rho = 1), NaN when rho is unknown."""
    if not math.isfinite(rho):
        return math.nan
    return 1.0 / (1.0 - rho) if rho < 1 else math.inf


def equilibrium_steps(
    rule: str | None, lr: float, wd: float, beta: float, decoupled: bool
) -> float:
    """Steps over which a scale group approaches equilibrium: the accumulator's time
    (1 - beta)/(4 eta lambda) under ``"l2"``, the decay time 1/(2 eta lambda) of |q|^2 under
    ``"decoupled"``; NaN without weight decay or when the rule is not covered."""
    if not (wd > 0 and lr > 0) or not covered(rule, decoupled):
        return math.nan
    if rule == "l2":
        return time_constant(implied_decay(rule, lr, wd, beta, decoupled))
    return 1.0 / (2.0 * lr * wd)


def equilibrium_r2(
    rule: str | None, lr: float, wd: float, beta: float, decoupled: bool, ghat_sq: float
) -> float:
    """The noise-dominated equilibrium r*^2 = sqrt(eta E|ghat|^2 / (2 lambda (1 - beta))) under
    ``"l2"`` with decay, from the mean ``ghat_sq`` = |g_A|^2 r^2; NaN otherwise."""
    if rule != "l2" or decoupled or not wd > 0 or not math.isfinite(ghat_sq):
        return math.nan
    return _sqrt(lr * ghat_sq / (2 * wd * (1 - beta)))


def regime(rule: str | None, wd: float, decoupled: bool) -> str:
    """Which regime of docs/theory.md §4 a group is in, in words."""
    if rule == "l2" and not decoupled:
        return "RMSprop-like EMA" if wd > 0 else "Adagrad-like sum (no weight decay)"
    if decoupled and wd > 0:
        return "decoupled decay (RE)"
    return "not covered by docs/theory.md §4"
