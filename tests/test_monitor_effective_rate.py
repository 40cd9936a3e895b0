"""The stored ``effective_lr`` by optimizer family (issue 13, item 3; docs/theory.md §4,
``noether_dyn.quantities.effective_rate``): under Adam a scale-invariant weight 4x larger has a
4x lower effective rate (eta / r), under SGD 16x lower (eta / ((1 - beta) r^2)).

Two copies of ``tests.test_charges.exact_model`` (BatchNorm eps 1e-30, float64) differ only in
the first layer scaled by 4, which BatchNorm makes invisible to the loss. The column's ratio at
step 0 is then 4 or 16 to rounding (1e-12). The measured angle turned on step 0 checks that the
column's law is the rule's: Adam's first step is ``eta sign(g)`` up to eps / |g| (~1e-6 here),
so its angle goes as 1/r; SGD's first step is ``eta g`` with |g| ~ 1/r, so its angle goes as
1/r^2. With angles below 1e-3 rad, atan's curvature is below 1e-6 relative: 1e-4 covers both.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import noether_dyn as nd
from tests.conftest import batch
from tests.test_charges import SYMS, exact_model

MAKERS = {
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-5), 4.0),
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9), 16.0),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=1e-6), 4.0),
}


def _step0(make, factor, run_dir):
    model = exact_model(0)
    with torch.no_grad():
        model[0].weight.mul_(factor)
        model[0].bias.mul_(factor)
    opt = make(model.parameters())
    x, y = batch(dtype=torch.float64, n=64)
    with nd.watch(model, opt, run_dir, symmetries=SYMS):
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    run = nd.load_run(run_dir)
    return run, run.charge("scale:0").iloc[0]


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_effective_rate_ratio_by_family(family, tmp_path):
    make, ratio = MAKERS[family]
    run, small = _step0(make, 1.0, tmp_path / "a")
    _, large = _step0(make, 4.0, tmp_path / "b")
    assert run.meta["optimizer"]["family"] == family
    assert "eta_eff" in run.meta["optimizer"]["effective_rate"]
    assert small["effective_lr"] / large["effective_lr"] == pytest.approx(ratio, rel=1e-12)
    assert small["angular_update"] / large["angular_update"] == pytest.approx(ratio, rel=1e-4)


def test_compare_direction_rate_is_eta_eff_under_plain_sgd(run_dir):
    """``report.compare.direction_rate`` = |dq| / (r^2 |g|): under plain SGD (dq = -eta g) on a
    scale-invariant layer it is eta / r^2, the stored effective_lr, to rounding (1e-12)."""
    from noether_dyn.report.compare import direction_rate, tail_quantiles

    model = exact_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch(dtype=torch.float64, n=64)
    with nd.watch(model, opt, run_dir, symmetries=SYMS):
        for _ in range(10):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    run = nd.load_run(run_dir)
    steps, rate = direction_rate(run, ("0.weight", "0.bias"))
    eff = run.charge("scale:0").loc[steps, "effective_lr"].to_numpy()
    assert rate == pytest.approx(eff, rel=1e-12)
    q10, q50, q90 = tail_quantiles(rate)
    assert q10 <= q50 <= q90 and q50 > 0
