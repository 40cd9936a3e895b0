"""Tests for noether_dyn.depth.stability, the forward-Euler stability diagnostic (docs/theory.md
§5).

Identities checked in float64 against values computed by hand:
- a linear branch F with eigenvalues a +- ib and c gives max |1 + h lambda| =
  max(sqrt((1 + h a)^2 + (h b)^2), |1 + h c|) and h_max = min(-2a/(a^2 + b^2), -2/c);
- at h = h_max the factor is 1, just above it > 1;
- eigenvalues with Re >= 0 (and != 0) allow no positive step; lambda = 0 allows any;
- along a tanh residual stack, layer j's factor is read at the state y_j the batch reaches.
Tolerance 1e-12: eigenvalues of 3x3 / 8x8 float64 matrices carry ~1e-15 relative rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from noether_dyn.depth import EulerResNet, Residual, ResidualStack, profile, stability_profile
from noether_dyn.depth.stability import amplification, largest_stable_step, stable_step

DT = torch.float64


def _linear(a: float, b: float, c: float) -> nn.Linear:
    """Branch y -> W y with eigenvalues a +- ib (rotation-scaling block) and c."""
    lin = nn.Linear(3, 3, bias=False).to(DT)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(0)))
    block = torch.tensor([[a, -b, 0.0], [b, a, 0.0], [0.0, 0.0, c]], dtype=DT)
    with torch.no_grad():
        lin.weight.copy_(q @ block @ q.T)
    return lin


@pytest.mark.parametrize(("a", "b", "c", "h"), [(-1.0, 2.0, -3.0, 0.3), (-0.5, 4.0, -0.2, 0.05)])
def test_linear_branch_by_hand(a: float, b: float, c: float, h: float) -> None:
    net = ResidualStack([Residual(_linear(a, b, c), h=h), Residual(_linear(a, b, c), h=h)])
    table = stability_profile(net, torch.randn(4, 3, dtype=DT))
    factor = max(math.hypot(1 + h * a, h * b), abs(1 + h * c))
    h_max = min(-2 * a / (a * a + b * b), -2 / c)
    assert list(table["layer"]) == [0, 1]
    assert table["stability"].to_numpy() == pytest.approx([factor, factor], abs=1e-12)
    assert table["h_max"].to_numpy() == pytest.approx([h_max, h_max], abs=1e-12)
    assert table["max_real"].to_numpy() == pytest.approx([max(a, c)] * 2, abs=1e-12)
    assert stable_step(table) == pytest.approx(h_max, abs=1e-12)


def test_factor_is_one_at_the_largest_stable_step() -> None:
    lam = torch.tensor([-1 + 2j, -1 - 2j, -3 + 0j], dtype=torch.complex128)
    h_max = float(largest_stable_step(lam))
    assert h_max == pytest.approx(2 / 5, abs=1e-15)  # -2a/(a^2+b^2) = 2/5 < 2/3
    assert float(amplification(lam, h_max)) == pytest.approx(1.0, abs=1e-12)
    assert float(amplification(lam, h_max * (1 + 1e-6))) > 1.0
    assert float(amplification(lam, h_max * (1 - 1e-6))) < 1.0


def test_undamped_and_growing_modes_allow_no_step() -> None:
    imag = torch.tensor([2j, -2j, -1 + 0j], dtype=torch.complex128)
    grow = torch.tensor([0.1 + 0j, -1 + 0j], dtype=torch.complex128)
    zero = torch.tensor([0j, -4 + 0j], dtype=torch.complex128)
    assert float(largest_stable_step(imag)) == 0.0
    assert float(largest_stable_step(grow)) == 0.0
    assert float(largest_stable_step(zero)) == pytest.approx(0.5, abs=1e-15)
    # Forward Euler on an undamped oscillator grows by sqrt(1 + h^2 omega^2) per step.
    assert float(amplification(imag, 0.1)) == pytest.approx(math.sqrt(1 + 0.04), abs=1e-15)


def test_tanh_stack_reads_each_layer_at_its_state() -> None:
    """Layer j of y <- y + h tanh(W_j y + b_j) has F_j = diag(1 - tanh^2(W_j y_j + b_j)) W_j."""
    torch.manual_seed(0)
    net = EulerResNet(8, 3, h=0.5, init_std=1.0).to(DT)
    with torch.no_grad():
        for layer in net.layers:
            layer.bias.normal_()
    x = torch.randn(5, 8, dtype=DT)
    table = stability_profile(net, x)
    y = x
    for j, layer in enumerate(net.layers):
        z = (y @ layer.weight.T + layer.bias).detach()
        jac = (1 - torch.tanh(z) ** 2)[:, :, None] * layer.weight.detach()
        lam = torch.linalg.eigvals(jac)
        assert table.loc[j, "stability"] == pytest.approx(
            float((1 + 0.5 * lam).abs().amax()), abs=1e-12
        )
        assert table.loc[j, "max_real"] == pytest.approx(float(lam.real.amax()), abs=1e-12)
        y = y + 0.5 * torch.tanh(z)
    # profile() reports the same factor in its stability column.
    assert profile(net, x)["stability"].to_numpy() == pytest.approx(
        table["stability"].to_numpy(), abs=1e-12
    )


def test_rejects_a_stack_without_vector_fields() -> None:
    with pytest.raises(TypeError, match="ResidualStack"):
        stability_profile(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2))


def test_stability_along_training_reaches_the_report(tmp_path) -> None:
    """The diagnostic travels through Monitor.log_depth_profile into the store, and the report's
    depth section lists per step the largest factor, equal to stability_profile's."""
    import noether_dyn as nd
    from noether_dyn.report.document import Table
    from noether_dyn.report.sections import depth_section

    torch.manual_seed(0)
    net = EulerResNet(4, 6, h=0.5, init_std=1.0)
    x = torch.randn(8, 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    expected = {}
    with nd.watch(net, opt, tmp_path / "run", fused=False) as monitor:
        for step in range(6):
            if step in (0, 5):
                monitor.log_depth_profile(profile(net, x))
                expected[monitor.step] = stability_profile(net, x)["stability"].max()
            opt.zero_grad()
            loss = (net(x) ** 2).mean()
            monitor.log_loss(loss)
            loss.backward()
            opt.step()
    section = depth_section(nd.load_run(tmp_path / "run"))
    trace = [b.frame for b in section.blocks if isinstance(b, Table)][-1]
    assert list(trace["step"]) == sorted(expected)
    # The same float32 computation at the same weights, stored as float64: equal exactly.
    assert list(trace["max stability"]) == [expected[s] for s in sorted(expected)]
