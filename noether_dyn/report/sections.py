"""The sections of a run's report, one small builder each (add one to :data:`SECTIONS`).

A builder takes a :class:`Run` and returns a :class:`Section` or None (nothing to say). Figures
whose data is missing become notes (:func:`plot_or_note`), so a run without a loss, without
symmetries or without steps still reports.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from noether_dyn.quantities.effective_rate import RATE_RULES
from noether_dyn.report import figures
from noether_dyn.report import formulas as F
from noether_dyn.report.data import (
    MissingData,
    charge_cube,
    first_last,
    layer_of,
    param_group_table,
    param_sizes,
)
from noether_dyn.report.document import (
    Code,
    Document,
    FindingList,
    Formula,
    Note,
    Paragraph,
    Section,
    Table,
    plot_or_note,
    printable,
)
from noether_dyn.report.findings import (
    CLOSURE_TOLERANCE,
    closure_check,
    finding_items,
    findings,
)
from noether_dyn.report.normalization import scale_table
from noether_dyn.store import Run

PREDICTION_TEXT = {
    "sgd": (
        F.SGD_RECURSION,
        "SGD without momentum: the exact recursion above (docs/theory.md §3.2), rolled from the "
        "first "
        "step with the measured gradients. It is exact when the symmetry is, so the residual is "
        "the symmetry defect alone.",
    ),
    "momentum": (
        F.MOMENTUM_RECURSION,
        "SGD with momentum: the exact discrete recurrence above (docs/theory.md §3.2b; ρ = β "
        "η_n/η_(n−1), "
        "c = (1 − d) η λ; torch's undamped first step, dampening and Nesterov included), rolled "
        "from the first step with the measured updates. It is exact when the symmetry is, so the "
        "residual is the symmetry defect alone. The continuous damped oscillator of Neural "
        "Mechanics (Kunin et al. 2021; docs/theory.md §3.3) is stored beside it as predicted_ode; "
        "its "
        "residual is a finite-step error, first order in η.",
    ),
    "flow": (
        F.FLOW,
        "a preconditioned or unknown rule: the prediction is what gradient flow conserves, the "
        "charge decaying by weight decay alone (docs/theory.md §3). The residual is then the whole "
        "breaking by the optimizer's metric and finite step, which the decomposition below "
        "splits into its learning-rule and KSB terms (docs/theory.md §3.1).",
    ),
}
"""Per prediction regime: the formula and what its residual means."""


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
            *(
                [("symmetries tracked from step", str(meta["symmetries_from_step"]))]
                if meta.get("symmetries_from_step") is not None
                else []
            ),
            *(
                [("dropped candidates", str(len(run.dropped)))]
                if len(getattr(run, "dropped", ()))
                else []
            ),
        ],
        columns=["item", "value"],
    ).map(printable)


def summary_section(run: Run) -> Section:
    """Model, optimizer, steps, wall time, and every param group's hyperparameters."""
    model = run.meta.get("model") or {}
    blocks: list = [Table(run_facts(run))]
    groups, differ = param_group_table(run)
    if not groups.empty:
        if len(groups) > 1:
            diff = (
                f"they differ in {', '.join(differ)} (columns shown first)"
                if differ
                else "all hold the same hyperparameters"
            )
            caption = f"{len(groups)} param groups; {diff}."
        else:
            caption = "One param group."
        blocks.append(
            Table(
                groups,
                caption + " beta: the momentum of the kinetic metric (SGD momentum, Adam "
                "beta1); decoupled_weight_decay: weight decay as a friction (AdamW) instead of "
                "an L2 term.",
            )
        )
    if model.get("summary"):
        blocks.append(Code(str(model["summary"]), "model"))
    return Section("summary", "Run summary", blocks)


def findings_section(run: Run) -> Section:
    """The ranked findings: what happened, why, what to do, each linked to its figure."""
    frame = findings(run)
    counts = frame["severity"].value_counts()
    blocks: list = [
        Paragraph(
            f"{len(frame)} findings, most important first: {counts.get('problem', 0)} problems "
            f"(change the training), {counts.get('check', 0)} to check, {counts.get('info', 0)} "
            "for information. Each says what happened, why (with the number) and what to do, "
            "and links to the figure that shows it."
        )
    ]
    if len(frame):
        blocks.append(FindingList(finding_items(frame)))
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
                "exactness": sym.get("exactness", ""),
                "verify defect": sym["defect"],
                "mean defect": float(np.nanmean(defect)) if np.isfinite(defect).any() else np.nan,
                "max defect": float(np.nanmax(defect)) if np.isfinite(defect).any() else np.nan,
                "Q first": q0,
                "Q last": q1,
            }
        )
    blocks = [
        Paragraph(
            "Symmetries of the loss whose Noether charges are tracked (docs/theory.md §3; Kunin "
            "et al. "
            "2021 NM). size: parameters in the group; verified: checked numerically before "
            "training; defect |⟨g, ξ⟩|/(|g| |ξ|): 0 for an exact symmetry, measured every "
            f"logged step from the step's own gradient. {note.rstrip('.')}."
        ),
        Table(pd.DataFrame(rows)),
    ]
    start = run.meta.get("symmetries_from_step")
    if start is not None:
        blocks.append(
            Paragraph(f"Detected on the first training batch: tracked from step {start}.")
        )
    dropped = getattr(run, "dropped", None)
    if dropped is not None and len(dropped):
        blocks += [
            Paragraph(
                f"{len(dropped)} detected candidates were not tracked: their defect showed they "
                "are not symmetries of this training (the rule says why; a blank defect: no "
                "gradient reached them)."
            ),
            Table(dropped[["symmetry", "kind", "defect", "rule"]].reset_index(drop=True)),
        ]
    return Section("symmetries", "Symmetries", blocks)


def charges_section(run: Run) -> Section:
    """Measured charge against the prediction, with the relative residual beside it."""
    title = "Charges: measured vs predicted"
    regime = (run.meta.get("optimizer") or {}).get("prediction", "")
    formula, text = PREDICTION_TEXT.get(regime, (None, f"prediction regime {regime!r}."))
    blocks: list = [
        Paragraph(
            "A charge Q is the quantity a symmetry of the loss would conserve under gradient "
            "flow (Noether; Kunin et al. 2021 NM): |q_A|² for a scale symmetry, the norm "
            "difference between a unit's incoming and outgoing weights for rescale, a column "
            "sum for translation. The optimizer's finite steps and metric move it; the theory "
            "predicts how."
        )
    ]
    if formula is not None:
        blocks.append(Formula(formula, "Prediction used: " + text))
    else:
        blocks.append(Paragraph("Prediction used: " + text))
    blocks.append(
        Formula(
            F.RELATIVE_RESIDUAL,
            "Right-hand panels: 0 means the theory explains the charge exactly; ±0.01 is 1% off.",
        )
    )
    try:
        names, choice = figures.select_symmetries(run)
    except MissingData as exc:
        return Section("charges", title, [*blocks, Note(f"No charge figure: {exc}.")])
    if choice:
        blocks.append(Note(choice.capitalize() + "."))
    blocks.append(
        plot_or_note(
            "charges",
            "One row per symmetry. Left: measured charge Q (solid) and the prediction (dashed), "
            "in parameter units squared (param² ; a translation charge is in param). Right: the "
            "signed relative residual (Q − P)/max(|P|, |Q₀|) (dimensionless; the title gives "
            "its last value). Red bands: steps where Q or P is NaN/Inf.",
            lambda: figures.charges_figure(run, names, regime),
            alt=f"Measured vs predicted charges and relative residuals of {', '.join(names)}.",
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
                "Q − P last": q1 - p1,
                "relative residual": rel[j],
            }
        )
    blocks.append(
        Table(
            pd.DataFrame(rows),
            "relative residual: |Q − P| / max(|P|, |Q₀|) at the last logged step",
        )
    )
    return Section("charges", title, blocks)


def _decay_rule_note(run: Run) -> list:
    """What the decay column holds per symmetry (meta ``decay``; absent in older runs)."""
    decay = run.meta.get("decay") or {}
    by_sym, rules = decay.get("by_symmetry") or {}, decay.get("rules") or {}
    partial = sorted(n for n, r in by_sym.items() if r != "exact")
    if not by_sym:
        return [Note("This run does not record which rule filled its decay column.")]
    if not partial:
        return [Paragraph("decay is weight decay's true share of the change for every row.")]
    return [
        Note(
            f"decay of {', '.join(partial)} is the {rules.get('instantaneous', 'instantaneous')}"
            " (docs/theory.md §3.1). The other rows hold weight decay's true share."
        )
    ]


def ksb_section(run: Run) -> Section:
    """The exact decomposition decay / rule / ksb over time, and its totals."""
    title = "Kinetic symmetry breaking: decay, rule, KSB"
    intro: list = [
        Paragraph(
            "Each step's change of a charge splits exactly (docs/theory.md §3.1; Tanaka & Kunin "
            "2021 "
            "NLD) into what weight decay removes, what the learning rule adds (zero for plain "
            "SGD; nonzero for momentum and preconditioned rules) and the kinetic symmetry "
            "breaking of the finite step:"
        ),
        Formula(F.SPLIT),
        Paragraph(
            [
                "with ",
                F.DECAY_TERM,
                " (without momentum) and ",
                F.KSB_TERM,
                " for a scale "
                "charge. A term that dominates the accumulated change names what moves the charge.",
            ]
        ),
        *_decay_rule_note(run),
    ]
    try:
        names, choice = figures.select_symmetries(run)
    except MissingData as exc:
        return Section("ksb", title, [*intro, Note(f"No decomposition figure: {exc}.")])
    blocks: list = list(intro)
    if choice:
        blocks.append(Note(choice.capitalize() + "."))
    blocks.append(
        plot_or_note(
            "ksb",
            "Per symmetry: the three terms summed from the first logged step (solid) beside the "
            "measured change Q − Q₀ (dashed), in the charge's units; the solid lines add up to "
            "the dashed one. Red bands: steps where a term is NaN/Inf (the sums stop there).",
            lambda: figures.ksb_figure(run, names),
            alt=f"Accumulated decay, rule and KSB terms of {', '.join(names)}.",
        )
    )
    cube = charge_cube(run)
    with np.errstate(over="ignore", invalid="ignore"):
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
            "Totals over the logged steps (the sums equal the measured change up to the last "
            "step's own terms when every = 1).",
        )
    )
    return Section("ksb", title, blocks)


def lagrangian_section(run: Run) -> Section:
    """T, V and t/tau from the steps table."""
    s = run.steps
    blocks: list = [
        Paragraph(
            "A learning rule with momentum β is a mechanical system (docs/theory.md §2; Tanaka & "
            "Kunin "
            "2021 NLD) with mass m, the optimizer's metric G and friction 1 − β:"
        ),
        Formula(F.LAGRANGIAN),
        Formula(
            F.POTENTIAL,
            "with coupled (L2) weight decay. The exponential prefactor is never formed; t/τ is "
            "drawn instead.",
        ),
        plot_or_note(
            "lagrangian",
            "Left: kinetic energy T per step (log scale when positive). Middle: potential V = "
            "loss + L2 term and the loss, in loss units. Right: the log-prefactor t/τ "
            "(dimensionless). Red bands: steps where a value is NaN/Inf.",
            lambda: figures.lagrangian_figure(run),
            alt="Kinetic energy, potential and loss, and log-prefactor per logged step.",
        ),
    ]
    if not s.empty:
        cols = ["kinetic", "potential", "loss", "l2", "log_prefactor"]
        rows = [
            {
                "quantity": c,
                "first": first_last(s[c].to_numpy(dtype=float))[0],
                "last": first_last(s[c].to_numpy(dtype=float))[1],
                "non-finite steps": int((~np.isfinite(s[c].to_numpy(dtype=float))).sum()),
            }
            for c in cols
        ]
        blocks.append(Table(pd.DataFrame(rows), "first and last finite values"))
    return Section("lagrangian", "The Lagrangian: T, V and t/τ", blocks)


NORMALIZATION_HEADERS = {
    "symmetry": "symmetry",
    "layer": "layer",
    "lr": "η",
    "weight_decay": "λ",
    "beta": "β",
    "norm_growth": "|q| last/first",
    "eff_lr_first": "η_eff first",
    "eff_lr_last": "η_eff last",
    "r2_last": "r² last (√v scale)",
    "rho_eff": "ρ_eff",
    "equilibrium_steps": "equilibrium time (steps)",
    "regime": "regime",
    "angular_measured": "angular update (rad/step)",
    "angular_theory": "θ* (rad/step)",
    "r2_equilibrium": "r*² noise theory",
}


def _rate_rule(run: Run) -> str:
    """The effective-rate formula the run stored (runs before it was recorded used SGD's)."""
    opt = run.meta.get("optimizer") or {}
    return opt.get("effective_rate", RATE_RULES["sgd"] + " (recorded before rules by family)")


def normalization_section(run: Run) -> Section:
    """Normalization as adaptive optimization, per normalized layer (docs/theory.md §4)."""
    title = "Normalization as adaptive optimization"
    intro: list = [
        Paragraph(
            "A layer followed by a normalization is scale-invariant: only its direction q/|q| "
            "matters. Write q = r q̂. Under SGD(M) the direction moves with the effective rate "
            "(Tanaka & Kunin 2021 NLD §4; docs/theory.md §4)"
        ),
        Formula(F.EFFECTIVE_RATE),
        Paragraph(
            [
                "and r⁴ accumulates squared gradients like RMSprop's v: an exponential average "
                "with per-step decay ",
                F.IMPLIED_DECAY,
                " under L2 weight decay, a growing sum like Adagrad's without it. So r² plays "
                "√v with one accumulator per layer. With weight decay the layer settles where it "
                "turns by a fixed angle per step: ",
                F.ANGLE_SGD,
                " for SGD(M) with L2 decay (Wan et al. 2021 SMD), ",
                F.ANGLE_ADAMW,
                " for AdamW (Kosson et al. 2024 RE). Measured values average the last 20% of "
                "logged steps; the equilibrium time is 1/(1 − ρ_eff) for SGD(M) and 1/(2ηλ) for "
                "AdamW; r*² (noise theory) is the square root of ",
                F.RADIUS_NOISE,
                ". Under the adaptive rules (Adam/AdamW, RMSprop, Adagrad) the preconditioner "
                "rescales with the gradient, √v ∝ 1/r, so the direction's rate is η/r, not "
                "η/r² (Kosson et al. 2024 RE; Gould & Tanaka 2024).",
            ]
        ),
        Paragraph(f"Effective-rate rule of this run (column effective_lr): {_rate_rule(run)}."),
    ]
    table = scale_table(run)
    if table.empty:
        return Section(
            "normalization",
            title,
            [
                *intro,
                Note(
                    "No normalized layer: the run tracks no scale symmetry, so there is no implied "
                    "RMSprop state to show."
                ),
            ],
        )
    shown = table[list(NORMALIZATION_HEADERS)].rename(columns=NORMALIZATION_HEADERS)
    blocks: list = [
        *intro,
        Table(shown, "η: rate, λ: weight decay, β: momentum; angular update in rad/step"),
    ]
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
            "One colour per normalized layer. Left: effective learning rate "
            f"{_rate_rule(run)} (log scale). Middle: angular update of the layer's "
            "direction in rad/step, dashed at its equilibrium θ*. Right: r² = |q|², the "
            "implied √v of RMSprop (log scale). Red bands: NaN/Inf steps.",
            lambda: figures.normalization_figure(run, table),
            alt="Effective learning rate, angular update and squared weight norm per "
            "normalized layer.",
        )
    )
    return Section("normalization", title, blocks)


def depth_section(run: Run) -> Section | None:
    """Depth dynamics, only when the run holds a depth profile (docs/theory.md §5)."""
    d = run.depth_profile
    if d.empty:
        return None
    last = d[d["step"] == d["step"].max()].drop(columns=["step"])
    if not np.isfinite(last["stability"]).any():
        last = last.drop(columns=["stability"])
    blocks = [
        Paragraph(
            "The network read as an integrator (docs/theory.md §5): per layer j, sigma_max and "
            "sigma_min "
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


def diagnostics_section(run: Run) -> Section:
    """Self-checks of the toolkit on this run (not findings about the training)."""
    text, worst = closure_check(run)
    status = (
        "passes"
        if np.isfinite(worst) and worst <= CLOSURE_TOLERANCE
        else ("FAILS (see Findings)" if np.isfinite(worst) else "not checked")
    )
    return Section(
        "diagnostics",
        "Diagnostics (self-checks)",
        [
            Paragraph(
                f"Exact split check {status}: {text}. This identity holds by construction "
                "(docs/theory.md §3.1); it checks the store and the toolkit, not the training."
            )
        ],
    )


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
    diagnostics_section,
]
"""The report's sections, in page order: the one place to add a section. Each entry is a
function ``(run) -> Section | None`` (None: nothing to show for this run); it builds blocks from
the run alone and never writes files (see docs/contributing-report.md)."""


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
