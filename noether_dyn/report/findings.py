"""Findings: what a person should know about a run, each as what happened, why (with the number
behind it) and what to do, ranked by importance and linked to the figure that shows it.

:func:`findings` returns a DataFrame with one row per finding (columns :data:`COLUMNS`):
``severity`` (``problem``, ``check`` or ``info``, see
:data:`~noether_dyn.report.document.SEVERITIES`), ``layer`` and ``symmetry`` (where), ``what``,
``why`` and ``action``, the anchor ``figure`` of the figure or section that shows it, and for
terminals ``finding`` (what and why in one sentence) and ``warning`` (the action, empty when
nothing needs doing). Rows are ranked: severity first, then by ``weight``, the size of the effect.

Each rule is a small function of the run yielding :class:`Row`; add one to :data:`RULES`. Checks of
the toolkit itself (the exact split closing to rounding) are not findings: they are in the report's
diagnostics (:func:`closure_check`), and become a finding only when they fail.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from noether_dyn.report.data import charge_cube, first_last, hyper_for, layer_of
from noether_dyn.report.document import SEVERITIES, Finding, printable
from noether_dyn.report.figures import relative_residual
from noether_dyn.report.normalization import scale_table
from noether_dyn.store import Run

COLUMNS = (
    "severity",
    "layer",
    "symmetry",
    "what",
    "why",
    "action",
    "figure",
    "weight",
    "finding",
    "warning",
)

DEFECT_TOLERANCE = 1e-3
"""Mean symmetry defect above which a tracked symmetry is reported as broken by the loss."""
RESIDUAL_TOLERANCE = 0.05
"""Relative prediction residual at the last step above which a finding is raised."""
CLOSURE_TOLERANCE = 1e-5
"""Error of the exact split Q_{n+1} - Q_n = decay + rule + ksb, relative to
max(|Q_n| + |dQ|, |q_n|^2 of the whole model), above which the store is reported inconsistent
(float32 rounding stays near 1e-7, float64 near 1e-15)."""


@dataclass(frozen=True)
class Row:
    """One finding before ranking; ``weight`` orders findings of equal severity (larger first)."""

    severity: str
    layer: str
    symmetry: str
    what: str
    why: str
    action: str = ""
    figure: str = ""
    weight: float = 0.0


def _layer(name: str) -> str:
    """A layer's name for a sentence: ``fc1`` stays, a bare index ``0`` becomes ``layer 0``."""
    return f"layer {name}" if re.fullmatch(r"[\d.]+", name) else name


def _g(x: float) -> str:
    return f"{x:.3g}" if np.isfinite(x) else str(x)


def _pct(fraction: float) -> str:
    pct = 100 * fraction
    return f"{pct:,.0f}%" if abs(pct) >= 100 else f"{_g(pct)}%"


def _factor(ratio: float, up: str = "grew", down: str = "fell") -> str:
    if not np.isfinite(ratio) or ratio <= 0:
        return "changed by an undefined factor"
    return f"{up} {_g(ratio)}x" if ratio >= 1 else f"{down} {_g(1 / ratio)}x"


def _first_bad(steps: np.ndarray, values: np.ndarray) -> int | None:
    bad = np.flatnonzero(~np.isfinite(values))
    return int(steps[bad[0]]) if len(bad) else None


def _lr_text(run: Run) -> str:
    groups = (run.meta.get("optimizer") or {}).get("param_groups") or []
    rates = sorted({g.get("lr") for g in groups if isinstance(g.get("lr"), int | float)})
    return "η = " + ", ".join(_g(float(r)) for r in rates) if rates else "its learning rate"


def _run_level(run: Run) -> Iterator[Row]:
    s = run.steps
    opt = run.meta.get("optimizer") or {}
    if s.empty:
        yield Row(
            "problem",
            "run",
            "",
            "The run holds no logged step.",
            "the store has 0 step rows, so there is nothing to measure",
            "train under watch() and let the monitor flush (leave the `with` block or call "
            "monitor.close()); a run killed before its first flush stores nothing",
            "summary",
            1e9,
        )
        return
    steps = s["step"].to_numpy()
    norm = s["param_norm"].to_numpy(dtype=float)
    nan_from_start = bool(len(norm)) and not np.isfinite(norm[0])
    if nan_from_start:
        yield Row(
            "problem",
            "run",
            "",
            f"The parameters are not finite from the first logged step (step {steps[0]}).",
            f"|q| at step {steps[0]} is {norm[0]}: every charge and energy built from it is "
            "undefined",
            "check the initialization or the checkpoint the model was loaded from "
            "(torch.isfinite(p).all() for each parameter)",
            "fig-lagrangian",
            1e8,
        )
    loss = s["loss"].to_numpy(dtype=float)
    # a NaN loss reads back like an unlogged one (SQLite stores NaN as NULL): divergence is read
    # from the gradient and parameter norms, which are always logged
    bad = ~np.isfinite(s["grad_norm"].to_numpy(dtype=float)) | ~np.isfinite(norm) | np.isinf(loss)
    bad_step = int(steps[np.flatnonzero(bad)[0]]) if bad.any() else None
    if bad_step is not None and not nan_from_start:
        before = loss[(steps < bad_step) & np.isfinite(loss)]
        last_ok = f"; the last finite loss was {_g(before[-1])}" if len(before) else ""
        yield Row(
            "problem",
            "run",
            "",
            f"Training diverged: from step {bad_step} on the gradients or parameters are NaN "
            "or infinite.",
            f"{int(bad.sum())} of {len(s)} logged steps have a non-finite gradient or parameter "
            f"norm{last_ok}",
            f"lower the learning rate ({_lr_text(run)} now), clip gradients "
            "(torch.nn.utils.clip_grad_norm_), or check the inputs for NaN",
            "fig-lagrangian",
            1e7 + int(bad.sum()),
        )
    elif bad_step is None and not np.isfinite(loss).any():
        yield Row(
            "check",
            "run",
            "",
            "No loss was logged, so the potential V and the loss curve are missing.",
            f"the loss column is empty in all {len(s)} logged steps",
            "call monitor.log_loss(loss) before optimizer.step()",
            "fig-lagrangian",
        )
    finite = loss[np.isfinite(loss)]
    if len(finite):
        k = max(1, len(finite) // 10)
        first, last = float(np.mean(finite[:k])), float(np.mean(finite[-k:]))
        why = f"means of the first and last {k} finite logged losses: {_g(first)} and {_g(last)}"
        if last > first and bad_step is None:
            yield Row(
                "problem",
                "run",
                "",
                f"The loss rose over the run, from {_g(first)} to {_g(last)}.",
                why,
                f"lower the learning rate ({_lr_text(run)} now) or add warm-up",
                "fig-lagrangian",
                1e6 * (last - first) / max(abs(first), 1e-12),
            )
        elif last <= first:
            drop = (first - last) / abs(first) if first else np.nan
            yield Row(
                "info",
                "run",
                "",
                f"The loss fell from {_g(first)} to {_g(last)} ({_pct(drop)} lower).",
                why,
                "",
                "fig-lagrangian",
                1e3,
            )
    if opt.get("metric_fallback"):
        yield Row(
            "check",
            "run",
            "",
            f"{opt.get('class')} has no known kinetic metric; T, KSB and the Noether charge use "
            "the Euclidean metric G = I, β = 0.",
            "the optimizer is not one whose preconditioner the toolkit reads (SGD, RMSprop, "
            "Adam, AdamW, Adagrad)",
            "read the kinetic quantities as approximate, or register an adapter for it "
            "(see the contributor guide)",
            "summary",
        )
    if run.symmetries.empty:
        note = run.meta.get("symmetry_note") or "no symmetry recorded"
        yield Row(
            "check",
            "run",
            "",
            "No symmetry is tracked, so there are no charges to read.",
            note,
            "pass inputs= (and targets=, loss_fn=) or symmetries= to watch()",
            "symmetries",
        )


def _events(run: Run) -> Iterator[Row]:
    e = run.events
    if e.empty:
        return
    for kind, rows in e.groupby("kind", sort=True):
        first = rows["step"].min()
        nonfinite = str(kind).startswith("nonfinite")
        yield Row(
            "problem" if nonfinite else "info",
            "run",
            "",
            f"{len(rows)} '{kind}' event(s), the first at step {first}.",
            str(rows["message"].iloc[0]),
            "lower the learning rate, clip gradients or check the data" if nonfinite else "",
            "events",
            float(len(rows)),
        )


def _verification(run: Run) -> Iterator[Row]:
    cube = charge_cube(run)
    defect = cube["defect"]
    for _, sym in run.symmetries.iterrows():
        name, layer = sym["symmetry"], layer_of(sym["params"])
        col = defect[:, cube.index(name)]
        mean = float(np.nanmean(col)) if np.isfinite(col).any() else np.nan
        if sym["verified"] is False:
            yield Row(
                "check",
                layer,
                name,
                "Not a symmetry of this loss: it failed verification before training.",
                f"verification defect {_g(sym['defect'])}: {sym['note']}",
                "drop it from symmetries= or fix its parameter list; its charge is not conserved "
                "even by gradient flow",
                "symmetries",
                float(sym["defect"]) if sym["defect"] is not None else 0.0,
            )
        elif np.isfinite(mean) and mean > DEFECT_TOLERANCE:
            yield Row(
                "check",
                layer,
                name,
                "The loss breaks this symmetry during training.",
                f"mean defect |⟨g, ξ⟩|/(|g||ξ|) = {_g(mean)} (exact symmetry: 0; tolerance "
                f"{_g(DEFECT_TOLERANCE)})",
                "read this charge's drift as partly caused by the loss, not the optimizer",
                "symmetries",
                mean,
            )
        elif sym["verified"] is None:
            yield Row(
                "info",
                layer,
                name,
                "Not verified numerically.",
                "watch() was not given a batch to check it on",
                "pass inputs=, targets=, loss_fn= to watch() to verify it",
                "symmetries",
            )


def _normalization(run: Run) -> Iterator[Row]:
    table = scale_table(run)
    cube = charge_cube(run)
    if not len(cube.steps):
        return
    span = int(cube.steps[-1] - cube.steps[0] + 1)
    params = dict(zip(run.symmetries["symmetry"], run.symmetries["params"]))
    for _, r in table.iterrows():
        layer, name = r["layer"], r["symmetry"]
        who = _layer(layer)
        growth, change = r["norm_growth"], r["eff_lr_change"]
        hyper = hyper_for(run, params.get(name, ()))
        group = f"param group {hyper.group}" if hyper else "its param group"
        if not np.isfinite(change):
            continue
        if r["weight_decay"] == 0:
            sev = "check" if change < 0.5 else "info"
            yield Row(
                sev,
                layer,
                name,
                f"The effective learning rate of {who} {_factor(change, 'rose', 'fell')} over "
                f"{span} steps.",
                f"without weight decay its weight norm only grows ({_factor(growth)}): r⁴ "
                "accumulates like Adagrad's sum, so η_eff = η/((1 − β) r²) keeps shrinking",
                f"add weight decay to {group} (λ > 0): it bounds the norm and gives the layer an "
                "equilibrium rate (an RMSprop-like average instead of a sum)"
                if sev == "check"
                else "",
                "fig-normalization",
                abs(np.log(change)),
            )
            continue
        ratio, horizon = r["angular_ratio"], r["equilibrium_steps"]
        if not np.isfinite(ratio):
            continue
        why = (
            f"angular update {_g(r['angular_measured'])} rad/step against the equilibrium "
            f"θ* = {_g(r['angular_theory'])} rad/step (ratio {_g(ratio)}); weight norm "
            f"{_factor(growth)}"
        )
        if 2 / 3 <= ratio <= 1.5:
            yield Row(
                "info",
                layer,
                name,
                f"{who} turns at its rotational equilibrium rate.",
                why,
                "",
                "fig-normalization",
                abs(np.log(ratio)),
            )
        elif np.isfinite(horizon) and span < 3 * horizon:
            yield Row(
                "info",
                layer,
                name,
                f"{who} has not reached rotational equilibrium yet.",
                f"{why}; the run ({span} steps) is shorter than 3 equilibrium times "
                f"({_g(horizon)} steps each)",
                "train longer before reading the equilibrium",
                "fig-normalization",
                abs(np.log(ratio)),
            )
        else:
            yield Row(
                "check",
                layer,
                name,
                f"{who} stays away from rotational equilibrium.",
                f"{why}; after {span} steps, more than 3 equilibrium times ({_g(horizon)} steps)",
                "check that the layer is really scale-invariant and that its rate schedule is "
                "not changing faster than the equilibrium time",
                "fig-normalization",
                abs(np.log(ratio)),
            )


def _residuals(run: Run) -> Iterator[Row]:
    cube = charge_cube(run)
    if not len(cube.steps):
        return
    regime = (run.meta.get("optimizer") or {}).get("prediction", "")
    rel = relative_residual(cube)
    terms = {c: np.nansum(cube[c], axis=0) for c in ("decay", "rule", "ksb")}
    params = dict(zip(run.symmetries["symmetry"], run.symmetries["params"]))
    defect = cube["defect"]
    for j, name in enumerate(cube.names):
        if not np.isfinite(rel[j]) or rel[j] <= RESIDUAL_TOLERANCE:
            continue
        layer = layer_of(params.get(name, ()))
        q0, q1 = first_last(cube["charge"][:, j])
        if regime == "sgd":
            col = defect[:, j]
            mean = _g(float(np.nanmean(col))) if np.isfinite(col).any() else "n/a"
            yield Row(
                "check",
                layer,
                name,
                f"The charge departs from its exact SGD prediction by {_pct(rel[j])}.",
                "the SGD recursion is exact given the symmetry, so the gap is the symmetry "
                f"defect (mean {mean})",
                "check that the symmetry holds exactly (a norm layer's eps, a bias added after "
                "the norm, a parameter shared with another layer)",
                "fig-charges",
                rel[j],
            )
        elif regime == "momentum":
            yield Row(
                "info",
                layer,
                name,
                f"The charge departs from the continuous momentum theory by {_pct(rel[j])}.",
                "the damped-oscillator prediction (NM) is first order in η: the gap is the "
                "finite-step error, largest when η is large",
                "",
                "fig-charges",
                rel[j],
            )
        elif regime == "flow":
            scale = max(abs(q0), 1e-12)
            dq = q1 - q0
            effect, action = FLOW_EFFECT.get(cube.kinds[j], FLOW_EFFECT["scale"])
            yield Row(
                "info",
                layer,
                name,
                f"The optimizer moved this charge by {_g(dq)} ({_pct(dq / scale)} of |Q₀|), "
                "which gradient flow would keep constant up to weight decay.",
                f"the learning-rule term sums to {_g(terms['rule'][j])} and the finite-step KSB "
                f"term to {_g(terms['ksb'][j])}: the optimizer's preconditioner and step size, "
                f"not the loss, {effect}",
                action,
                "fig-ksb",
                rel[j],
            )


FLOW_EFFECT = {
    "scale": (
        "changed the norm of this normalized layer, and with it its effective rate η/r²",
        "nothing required; weight decay on this layer bounds its norm if the rate drifts",
    ),
    "rescale": (
        "moved norm between the weights into and out of these units (|q_in|² − |q_out|²)",
        "nothing required unless one side's norm runs away; weight decay pulls the charge "
        "toward 0 and keeps the layers balanced",
    ),
    "translation": (
        "shifted the logits' column sums, which the softmax ignores",
        "nothing required: the loss does not see this drift; weight decay bounds it",
    ),
}
"""Per symmetry kind: what a charge moved by the optimizer means, and what (if anything) to do."""


def closure_check(run: Run) -> tuple[str, float]:
    """The exact identity Q_{n+1} - Q_n = decay + rule + ksb (docs/theory.md §3.1) checked on
    consecutive
    logged steps: a sentence and the worst relative error (NaN when it cannot be checked)."""
    cube = charge_cube(run)
    if len(cube.steps) < 2:
        return "fewer than two logged steps: the exact split cannot be checked", np.nan
    consecutive = np.flatnonzero(np.diff(cube.steps) == 1)
    if not len(consecutive):
        return "no consecutive logged steps (every > 1): the exact split is not checked", np.nan
    q = cube["charge"]
    with np.errstate(over="ignore", invalid="ignore"):
        dq = q[consecutive + 1] - q[consecutive]
        split = (cube["decay"] + cube["rule"] + cube["ksb"])[consecutive]
        norm_sq = (
            run.steps.set_index("step")["param_norm"]
            .reindex(cube.steps[consecutive])
            .to_numpy(dtype=float)[:, None]
            ** 2
        )
        # rounding of a charge scales with the squared norms it is made of, bounded by |q|^2 of
        # the whole model (param_norm^2): rescale charges are small differences of large norms
        scale = np.fmax(np.abs(q[consecutive]) + np.abs(dq), norm_sq) + 1e-30
        err = np.abs(dq - split) / scale
    if not np.isfinite(err).any():
        return "no finite step pair: the exact split cannot be checked", np.nan
    worst = float(np.nanmax(err))
    j = int(np.nanargmax(np.nanmax(np.where(np.isfinite(err), err, -1.0), axis=0)))
    n_ok = int(np.isfinite(err).any(axis=1).sum())
    return (
        f"the exact split Q_(n+1) − Q_n = decay + rule + ksb closes to {_g(worst)} relative to "
        f"max(|Q_n| + |dQ|, |q_n|²) (worst: {cube.names[j]}) over {n_ok} finite consecutive "
        "step pairs",
        worst,
    )


def _closure(run: Run) -> Iterator[Row]:
    text, worst = closure_check(run)
    if np.isfinite(worst) and worst > CLOSURE_TOLERANCE:
        yield Row(
            "problem",
            "run",
            "",
            "The stored charge terms do not add up to the measured change.",
            f"{text} (tolerance {_g(CLOSURE_TOLERANCE)})",
            "the store may be inconsistent: re-record the run and report a bug with it",
            "diagnostics",
            worst,
        )


def _depth(run: Run) -> Iterator[Row]:
    d = run.depth_profile
    if d.empty:
        return
    last = d[d["step"] == d["step"].max()]
    t = last["transmission"].to_numpy(dtype=float)
    if not np.isfinite(t).any():
        return
    i = int(np.nanargmin(t))
    lo, hi = float(np.nanmin(t)), float(np.nanmax(t))
    why = (
        f"gradient transmission |∂L/∂y_j|/|∂L/∂y_L| at step {int(last['step'].iloc[0])} ranges "
        f"{_g(lo)} (layer {int(last['layer'].iloc[i])}) to {_g(hi)}"
    )
    if hi > 1e3:
        yield Row(
            "problem",
            "depth",
            "",
            "Gradients explode through depth.",
            why,
            "add normalization or residual scaling, or lower the initial weight scale",
            "fig-depth",
            np.log10(hi),
        )
    elif lo < 1e-3:
        yield Row(
            "problem",
            "depth",
            "",
            "Gradients vanish through depth.",
            why,
            "add residual connections or normalization, or raise the initial weight scale",
            "fig-depth",
            -np.log10(lo),
        )
    else:
        yield Row(
            "info",
            "depth",
            "",
            "Gradients pass through depth without blowing up.",
            why,
            "",
            "fig-depth",
        )


RULES: list[Callable[[Run], Iterator[Row]]] = [
    _run_level,
    _events,
    _verification,
    _normalization,
    _residuals,
    _closure,
    _depth,
]
"""The finding rules; their rows are ranked by severity, then weight."""


def findings(run: Run) -> pd.DataFrame:
    """The findings of ``run``, ranked (columns :data:`COLUMNS`). Every finding carries the
    number behind it."""
    rows = [row for rule in RULES for row in rule(run)]
    frame = pd.DataFrame(
        [
            {
                **row.__dict__,
                "finding": f"{row.what.rstrip('.')}: {row.why}",
                "warning": row.action if row.severity != "info" else "",
            }
            for row in rows
        ],
        columns=list(COLUMNS),
    )
    for col in ("layer", "symmetry", "what", "why", "action", "finding", "warning"):
        frame[col] = frame[col].astype(str).map(printable)
    rank = frame["severity"].map({s: i for i, s in enumerate(SEVERITIES)})
    order = np.lexsort((-frame["weight"].to_numpy(dtype=float), rank.to_numpy()))
    return frame.iloc[order].reset_index(drop=True)


def finding_items(frame: pd.DataFrame, prefix: str = "") -> list[Finding]:
    """The rows of a :func:`findings` frame as :class:`Finding` blocks; ``prefix`` (a run label)
    goes before each location and each figure anchor gets ``prefix``-free keys."""
    out = []
    for r in frame.itertuples(index=False):
        where = " ".join(x for x in (r.layer, r.symmetry) if x and x != "run")
        where = " ".join(x for x in (prefix, where) if x)
        out.append(Finding(r.severity, where, r.what, r.why, r.action, r.figure))
    return out
