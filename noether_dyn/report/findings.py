"""Findings: what a person should know about a run, in plain language, one row each.

:func:`findings` returns a DataFrame ``layer, symmetry, finding, warning`` (the WeightWatcher
habit): ``finding`` states a measurement with its number, ``warning`` is empty when nothing
needs doing and otherwise says what is wrong or what would fix it. Each rule is a small function
of the run; add one to :data:`RULES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd

from noether_dyn.report.data import charge_cube, layer_of
from noether_dyn.report.figures import relative_residual
from noether_dyn.report.normalization import scale_table
from noether_dyn.store import Run

COLUMNS = ("layer", "symmetry", "finding", "warning")
Row = tuple[str, str, str, str]

DEFECT_TOLERANCE = 1e-3
"""Mean symmetry defect above which a tracked symmetry is reported as broken by the loss."""
RESIDUAL_TOLERANCE = 0.05
"""Relative prediction residual at the last step above which a finding is raised."""
CLOSURE_TOLERANCE = 1e-5
"""Error of the exact split Q_{n+1} - Q_n = decay + rule + ksb, relative to
max(|Q_n| + |dQ|, |q_n|^2 of the whole model), above which a warning is raised (float32
rounding stays near 1e-7)."""


def _g(x: float) -> str:
    return f"{x:.3g}"


def _pct(fraction: float) -> str:
    pct = 100 * fraction
    return f"{pct:,.0f}%" if pct >= 100 else f"{_g(pct)}%"


def _factor(ratio: float, up: str = "grew", down: str = "fell") -> str:
    if not np.isfinite(ratio):
        return "changed by an undefined factor"
    return f"{up} {_g(ratio)}x" if ratio >= 1 else f"{down} {_g(1 / ratio)}x"


def _run_level(run: Run) -> Iterator[Row]:
    s = run.steps
    opt = run.meta.get("optimizer") or {}
    if s.empty:
        yield ("run", "", "the run holds no logged step", "no training step reached the store")
        return
    loss = s["loss"].to_numpy()
    if not np.isfinite(loss).any():
        yield (
            "run",
            "",
            "no loss was logged: V and the loss curve are not shown",
            "call monitor.log_loss(loss) before optimizer.step()",
        )
    else:
        finite = loss[np.isfinite(loss)]
        k = max(1, len(finite) // 10)
        first, last = float(np.mean(finite[:k])), float(np.mean(finite[-k:]))
        trend = f"loss went from {_g(first)} to {_g(last)} (means of the first and last {k} logged)"
        warn = "the loss rose: the rate may be too high" if last > first else ""
        yield ("run", "", trend, warn)
    if opt.get("metric_fallback"):
        yield (
            "run",
            "",
            f"optimizer {opt.get('class')} has no known kinetic metric: T, KSB and the NLD "
            "charge use the Euclidean fallback G = I, beta = 0",
            "kinetic quantities are approximate for this optimizer",
        )
    if run.symmetries.empty:
        note = run.meta.get("symmetry_note") or "no symmetry recorded"
        yield ("run", "", f"no symmetry is tracked ({note})", "")


def _events(run: Run) -> Iterator[Row]:
    e = run.events
    if e.empty:
        return
    for kind, rows in e.groupby("kind", sort=True):
        first = rows["step"].min()
        msg = f"{len(rows)} '{kind}' event(s), first at step {first}: {rows['message'].iloc[0]}"
        warn = (
            "non-finite values: lower the rate, clip gradients or check the data"
            if str(kind).startswith("nonfinite")
            else ""
        )
        yield ("run", "", msg, warn)


def _verification(run: Run) -> Iterator[Row]:
    cube = charge_cube(run)
    defect = cube["defect"]
    for _, sym in run.symmetries.iterrows():
        name, layer = sym["symmetry"], layer_of(sym["params"])
        j = cube.index(name)
        col = defect[:, j]
        mean = float(np.nanmean(col)) if np.isfinite(col).any() else np.nan
        if sym["verified"] is False:
            yield (
                layer,
                name,
                f"failed verification (defect {_g(sym['defect'])}): {sym['note']}",
                "not a symmetry of this loss: its charge is not conserved even by gradient flow",
            )
        elif np.isfinite(mean) and mean > DEFECT_TOLERANCE:
            yield (
                layer,
                name,
                f"mean symmetry defect during training {_g(mean)} (> {_g(DEFECT_TOLERANCE)})",
                "the loss breaks this symmetry: read its charge's drift with that in mind",
            )
        elif sym["verified"] is None:
            yield (
                layer,
                name,
                "not verified numerically",
                "pass inputs=, targets=, loss_fn= to watch() to verify it",
            )


def _normalization(run: Run) -> Iterator[Row]:
    table = scale_table(run)
    cube = charge_cube(run)
    if not len(cube.steps):
        return
    span = int(cube.steps[-1] - cube.steps[0] + 1)
    for _, r in table.iterrows():
        growth = r["norm_growth"]
        change = r["eff_lr_change"]
        text = (
            f"weight norm {_factor(growth)} and its effective learning rate "
            f"{_factor(change, 'rose', 'fell')} over {span} steps"
        )
        warn = ""
        if r["weight_decay"] == 0 and change < 0.5:
            warn = (
                "no weight decay: the norm accumulates like Adagrad's sum; "
                "weight decay would bound it"
            )
        elif r["weight_decay"] > 0 and np.isfinite(r["angular_ratio"]):
            text += (
                f"; angular update {_g(r['angular_measured'])} rad/step vs equilibrium theory "
                f"{_g(r['angular_theory'])} (ratio {_g(r['angular_ratio'])})"
            )
            horizon = r["equilibrium_steps"]
            if not 2 / 3 <= r["angular_ratio"] <= 1.5:
                if not np.isfinite(horizon):
                    text += "; no equilibrium time is known for this rule"
                elif span < 3 * horizon:
                    text += (
                        f"; the run is shorter than 3 equilibrium times ({_g(horizon)} steps), "
                        "so equilibrium is not expected yet"
                    )
                else:
                    warn = (
                        f"away from rotational equilibrium after {span} steps, more than 3 "
                        f"equilibrium times ({_g(horizon)} steps)"
                    )
        yield (r["layer"], r["symmetry"], text, warn)


def _residuals(run: Run) -> Iterator[Row]:
    cube = charge_cube(run)
    if not len(cube.steps):
        return
    regime = (run.meta.get("optimizer") or {}).get("prediction", "")
    rel = relative_residual(cube)
    terms = {c: np.nansum(cube[c], axis=0) for c in ("decay", "rule", "ksb")}
    q0 = np.array([_first(cube["charge"][:, j]) for j in range(len(cube.names))])
    params = dict(zip(run.symmetries["symmetry"], run.symmetries["params"]))
    for j, name in enumerate(cube.names):
        if not np.isfinite(rel[j]):
            continue
        layer = layer_of(params.get(name, ()))
        if regime in ("sgd", "momentum") and rel[j] > RESIDUAL_TOLERANCE:
            source = (
                "the symmetry defect (the SGD prediction is exact given the symmetry)"
                if regime == "sgd"
                else "finite-step effects the continuous momentum theory leaves out"
            )
            yield (
                layer,
                name,
                f"measured charge differs from the prediction by {_pct(rel[j])} at the last step",
                f"large prediction residual: points to {source}",
            )
        elif regime == "flow" and rel[j] > RESIDUAL_TOLERANCE:
            scale = max(abs(q0[j]), 1e-12)
            yield (
                layer,
                name,
                f"the optimizer's metric and finite step moved the charge {_pct(rel[j])} "
                f"away from gradient flow (summed learning-rule term {_g(terms['rule'][j])}, "
                f"KSB term {_g(terms['ksb'][j])}, relative to |Q_0| = {_g(scale)})",
                "",
            )


def _closure(run: Run) -> Iterator[Row]:
    """Check the exact identity Q_{n+1} - Q_n = decay + rule + ksb (THEORY §3.1) on consecutive
    logged steps."""
    cube = charge_cube(run)
    if len(cube.steps) < 2:
        return
    consecutive = np.flatnonzero(np.diff(cube.steps) == 1)
    if not len(consecutive):
        return
    q = cube["charge"]
    dq = q[consecutive + 1] - q[consecutive]
    split = (cube["decay"] + cube["rule"] + cube["ksb"])[consecutive]
    norm_sq = (
        run.steps.set_index("step")["param_norm"]
        .reindex(cube.steps[consecutive])
        .to_numpy(dtype=float)[:, None]
        ** 2
    )
    # rounding of a charge scales with the squared norms it is made of, bounded by |q|^2 of the
    # whole model (param_norm^2): rescale charges are small differences of large norms
    scale = np.fmax(np.abs(q[consecutive]) + np.abs(dq), norm_sq) + 1e-30
    err = np.abs(dq - split) / scale
    if not np.isfinite(err).any():
        return
    worst = float(np.nanmax(err))
    j = int(np.nanargmax(np.nanmax(err, axis=0)))
    text = (
        f"exact split Q_(n+1) - Q_n = decay + rule + ksb closes to {_g(worst)} relative to "
        f"max(|Q_n| + |dQ|, |q_n|^2) "
        f"(worst: {cube.names[j]}) over {len(consecutive)} consecutive step pairs"
    )
    warn = (
        "the exact decomposition does not close: the store may be inconsistent"
        if worst > CLOSURE_TOLERANCE
        else ""
    )
    yield ("run", "", text, warn)


def _depth(run: Run) -> Iterator[Row]:
    d = run.depth_profile
    if d.empty:
        return
    last = d[d["step"] == d["step"].max()]
    t = last["transmission"].to_numpy()
    if np.isfinite(t).any():
        i = int(np.nanargmin(t))
        text = (
            f"gradient transmission at step {int(last['step'].iloc[0])} ranges "
            f"{_g(np.nanmin(t))} (layer {int(last['layer'].iloc[i])}) to {_g(np.nanmax(t))}"
        )
        warn = "gradients vanish through depth" if np.nanmin(t) < 1e-3 else ""
        warn = "gradients explode through depth" if np.nanmax(t) > 1e3 else warn
        yield ("depth", "", text, warn)


RULES: list[Callable[[Run], Iterator[Row]]] = [
    _run_level,
    _events,
    _verification,
    _normalization,
    _residuals,
    _closure,
    _depth,
]
"""The finding rules, in report order (warnings are listed first in the result)."""


def findings(run: Run) -> pd.DataFrame:
    """The findings of ``run``: columns ``layer, symmetry, finding, warning``, rows with a
    warning first. Every finding carries the number behind it."""
    rows = [row for rule in RULES for row in rule(run)]
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    order = np.argsort(frame["warning"].eq("").to_numpy(), kind="stable")
    return frame.iloc[order].reset_index(drop=True)


def _first(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite[0]) if len(finite) else np.nan
