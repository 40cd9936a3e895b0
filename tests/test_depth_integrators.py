"""Tests for noether_dyn.depth.integrators: SymplecticNet layers as integrators (docs/theory.md §5).

Identities checked: consistency of the stage tables (kick and drift weights each sum to 1);
global error against the exact pendulum flow falls as h^order (order 1, 2, 4); the symmetric
methods (orders 2 and 4) are time-reversible, symplectic Euler is not; each step is a
symplectic map (A^T J A = J) to float64 rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import jacrev, vmap

from noether_dyn.depth import SymplecticNet
from noether_dyn.depth.integrators import ORDERS, STAGES, integrate, symplectic_step
from noether_dyn.depth.profile import symplecticity_defect

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny per-layer ops: one thread avoids OpenMP oversubscription slowdowns (10-50x) on
    shared CPUs; the previous setting is restored after this module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _identity(p: torch.Tensor) -> torch.Tensor:
    return p


def _pendulum_rk4(y: torch.Tensor, t_final: float, steps: int) -> torch.Tensor:
    """Classical RK4 for q' = p, p' = -sin q (H = p^2/2 - cos q); global error O(h^4)."""
    h = t_final / steps

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.stack([z[..., 1], -torch.sin(z[..., 0])], -1)

    for _ in range(steps):
        k1 = f(y)
        k2 = f(y + h / 2 * k1)
        k3 = f(y + h / 2 * k2)
        k4 = f(y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y


@pytest.mark.parametrize("order", ORDERS)
def test_stage_weights_sum_to_one(order: int) -> None:
    kicks = sum(c for kind, c in STAGES[order] if kind == "kick")
    drifts = sum(c for kind, c in STAGES[order] if kind == "drift")
    assert kicks == pytest.approx(1.0, abs=1e-15)
    assert drifts == pytest.approx(1.0, abs=1e-15)


def test_forest_ruth_theta() -> None:
    theta = STAGES[4][1][1]
    assert theta == pytest.approx(1.0 / (2.0 - 2.0 ** (1.0 / 3.0)), rel=1e-15)
    assert 2 * theta**3 + (1 - 2 * theta) ** 3 == pytest.approx(0.0, abs=1e-14)  # order-4 cond.


@pytest.fixture(scope="module")
def pendulum_reference() -> tuple[torch.Tensor, torch.Tensor, float]:
    y0 = torch.tensor([[1.0, 0.0], [2.0, 0.5], [-0.5, 1.0]], dtype=DT)
    t_final = 2.0
    ref = _pendulum_rk4(y0, t_final, 8000)
    # RK4 self-consistency: halving the step changes the result by ~ 16x its own error.
    coarse = _pendulum_rk4(y0, t_final, 4000)
    assert (ref - coarse).abs().max() < 1e-13
    return y0, ref, t_final


def measured_slope(order: int, y0: torch.Tensor, ref: torch.Tensor, t_final: float) -> float:
    """Least-squares slope of log(max global error) against log(depth), depth 8..128."""
    depths = [8, 16, 32, 64, 128]
    errors = []
    for depth in depths:
        net = SymplecticNet.from_gradients(2, depth, order, t_final / depth, _identity, torch.sin)
        with torch.no_grad():
            errors.append(float((net(y0) - ref).norm(dim=-1).max()))
    # Errors must stay well above the float64/reference floor (~1e-13) for the fit to mean much.
    assert min(errors) > 1e-11
    return float(-np.polyfit(np.log(depths), np.log(errors), 1)[0])


@pytest.mark.parametrize("order", ORDERS)
def test_global_error_order(
    order: int, pendulum_reference: tuple[torch.Tensor, torch.Tensor, float]
) -> None:
    """Global error at t = 2 against the pendulum flow ~ C h^order.

    Tolerance 0.1 on the slope: the next term of the error expansion changes the local slope by
    O(h); over depths 8..128 (h = 0.25..0.016) the measured local slopes are within 3% of the
    order for orders 1 and 2 and within 6% at the coarsest pair for order 4, so 0.1 separates
    the orders (they differ by >= 1) while allowing that pre-asymptotic bias. The reference is
    RK4 with 8000 steps (error < 1e-13), far below the smallest error fitted (~3e-9).
    """
    y0, ref, t_final = pendulum_reference
    assert measured_slope(order, y0, ref, t_final) == pytest.approx(order, abs=0.1)


@pytest.mark.parametrize("order", ORDERS)
def test_reversibility(order: int) -> None:
    """Orders 2 and 4 are symmetric methods: step(h) then step(-h) is the identity to
    rounding. Symplectic Euler is not symmetric: the round trip misses by O(h^2)."""
    y = torch.tensor([[1.3, -0.4], [0.2, 0.9]], dtype=DT)
    q, p = y[:, :1], y[:, 1:]
    q1, p1 = integrate(q, p, _identity, torch.sin, 0.3, 5, order)
    q2, p2 = integrate(q1, p1, _identity, torch.sin, -0.3, 5, order)
    miss = float(torch.cat([q2 - q, p2 - p], -1).abs().max())
    if order == 1:
        assert miss > 1e-3
    else:
        assert miss < 1e-13


@pytest.mark.parametrize("order", ORDERS)
def test_single_step_is_symplectic(order: int) -> None:
    """A^T J A = J for one large step (h = 0.7) of a 3-degree-of-freedom coupled pendulum chain,
    V(q) = -sum cos q_i - sum cos(q_{i+1} - q_i), to float64 rounding (defect < 1e-14)."""

    def grad_v(q: torch.Tensor) -> torch.Tensor:
        def v(x: torch.Tensor) -> torch.Tensor:
            return -torch.cos(x).sum() - torch.cos(x[1:] - x[:-1]).sum()

        return vmap(jacrev(v))(q)

    def step(y: torch.Tensor) -> torch.Tensor:
        q, p = symplectic_step(y[:3], y[3:], _identity, lambda z: grad_v(z[None])[0], 0.7, order)
        return torch.cat([q, p])

    y = torch.tensor([0.4, -1.0, 2.0, 0.3, 0.0, -0.7], dtype=DT)
    a = jacrev(step)(y)
    assert float(symplecticity_defect(a)) < 1e-14
    assert not torch.allclose(a, torch.eye(6, dtype=DT))  # the step does something


def test_energy_error_stays_bounded() -> None:
    """Symplectic integrators keep the energy error O(h^order) over long times (no drift):
    10,000 Stormer-Verlet steps of h = 0.1 on the pendulum keep |H - H0| < 0.01 (the O(h^2)
    modified-Hamiltonian offset; Hairer, Lubich, Wanner §IX.8)."""
    q = torch.tensor([2.0], dtype=DT)
    p = torch.tensor([0.0], dtype=DT)
    h0 = 0.5 * p**2 - torch.cos(q)
    worst = 0.0
    for _ in range(100):
        q, p = integrate(q, p, _identity, torch.sin, 0.1, 100, 2)
        worst = max(worst, float((0.5 * p**2 - torch.cos(q) - h0).abs()))
    assert worst < 0.01
    assert math.isfinite(worst)


def test_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="order=3"):
        SymplecticNet(4, 2, 3)
    with pytest.raises(ValueError, match="even"):
        SymplecticNet(5, 2, 2)
    with pytest.raises(ValueError, match=r"\(batch, 4\)"):
        SymplecticNet(4, 2, 2)(torch.zeros(3, 6))
