"""The report rebuilt for reading (issue 15 item 1): formulas as MathML and Unicode, labelled axes
with units, relative residuals, distinct colours, hyperparameters of every param group, findings
linked to figures, a compare page that leads with the better run, and a section registry."""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb

import noether_dyn as nd
from noether_dyn.report import compare, report, sections
from noether_dyn.report import figures as figs
from noether_dyn.report import formulas as F
from noether_dyn.report.compare import loss_stats
from noether_dyn.report.data import param_group_table
from noether_dyn.report.document import Paragraph, Section
from noether_dyn.report.mathml import frac, m, sqrt, sub, sup, to_mathml, to_text
from noether_dyn.report.normalization import scale_table
from tests.conftest import bn_mlp, train
from tests.test_report import train_small

MATHML = "{http://www.w3.org/1998/Math/MathML}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reading")
    return {
        "sgd": train_small(root / "sgd", steps=20),
        "rmsprop": train_small(root / "rmsprop", steps=20, optimizer="rmsprop"),
    }


def test_formula_renders_as_mathml_and_unicode():
    eff = F.EFFECTIVE_RATE
    assert to_text(eff) == "η_eff = η/((1 − β) r²)"
    root = ET.fromstring(to_mathml(eff, display=True))
    assert root.tag == f"{MATHML}math" and root.get("display") == "block"
    fracs = root.findall(f".//{MATHML}mfrac")
    assert len(fracs) == 1 and fracs[0][0].text == "η"  # numerator, then the denominator
    assert root.find(f".//{MATHML}msup/{MATHML}mn").text == "2"
    assert to_text(F.ANGLE_SGD) == "θ* = √((2 η λ)/(1 + β))"
    assert to_text(m("x", sub("", "n+1"))) == "x_(n+1)"
    assert to_text(sup("e", m("t/τ"))) == "e^(t/τ)"
    assert to_text(frac("a", "b")) == "a/b" and to_text(sqrt("x")) == "√x"
    assert "&lt;" in to_mathml(m("a < b"))  # operators are escaped


def test_html_report_math_is_mathml_and_links_resolve(runs, tmp_path):
    html = report(runs["sgd"], tmp_path / "r.html").read_text()
    maths = re.findall(r"<math .*?</math>", html, flags=re.S)
    assert len(maths) >= 8
    for block in maths:
        ET.fromstring(block)  # well-formed MathML
    ids = set(re.findall(r'id="([^"]+)"', html))
    hrefs = re.findall(r'href="#([^"]+)"', html)
    assert any(h.startswith("fig-") for h in hrefs)
    assert set(hrefs) <= ids, set(hrefs) - ids
    assert "eta/((1-beta) r^2)" not in html  # no ASCII math left in prose


def test_every_figure_axis_is_labelled_with_units(runs):
    run = nd.load_run(runs["sgd"])
    names, _ = figs.select_symmetries(run)
    drawn = [
        figs.charges_figure(run, names, "momentum"),
        figs.ksb_figure(run, names),
        figs.lagrangian_figure(run),
        figs.normalization_figure(run, scale_table(run)),
        figs.loss_figure([("a", run)]),
    ]
    for fig in drawn:
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            assert re.search(r"\(.+\)$", ax.get_ylabel()), (
                ax.get_title(loc="left"),
                ax.get_ylabel(),
            )
    charge_axes = drawn[0].axes
    assert all(a.get_title(loc="left").startswith("relative residual") for a in charge_axes[1::2])
    assert drawn[3].axes[1].get_ylabel() == "angular update (rad/step)"


def test_relative_residual_series_ends_at_the_tables_value(runs):
    run = nd.load_run(runs["rmsprop"])
    from noether_dyn.report.data import charge_cube

    cube = charge_cube(run)
    table = figs.relative_residual(cube)
    for j in range(len(cube.names)):
        series = figs.relative_residual_series(cube, j)
        assert abs(series[np.isfinite(series)][-1]) == pytest.approx(table[j], rel=1e-12)


def test_palette_hues_are_distinct():
    rgb = [np.array(to_rgb(c)) for c in figs.PALETTE]
    assert len(rgb) == 8
    closest = min(np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2))
    assert closest > 0.25  # seaborn's colorblind palette had pairs near 0.1 apart


def test_hyperparameters_of_every_param_group(tmp_path):
    model = bn_mlp()
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "weight_decay": 0.0},
            {"params": [*model[1].parameters(), *model[3].parameters()], "weight_decay": 5e-3},
        ],
        lr=0.1,
        momentum=0.9,
    )
    with nd.watch(model, opt, tmp_path / "run") as mon:
        train(model, opt, mon, steps=3)
    run = nd.load_run(tmp_path / "run")
    frame, differ = param_group_table(run)
    assert differ == ["weight_decay"]
    assert list(frame["weight_decay"]) == [0.0, 5e-3]
    assert list(frame.columns[:3]) == ["group", "parameters", "weight_decay"]
    assert frame["parameters"].iloc[0] == "2 tensors: 0"
    html = report(run, tmp_path / "r.html").read_text()
    assert "2 param groups; they differ in weight_decay" in html


def test_compare_leads_with_the_better_run(runs, tmp_path):
    a, b = nd.load_run(runs["sgd"]), nd.load_run(runs["rmsprop"])
    html = compare(a, b, tmp_path / "c.html").read_text()
    first = re.search(r'<section id="([^"]+)">\s*<h2>([^<]+)</h2>\s*<p>([^<]+)', html)
    assert first.group(1) == "verdict" and first.group(2) == "Which run trained better"
    sa, sb = loss_stats(a), loss_stats(b)
    winner = "sgd" if sa["final"] <= sb["final"] else "rmsprop"
    best, worst = sorted([sa["final"], sb["final"]])
    assert first.group(3).startswith(
        f"{winner} trained better: final loss {best:.3g} against {worst:.3g}"
    )
    assert "Why, in the theory" in html and "<mfrac>" in html


def test_a_section_added_to_the_registry_appears(runs, tmp_path, monkeypatch):
    def extra(run):
        return Section("extra", "My extra section", [Paragraph(f"{len(run.steps)} steps")])

    monkeypatch.setattr(sections, "SECTIONS", [*sections.SECTIONS, extra])
    html = report(runs["sgd"], tmp_path / "r.html").read_text()
    assert '<section id="extra">\n<h2>My extra section</h2>' in html
    assert '<a href="#extra">My extra section</a>' in html


def test_self_check_is_a_diagnostic_not_a_finding(runs, tmp_path):
    html = report(runs["sgd"], tmp_path / "r.html").read_text()
    findings_part = html.split('<section id="findings">')[1].split("</section>")[0]
    assert "exact split" not in findings_part
    diag = html.split('<section id="diagnostics">')[1].split("</section>")[0]
    assert "Exact split check passes" in diag
