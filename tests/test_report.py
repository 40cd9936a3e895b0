"""Reports, plots and comparisons (noether_dyn.report), drawn from saved runs alone.

Real runs are trained here for a few dozen steps under ``watch``; larger or odd runs (no
symmetry, depth profile, events, metric fallback, failed verification) are written
synthetically with ``RunWriter`` (``benchmarks/report_scale.py``).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import noether_dyn as nd
from noether_dyn.report import compare, findings, plot_charges, report
from noether_dyn.report import figures as figs
from noether_dyn.report.compare import layer_rate, layer_table
from noether_dyn.report.data import MAX_POINTS, decimate
from noether_dyn.report.normalization import scale_table
from noether_dyn.store import CHARGE_COLUMNS, RunWriter
from noether_dyn.store.schema import GROUP_COLUMNS, STEP_COLUMNS
from tests.conftest import batch, bn_mlp, relu_mlp

ROOT = Path(__file__).resolve().parents[1]
PNG_RE = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def load_benchmark():
    """``benchmarks/report_scale.py`` as a module (its synthetic-run writer)."""
    spec = importlib.util.spec_from_file_location(
        "report_scale", ROOT / "benchmarks" / "report_scale.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def declared(model_kind: str) -> list[nd.Symmetry]:
    """The symmetries of the conftest models, written out (used only if detection fails)."""
    if model_kind == "bn":
        return [
            nd.Symmetry("scale:0", "scale", ("0.weight", "0.bias")),
            nd.Symmetry("rescale:1", "rescale", ("1.weight", "1.bias", "3.weight"), (1, 1, -1)),
            nd.Symmetry("translation:3", "translation", ("3.weight", "3.bias")),
        ]
    return [
        nd.Symmetry("rescale:0", "rescale", ("0.weight", "0.bias", "2.weight"), (1, 1, -1)),
        nd.Symmetry("translation:2", "translation", ("2.weight", "2.bias")),
    ]


def train_small(
    run_dir: Path,
    steps: int = 40,
    optimizer: str = "sgd",
    log_loss: bool = True,
    symmetries: bool = True,
    every: int = 1,
) -> Path:
    """Train conftest's BN MLP (SGD + momentum + weight decay) or ReLU MLP (RMSprop) on a fixed
    batch with ``watch``; symmetries are detected from the model, falling back to declared ones
    only if detection raises."""
    model = relu_mlp() if optimizer == "rmsprop" else bn_mlp()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    elif optimizer == "adamw":
        model = bn_mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)
    else:
        opt = torch.optim.RMSprop(model.parameters(), lr=1e-2, alpha=0.99)
    x, y = batch(dtype=torch.float64)
    loss_fn = nn.CrossEntropyLoss()
    if not symmetries:
        monitor = nd.watch(model, opt, run_dir, every=every, symmetries=[])
    else:
        try:
            monitor = nd.watch(
                model, opt, run_dir, every=every, inputs=x, targets=y, loss_fn=loss_fn
            )
        except Exception:
            monitor = nd.watch(
                model,
                opt,
                run_dir,
                inputs=x,
                targets=y,
                loss_fn=loss_fn,
                symmetries=declared("bn" if optimizer == "sgd" else "relu"),
            )
    with monitor:
        for _ in range(steps):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            if log_loss:
                monitor.log_loss(loss)
            opt.step()
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "sgd": train_small(root / "sgd"),
        "rmsprop": train_small(root / "rmsprop", optimizer="rmsprop"),
    }


def embedded_pngs(html: str) -> list[np.ndarray]:
    """Every base64 PNG of an HTML report, decoded (raises if one is not a valid PNG)."""
    return [
        mpimg.imread(io.BytesIO(base64.b64decode(b)), format="png") for b in PNG_RE.findall(html)
    ]


def test_html_report_of_a_real_run(runs, tmp_path):
    path = report(runs["sgd"], tmp_path / "r.html")
    html = path.read_text()
    for title in (
        "Run summary",
        "Findings",
        "Symmetries",
        "Charges: measured vs predicted",
        "Kinetic symmetry breaking",
        "The Lagrangian",
        "Normalization as adaptive",
    ):
        assert title in html
    images = embedded_pngs(html)
    assert len(images) == 4  # charges, ksb, lagrangian, normalization
    assert all(img.shape[0] > 150 and img.shape[1] > 500 for img in images)
    # self-contained: no script, no remote resource
    assert "<script" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)
    run = nd.load_run(runs["sgd"])
    for name in run.symmetries["symmetry"]:
        assert name in html


def test_markdown_report_writes_figures_beside_it(runs, tmp_path):
    path = report(runs["sgd"], tmp_path / "out" / "r.md")
    text = path.read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert len(refs) == 4
    for ref in refs:
        img = mpimg.imread(path.parent / ref)
        assert img.shape[0] > 150
    assert "## Findings" in text and "   Why: " in text
    assert "<math" not in text  # formulas as Unicode text in Markdown
    assert "η_eff = η/((1 − β) r²)" in text


def test_normalization_table_follows_theory(runs):
    """docs/theory.md §4: rho_eff = 1 - 4 eta lambda/(1-beta), angle* = sqrt(2 eta
    lambda/(1+beta))."""
    run = nd.load_run(runs["sgd"])
    table = scale_table(run)
    assert len(table) == (run.symmetries["kind"] == "scale").sum() >= 1
    row = table.iloc[0]
    eta, lam, beta = 0.1, 1e-2, 0.9
    assert row["rho_eff"] == pytest.approx(1 - 4 * eta * lam / (1 - beta))
    assert row["angular_theory"] == pytest.approx(np.sqrt(2 * eta * lam / (1 + beta)))
    charge = run.charge(row["symmetry"])["charge"].to_numpy()
    assert row["norm_growth"] == pytest.approx(np.sqrt(charge[-1] / charge[0]))
    eff = run.charge(row["symmetry"])["effective_lr"].to_numpy()
    assert row["eff_lr_change"] == pytest.approx(eff[-1] / eff[0])


def test_findings_carry_their_numbers(runs):
    run = nd.load_run(runs["sgd"])
    frame = findings(run)
    assert list(frame.columns) == [
        "severity", "layer", "symmetry", "what", "why", "action", "figure", "weight", "finding",
        "warning",
    ]  # fmt: skip
    row = scale_table(run).iloc[0]
    why = frame.loc[frame["symmetry"] == row["symmetry"], "why"].iloc[0]
    assert f"ratio {row['angular_ratio']:.3g}" in why
    assert f"θ* = {row['angular_theory']:.3g} rad/step" in why
    # the closure self-test is a diagnostics line, not a finding (float64 run: it closes)
    assert not frame["why"].str.contains("exact split").any()
    # ranked: severities never go back up the list
    rank = frame["severity"].map({"problem": 0, "check": 1, "info": 2}).to_numpy()
    assert (np.diff(rank) >= 0).all()
    assert set(frame["figure"]) <= {
        "fig-lagrangian",
        "fig-normalization",
        "fig-charges",
        "fig-ksb",
        "symmetries",
        "summary",
        "events",
        "diagnostics",
    }


def test_run_without_loss_still_reports(tmp_path):
    run_dir = train_small(tmp_path / "noloss", steps=8, log_loss=False)
    html = report(run_dir, tmp_path / "r.html").read_text()
    assert "No loss was logged" in html
    assert len(embedded_pngs(html)) == 4  # the Lagrangian figure still draws T and t/tau


def test_run_without_symmetries_still_reports(tmp_path):
    run_dir = train_small(tmp_path / "nosym", steps=8, symmetries=False)
    html = report(run_dir, tmp_path / "r.html").read_text()
    assert "No symmetry is tracked" in html
    assert len(embedded_pngs(html)) == 1  # only the Lagrangian


def test_plot_charges_api(runs):
    run = nd.load_run(runs["sgd"])
    fig = plot_charges(runs["sgd"])
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * len(run.symmetries)
    fig = plot_charges(run, kind="scale")
    assert len(fig.axes) == 2 * (run.symmetries["kind"] == "scale").sum()
    name = run.symmetries["symmetry"].iloc[0]
    ax = Figure().subplots()
    assert plot_charges(run, symmetry=name, ax=ax) is ax.figure
    assert len(ax.lines) == 2
    with pytest.raises(KeyError, match="no symmetry"):
        plot_charges(run, symmetry="scale:nope")
    with pytest.raises(ValueError, match="no 'nope' symmetry"):
        plot_charges(run, kind="nope")


def test_compare_shows_the_adaptive_runs_per_layer_rate(runs, tmp_path):
    path = compare(runs["sgd"], runs["rmsprop"], tmp_path / "c.html")
    html = path.read_text()
    assert "Normalization vs adaptive optimization" in html
    assert "B η/G per coordinate (layer mean, median over steps)" in html
    assert "B direction rate median" in html
    assert "same parameters" in html  # layer 0 of the ReLU twin, matched by name
    table = layer_table(nd.load_run(runs["sgd"]), nd.load_run(runs["rmsprop"]))
    assert np.isfinite(table["B η/G per coordinate (layer mean, median over steps)"]).all()
    for col in ("A direction rate median", "B direction rate median"):
        assert (table[col] > 0).all(), col
    assert len(embedded_pngs(html)) >= 3
    md = compare(nd.load_run(runs["rmsprop"]), runs["sgd"], tmp_path / "c.md")
    assert "RMSprop ρ" in md.read_text()  # roles found from the runs, not the order


def test_decimation_keeps_extremes():
    x = np.arange(100_000)
    y = np.sin(x / 5000.0)
    y[12_345] = 50.0
    xs, ys = decimate(x, y)
    assert len(xs) <= MAX_POINTS
    assert ys.max() == 50.0 and xs[ys.argmax()] == 12_345
    assert np.all(np.diff(xs) > 0)


def test_synthetic_run_renders_with_downsampled_lines(tmp_path):
    bench = load_benchmark()
    run_dir = bench.write_synthetic_run(tmp_path / "syn", n_steps=3000, n_symmetries=10, block=1000)
    run = nd.load_run(run_dir)
    names, note = figs.select_symmetries(run)
    assert len(names) == figs.MAX_PANELS and "showing 8 of 10" in note
    fig = figs.charges_figure(run, names)
    assert all(len(line.get_xdata()) <= MAX_POINTS for ax in fig.axes for line in ax.lines)
    html = report(run, tmp_path / "r.html").read_text()
    assert len(embedded_pngs(html)) == 4


def _append_events(run_dir: Path, events: list[tuple[int, str, str]]) -> None:
    w = RunWriter(run_dir, mode="resume")
    n_sym = len(w.symmetry_names())
    w.append(
        np.zeros((0, len(STEP_COLUMNS))),
        np.zeros((0, len(GROUP_COLUMNS))),
        np.zeros(0, dtype=np.int64),
        np.zeros((0, n_sym, len(CHARGE_COLUMNS))),
        events,
        {},
    )
    w.close()


def test_findings_flag_events_fallback_and_failed_symmetries(tmp_path):
    bench = load_benchmark()
    run_dir = bench.write_synthetic_run(tmp_path / "syn", n_steps=300, n_symmetries=3, block=100)
    _append_events(run_dir, [(17, "nonfinite_loss", "loss is nan"), (18, "nonfinite_loss", "nan")])
    w = RunWriter(run_dir, mode="resume")
    meta = w.get_meta("optimizer")
    w.set_meta({"optimizer": {**meta, "metric_fallback": True, "class": "Lion"}})
    syms = bench._symmetries(3)
    bad = nd.Symmetry(syms[1].name, syms[1].kind, syms[1].params, syms[1].signs, False, 0.3, "x")
    w.set_symmetries([syms[0], bad, syms[2]])
    w.close()
    frame = findings(nd.load_run(run_dir))
    warned = frame[frame["warning"] != ""]
    assert (
        warned["finding"]
        .str.contains("2 'nonfinite_loss' event\\(s\\), the first at step 17")
        .any()
    )
    assert warned["finding"].str.contains("Lion has no known kinetic metric").any()
    assert warned["finding"].str.contains("verification defect 0.3").any()
    assert frame["severity"].iloc[0] == "problem"  # the non-finite events lead
    html = report(run_dir, tmp_path / "r.html").read_text()
    assert "Events" in html and 'class="badge problem"' in html


def test_depth_section_when_profiled(tmp_path):
    bench = load_benchmark()
    run_dir = bench.write_synthetic_run(tmp_path / "syn", n_steps=200, n_symmetries=3, block=100)
    w = RunWriter(run_dir, mode="resume")
    layers = np.arange(6.0)
    for step in (0, 199):
        rows = np.column_stack(
            [
                layers,
                2.0 + layers,
                0.5 / (1 + layers),
                1e-9 * (1 + layers),
                10.0**-layers,
                np.full(6, 1.01),
            ]
        )
        w.write_depth_profile(step, rows)
    w.close()
    run = nd.load_run(run_dir)
    html = report(run, tmp_path / "r.html").read_text()
    assert "Depth dynamics" in html and len(embedded_pngs(html)) == 5
    depth = findings(run).query("layer == 'depth'")
    assert depth["what"].iloc[0] == "Gradients vanish through depth."  # 1e-5 at layer 5
    assert depth["severity"].iloc[0] == "problem" and "1e-05 (layer 5)" in depth["why"].iloc[0]


def test_unwritable_output_fails_before_rendering(runs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot write"):
        report(runs["sgd"], blocker / "r.html")
    with pytest.raises(nd.StoreError):
        report(tmp_path / "missing", tmp_path / "r.html")
    with pytest.raises(ValueError, match="format must be None, .html. or .md."):
        report(runs["sgd"], tmp_path / "r.html", format="pdf")


def test_adamw_run_with_every_uses_the_re_theory(tmp_path):
    """AdamW: angle* = sqrt(2 eta lambda (1-beta1)/(1+beta1)) (Kosson et al. 2024 RE), no
    rho_eff (docs/theory.md §4 derives it for SGD(M) only); every=3 draws per-step terms."""
    run_dir = train_small(tmp_path / "adamw", steps=24, optimizer="adamw", every=3)
    run = nd.load_run(run_dir)
    row = scale_table(run).iloc[0]
    lam, b1 = 0.1, 0.8
    # the window's mean stored rate: torch's lr 1e-2 with Adam's bias correction of steps >= 19
    # still in it (docs/conventions.md), 1.1% above 1e-2 here
    eta = row["lr"]
    assert 1e-2 < eta < 1e-2 / (1 - b1**19)
    assert row["angular_theory"] == pytest.approx(np.sqrt(2 * eta * lam * (1 - b1) / (1 + b1)))
    assert np.isnan(row["rho_eff"]) and row["equilibrium_steps"] == pytest.approx(
        1 / (2 * eta * lam)
    )
    html = report(run, tmp_path / "r.html").read_text()
    assert "per-step terms (every=3)" not in html  # titles are inside the PNG, not the HTML
    assert "This run uses AdamW" in html and len(embedded_pngs(html)) == 4


def test_run_without_steps_still_reports(tmp_path):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nd.watch(model, opt, tmp_path / "empty", symmetries=declared("bn")).close()
    html = report(tmp_path / "empty", tmp_path / "r.html").read_text()
    assert "The run holds no logged step." in html
    assert html.count("skipped: the run holds no") >= 2 and not embedded_pngs(html)


def test_layer_rate_is_rmsprops_mean_coordinate_rate(tmp_path):
    """lr * mean over the layer's coordinates of 1/(sqrt(v)+eps), from the store alone, equals
    the same mean computed from the optimizer's state after the last step (float64)."""
    model = relu_mlp()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-2)
    x, y = batch(dtype=torch.float64)
    with nd.watch(model, opt, tmp_path / "r") as mon:
        for _ in range(4):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.log_loss(loss)
            opt.step()
    steps, rate = layer_rate(nd.load_run(tmp_path / "r"), ("0.weight", "0.bias"))
    inv = torch.cat(
        [(1 / (opt.state[p]["square_avg"].sqrt() + 1e-8)).flatten() for p in model[0].parameters()]
    )
    assert steps.tolist() == [0, 1, 2, 3]
    assert rate[-1] == pytest.approx(1e-2 * float(inv.mean()), rel=1e-12)
