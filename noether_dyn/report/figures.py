"""The report's figures, each drawn from a saved run alone.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (so no GUI
backend, no global figure registry, nothing to ``show``), or raises :class:`MissingData` with a
note saying what the run lacks. Lines longer than :data:`~noether_dyn.report.data.MAX_POINTS`
are min-max decimated.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from noether_dyn.report.data import (
    ChargeCube,
    MissingData,
    RunLike,
    as_run,
    charge_cube,
    decimate,
    first_last,
)
from noether_dyn.store import Run

MAX_PANELS = 8
"""Most symmetries drawn in one charge or KSB figure (the others are in the tables)."""

PALETTE = [
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#F0E442",  # yellow
]
"""One qualitative palette with distinct hues, safe for colour-blind readers (Okabe & Ito 2008,
"Color Universal Design"); lines beyond eight repeat the hues with a dotted style."""

NONFINITE_COLOR = "#B42318"
"""Shading of the steps where a drawn quantity is NaN or infinite."""

DRAW_LIMIT = 1e300
"""Largest magnitude drawn as a line; larger finite values are shaded like Inf."""

UNITS = {
    "charge": "charge Q (param²)",
    "translation": "charge Q (param)",
    "relative": "relative residual (1)",
    "kinetic": "T (loss units)",
    "potential": "V, loss (loss units)",
    "log_prefactor": "t/τ (1)",
    "effective_lr": "η_eff (1/(step·param²))",
    "angular": "angular update (rad/step)",
    "r2": "r² = |q|² (param²)",
    "loss": "loss (training objective)",
    "rate": "rate (per step)",
    "term": "change of Q (param²)",
}
"""Y-axis labels with units. ``param`` is the unit of a parameter's value; a scale or rescale
charge is a squared norm (param²), a translation charge a column sum (param). Rates are per
optimizer step; t/τ and residuals are dimensionless (1)."""

DEPTH_UNITS = {
    "sigma_max": "σ_max (gain, 1)",
    "sigma_min": "σ_min (gain, 1)",
    "transmission": "|∂L/∂y_j| / |∂L/∂y_L| (1)",
    "defect": "|MᵀJM − J|_F / |J|_F (1)",
    "stability": "max|1 + hλ| (1)",
}
"""Y labels of the depth panels: all are ratios of like quantities (dimensionless)."""


@contextmanager
def style() -> Iterator[None]:
    """The report's seaborn style, applied only while drawing."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        yield


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure (rendered by Agg when saved)."""
    return Figure(figsize=(width, height), layout="constrained")


def to_png(fig: Figure, dpi: int = 90) -> bytes:
    """PNG bytes of ``fig``; the figure is cleared afterwards to free its artists."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    fig.clear()
    return buf.getvalue()


def nonfinite_spans(x: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
    """(first x, last x) of each run of consecutive non-finite ``y`` values."""
    bad = ~np.isfinite(np.asarray(y, dtype=float))
    if not bad.any():
        return []
    edges = np.diff(np.concatenate([[0], bad.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    x = np.asarray(x)
    return [(float(x[a]), float(x[b])) for a, b in zip(starts, ends)]


def shade_nonfinite(ax: Axes, series: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> int:
    """Shade, on ``ax``, every stretch of steps where any of ``series`` is NaN or infinite (half a
    step beyond each end, so a single step shows); returns the number of non-finite values."""
    count = 0
    spans: list[tuple[float, float]] = []
    for _, x, y in series:
        y = np.asarray(y, dtype=float)
        count += int((~np.isfinite(y)).sum())
        spans += nonfinite_spans(x, y)
    merged: list[list[float]] = []
    for a, b in sorted(spans):  # one band per stretch, however many series share it
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    for i, (a, b) in enumerate(merged):
        ax.axvspan(
            a - 0.5,
            b + 0.5,
            color=NONFINITE_COLOR,
            alpha=0.18,
            linewidth=0,
            label="NaN/Inf or beyond 1e300 (not drawn)" if i == 0 else None,
        )
    return count


def finite_limits(ax: Axes, values: Sequence[np.ndarray], log: bool = False) -> None:
    """Set ``ax``'s y limits from the finite ``values`` with a 5% margin computed without
    overflow (values near the float64 maximum would otherwise give infinite limits, which
    matplotlib cannot draw)."""
    flat = np.concatenate([np.asarray(v, dtype=float).ravel() for v in values] or [np.zeros(0)])
    flat = flat[np.isfinite(flat)]
    if log:
        flat = flat[flat > 0]
    if not len(flat):
        return
    lo, hi = float(flat.min()), float(flat.max())
    big = DRAW_LIMIT * 1.5
    if log:
        ax.set_ylim(max(lo / 1.5, 1e-300), min(hi * 1.5, big))
        return
    pad = 0.05 * hi - 0.05 * lo
    if pad == 0:
        pad = 0.05 * abs(hi) or 1.0
    ax.set_ylim(max(lo - pad, -big), min(hi + pad, big))


def lines(
    ax: Axes,
    series: Sequence[tuple[str, np.ndarray, np.ndarray]],
    *,
    dashes: Sequence[str] = (),
    colors: Sequence | None = None,
    legend: bool = True,
    ylabel: str = "",
    log: bool = False,
) -> None:
    """Draw named (x, y) lines, each decimated; ``dashes`` names the dashed ones.

    Non-finite values cannot be drawn as a line: the steps that hold them are shaded instead
    (:func:`shade_nonfinite`), before decimation, so a blow-up is always visible. ``log`` uses a
    log y scale when every finite value is positive and within 1e±200.
    """
    # beyond DRAW_LIMIT matplotlib's axis arithmetic overflows: such values are shaded like Inf
    series = [
        (label, x, np.where(np.abs(y) <= DRAW_LIMIT, y, np.where(np.isnan(y), np.nan, np.inf)))
        for label, x, y in ((lab, x, np.asarray(y, dtype=float)) for lab, x, y in series)
    ]
    shade_nonfinite(ax, series)
    ax.set_ylabel(ylabel)
    drawn = [(label, *decimate(np.asarray(x), y)) for label, x, y in series]
    drawn = [(label, xs, ys) for label, xs, ys in drawn if len(ys)]
    if not drawn:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="best")
        return
    values = np.concatenate([ys for _, _, ys in drawn])
    # beyond ~1e±200 matplotlib's log locator overflows float64: a blown-up run is drawn linear
    log = log and bool((values > 0).all() and values.max() < 1e200 and values.min() > 1e-200)
    if log:
        ax.set_yscale("log")
    palette = list(colors or PALETTE)
    for i, (label, xs, ys) in enumerate(drawn):
        ax.plot(
            xs,
            ys,
            color=palette[i % len(palette)],
            linestyle=(0, (4, 2)) if label in dashes else "-",
            linewidth=1.4,
            label=label,
        )
    finite_limits(ax, [values], log)
    shaded = any(p.get_label() and not p.get_label().startswith("_") for p in ax.patches)
    if legend or shaded:
        handles, labels = ax.get_legend_handles_labels()
        if not legend:  # only the shading's entry
            keep = [i for i, lab in enumerate(labels) if lab.startswith("NaN/Inf")]
            handles, labels = [handles[i] for i in keep], [labels[i] for i in keep]
        ax.legend(handles, labels, fontsize="small", loc="best")


def select_symmetries(
    run: Run, symmetry: str | None = None, kind: str | None = None, limit: int = MAX_PANELS
) -> tuple[list[str], str]:
    """The symmetries a figure draws and a note on the choice.

    ``symmetry`` picks one by name (KeyError when unknown), ``kind`` keeps one kind (ValueError
    when the run has none of it). Beyond ``limit``, the symmetries with the largest relative
    prediction residual at the last step are drawn.
    """
    cube = charge_cube(run)
    if symmetry is not None:
        cube.index(symmetry)
        names = [symmetry]
    else:
        names = list(cube.names)
    if kind is not None:
        kinds = sorted(set(cube.kinds))
        names = [n for n in names if cube.kinds[cube.index(n)] == kind]
        if not names:
            raise ValueError(
                f"no {kind!r} symmetry in this run; its kinds: {', '.join(kinds) or 'none'}"
            )
    if not names:
        raise MissingData(
            "the run tracks no symmetry "
            f"({run.meta.get('symmetry_note') or 'no symmetry note recorded'})"
        )
    if len(cube.steps) == 0:
        raise MissingData("the run holds no charge rows yet (no step was logged)")
    if len(names) <= limit:
        return names, ""
    cols = [cube.index(n) for n in names]
    score = relative_residual(cube)[cols]
    order = np.argsort(-np.nan_to_num(score, nan=-1.0), kind="stable")[:limit]
    chosen = [names[i] for i in sorted(order)]
    return chosen, (
        f"showing {limit} of {len(names)} symmetries, those with the largest relative "
        "prediction residual at the last step; `noether-dyn plot RUN --symmetry NAME` draws "
        "any other"
    )


def relative_residual(cube: ChargeCube) -> np.ndarray:
    """Per symmetry, |charge - predicted| / max(|predicted|, |charge_0|) at the last finite
    step (NaN when undefined)."""
    charge, predicted = cube["charge"], cube["predicted"]
    out = np.full(len(cube.names), np.nan)
    for j in range(len(cube.names)):
        ok = np.flatnonzero(np.isfinite(charge[:, j]) & np.isfinite(predicted[:, j]))
        if len(ok):
            scale = max(abs(predicted[ok[-1], j]), abs(charge[ok[0], j]), 1e-12)
            out[j] = abs(charge[ok[-1], j] - predicted[ok[-1], j]) / scale
    return out


def relative_residual_series(cube: ChargeCube, j: int) -> np.ndarray:
    """(Q_n - P_n) / max(|P_n|, |Q_0|) per logged step for symmetry column ``j``: the signed
    relative residual whose last value :func:`relative_residual` reports (NaN where Q or P is
    not finite, +-inf never)."""
    q, p = cube["charge"][:, j], cube["predicted"][:, j]
    finite = np.flatnonzero(np.isfinite(q))
    q0 = abs(q[finite[0]]) if len(finite) else np.nan
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        scale = np.fmax(np.abs(p), q0)
        out = (q - p) / np.fmax(scale, 1e-12)
    return np.where(np.isfinite(q) & np.isfinite(p), out, np.nan)


def charge_label(kind: str) -> str:
    """Y label of a charge of ``kind`` with its unit."""
    return UNITS["translation"] if kind == "translation" else UNITS["charge"]


def charges_figure(run: Run, names: Sequence[str], regime: str = "") -> Figure:
    """Measured charge Q_n beside the theory's prediction (left) and their signed relative
    residual (Q - P)/max(|P|, |Q_0|) (right), one row per symmetry (docs/theory.md §3.2-3.3; Kunin
    et al.
    2021 NM, Tanaka & Kunin 2021 NLD)."""
    cube = charge_cube(run)
    pred_label = "predicted (gradient flow)" if regime == "flow" else "predicted"
    with style():
        fig = new_figure(11, 2.3 * len(names) + 0.5)
        axes = fig.subplots(len(names), 2, squeeze=False, width_ratios=(3, 2))
        for row, name in enumerate(names):
            j = cube.index(name)
            q, p = cube["charge"][:, j], cube["predicted"][:, j]
            left, right = axes[row]
            lines(
                left,
                [("measured", cube.steps, q), (pred_label, cube.steps, p)],
                dashes=[pred_label],
                ylabel=charge_label(cube.kinds[j]),
            )
            left.set_title(f"{name} ({cube.kinds[j]}): measured vs predicted", loc="left")
            rel = relative_residual_series(cube, j)
            lines(
                right,
                [("(Q − P)/max(|P|, |Q₀|)", cube.steps, rel)],
                colors=[PALETTE[3]],
                legend=False,
                ylabel=UNITS["relative"],
            )
            right.axhline(0.0, color="0.4", linewidth=0.8)
            last = rel[np.isfinite(rel)]
            tail = f" (last {100 * last[-1]:+.2g}%)" if len(last) else ""
            right.set_title(f"relative residual{tail}", loc="left")
            for ax in (left, right):
                ax.set_xlabel("step" if row == len(names) - 1 else "")
    return fig


def plot_charges(
    run: RunLike, symmetry: str | None = None, kind: str | None = None, ax: Axes | None = None
) -> Figure:
    """Charge trajectories of a run, measured beside predicted.

    Args:
        run: a :class:`Run` or the path of a run.
        symmetry: draw only this symmetry (KeyError naming the known ones when absent).
        kind: draw only symmetries of this kind (``scale``, ``rescale``, ``translation``).
        ax: draw measured (solid) and predicted (dashed) charges of the selection onto this axes
            and return its figure (no residual panel); without it a new figure holds one row per
            symmetry with the residual ``charge - predicted`` on the right.

    Returns:
        The matplotlib Figure (pyplot-free; save it with ``fig.savefig``).

    Raises:
        MissingData: the run tracks no symmetry or holds no charge rows.
    """
    run = as_run(run)
    names, _ = select_symmetries(run, symmetry, kind)
    regime = (run.meta.get("optimizer") or {}).get("prediction", "")
    if ax is None:
        return charges_figure(run, names, regime)
    cube = charge_cube(run)
    for i, name in enumerate(names):
        j = cube.index(name)
        color = PALETTE[i % len(PALETTE)]
        xs, ys = decimate(cube.steps, cube["charge"][:, j])
        ax.plot(xs, ys, color=color, label=f"{name} measured")
        xs, ys = decimate(cube.steps, cube["predicted"][:, j])
        ax.plot(xs, ys, color=color, linestyle="--", label=f"{name} predicted")
    ax.set_xlabel("step")
    ax.set_ylabel(UNITS["charge"])
    ax.legend(fontsize="small")
    return ax.figure


def accumulate(terms: np.ndarray) -> np.ndarray:
    """Running sum of per-step ``terms``; NaN from the first non-finite term (or overflow) on,
    so an accumulation that blew up shows as a shaded stretch, never as a made-up number."""
    terms = np.asarray(terms, dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.cumsum(np.where(np.isfinite(terms), terms, 0.0))
    bad = np.flatnonzero(~np.isfinite(terms) | ~np.isfinite(out))
    if len(bad):
        out[bad[0] :] = np.nan
    return out


def ksb_figure(run: Run, names: Sequence[str]) -> Figure:
    """The exact split of each charge's change (docs/theory.md §3.1): weight decay, learning rule
    and
    kinetic symmetry breaking, accumulated over the run beside the measured change Q_n - Q_0.

    With ``every > 1`` the stored rows are single steps, so the per-step terms are drawn instead.
    """
    cube = charge_cube(run)
    every = int(run.meta.get("every", 1) or 1)
    labels = ("weight decay", "learning rule", "KSB (finite step)")
    with style():
        n_cols = 2 if len(names) > 1 else 1
        n_rows = -(-len(names) // n_cols)
        fig = new_figure(11, 2.6 * n_rows + 0.4)
        axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
        for ax, name in zip(axes, names):
            j = cube.index(name)
            terms = [cube[c][:, j] for c in ("decay", "rule", "ksb")]
            unit = charge_label(cube.kinds[j]).replace("charge Q", "change of Q")
            if every == 1:
                x_next = cube.steps + 1
                series = [(lab, x_next, accumulate(t)) for lab, t in zip(labels, terms)]
                q = cube["charge"][:, j]
                q0, _ = first_last(q)
                with np.errstate(over="ignore", invalid="ignore"):
                    series.append(("measured Q − Q₀", cube.steps, q - q0))
                lines(
                    ax,
                    series,
                    dashes=["measured Q − Q₀"],
                    colors=[*PALETTE[:3], "0.15"],
                    ylabel=unit,
                )
                ax.set_title(f"{name}: accumulated change since step {cube.steps[0]}", loc="left")
            else:
                lines(ax, [(lab, cube.steps, t) for lab, t in zip(labels, terms)], ylabel=unit)
                ax.set_title(f"{name}: per-step terms (every={every})", loc="left")
            ax.set_xlabel("step")
        for ax in axes[len(names) :]:
            ax.set_visible(False)
    return fig


def lagrangian_figure(run: Run) -> Figure:
    """Kinetic energy T, potential V (loss + L2 term) and the log-prefactor t/tau of
    L = e^{t/tau}(T - V) over steps (docs/theory.md §2; Tanaka & Kunin 2021 NLD)."""
    s = run.steps
    if s.empty:
        raise MissingData("the run holds no step rows yet")
    x = s["step"].to_numpy()
    with style():
        fig = new_figure(11, 3.0)
        ax_t, ax_v, ax_tau = fig.subplots(1, 3)
        kinetic = s["kinetic"].to_numpy(dtype=float)
        lines(ax_t, [("T (kinetic)", x, kinetic)], legend=False, ylabel=UNITS["kinetic"], log=True)
        ax_t.set_title("kinetic energy T", loc="left")
        loss = s["loss"].to_numpy(dtype=float)
        l2 = s["l2"].to_numpy(dtype=float)
        v_series = []
        if np.isfinite(loss).any():
            potential = s["potential"].to_numpy(dtype=float)
            v_series += [("V = loss + L2", x, potential), ("loss", x, loss)]
        if np.nanmax(np.abs(np.where(np.isfinite(l2), l2, np.nan)), initial=0.0) > 0:
            v_series.append(("L2 term", x, l2))
        if v_series:
            lines(ax_v, v_series, dashes=["L2 term"], ylabel=UNITS["potential"])
        else:
            ax_v.text(
                0.5,
                0.5,
                "no loss logged and no L2 term",
                ha="center",
                va="center",
                transform=ax_v.transAxes,
            )
        title = "potential V" if np.isfinite(loss).any() else "potential (loss not logged)"
        ax_v.set_title(title, loc="left")
        lines(
            ax_tau,
            [("t/τ", x, s["log_prefactor"].to_numpy(dtype=float))],
            legend=False,
            colors=[PALETTE[2]],
            ylabel=UNITS["log_prefactor"],
        )
        ax_tau.set_title("log-prefactor t/τ", loc="left")
        for ax in (ax_t, ax_v, ax_tau):
            ax.set_xlabel("step")
    return fig


def normalization_figure(run: Run, table: pd.DataFrame) -> Figure:
    """Per normalized (scale) layer: effective learning rate eta/((1-beta)|q|^2), angular update
    per step against its equilibrium value, and r^2 = |q|^2, the implied sqrt(v) of RMSprop
    (docs/theory.md §4; Tanaka & Kunin 2021 NLD §4, Wan et al. 2021 SMD, Kosson et al. 2024 RE)."""
    if table.empty:
        raise MissingData("the run tracks no scale symmetry (no normalized layer)")
    cube = charge_cube(run)
    if not len(cube.steps):
        raise MissingData("the run holds no charge rows yet (no step was logged)")
    names = list(table["symmetry"])[: len(PALETTE)]
    with style():
        fig = new_figure(11, 3.4)
        ax_lr, ax_ang, ax_r = fig.subplots(1, 3)
        for ax, col, label in (
            (ax_lr, "effective_lr", UNITS["effective_lr"]),
            (ax_ang, "angular_update", UNITS["angular"]),
            (ax_r, "charge", UNITS["r2"]),
        ):
            lines(
                ax,
                [(name, cube.steps, cube[col][:, cube.index(name)]) for name in names],
                legend=ax is ax_lr,
                ylabel=label,
                log=col != "angular_update",
            )
        for i in range(len(names)):
            theory = table["angular_theory"].iloc[i]
            if np.isfinite(theory):
                ax_ang.axhline(theory, color=PALETTE[i], linestyle="--", linewidth=1.0)
        ax_lr.set_title("effective learning rate η_eff", loc="left")
        ax_ang.set_title("angular update (dashed: equilibrium θ*)", loc="left")
        ax_r.set_title("r² = |q|² (plays √v of RMSprop)", loc="left")
        for ax in (ax_lr, ax_ang, ax_r):
            ax.set_xlabel("step")
    return fig


def depth_figure(run: Run) -> Figure:
    """Per-layer depth diagnostics (docs/theory.md §5): sigma_max and sigma_min of the backward
    sensitivity, gradient transmission, symplecticity defect and (when recorded) the
    forward-Euler stability factor; one line per recorded step (at most five)."""
    d = run.depth_profile
    if d.empty:
        raise MissingData("the run holds no depth profile")
    steps = np.unique(d["step"].to_numpy())
    if len(steps) > 5:
        steps = steps[np.unique(np.linspace(0, len(steps) - 1, 5).round().astype(int))]
    panels = [
        ("sigma_max", "sigma_max of M_j"),
        ("sigma_min", "sigma_min of M_j"),
        ("transmission", "gradient transmission"),
        ("defect", "symplecticity defect"),
    ]
    if np.isfinite(d["stability"]).any():
        panels.append(("stability", "stability max|1 + h lambda|"))
    with style():
        fig = new_figure(11, 3.0 * -(-len(panels) // 3))
        axes = fig.subplots(-(-len(panels) // 3), 3, squeeze=False).ravel()
        for ax, (col, title) in zip(axes, panels):
            for i, step in enumerate(steps):
                rows = d[d["step"] == step]
                ax.plot(
                    rows["layer"],
                    rows[col],
                    marker=".",
                    color=PALETTE[i % 10],
                    label=f"step {step}",
                )
            values = d[col].to_numpy()
            if np.isfinite(values).any() and np.nanmin(values) > 0:
                ax.set_yscale("log")
            ax.set_title(title, loc="left")
            ax.set_ylabel(DEPTH_UNITS.get(col, col))
            ax.set_xlabel("layer j")
        axes[0].legend(fontsize="small")
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
    return fig


def loss_figure(runs: Sequence[tuple[str, Run]]) -> Figure:
    """The logged loss of several runs on one axis, each run's minimum marked."""
    series = [
        (label, r.steps["step"].to_numpy(), r.steps["loss"].to_numpy(dtype=float))
        for label, r in runs
        if np.isfinite(r.steps["loss"].to_numpy(dtype=float)).any()
    ]
    if not series:
        raise MissingData("none of the runs logged a loss (call monitor.log_loss(loss))")
    with style():
        fig = new_figure(11, 3.2)
        ax = fig.subplots()
        lines(ax, series, ylabel=UNITS["loss"])
        for i, (_, x, y) in enumerate(series):
            k = int(np.nanargmin(np.where(np.isfinite(y), y, np.nan)))
            ax.plot(x[k], y[k], marker="o", color=PALETTE[i % len(PALETTE)], linestyle="")
        ax.set_title("loss per logged step (dots: each run's minimum)", loc="left")
        ax.set_xlabel("step")
    return fig


def rates_figure(
    series_a: Sequence[tuple[str, np.ndarray, np.ndarray]],
    series_b: Sequence[tuple[str, np.ndarray, np.ndarray]],
    title_a: str,
    title_b: str,
) -> Figure:
    """Effective learning rates of two runs side by side (log scale)."""
    if not series_a and not series_b:
        raise MissingData("neither run holds an effective learning rate")
    with style():
        fig = new_figure(11, 3.4)
        axes = fig.subplots(1, 2)
        for ax, series, title in ((axes[0], series_a, title_a), (axes[1], series_b, title_b)):
            if series:
                lines(ax, series, ylabel=UNITS["rate"], log=True)
            else:
                ax.text(
                    0.5, 0.5, "not in the store", ha="center", va="center", transform=ax.transAxes
                )
            ax.set_title(title, loc="left")
            ax.set_xlabel("step")
    return fig
