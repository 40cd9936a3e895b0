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
)
from noether_dyn.store import Run

MAX_PANELS = 8
"""Most symmetries drawn in one charge or KSB figure (the others are in the tables)."""

PALETTE = sns.color_palette("colorblind", 10)


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


def lines(
    ax: Axes,
    series: Sequence[tuple[str, np.ndarray, np.ndarray]],
    *,
    dashes: Sequence[str] = (),
    colors: Sequence | None = None,
    legend: bool = True,
) -> None:
    """Draw named (x, y) lines with seaborn, each decimated; ``dashes`` names the dashed ones."""
    parts = []
    for label, x, y in series:
        xs, ys = decimate(np.asarray(x), np.asarray(y, dtype=float))
        parts.append(pd.DataFrame({"step": xs, "value": ys, "series": label}))
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if frame.empty:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
        return
    labels = [s[0] for s in series if (frame["series"] == s[0]).any()]
    sns.lineplot(
        data=frame,
        x="step",
        y="value",
        hue="series",
        hue_order=labels,
        style="series",
        style_order=labels,
        dashes={lab: (4, 2) if lab in dashes else "" for lab in labels},
        palette=list(colors or PALETTE)[: len(labels)] if len(labels) <= 10 else None,
        estimator=None,
        errorbar=None,
        linewidth=1.2,
        ax=ax,
        legend=legend,
    )
    ax.set_ylabel("")
    if legend and ax.get_legend() is not None:
        ax.legend(fontsize="small", title=None, loc="best")


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


def charges_figure(run: Run, names: Sequence[str], regime: str = "") -> Figure:
    """Measured charge Q_n beside the theory's prediction (left) and their residual (right), one
    row per symmetry (THEORY §3.2-3.3; Kunin et al. 2021 NM, Tanaka & Kunin 2021 NLD)."""
    cube = charge_cube(run)
    pred_label = "predicted (gradient flow)" if regime == "flow" else "predicted"
    with style():
        fig = new_figure(11, 2.2 * len(names) + 0.4)
        axes = fig.subplots(len(names), 2, squeeze=False)
        for row, name in enumerate(names):
            j = cube.index(name)
            q, p = cube["charge"][:, j], cube["predicted"][:, j]
            left, right = axes[row]
            lines(
                left,
                [("measured", cube.steps, q), (pred_label, cube.steps, p)],
                dashes=[pred_label],
            )
            left.set_title(f"{name} ({cube.kinds[j]}): charge Q", loc="left")
            lines(right, [("charge - predicted", cube.steps, q - p)], colors=[PALETTE[3]])
            right.axhline(0.0, color="0.4", linewidth=0.8)
            right.set_title("residual", loc="left")
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
    ax.set_ylabel("charge Q")
    ax.legend(fontsize="small")
    return ax.figure


def ksb_figure(run: Run, names: Sequence[str]) -> Figure:
    """The exact split of each charge's change (THEORY §3.1): weight decay, learning rule and
    kinetic symmetry breaking, accumulated over the run beside the measured change Q_n - Q_0.

    With ``every > 1`` the stored rows are single steps, so the per-step terms are drawn instead.
    """
    cube = charge_cube(run)
    every = int(run.meta.get("every", 1) or 1)
    labels = ("weight decay", "learning rule", "KSB (finite step)")
    with style():
        n_cols = 2 if len(names) > 1 else 1
        n_rows = -(-len(names) // n_cols)
        fig = new_figure(11, 2.5 * n_rows + 0.4)
        axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
        for ax, name in zip(axes, names):
            j = cube.index(name)
            terms = [np.nan_to_num(cube[c][:, j]) for c in ("decay", "rule", "ksb")]
            if every == 1:
                x_next = cube.steps + 1
                series = [(lab, x_next, np.cumsum(t)) for lab, t in zip(labels, terms)]
                q = cube["charge"][:, j]
                series.append(("measured Q - Q_0", cube.steps, q - q[np.isfinite(q)][0]))
                lines(ax, series, dashes=["measured Q - Q_0"], colors=[*PALETTE[:3], "0.15"])
                ax.set_title(f"{name}: accumulated change", loc="left")
            else:
                lines(ax, [(lab, cube.steps, t) for lab, t in zip(labels, terms)])
                ax.set_title(f"{name}: per-step terms (every={every})", loc="left")
            ax.set_xlabel("step")
        for ax in axes[len(names) :]:
            ax.set_visible(False)
    return fig


def lagrangian_figure(run: Run) -> Figure:
    """Kinetic energy T, potential V (loss + L2 term) and the log-prefactor t/tau of
    L = e^{t/tau}(T - V) over steps (THEORY §2; Tanaka & Kunin 2021 NLD)."""
    s = run.steps
    if s.empty:
        raise MissingData("the run holds no step rows yet")
    x = s["step"].to_numpy()
    with style():
        fig = new_figure(11, 3.0)
        ax_t, ax_v, ax_tau = fig.subplots(1, 3)
        kinetic = s["kinetic"].to_numpy()
        lines(ax_t, [("T (kinetic)", x, kinetic)], legend=False)
        if np.nanmin(np.where(kinetic > 0, kinetic, np.nan), initial=np.inf) < np.inf and (
            np.nanmin(kinetic) > 0
        ):
            ax_t.set_yscale("log")
        ax_t.set_title("kinetic energy T", loc="left")
        v_series = []
        if np.isfinite(s["loss"]).any():
            v_series += [("V = loss + L2", x, s["potential"].to_numpy()), ("loss", x, s["loss"])]
        if np.nanmax(np.abs(s["l2"].to_numpy()), initial=0.0) > 0:
            v_series.append(("L2 term", x, s["l2"].to_numpy()))
        if v_series:
            lines(ax_v, v_series, dashes=["L2 term"])
        else:
            ax_v.text(
                0.5,
                0.5,
                "no loss logged and no L2 term",
                ha="center",
                va="center",
                transform=ax_v.transAxes,
            )
        title = "potential V" if np.isfinite(s["loss"]).any() else "potential (loss not logged)"
        ax_v.set_title(title, loc="left")
        lines(
            ax_tau, [("t/tau", x, s["log_prefactor"].to_numpy())], legend=False, colors=[PALETTE[2]]
        )
        ax_tau.set_title("log-prefactor t/tau", loc="left")
        for ax in (ax_t, ax_v, ax_tau):
            ax.set_xlabel("step")
    return fig


def normalization_figure(run: Run, table: pd.DataFrame) -> Figure:
    """Per normalized (scale) layer: effective learning rate eta/((1-beta)|q|^2), angular update
    per step against its equilibrium value, and r^2 = |q|^2, the implied sqrt(v) of RMSprop
    (THEORY §4; Tanaka & Kunin 2021 NLD §4, Wan et al. 2021 SMD, Kosson et al. 2024 RE)."""
    if table.empty:
        raise MissingData("the run tracks no scale symmetry (no normalized layer)")
    cube = charge_cube(run)
    if not len(cube.steps):
        raise MissingData("the run holds no charge rows yet (no step was logged)")
    names = list(table["symmetry"])[:10]
    with style():
        fig = new_figure(11, 3.2)
        ax_lr, ax_ang, ax_r = fig.subplots(1, 3)
        for i, name in enumerate(names):
            j = cube.index(name)
            color = PALETTE[i % len(PALETTE)]
            for ax, col in ((ax_lr, "effective_lr"), (ax_ang, "angular_update"), (ax_r, "charge")):
                xs, ys = decimate(cube.steps, cube[col][:, j])
                ax.plot(xs, ys, color=color, linewidth=1.1, label=name)
            theory = table["angular_theory"].iloc[i]
            if np.isfinite(theory):
                ax_ang.axhline(theory, color=color, linestyle="--", linewidth=1.0)
        ax_lr.set_yscale("log")
        ax_r.set_yscale("log")
        ax_lr.set_title("effective learning rate", loc="left")
        ax_ang.set_title("angular update (dashed: theory)", loc="left")
        ax_r.set_title("r^2 = |q|^2 (implied sqrt(v))", loc="left")
        for ax in (ax_lr, ax_ang, ax_r):
            ax.set_xlabel("step")
        ax_lr.legend(fontsize="small")
    return fig


def depth_figure(run: Run) -> Figure:
    """Per-layer depth diagnostics (THEORY §5): sigma_max and sigma_min of the backward
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
            ax.set_xlabel("layer j")
        axes[0].legend(fontsize="small")
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
    return fig


def loss_figure(runs: Sequence[tuple[str, Run]]) -> Figure:
    """The logged loss of several runs on one axis."""
    series = [
        (label, r.steps["step"].to_numpy(), r.steps["loss"].to_numpy())
        for label, r in runs
        if np.isfinite(r.steps["loss"]).any()
    ]
    if not series:
        raise MissingData("none of the runs logged a loss (call monitor.log_loss(loss))")
    with style():
        fig = new_figure(11, 3.0)
        ax = fig.subplots()
        lines(ax, series)
        ax.set_title("loss", loc="left")
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
        fig = new_figure(11, 3.2)
        axes = fig.subplots(1, 2, sharey=True)
        for ax, series, title in ((axes[0], series_a, title_a), (axes[1], series_b, title_b)):
            if series:
                lines(ax, series)
                ax.set_yscale("log")
            else:
                ax.text(
                    0.5, 0.5, "not in the store", ha="center", va="center", transform=ax.transAxes
                )
            ax.set_title(title, loc="left")
            ax.set_xlabel("step")
    return fig
