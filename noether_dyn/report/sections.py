"""The sections of a run's report, one small builder each (add one to :data:`SECTIONS`).

A builder takes a :class:`Run` and returns a :class:`Section` or None (nothing to say). Figures
whose data is missing become notes (:func:`plot_or_note`), so a run without a loss, without
symmetries or without steps still reports.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from noether_dyn.report import figures
from noether_dyn.report.data import (
    MissingData,
    charge_cube,
    first_last,
    layer_of,
    param_sizes,
)
from noether_dyn.report.document import (
    Code,
    Document,
    Note,
    Paragraph,
    Section,
    Table,
    plot_or_note,
)
from noether_dyn.report.findings import findings
from noether_dyn.report.normalization import scale_table
from noether_dyn.store import Run

_NOISY_KEYS = {"params", "foreach", "differentiable", "fused", "capturable", "maximize"}

PREDICTION_TEXT = {
    "sgd": "SGD without momentum: the exact recursion Q_(n+1) = (1 - eta lambda)^2 Q_n + "
    "eta^2 |g_A|^2 (THEORY §3.2), rolled from the first step with the measured gradients; the "
    "residual is the symmetry defect alone.",
    "momentum": "SGD with momentum: the damped oscillator Q'' + 2 gamma Q' + omega^2 Q = "
    "2|q'_A|^2 of Neural Mechanics (Kunin et al. 2021; THEORY §3.3), driven by the measured "
    "updates; the residual is the finite-step error of that continuous theory.",
    "flow": "a preconditioned or unknown rule: the prediction is what gradient flow conserves, "
    "Q decaying by weight decay alone, so the residual is the whole breaking by the metric and "
    "the finite step, which the learning-rule and KSB terms split (THEORY §3.1).",
}


def run_facts(run: Run) -> pd.DataFrame:
    """The run summary as ``item, value`` rows: model, optimizer, steps, wall time, versions."""
    meta, s = run.meta, run.steps
    model = meta.get("model") or {}
    opt = meta.get("optimizer") or {}
    n_steps = len(s)
    wall = float(s["wall_time"].max()) if n_steps and s["wall_time"].notna().any() else np.nan
    span = f"steps {int(s['step'].min())} to {int(s['step'].max())}" if n_steps else "no steps"
    metric = str(opt.get("metric", "?")) + (
        "; Euclidean fallback" if opt.get("metric_fallback") else ""
    )
    return pd.DataFrame(
        [
            ("run", str(run.path)),
            (
                "model",
                f"{model.get('class', '?')} ({_count(model.get('n_parameters'))} parameters, "
                f"{_count(model.get('n_trainable'))} trainable)",
            ),
            ("optimizer", f"{opt.get('class', '?')} (adapter {opt.get('adapter', '?')})"),
            ("kinetic metric", metric),
            ("prediction", str(opt.get("prediction", "?"))),
            ("logged steps", f"{n_steps} ({span}, every {meta.get('every', 1)})"),
            ("wall time", "n/a" if np.isnan(wall) else f"{wall:.1f} s"),
            ("started", str(meta.get("started", "?"))),
            (
                "versions",
                f"noether-dyn {meta.get('noether_dyn_version', '?')}, torch "
                f"{meta.get('torch_version', '?')}",
            ),
            ("command", str(meta.get("command", "?"))),
            ("symmetries", f"{len(run.symmetries)} ({meta.get('symmetry_note') or 'no note'})"),
        ],
        columns=["item", "value"],
    )


def summary_section(run: Run) -> Section:
    """Model, optimizer and hyperparameters, steps, wall time."""
    meta = run.meta
    model = meta.get("model") or {}
    opt = meta.get("optimizer") or {}
    facts = run_facts(run)
    groups = [
        {"group": i, **{k: v for k, v in g.items() if k not in _NOISY_KEYS}}
        for i, g in enumerate(opt.get("param_groups") or [])
    ]
    blocks = [Table(facts)]
    if groups:
        blocks.append(
            Table(
                pd.DataFrame(groups),
                "Param groups (beta: the momentum of the "
                "kinetic metric; decoupled: weight decay as friction, as in AdamW)",
            )
        )
    if model.get("summary"):
        blocks.append(Code(str(model["summary"]), "model"))
    return Section("summary", "Run summary", blocks)


def findings_section(run: Run) -> Section:
    """The plain-language findings table (warnings first)."""
    frame = findings(run)
    n_warn = int((frame["warning"] != "").sum())
    blocks = [
        Paragraph(
            f"{len(frame)} findings, {n_warn} with a warning. Each states the number "
            "behind it; the other sections show the curves."
        ),
        Table(frame),
    ]
    return Section("findings", "Findings", blocks)


def symmetry_section(run: Run) -> Section:
    """Per tracked symmetry: kind, layer, size, verification and defect."""
    syms = run.symmetries
    note = run.meta.get("symmetry_note") or ""
    if syms.empty:
        return Section(
            "symmetries",
            "Symmetries",
            [Note(f"No symmetry is tracked: {note or 'no note recorded'}.")],
        )
    cube = charge_cube(run)
    sizes = param_sizes(run)
    rows = []
    for _, sym in syms.iterrows():
        j = cube.index(sym["symmetry"])
        defect = cube["defect"][:, j]
        q0, q1 = first_last(cube["charge"][:, j])
        known = [sizes.get(p) for p in sym["params"]]
        rows.append(
            {
                "symmetry": sym["symmetry"],
                "kind": sym["kind"],
                "layer": layer_of(sym["params"]),
                "size": sum(known) if all(k is not None for k in known) else None,
                "verified": sym["verified"],
                "verify defect": sym["defect"],
                "mean defect": float(np.nanmean(defect)) if np.isfinite(defect).any() else np.nan,
                "max defect": float(np.nanmax(defect)) if np.isfinite(defect).any() else np.nan,
                "Q first": q0,
                "Q last": q1,
            }
        )
    blocks = [
        Paragraph(
            "Symmetries of the loss whose Noether charges are tracked (THEORY §3; Kunin et al. "
            "2021 NM). size: parameters in the group; verified: checked numerically before "
            "training; defect |<g, xi>|/(|g||xi|): 0 for an exact symmetry, measured every "
            f"logged step from the step's own gradient. {note.rstrip('.')}."
        ),
        Table(pd.DataFrame(rows)),
    ]
    return Section("symmetries", "Symmetries", blocks)


def charges_section(run: Run) -> Section:
    """Measured charge against the prediction, with the residual."""
    regime = (run.meta.get("optimizer") or {}).get("prediction", "")
    blocks: list = [Paragraph("Prediction used: " + PREDICTION_TEXT.get(regime, f"{regime!r}."))]
    try:
        names, choice = figures.select_symmetries(run)
    except MissingData as exc:
        return Section(
            "charges", "Charges: measured vs predicted", [Note(f"No charge figure: {exc}.")]
        )
    if choice:
        blocks.append(Note(choice.capitalize() + "."))
    blocks.append(
        plot_or_note(
            "charges",
            "Charge Q (solid) and prediction (dashed); right: residual.",
            lambda: figures.charges_figure(run, names, regime),
        )
    )
    cube = charge_cube(run)
    rel = figures.relative_residual(cube)
    rows = []
    for j, name in enumerate(cube.names):
        q0, q1 = first_last(cube["charge"][:, j])
        _, p1 = first_last(cube["predicted"][:, j])
        rows.append(
            {
                "symmetry": name,
                "Q first": q0,
                "Q last": q1,
                "predicted last": p1,
                "residual last": q1 - p1,
                "relative residual": rel[j],
            }
        )
    blocks.append(
        Table(
            pd.DataFrame(rows),
            "relative residual: |Q - predicted| / max(|predicted|, |Q_0|) at the last logged step",
        )
    )
    return Section("charges", "Charges: measured vs predicted", blocks)


def ksb_section(run: Run) -> Section:
    """The exact decomposition decay / rule / ksb over time, and its totals."""
    title = "Kinetic symmetry breaking: decay, rule, KSB"
    intro = Paragraph(
        "Each charge's change splits exactly (THEORY §3.1; Tanaka & Kunin 2021 NLD): "
        "Q_(n+1) - Q_n = decay + rule + ksb, with decay the weight-decay part -2 eta lambda Q_n, "
        "rule what the learning rule adds (zero for plain SGD, nonzero for momentum and "
        "preconditioned rules) and ksb |dq_n|^2, the finite-step kinetic symmetry breaking."
    )
    try:
        names, choice = figures.select_symmetries(run)
    except MissingData as exc:
        return Section("ksb", title, [intro, Note(f"No decomposition figure: {exc}.")])
    blocks: list = [intro]
    if choice:
        blocks.append(Note(choice.capitalize() + "."))
    blocks.append(
        plot_or_note(
            "ksb",
            "Accumulated decay, rule and KSB terms beside the measured change (dashed).",
            lambda: figures.ksb_figure(run, names),
        )
    )
    cube = charge_cube(run)
    totals = {c: np.nansum(cube[c], axis=0) for c in ("decay", "rule", "ksb")}
    rows = []
    for j, name in enumerate(cube.names):
        q0, q1 = first_last(cube["charge"][:, j])
        rows.append(
            {
                "symmetry": name,
                "measured change": q1 - q0,
                "sum decay": totals["decay"][j],
                "sum rule": totals["rule"][j],
                "sum ksb": totals["ksb"][j],
            }
        )
    blocks.append(
        Table(
            pd.DataFrame(rows),
            "Totals over the logged steps (the sums equal the "
            "measured change up to the last step's own terms when every = 1).",
        )
    )
    return Section("ksb", title, blocks)


def lagrangian_section(run: Run) -> Section:
    """T, V and t/tau from the steps table."""
    s = run.steps
    blocks: list = [
        Paragraph(
            "L = e^(t/tau) (T - V) (THEORY §2; Tanaka & Kunin 2021 NLD): kinetic T = (m/2) "
            "q'^T G q' with mass m = eta(1+beta)/2 and the optimizer's metric G, potential "
            "V = loss + (lambda/2)|q|^2 (coupled weight decay), and the log-prefactor t/tau with "
            "tau = m/(1-beta); e^(t/tau) itself is never formed."
        ),
        plot_or_note(
            "lagrangian",
            "Kinetic energy, potential and log-prefactor per step.",
            lambda: figures.lagrangian_figure(run),
        ),
    ]
    if not s.empty:
        cols = ["kinetic", "potential", "loss", "l2", "log_prefactor"]
        rows = [
            {
                "quantity": c,
                "first": first_last(s[c].to_numpy())[0],
                "last": first_last(s[c].to_numpy())[1],
            }
            for c in cols
        ]
        blocks.append(Table(pd.DataFrame(rows)))
    return Section("lagrangian", "The Lagrangian: T, V and t/tau", blocks)


NORMALIZATION_HEADERS = {
    "symmetry": "symmetry",
    "layer": "layer",
    "lr": "eta",
    "weight_decay": "lambda",
    "beta": "beta",
    "norm_growth": "|q| last/first",
    "eff_lr_first": "eta_eff first",
    "eff_lr_last": "eta_eff last",
    "r2_last": "r^2 last (sqrt(v) scale)",
    "rho_eff": "rho_eff",
    "equilibrium_steps": "equilibrium time (steps)",
    "regime": "regime",
    "angular_measured": "angular update",
    "angular_theory": "theory",
    "r2_equilibrium": "r*^2 noise theory",
}


def normalization_section(run: Run) -> Section:
    """Normalization as adaptive optimization, per normalized layer (THEORY §4)."""
    title = "Normalization as adaptive optimization"
    intro = Paragraph(
        "A scale-invariant (normalized) layer with q = r qhat moves its direction with effective "
        "rate eta_eff = eta/((1-beta) r^2); r^4 accumulates squared gradients like RMSprop's v "
        "(an exponential average with per-step decay rho_eff = 1 - 4 eta lambda/(1-beta) under "
        "weight decay, a sum like Adagrad's without), so r^2 plays sqrt(v), one accumulator per "
        "layer (Tanaka & Kunin 2021 NLD §4; THEORY §4). At equilibrium the angular update per "
        "step is sqrt(2 eta lambda/(1+beta)) for SGD(M) with L2 decay (Wan et al. 2021 SMD) and "
        "sqrt(2 eta lambda (1-beta1)/(1+beta1)) for AdamW (Kosson et al. 2024 RE); measured "
        "values average the last 20% of logged steps. Equilibrium time: 1/(1-rho_eff) for "
        "SGD(M), 1/(2 eta lambda) (the decay time of |q|^2) for AdamW. r*^2 noise theory: "
        "sqrt(eta E|ghat|^2/(2 lambda (1-beta))) with |ghat|^2 = |g_A|^2 r^2 (SMD, RE)."
    )
    table = scale_table(run)
    if table.empty:
        return Section(
            "normalization",
            title,
            [
                intro,
                Note(
                    "No normalized layer: the run tracks no scale symmetry, so there is no implied "
                    "RMSprop state to show."
                ),
            ],
        )
    shown = table[list(NORMALIZATION_HEADERS)].rename(columns=NORMALIZATION_HEADERS)
    blocks: list = [intro, Table(shown)]
    opt = (run.meta.get("optimizer") or {}).get("class", "")
    if opt not in ("SGD",):
        blocks.append(
            Note(
                f"This run uses {opt}: rho_eff and the noise equilibrium are derived for SGD(M) "
                "with L2 decay only (n/a here). The store does not hold the optimizer's "
                "per-parameter state v, so eta/(sqrt(v)+eps) of the layers is not shown; "
                "eta_eff above is the normalization-implied rate from |q|^2."
            )
        )
    blocks.append(
        plot_or_note(
            "normalization",
            "Per normalized layer: effective learning rate, "
            "angular update (dashed: equilibrium theory), r^2.",
            lambda: figures.normalization_figure(run, table),
        )
    )
    return Section("normalization", title, blocks)


def depth_section(run: Run) -> Section | None:
    """Depth dynamics, only when the run holds a depth profile (THEORY §5)."""
    d = run.depth_profile
    if d.empty:
        return None
    last = d[d["step"] == d["step"].max()].drop(columns=["step"])
    if not np.isfinite(last["stability"]).any():
        last = last.drop(columns=["stability"])
    blocks = [
        Paragraph(
            "The network read as an integrator (THEORY §5): per layer j, sigma_max and sigma_min "
            "of the backward sensitivity M_j = dy_L/dy_j, the symplecticity defect "
            "|M^T J M - J|_F/|J|_F, the gradient transmission |dL/dy_j|/|dL/dy_L| and, when "
            "recorded, the forward-Euler stability factor max|1 + h lambda(J_j)| (Haber & "
            "Ruthotto 2018)."
        ),
        plot_or_note("depth", "Depth profile per layer.", lambda: figures.depth_figure(run)),
        Table(last, f"Depth profile at step {int(d['step'].max())}."),
    ]
    if np.isfinite(d["stability"]).any():
        blocks.append(Table(_stability_trace(d), _STABILITY_CAPTION))
    return Section("depth", "Depth dynamics", blocks)


_STABILITY_CAPTION = (
    "Forward-Euler stability along training: per recorded step, the largest factor "
    "max|1 + h lambda| over the residual layers, the layer holding it and how many layers exceed "
    "1 (a direction that grows through the layer; noether_dyn.depth.stability_profile also gives "
    "each layer's largest stable step h_max)."
)


def _stability_trace(d: pd.DataFrame) -> pd.DataFrame:
    """Per step: the worst stability factor, its layer, and the count of layers above 1."""
    rows = []
    for step, sub in d[np.isfinite(d["stability"])].groupby("step"):
        worst = sub.loc[sub["stability"].idxmax()]
        rows.append(
            {
                "step": int(step),
                "max stability": float(worst["stability"]),
                "at layer": int(worst["layer"]),
                "layers > 1": int((sub["stability"] > 1).sum()),
            }
        )
    return pd.DataFrame(rows)


def events_section(run: Run) -> Section | None:
    """Events the run recorded (non-finite values, resumes), when there are any."""
    e = run.events
    if e.empty:
        return None
    blocks: list = [Table(e.head(50))]
    if len(e) > 50:
        blocks.append(Note(f"First 50 of {len(e)} events shown."))
    return Section("events", "Events", blocks)


SECTIONS: list[Callable[[Run], Section | None]] = [
    summary_section,
    findings_section,
    symmetry_section,
    charges_section,
    ksb_section,
    lagrangian_section,
    normalization_section,
    depth_section,
    events_section,
]
"""The report's sections in order."""


def run_document(run: Run) -> Document:
    """The report of one run as a :class:`Document`."""
    sections = [s for build in SECTIONS if (s := build(run)) is not None]
    opt = (run.meta.get("optimizer") or {}).get("class", "?")
    model = (run.meta.get("model") or {}).get("class", "?")
    return Document(
        title=f"noether-dyn report: {run.path.parent.name}",
        subtitle=f"{model} trained with {opt}, {len(run.steps)} logged steps",
        sections=sections,
    )


def _count(n: object) -> str:
    return f"{n:,}" if isinstance(n, int) else "?"
