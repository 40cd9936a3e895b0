"""Reports on bad data (issue 14 item 7): NaN parameters from step 0, gradients that overflow to
Inf under SGD, and empty runs all render, and non-finite stretches are shown, never dropped."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from torch import nn

import noether_dyn as nd
from noether_dyn.report import figures as figs
from noether_dyn.report import findings, report
from noether_dyn.report.data import MAX_POINTS
from tests.conftest import batch, bn_mlp
from tests.test_report import embedded_pngs


def _train(run_dir: Path, model: nn.Module, opt, steps: int, blow_up_at: int | None = None):
    """Full-batch cross-entropy under ``watch`` (symmetries detected from the batch); from step
    ``blow_up_at`` the logits are scaled by 1e30, so gradients overflow to Inf within a few
    steps."""
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with nd.watch(model, opt, run_dir, inputs=x) as mon:
            for i in range(steps):
                scale = 1e30 if blow_up_at is not None and i >= blow_up_at else 1.0
                loss = nn.functional.cross_entropy(model(x) * scale, y)
                opt.zero_grad()
                loss.backward()
                mon.log_loss(loss)
                opt.step()
    return run_dir


def _render_both(run_dir: Path, out: Path) -> tuple[str, str]:
    with warnings.catch_warnings():
        # a figure that fails to draw warns; bad data itself must not warn (numpy's overflow
        # warnings are silenced while the report is built: it shows non-finite values instead)
        warnings.simplefilter("error", RuntimeWarning)
        html = report(run_dir, out / "r.html").read_text()
        md = report(run_dir, out / "r.md").read_text()
    assert "could not be drawn" not in html and "could not be drawn" not in md
    return html, md


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory) -> Path:
    model = bn_mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    return _train(tmp_path_factory.mktemp("nan") / "run", model, opt, steps=6)


@pytest.fixture(scope="module")
def inf_run(tmp_path_factory) -> Path:
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e3)
    return _train(tmp_path_factory.mktemp("inf") / "run", model, opt, steps=30, blow_up_at=10)


def test_nan_parameters_from_step_0_render(nan_run, tmp_path):
    html, md = _render_both(nan_run, tmp_path)
    frame = findings(nd.load_run(nan_run))
    top = frame.iloc[0]
    assert top["severity"] == "problem"
    assert top["what"].startswith("The parameters are not finite from the first logged step")
    assert "The parameters are not finite" in html and "The parameters are not finite" in md
    assert len(embedded_pngs(html)) >= 1


def test_inf_gradients_under_sgd_render_and_show_the_blow_up(inf_run, tmp_path):
    run = nd.load_run(inf_run)
    grad = run.steps["grad_norm"].to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(grad))
    assert len(bad), "the scenario must actually overflow"  # guards the test itself
    html, _ = _render_both(inf_run, tmp_path)
    assert len(embedded_pngs(html)) == 4  # charges, ksb, lagrangian, normalization all drawn
    frame = findings(run)
    diverged = frame[frame["what"].str.startswith("Training diverged")]
    first = int(run.steps["step"].to_numpy()[bad[0]])
    assert len(diverged) == 1
    assert f"from step {first} on" in diverged["what"].iloc[0]
    assert "lower the learning rate (η = 1e+03 now)" in diverged["action"].iloc[0]


def test_empty_run_renders(tmp_path):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, _ = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nd.watch(model, opt, tmp_path / "empty", inputs=x).close()
    html, md = _render_both(tmp_path / "empty", tmp_path)
    assert "The run holds no logged step." in html and "The run holds no logged step." in md


def test_nonfinite_stretch_is_shaded_before_decimation():
    """A NaN stretch in a series far longer than MAX_POINTS is still drawn as a shaded span at
    the right steps, and an Inf spike as a span of one step."""
    n = 50 * MAX_POINTS
    x = np.arange(n)
    y = np.sin(x / 1000.0)
    y[70_000:70_400] = np.nan
    y[90_000] = np.inf
    fig = Figure()
    ax = fig.subplots()
    figs.lines(ax, [("y", x, y)], ylabel="value (1)")
    spans = sorted(
        (p.get_x(), p.get_x() + p.get_width())
        for p in ax.patches
        if np.allclose(p.get_facecolor()[:3], to_rgb(figs.NONFINITE_COLOR))
    )
    assert spans == [(69_999.5, 70_399.5), (89_999.5, 90_000.5)]
    assert ax.get_ylabel() == "value (1)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "NaN/Inf or beyond 1e300 (not drawn)" in legend


def test_accumulated_terms_stop_at_overflow_instead_of_inventing_numbers():
    big = np.finfo(np.float64).max * 0.75
    out = figs.accumulate(np.array([1.0, big, big, 1.0]))
    assert out[0] == 1.0 and out[1] == pytest.approx(big)
    assert np.isnan(out[2:]).all()  # big + big overflows: NaN from there, never inf
    out = figs.accumulate(np.array([1.0, np.nan, 2.0]))
    assert out[0] == 1.0 and np.isnan(out[1:]).all()


def test_values_near_float_max_give_finite_axis_limits():
    fig = Figure()
    ax = fig.subplots()
    y = np.array([1.0, 1e100, 1e300, 1.7e308, np.nan])
    figs.lines(ax, [("T", np.arange(5), y)], log=True)
    fig.canvas.draw()  # raised OverflowError/ValueError before
    lo, hi = ax.get_ylim()
    assert np.isfinite(lo) and np.isfinite(hi) and hi >= 1e300
    assert ax.get_yscale() == "linear"  # beyond 1e200 the log locator would overflow
    spans = [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches]
    assert spans == [(2.5, 4.5)]  # 1.7e308 (too large to draw) and NaN, shaded


def test_overlapping_stretches_of_several_series_make_one_band():
    fig = Figure()
    ax = fig.subplots()
    x = np.arange(10)
    a = np.where(x >= 5, np.nan, 1.0)
    b = np.where(x >= 6, np.inf, 2.0)
    figs.lines(ax, [("a", x, a), ("b", x + 1, b)])
    assert [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches] == [(4.5, 10.5)]
