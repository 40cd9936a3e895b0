"""Comparing two runs, built for normalization (SGD + momentum + weight decay on a normalized
network) against a real adaptive optimizer (RMSprop or Adam on its un-normalized twin):
docs/theory.md §4,
Tanaka & Kunin 2021 NLD §4.

Per layer, the normalized run gives η_eff = η/((1 − β) r²), the implied RMSprop state
(r² in the part of √v, decay ρ_eff) and the angular update against its theory; the
adaptive run gives its real per-layer rate η/(√v + ε), averaged over the layer's
coordinates, from the per-tensor table of its store (``run.tensors``, see :data:`RATE_NOTE`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from noether_dyn.report import figures
from noether_dyn.report import formulas as F
from noether_dyn.report.arguments import check_output_args
from noether_dyn.report.data import (
    MissingData,
    RunLike,
    as_run,
    charge_cube,
    layer_of,
    param_group_table,
    tail_mask,
)
from noether_dyn.report.document import (
    Document,
    FindingList,
    Formula,
    Note,
    Paragraph,
    Section,
    Table,
    plot_or_note,
)
from noether_dyn.report.findings import finding_items, findings
from noether_dyn.report.normalization import scale_table
from noether_dyn.report.render import check_writable, output_format, write_document
from noether_dyn.store import Run
from noether_dyn.symmetries.kinds import normalized_kinds

RATE_NOTE = (
    "The direction rate |dq|/(r²|g|) of each layer (r² = |q|², norms over the layer's tensors) "
    "is in the same units for both runs: radians per step per unit of the gradient at unit "
    "norm; it equals η_eff for a normalized layer under SGD. Shown as the median and the "
    "10%–90% range over the last 20% of logged steps (not a mean, which a few steps can "
    "dominate). "
    "B's per-layer rate is the mean over the layer's coordinates of η/G_ii, the rate at which "
    "the optimizer moves a raw coordinate per unit gradient: η/(√v_i + ε) for RMSprop and "
    "Adam (bias-corrected v), η for SGD. It comes from the run's per-tensor table "
    "(run.tensors: lr x inv_metric, averaged over the layer's tensors by size) at each logged "
    "step. For a normalized layer of A the same role is played by η_eff = η/((1 − β) r²), "
    "which moves the unit direction; compare time courses and decays, not raw magnitudes. "
    "A coordinate mean of η/G_ii is dominated by dead units (√v ≈ 0: rate η/ε); the direction "
    "rates above are not."
)


def layer_rate(run: Run, params: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Steps and the mean per-coordinate rate eta/G_ii over the tensors ``params`` of ``run``
    (size-weighted), from ``run.tensors``; empty arrays when the run has no such tensors."""
    meta = run.meta.get("parameters", []) or []
    index = {p["name"]: i for i, p in enumerate(meta)}
    pos = [index[n] for n in params if n in index]
    steps, data = run.tensor_array()
    if not pos or not len(steps):
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    sizes = np.array([float(np.prod(meta[i]["shape"])) for i in pos])
    groups = [meta[i]["group"] for i in pos]
    lr = run.groups.pivot(index="step", columns="grp", values="lr").reindex(steps)
    inv = data[:, pos, 4]  # inv_metric column
    rates = inv * lr[groups].to_numpy()
    return steps, rates @ sizes / sizes.sum()


def direction_rate(run: Run, params: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Steps and the per-layer direction rate ``|dq| / (r^2 |g|)`` over the tensors ``params``
    (r^2 = |q|^2, norms over the layer's tensors together), from ``run.tensors``: the angle the
    layer's direction turns per step (|dq|/r, small angles) per unit of the gradient at unit
    norm (r |g|). The same units for every optimizer, and for a scale-invariant layer under SGD
    equal to eta/r^2 (eta/((1 - beta) r^2) in momentum's steady state); coordinates that do not
    move (dead units) add nothing, unlike a coordinate mean of eta/G_ii. Empty arrays without
    a per-tensor table."""
    meta = run.meta.get("parameters", []) or []
    index = {p["name"]: i for i, p in enumerate(meta)}
    pos = [index[n] for n in params if n in index]
    steps, data = run.tensor_array()
    if not pos or not len(steps):
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    qq, gg, dd = (data[:, pos, c].sum(axis=1) for c in (0, 1, 2))  # sq_norm, grad_sq, update_sq
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.sqrt(dd) / (qq * np.sqrt(gg))
    return steps, np.where(np.isfinite(rate), rate, np.nan)


def tail_quantiles(values: np.ndarray) -> tuple[float, float, float]:
    """(10%, 50%, 90%) quantiles of the finite values over the last 20% of logged steps."""
    tail = values[tail_mask(len(values))] if len(values) else values
    tail = tail[np.isfinite(tail)]
    if not len(tail):
        return np.nan, np.nan, np.nan
    q10, q50, q90 = np.quantile(tail, [0.1, 0.5, 0.9])
    return float(q10), float(q50), float(q90)


def _time_constant(rho: float) -> float:
    """1/(1 - rho) steps; inf for a sum (rho = 1), NaN when rho is unknown."""
    if not np.isfinite(rho):
        return np.nan
    return 1 / (1 - rho) if rho < 1 else np.inf


def _label(run: Run, other: Run, tag: str) -> str:
    name = run.path.parent.name
    return f"{tag}: {name}" if name == other.path.parent.name else name


def _opt(run: Run) -> dict:
    return run.meta.get("optimizer") or {}


def accumulator_decay(run: Run) -> float:
    """Per-step decay of the adaptive run's real second-moment accumulator: RMSprop ``alpha``,
    Adam/AdamW ``betas[1]``, Adagrad 1 (a sum); NaN for other optimizers."""
    opt = _opt(run)
    groups = opt.get("param_groups") or [{}]
    g = groups[0]
    cls = opt.get("class")
    if cls == "RMSprop":
        return float(g.get("alpha", np.nan))
    if cls in ("Adam", "AdamW") and g.get("betas"):
        return float(g["betas"][1])
    if cls == "Adagrad":
        return 1.0
    return np.nan


def realized_rate(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Steps and the run-wide realized rate |dq|/|g| (update_norm / grad_norm)."""
    s = run.steps
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = s["update_norm"].to_numpy() / s["grad_norm"].to_numpy()
    return s["step"].to_numpy(), np.where(np.isfinite(rate), rate, np.nan)


def _span(q: tuple[float, float, float]) -> str:
    return "n/a" if not np.isfinite(q[0]) else f"{q[0]:.3g}–{q[2]:.3g}"


def _tail_mean(values: np.ndarray) -> float:
    tail = values[tail_mask(len(values))]
    return float(np.nanmean(tail)) if np.isfinite(tail).any() else np.nan


def layer_table(normalized: Run, adaptive: Run) -> pd.DataFrame:
    """Per normalized layer of ``normalized``, the implied adaptive state beside what the store
    gives for the same layer (same parameter names) of ``adaptive``."""
    table = scale_table(normalized)
    rho_b = accumulator_decay(adaptive)
    cls_b = _opt(adaptive).get("class", "?")
    b_scale = {
        tuple(s["params"]): s["symmetry"]
        for _, s in adaptive.symmetries.iterrows()
        if s["kind"] in normalized_kinds()
    }
    b_params = {p.get("name") for p in adaptive.meta.get("parameters", []) or []}
    cube_b = charge_cube(adaptive)
    _, rate_b = realized_rate(adaptive)
    params_a = dict(zip(normalized.symmetries["symmetry"], normalized.symmetries["params"]))
    rows = []
    for _, r in table.iterrows():
        params = tuple(params_a[r["symmetry"]])
        _, rate_layer = layer_rate(adaptive, params)
        layer_b = tail_quantiles(rate_layer)[1] if len(rate_layer) else np.nan
        dir_a = tail_quantiles(direction_rate(normalized, params)[1])
        dir_b = tail_quantiles(direction_rate(adaptive, params)[1])
        if params in b_scale:
            eff_b = _tail_mean(cube_b["effective_lr"][:, cube_b.index(b_scale[params])])
            status = f"scale symmetry {b_scale[params]}: η_eff shown"
        elif set(params) <= b_params:
            eff_b = np.nan
            status = "same parameters" if len(rate_layer) else "no per-tensor table in B's store"
        else:
            eff_b = np.nan
            status = "no parameters of this name"
        rows.append(
            {
                "layer": layer_of(params),
                "A η_eff first": r["eff_lr_first"],
                "A η_eff last": r["eff_lr_last"],
                "A r² last (√v scale)": r["r2_last"],
                "A ρ_eff": r["rho_eff"],
                "A 1/(1 − ρ_eff) (steps)": r["accumulator_steps"],
                "A angular / theory": r["angular_ratio"],
                "A direction rate median": dir_a[1],
                "A direction rate q10–q90": _span(dir_a),
                "B direction rate median": dir_b[1],
                "B direction rate q10–q90": _span(dir_b),
                f"B {cls_b} ρ": rho_b,
                "B 1/(1 − ρ) (steps)": _time_constant(rho_b),
                "B η/G per coordinate (layer mean, median over steps)": layer_b,
                "B η_eff (scale layer)": eff_b,
                "B |dq|/|g| run-wide": _tail_mean(rate_b),
                "B per-layer state": status,
            }
        )
    return pd.DataFrame(rows)


def loss_stats(run: Run) -> dict[str, float]:
    """``final`` (mean of the last 10% of finite logged losses), ``min`` and ``min_step``,
    ``first`` (mean of the first 10%) and ``diverged_at`` (first step whose gradient or
    parameter norm is not finite; NaN when none)."""
    s = run.steps
    loss = s["loss"].to_numpy(dtype=float)
    steps = s["step"].to_numpy()
    ok = np.isfinite(loss)
    bad = ~np.isfinite(s["grad_norm"].to_numpy(dtype=float)) | ~np.isfinite(
        s["param_norm"].to_numpy(dtype=float)
    )
    out = {"final": np.nan, "first": np.nan, "min": np.nan, "min_step": np.nan}
    out["diverged_at"] = float(steps[np.flatnonzero(bad)[0]]) if bad.any() else np.nan
    if ok.any():
        finite = loss[ok]
        k = max(1, len(finite) // 10)
        i = int(np.argmin(finite))
        out.update(
            final=float(np.mean(finite[-k:])),
            first=float(np.mean(finite[:k])),
            min=float(finite[i]),
            min_step=float(steps[ok][i]),
        )
    return out


def _hyper_text(run: Run) -> str:
    """Every param group's hyperparameters in one line (``g0: lr=0.1, ...; g1: ...``)."""
    frame, differ = param_group_table(run)
    keys = ("lr", "momentum", "alpha", "betas", "weight_decay", "eps")
    parts = []
    for r in frame.to_dict("records"):
        shown = [f"{k}={r[k]}" for k in keys if k in r and r[k] is not None]
        parts.append(f"g{r['group']}: " + ", ".join(shown))
    text = "; ".join(parts) or "?"
    return text + (f" (groups differ in {', '.join(differ)})" if differ else "")


def _summary(a: Run, b: Run, la: str, lb: str) -> Table:
    def facts(run: Run) -> dict:
        opt = _opt(run)
        s = run.steps
        stats = loss_stats(run)
        return {
            "model": (run.meta.get("model") or {}).get("class", "?"),
            "parameters": (run.meta.get("model") or {}).get("n_parameters", "?"),
            "optimizer": opt.get("class", "?"),
            "hyperparameters (every param group)": _hyper_text(run),
            "logged steps": len(s),
            "wall time (s)": float(s["wall_time"].max()) if len(s) else np.nan,
            "final loss (mean of last 10%)": stats["final"],
            "minimum loss": stats["min"],
            "symmetries": len(run.symmetries),
            "scale (normalized) layers": int(run.symmetries["kind"].isin(normalized_kinds()).sum()),
        }

    fa, fb = facts(a), facts(b)
    return Table(pd.DataFrame({"item": list(fa), la: list(fa.values()), lb: list(fb.values())}))


def _g(x: float) -> str:
    return f"{x:.3g}"


def _scale_story(run: Run, label: str) -> list[str]:
    """Sentences on a run's normalized layers: effective-rate trend, weight decay, equilibrium."""
    table = scale_table(run)
    out = []
    for r in table.itertuples(index=False):
        if not np.isfinite(r.eff_lr_change):
            continue
        trend = (
            f"fell {_g(1 / r.eff_lr_change)}x"
            if r.eff_lr_change < 1
            else f"rose {_g(r.eff_lr_change)}x"
        )
        if r.weight_decay == 0:
            out.append(
                f"In {label}, {r.layer} has no weight decay: its norm grew {_g(r.norm_growth)}x "
                f"and its effective rate η_eff = η/((1 − β) r²) {trend} (an Adagrad-like sum)."
            )
        elif np.isfinite(r.angular_ratio):
            out.append(
                f"In {label}, {r.layer}'s η_eff {trend} and it turns at "
                f"{_g(r.angular_ratio)} times its equilibrium angle θ* "
                f"({'at' if 2 / 3 <= r.angular_ratio <= 1.5 else 'away from'} equilibrium)."
            )
    return out


def _breaking_story(run: Run, label: str) -> list[str]:
    """A sentence on how much the learning rule moved the charges, relative to |Q_0|."""
    if _opt(run).get("prediction") != "flow":
        return []
    cube = charge_cube(run)
    if not len(cube.steps):
        return []
    with np.errstate(over="ignore", invalid="ignore"):
        rule = np.nansum(cube["rule"], axis=0)
    q0 = np.array([_first(cube["charge"][:, j]) for j in range(len(cube.names))])
    rel = np.abs(rule) / np.fmax(np.abs(q0), 1e-12)
    if not np.isfinite(rel).any():
        return []
    j = int(np.nanargmax(rel))
    return [
        f"In {label}, the optimizer's metric (not the loss) moved the charges gradient flow "
        f"would keep: the learning-rule term of {cube.names[j]} sums to {_g(rule[j])}, "
        f"{_g(100 * rel[j])}% of |Q₀|; the preconditioner redistributes norm between layers."
    ]


def _first(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite[0]) if len(finite) else np.nan


def verdict_blocks(a: Run, b: Run, la: str, lb: str) -> list:
    """The comparison's lead: which run trained better (final and minimum loss, with numbers)
    and why, in the terms of the theory (effective rates, charges, equilibrium)."""
    sa, sb = loss_stats(a), loss_stats(b)
    blocks: list = []
    div = [(lab, st["diverged_at"]) for lab, st in ((la, sa), (lb, sb))]
    if np.isfinite(sa["final"]) and np.isfinite(sb["final"]):
        better, worse = ((la, sa), (lb, sb)) if sa["final"] <= sb["final"] else ((lb, sb), (la, sa))
        gap = (worse[1]["final"] - better[1]["final"]) / max(abs(worse[1]["final"]), 1e-12)
        head = (
            f"{better[0]} trained better: final loss {_g(better[1]['final'])} against "
            f"{_g(worse[1]['final'])} for {worse[0]} ({_g(100 * gap)}% lower; means of the last "
            f"10% of logged steps). Minimum loss: {_g(sa['min'])} for {la} (step "
            f"{int(sa['min_step'])}), {_g(sb['min'])} for {lb} (step {int(sb['min_step'])})."
        )
        if gap < 0.01:
            head = (
                f"Neither run trained clearly better: final losses {_g(sa['final'])} ({la}) and "
                f"{_g(sb['final'])} ({lb}) differ by {_g(100 * gap)}%."
            )
    elif np.isfinite(sa["final"]) or np.isfinite(sb["final"]):
        ok, other = (la, sa) if np.isfinite(sa["final"]) else (lb, sb)
        head = (
            f"Only {ok} has a finite logged loss (final {_g(other['final'])}); the other run "
            "logged none or diverged, so it cannot be ranked by loss."
        )
    else:
        head = (
            "Neither run logged a finite loss (call monitor.log_loss(loss)), so they cannot be "
            "ranked by loss."
        )
    blocks.append(Paragraph(head))
    for lab, at in div:
        if np.isfinite(at):
            blocks.append(
                Note(
                    f"{lab} diverged: its gradients or parameters are NaN/Inf from step {int(at)}."
                )
            )
    why = _scale_story(a, la) + _scale_story(b, lb) + _breaking_story(a, la)
    why += _breaking_story(b, lb)
    rate_a, rate_b = _tail_mean(realized_rate(a)[1]), _tail_mean(realized_rate(b)[1])
    if np.isfinite(rate_a) and np.isfinite(rate_b):
        why.append(
            f"Realized step per unit gradient |dq|/|g| over the last 20% of steps: "
            f"{_g(rate_a)} for {la}, {_g(rate_b)} for {lb}."
        )
    if why:
        blocks.append(
            Paragraph(
                "Why, in the theory's terms (docs/theory.md §4; Tanaka & Kunin 2021 NLD): a "
                "normalized "
                "layer under SGD(M) is an adaptive optimizer with one accumulator per layer, "
                "whose rate is"
            )
        )
        blocks.append(Formula(F.EFFECTIVE_RATE))
        blocks.append(Paragraph(" ".join(why)))
    blocks.append(
        Paragraph(
            "These are measurements beside the loss, not a proof of cause: a rate that keeps "
            "falling (no weight decay) slows a layer down; a layer at equilibrium keeps a "
            "constant angular speed; a large learning-rule term means the preconditioner, not "
            "the loss, reshapes the weights."
        )
    )
    return blocks


def _rates_series(
    run: Run, layers: list[tuple[str, ...]] = ()
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """eta_eff of each scale layer, eta/G per coordinate of ``layers``, and |dq|/|g|."""
    cube = charge_cube(run) if len(run.symmetries) else None
    series = []
    if cube is not None:
        for j, (name, kind) in enumerate(zip(cube.names, cube.kinds)):
            if kind in normalized_kinds() and len(series) < 8:
                series.append((f"η_eff {name}", cube.steps, cube["effective_lr"][:, j]))
    for params in layers[:8]:
        steps, rate = layer_rate(run, params)
        if len(rate):
            series.append((f"η/G {layer_of(params)}", steps, rate))
    steps, rate = realized_rate(run)
    if np.isfinite(rate).any():
        series.append(("|dq|/|g| run-wide", steps, rate))
    return series


def compare_document(run_a: Run, run_b: Run) -> Document:
    """The comparison of two runs as a :class:`Document`."""
    la, lb = _label(run_a, run_b, "A"), _label(run_b, run_a, "B")
    sections = [
        Section(
            "verdict",
            "Which run trained better",
            [
                *verdict_blocks(run_a, run_b, la, lb),
                plot_or_note(
                    "loss",
                    "Training loss per logged step of both runs (one colour each; dots: each "
                    "run's minimum). Red bands: steps where a loss is NaN/Inf.",
                    lambda: figures.loss_figure([(la, run_a), (lb, run_b)]),
                    alt=f"Loss curves of {la} and {lb}.",
                ),
            ],
        ),
        Section(
            "runs",
            "Runs",
            [
                Paragraph(f"A = {la} ({run_a.path}), B = {lb} ({run_b.path})."),
                _summary(run_a, run_b, la, lb),
            ],
        ),
    ]
    items = finding_items(findings(run_a), la) + finding_items(findings(run_b), lb)
    rank = {"problem": 0, "check": 1, "info": 2}
    items.sort(key=lambda f: rank.get(f.severity, 3))
    sections.append(
        Section(
            "findings",
            "Findings of both runs",
            [FindingList(items)] if items else [Note("No findings.")],
        )
    )

    has_a = run_a.symmetries["kind"].isin(normalized_kinds()).any()
    has_b = run_b.symmetries["kind"].isin(normalized_kinds()).any()
    norm, adapt, ln, ladapt = (
        (run_a, run_b, la, lb) if has_a or not has_b else (run_b, run_a, lb, la)
    )
    blocks: list = [
        Paragraph(
            [
                "docs/theory.md §4 (Tanaka & Kunin 2021 NLD §4): a normalized layer trained with "
                "SGD(M) "
                "and L2 weight decay behaves like an adaptive optimizer with one accumulator per "
                "layer: its direction moves at ",
                F.EFFECTIVE_RATE,
                ", r² plays √v and r⁴ is an exponential average with decay ",
                F.IMPLIED_DECAY,
                f". Below, A = {ln} (the normalized run) beside B = {ladapt}, layers matched by "
                "parameter name. The rates are not in the same units: η_eff is the rate of the "
                "unit direction, η/(√v + ε) the rate of raw coordinates; compare their time "
                "courses and accumulator decays.",
            ]
        )
    ]
    if not (has_a or has_b):
        blocks.append(
            Note(
                "Neither run tracks a scale symmetry (normalized layer): no implied "
                "adaptive state to compare."
            )
        )
    else:
        blocks.append(Table(layer_table(norm, adapt)))
        scale_params = [
            tuple(s["params"])
            for _, s in norm.symmetries.iterrows()
            if s["kind"] in normalized_kinds()
        ]
        blocks.append(
            plot_or_note(
                "rates",
                "Effective rates per step (log scale): per normalized layer of A its η_eff, per "
                "same-named layer of B the mean per-coordinate rate η/G, and each run's realized "
                "rate |dq|/|g|.",
                lambda: figures.rates_figure(
                    _rates_series(norm), _rates_series(adapt, scale_params), ln, ladapt
                ),
            )
        )
    blocks.append(Note(RATE_NOTE))
    sections.append(Section("normalization", "Normalization vs adaptive optimization", blocks))

    for tag, run, label in (("a", run_a, la), ("b", run_b, lb)):
        regime = _opt(run).get("prediction", "")
        try:
            names, choice = figures.select_symmetries(run, limit=4)
            block_list = [
                plot_or_note(
                    f"charges-{tag}",
                    f"Charges of {label}: measured (solid) and predicted (dashed) charge Q, "
                    "and the signed relative residual (Q − P)/max(|P|, |Q₀|) beside it.",
                    lambda r=run, n=names, g=regime: figures.charges_figure(r, n, g),
                )
            ]
            if choice:
                block_list.insert(0, Note(choice.capitalize() + "."))
        except MissingData as exc:
            block_list = [Note(f"No charge figure: {exc}.")]
        sections.append(Section(f"charges-{tag}", f"Charges of {label}", block_list))
    return Document(
        title=f"noether-dyn comparison: {la} vs {lb}",
        subtitle=f"{_opt(run_a).get('class', '?')} vs {_opt(run_b).get('class', '?')}",
        sections=sections,
    )


def compare(run_a: RunLike, run_b: RunLike, path: str | Path, format: str | None = None) -> Path:
    """Write the comparison report of two runs (normalization vs RMSprop/Adam: docs/theory.md §4).

    Args:
        run_a, run_b: runs or their paths; the one with scale symmetries is read as the
            normalized run.
        path: output file; ``.md`` gives Markdown (figures in ``<stem>_files/``), else HTML.
        format: ``"html"`` or ``"md"`` to override the suffix.

    Returns:
        The written path. Raises ``StoreError`` for a bad run and ``OSError`` for an unwritable
        path (checked before rendering).
    """
    check_output_args("compare", {"run_a": run_a, "run_b": run_b}, path, format)
    fmt = output_format(path, format)
    a, b = as_run(run_a), as_run(run_b)
    check_writable(path)
    with np.errstate(all="ignore"):  # non-finite data is shown, numpy's warnings add nothing
        doc = compare_document(a, b)
    return write_document(doc, path, fmt)
