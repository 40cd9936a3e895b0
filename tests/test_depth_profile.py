"""Tests for noether_dyn.depth.profile: per-layer diagnostics and the two invariants
(docs/theory.md §5).

Identities checked, in float64:
- M_j^T J M_j = J for every layer of a SymplecticNet with random weights (defect < 1e-10), hence
  sigma_max(M_j) >= 1 at every layer; neither holds for EulerResNet / TanhMLP.
- the adjoint pairing p_j . dx_j is the same at every layer for any net (exact);
- omega(u_j, v_j) = u_j^T J v_j is the same at every layer for SymplecticNet only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from noether_dyn.depth import (
    EulerResNet,
    SymplecticNet,
    TanhMLP,
    adjoint_pairing,
    profile,
    symplectic_form,
)
from noether_dyn.depth.profile import COLUMNS, adjoints, layer_jacobians, sensitivities, tangents

DT = torch.float64
EPS = torch.finfo(DT).eps


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny per-layer ops: one thread avoids OpenMP oversubscription slowdowns (10-50x) on
    shared CPUs; the previous setting is restored after this module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _random_symplectic(order: int, kinetic: str, seed: int, depth: int = 64) -> SymplecticNet:
    """Depth-64 net with every parameter redrawn N(0, 1): arbitrary, not the friendly init."""
    torch.manual_seed(seed)
    net = SymplecticNet(8, depth, order, h=0.1, kinetic=kinetic).to(DT)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 1.0)
    return net


def _nets(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {
        "symplectic": SymplecticNet(8, 32, 2, h=0.1, kinetic="learned").to(DT),
        "euler": EulerResNet(8, 32, h=0.1).to(DT),
        "tanh": TanhMLP(8, 32).to(DT),
    }


@pytest.mark.parametrize("kinetic", ["quadratic", "learned"])
@pytest.mark.parametrize("order", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_symplectic_net_defect_and_certificate(order: int, kinetic: str, seed: int) -> None:
    """defect < 1e-10 at depth 64, float64, random N(0,1) weights, h = 0.1.

    The rounding floor of the defect is ~ L eps sigma_max^2 (M^T J M has entries of size
    sigma_max^2); here sigma_max <= ~10, so the floor is ~1e-12 and 1e-10 leaves margin while
    still failing for any non-symplectic layer (EulerResNet gives ~0.1-1). sigma_max >= 1
    follows from M^T J M = J; checked with a 1e-12 rounding allowance.
    """
    net = _random_symplectic(order, kinetic, seed)
    x = torch.randn(16, 8, dtype=DT)
    df = profile(net, x)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == 64
    assert df["defect"].max() < 1e-10
    assert (df["sigma_max"] >= 1.0 - 1e-12).all()
    # Singular values of a symplectic matrix come in pairs (s, 1/s), so sigma_min <= 1 too:
    # the certificate bounds the largest one only, contracting directions still exist.
    assert (df["sigma_min"] <= 1.0 + 1e-12).all()
    assert df["sigma_min"].min() < 1.0
    assert df["stability"].isna().all()


def test_baselines_are_not_symplectic() -> None:
    nets = _nets()
    x = torch.randn(16, 8, dtype=DT)
    for name in ("euler", "tanh"):
        df = profile(nets[name], x)
        assert df["defect"].iloc[0] > 1e-3, name


def test_tanh_mlp_gradient_vanishes_but_symplectic_cannot() -> None:
    """Default-init TanhMLP: sigma_max(M_0) falls far below 1 over 32 layers (vanishing
    gradients), which the symplectic certificate forbids."""
    nets = _nets()
    x = torch.randn(16, 8, dtype=DT)
    tanh = profile(nets["tanh"], x)
    sym = profile(nets["symplectic"], x)
    assert tanh["sigma_max"].iloc[0] < 1e-3
    assert tanh["transmission"].iloc[0] < 1e-3
    assert sym["sigma_max"].min() >= 1.0 - 1e-12


def test_profile_columns_match_definitions() -> None:
    """transmission_j = |M_j^T g|_F / |g|_F with g = dL/dy_L, computed here from the M_j
    themselves; sigma_max from the batch-worst (smallest) top singular value."""
    torch.manual_seed(3)
    net = EulerResNet(6, 10, h=0.5).to(DT)
    x = torch.randn(5, 6, dtype=DT)
    df = profile(net, x, loss_fn=lambda y: (y**2).sum())
    ys, jacs = layer_jacobians(net, x)
    ms = sensitivities(jacs)
    g = 2 * ys[-1]
    for j, m in enumerate(ms):
        grad_j = torch.einsum("bij,bi->bj", m, g)
        assert df["transmission"].iloc[j] == pytest.approx(float(grad_j.norm() / g.norm()), 1e-12)
        top = torch.linalg.matrix_norm(m, ord=2)
        assert df["sigma_max"].iloc[j] == pytest.approx(float(top.min()), rel=1e-12)


def test_stability_factor_by_hand() -> None:
    """stability = max |1 + h lambda| of J = diag(1 - tanh^2(W y + b)) W, the residual layer's
    vector-field Jacobian (Haber & Ruthotto 2018), largest over the batch."""
    torch.manual_seed(4)
    net = EulerResNet(4, 3, h=0.7).to(DT)
    x = torch.randn(6, 4, dtype=DT)
    df = profile(net, x)
    y = x
    for j, layer in enumerate(net.layers.requires_grad_(False)):
        d = 1 - torch.tanh(y @ layer.weight.T + layer.bias) ** 2
        lam = torch.linalg.eigvals(d[:, :, None] * layer.weight)
        expected = float((1 + 0.7 * lam).abs().max())
        assert df["stability"].iloc[j] == pytest.approx(expected, rel=1e-12)
        y = layer(y)
    assert math.isnan(profile(TanhMLP(4, 2).to(DT), x)["stability"].iloc[0])


@pytest.mark.parametrize("name", ["symplectic", "euler", "tanh"])
def test_adjoint_pairing_is_invariant_for_every_net(name: str) -> None:
    """p_j . dx_j = g^T (dy_L/dy_0) dx_0 for every j (vjp against jvp), any architecture.

    Tolerance: 1e-12 times the largest |p_j| |dx_j| of the sample (the size of the terms
    summed, which sets the rounding error), since the pairing itself may be tiny (TanhMLP)."""
    net = _nets()[name]
    x = torch.randn(8, 8, dtype=DT)
    dx = torch.randn(8, 8, dtype=DT)
    pairing = adjoint_pairing(net, x, dx)
    assert pairing.shape == (33, 8)
    scale = torch.stack(
        [
            p.norm(dim=-1) * t.norm(dim=-1)
            for p, t in zip(adjoints(net, x), tangents(net, x, dx), strict=True)
        ]
    ).amax(0)
    assert ((pairing - pairing[0]).abs() <= 1e-12 * scale).all()
    # Not trivially constant because everything is zero (TanhMLP's terms are ~1e-9: the tangent
    # vanishes forward as the adjoint vanishes backward, hence the relative tolerance).
    assert (scale > (1e-12 if name == "tanh" else 1e-3)).all()


def test_symplectic_form_invariant_only_for_symplectic_nets() -> None:
    """omega(u_j, v_j) constant to 1e-12 * |u_j||v_j| through SymplecticNet; changes by a large
    fraction of its size through EulerResNet and TanhMLP."""
    nets = _nets()
    x = torch.randn(8, 8, dtype=DT)
    u = torch.randn(8, 8, dtype=DT)
    v = torch.randn(8, 8, dtype=DT)
    for name, net in nets.items():
        omega = symplectic_form(net, x, u, v)
        size = torch.stack(
            [
                a.norm(dim=-1) * b.norm(dim=-1)
                for a, b in zip(tangents(net, x, u), tangents(net, x, v), strict=True)
            ]
        ).amax(0)
        change = ((omega - omega[0]).abs() / size).amax().item()
        if name == "symplectic":
            assert change < 1e-12
        else:
            assert change > 1e-2, (name, change)


def test_pairing_and_form_on_pendulum_chain_are_reported_per_sample() -> None:
    net = SymplecticNet.from_gradients(2, 16, 4, 0.2, lambda p: p, torch.sin)
    x = torch.tensor([[1.0, 0.0], [0.1, 0.2]], dtype=DT)
    e1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=DT)
    e2 = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=DT)
    omega = symplectic_form(net, x, e1, e2)
    assert omega.shape == (17, 2)
    # For one degree of freedom omega is the oriented area: det(M) = 1 keeps it at 1.
    np.testing.assert_allclose(omega.numpy(), 1.0, atol=1e-13)
