"""Normalization as implicit adaptive optimization (THEORY §4; Tanaka & Kunin 2021 NLD §4,
Wan et al. 2021 SMD, Kosson et al. 2024 RE), per normalized (scale-symmetric) layer.

For a scale group write q = r qhat with r^2 = |q_A|^2 (the stored ``charge``):

* effective learning rate of the direction: eta_eff = eta / ((1 - beta) r^2) (stored column
  ``effective_lr``);
* r^4 follows an accumulator like RMSprop's v: with L2 weight decay an exponential moving average
  with per-step decay rho_eff = 1 - 4 eta lambda / (1 - beta), without it a plain sum (Adagrad);
  r^2 plays the part of sqrt(v), one accumulator per layer;
* equilibrium angular update per step: sqrt(2 eta lambda / (1 + beta)) for SGD(M) with L2 decay
  (SMD), sqrt(2 eta lambda (1 - beta1) / (1 + beta1)) for AdamW (RE);
* noise-dominated equilibrium norm r*^4 = eta E|ghat|^2 / (2 lambda (1 - beta)) (SMD, RE) with
  |ghat|^2 = |g_A|^2 r^2 (stored ``grad_sq`` times ``charge``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from noether_dyn.report.data import (
    charge_cube,
    first_last,
    group_lr,
    hyper_for,
    layer_of,
    tail_mask,
)
from noether_dyn.store import Run

COLUMNS = (
    "symmetry",
    "layer",
    "optimizer",
    "lr",
    "weight_decay",
    "beta",
    "r2_first",
    "r2_last",
    "norm_growth",
    "eff_lr_first",
    "eff_lr_last",
    "eff_lr_change",
    "rho_eff",
    "accumulator_steps",
    "equilibrium_steps",
    "regime",
    "angular_measured",
    "angular_theory",
    "angular_ratio",
    "r2_equilibrium",
)


def equilibrium_angle(optimizer: str, lr: float, wd: float, beta: float, decoupled: bool) -> float:
    """Equilibrium angular update per step of a scale-invariant group (radians), NaN when the
    theory does not cover the rule: SGD(M) with L2 decay sqrt(2 eta lambda/(1 + beta)) (Wan et
    al. 2021 SMD); AdamW sqrt(2 eta lambda (1 - beta1)/(1 + beta1)) (Kosson et al. 2024 RE)."""
    if not (wd > 0 and lr > 0):
        return np.nan
    if optimizer == "SGD" and not decoupled:
        return float(np.sqrt(2 * lr * wd / (1 + beta)))
    if optimizer in ("AdamW", "Adam") and decoupled:
        return float(np.sqrt(2 * lr * wd * (1 - beta) / (1 + beta)))
    return np.nan


def implied_decay(optimizer: str, lr: float, wd: float, beta: float, decoupled: bool) -> float:
    """rho_eff = 1 - 4 eta lambda / (1 - beta), the per-step decay of the r^4 accumulator
    implied by SGD(M) with L2 weight decay (THEORY §4, NLD §4); 1 without weight decay
    (Adagrad-like sum); NaN for rules the theory does not cover."""
    if optimizer != "SGD" or decoupled or not beta < 1:
        return np.nan
    return float(1.0 - 4.0 * lr * wd / (1.0 - beta))


def equilibrium_steps(optimizer: str, lr: float, wd: float, beta: float, decoupled: bool) -> float:
    """Steps over which a scale group approaches equilibrium: the r^4 accumulator's time
    1/(1 - rho_eff) = (1 - beta)/(4 eta lambda) for SGD(M) with L2 decay (THEORY §4), the decay
    time 1/(2 eta lambda) of |q|^2 under decoupled decay for AdamW (Kosson et al. 2024 RE); NaN
    when there is no weight decay or the rule is not covered."""
    if not (wd > 0 and lr > 0):
        return np.nan
    if optimizer == "SGD" and not decoupled:
        return _time_constant(implied_decay(optimizer, lr, wd, beta, decoupled))
    if optimizer in ("AdamW", "Adam") and decoupled:
        return 1.0 / (2.0 * lr * wd)
    return np.nan


def scale_table(run: Run, tail: float = 0.2) -> pd.DataFrame:
    """One row per scale symmetry with the quantities of this module's docstring.

    ``*_first``/``*_last`` are the first and last logged values; ``angular_measured`` and
    ``r2_equilibrium`` average over the last ``tail`` of the logged steps (the equilibrium
    window); ``lr`` is the group's mean rate in that window.
    """
    cube = charge_cube(run)
    syms = run.symmetries
    rows = []
    mask = tail_mask(len(cube.steps), tail)
    for _, sym in syms[syms["kind"] == "scale"].iterrows():
        j = cube.index(sym["symmetry"])
        h = hyper_for(run, sym["params"])
        opt = h.optimizer if h else "?"
        wd = h.weight_decay if h else np.nan
        beta = h.beta if h else np.nan
        decoupled = h.decoupled if h else False
        lr = h.lr if h else np.nan
        if h is not None and mask.any():
            series = group_lr(run, h.group)
            window = series.reindex(cube.steps[mask]).to_numpy(dtype=float)
            if np.isfinite(window).any():
                lr = float(np.nanmean(window))
        r2 = cube["charge"][:, j]
        eff = cube["effective_lr"][:, j]
        r2_0, r2_1 = first_last(r2)
        e0, e1 = first_last(eff)
        ang = cube["angular_update"][:, j][mask]
        angular = float(np.nanmean(ang)) if np.isfinite(ang).any() else np.nan
        theory = equilibrium_angle(opt, lr, wd, beta, decoupled)
        rho = implied_decay(opt, lr, wd, beta, decoupled)
        ghat_sq = (cube["grad_sq"][:, j] * r2)[mask]
        r2_eq = np.nan
        if opt == "SGD" and not decoupled and wd > 0 and np.isfinite(ghat_sq).any():
            r2_eq = float(np.sqrt(lr * np.nanmean(ghat_sq) / (2 * wd * (1 - beta))))
        if opt == "SGD" and not decoupled:
            regime = "RMSprop-like EMA" if wd > 0 else "Adagrad-like sum (no weight decay)"
        elif decoupled and wd > 0:
            regime = "decoupled decay (RE)"
        else:
            regime = "not covered by THEORY §4"
        rows.append(
            {
                "symmetry": sym["symmetry"],
                "layer": layer_of(sym["params"]),
                "optimizer": opt,
                "lr": lr,
                "weight_decay": wd,
                "beta": beta,
                "r2_first": r2_0,
                "r2_last": r2_1,
                "norm_growth": np.sqrt(r2_1 / r2_0) if r2_0 > 0 else np.nan,
                "eff_lr_first": e0,
                "eff_lr_last": e1,
                "eff_lr_change": e1 / e0 if e0 > 0 else np.nan,
                "rho_eff": rho,
                "accumulator_steps": _time_constant(rho),
                "equilibrium_steps": equilibrium_steps(opt, lr, wd, beta, decoupled),
                "regime": regime,
                "angular_measured": angular,
                "angular_theory": theory,
                "angular_ratio": angular / theory if theory > 0 else np.nan,
                "r2_equilibrium": r2_eq,
            }
        )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _time_constant(rho: float) -> float:
    """Steps over which an accumulator with per-step decay ``rho`` forgets: 1/(1 - rho); inf for a
    sum (rho = 1), NaN when rho is unknown."""
    if not np.isfinite(rho):
        return np.nan
    return 1.0 / (1.0 - rho) if rho < 1 else np.inf
