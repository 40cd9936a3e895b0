"""The per-layer table of docs/theory.md §4 (normalization as implicit adaptive optimization) from
a saved
run: one row per scale symmetry, its measured r^2 = |q_A|^2, effective rate and angular update
beside the theory's values. The theory lives in :mod:`noether_dyn.quantities.normalization`,
chosen by the field ``normalization`` that the run's optimizer adapter declares."""

from __future__ import annotations

import numpy as np
import pandas as pd

from noether_dyn.optimizers import adapter_named
from noether_dyn.quantities import normalization as sec4
from noether_dyn.report.data import (
    charge_cube,
    first_last,
    group_lr,
    hyper_for,
    layer_of,
    tail_mask,
)
from noether_dyn.store import Run
from noether_dyn.symmetries.kinds import normalized_kinds

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


def scale_table(run: Run, tail: float = 0.2) -> pd.DataFrame:
    """One row per scale symmetry with the quantities of this module's docstring.

    ``*_first``/``*_last`` are the first and last logged values; ``angular_measured`` and
    ``r2_equilibrium`` average over the last ``tail`` of the logged steps (the equilibrium
    window); ``lr`` is the group's mean rate in that window.
    """
    cube = charge_cube(run)
    syms = run.symmetries
    adapter = adapter_named((run.meta.get("optimizer") or {}).get("adapter"))
    rule = adapter.normalization if adapter is not None else None
    rows = []
    mask = tail_mask(len(cube.steps), tail)
    for _, sym in syms[syms["kind"].isin(normalized_kinds())].iterrows():
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
        theory = sec4.equilibrium_angle(rule, lr, wd, beta, decoupled)
        rho = sec4.implied_decay(rule, lr, wd, beta, decoupled)
        ghat_sq = (cube["grad_sq"][:, j] * r2)[mask]
        ghat_mean = float(np.nanmean(ghat_sq)) if np.isfinite(ghat_sq).any() else np.nan
        r2_eq = sec4.equilibrium_r2(rule, lr, wd, beta, decoupled, ghat_mean)
        regime = sec4.regime(rule, wd, decoupled)
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
                "accumulator_steps": sec4.time_constant(rho),
                "equilibrium_steps": sec4.equilibrium_steps(rule, lr, wd, beta, decoupled),
                "regime": regime,
                "angular_measured": angular,
                "angular_theory": theory,
                "angular_ratio": angular / theory if theory > 0 else np.nan,
                "r2_equilibrium": r2_eq,
            }
        )
    return pd.DataFrame(rows, columns=list(COLUMNS))
