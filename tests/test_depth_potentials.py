"""Potentials with analytic gradients, ``SymplecticNet.from_potentials`` and ``euler_step``.

Identities (float64; rounding of O(1)-O(10) values is ~1e-15, tolerances 1e-12):
- each potential's ``grad`` equals autograd of its ``energy``;
- the families hold the physics they are named for: a_11 = -1 is the pendulum's sin q, c_1 = -1
  the Kepler force q/|q|^3, c_1 = g the uniform field g;
- forward Euler on H = (p^2 + omega^2 q^2)/2 multiplies the energy by exactly 1 + h^2 omega^2
  per step; a Verlet net built on one shared module has that module's parameters once.
"""

from __future__ import annotations

import pytest
import torch

from noether_dyn.depth import SymplecticNet
from noether_dyn.depth.integrators import euler_step
from noether_dyn.depth.potentials import CentralPotential, FourierPotential, PolynomialPotential

DT = torch.float64


def _randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = module.to(DT)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


@pytest.mark.parametrize(
    "make",
    [
        lambda: PolynomialPotential(3, 4),
        lambda: FourierPotential(3, 3),
        lambda: CentralPotential(3),
    ],
)
def test_grad_is_the_derivative_of_energy(make) -> None:
    pot = _randomized(make(), 0)
    x = (torch.randn(5, 3, dtype=DT) + 2.0).requires_grad_(True)
    (auto,) = torch.autograd.grad(pot.energy(x).sum(), x)
    torch.testing.assert_close(pot.grad(x.detach()), auto, rtol=0, atol=1e-12)


def test_families_hold_their_physics() -> None:
    x = torch.randn(7, 2, dtype=DT) + 3.0
    fourier = FourierPotential(2, 3).to(DT)
    central = CentralPotential(2).to(DT)
    poly = PolynomialPotential(2, 2).to(DT)
    with torch.no_grad():
        fourier.a[:, 0] = -1.0
        poly.c[:, 0] = 9.81
    torch.testing.assert_close(fourier.grad(x), torch.sin(x), rtol=0, atol=1e-12)
    r3 = x.norm(dim=-1, keepdim=True) ** 3
    torch.testing.assert_close(central.grad(x), x / r3, rtol=0, atol=1e-12)
    torch.testing.assert_close(poly.grad(x), torch.full_like(x, 9.81), rtol=0, atol=1e-12)


def test_forward_euler_energy_factor() -> None:
    omega, h = 3.0, 0.2
    q, p = torch.tensor([0.7], dtype=DT), torch.tensor([-0.4], dtype=DT)

    def energy(q: torch.Tensor, p: torch.Tensor) -> float:
        return float(0.5 * (p**2 + omega**2 * q**2))

    e = energy(q, p)
    for _ in range(10):
        q, p = euler_step(q, p, lambda v: v, lambda v: omega**2 * v, h)
        e_new = energy(q, p)
        assert e_new / e == pytest.approx(1 + h**2 * omega**2, abs=1e-12)
        e = e_new


def test_from_potentials_shares_one_field() -> None:
    shared = FourierPotential(1, 2)
    net = SymplecticNet.from_potentials(2, 2, 0.1, [shared] * 4)
    assert len(net.layers) == 4 and net.depth == 4
    assert sum(p.numel() for p in net.parameters()) == 4  # a and b of one (1, 2) potential
    with pytest.raises(ValueError, match="potentials is empty"):
        SymplecticNet.from_potentials(2, 2, 0.1, [])
