"""The depth studies at CI size: each ``--quick`` run, in a subprocess (the studies pin torch to one
thread), writes its figure and tables, and its numbers pass checks a wrong study would fail.

Stability map (docs/theory.md §5, Haber & Ruthotto 2018): forward Euler grows every mode of the
linearized field, the stiffest fastest, by exactly sqrt(1 + h^2 rho^2) per layer in the energy
norm, so its smallest stable depth must *equal* the one-mode theory (integer search, no
tolerance); the symplectic methods are stable iff h rho <= 2, and the band c only adds the steps
near that threshold where the eigenvectors are ill-conditioned (measured 0.5-12% above rho T / 2
over widths 16-4096 in the full run).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.func import jvp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import depth_stability_map as sm  # noqa: E402
from noether_dyn.depth.integrators import euler_step, symplectic_step  # noqa: E402
from noether_dyn.depth.nets import SymplecticLayer  # noqa: E402
from noether_dyn.depth.potentials import LogCoshPotential, QuadraticKinetic  # noqa: E402


def _run(script: str, out: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "analysis" / script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("order", [0, 1, 2])
def test_linearized_step_is_the_layer_jvp_at_rest(order: int) -> None:
    """At y = 0 (an equilibrium of V = sum log cosh(K q)) the layer's jvp is the same step with
    the linear force q -> K^T K q: the premise of the stability map. Float64, exact up to
    rounding (1e-12 on O(10) entries)."""
    gen = torch.Generator().manual_seed(0)
    n = 6
    pot = LogCoshPotential(n, n, init_std=1.0).double()
    k = pot.K.detach()
    s = k.T @ k
    h = 0.07
    if order == 0:

        def layer(y: torch.Tensor) -> torch.Tensor:
            q, p = euler_step(y[..., :n], y[..., n:], lambda v: v, pot.grad, h)
            return torch.cat([q, p], -1)

    else:
        layer = SymplecticLayer(2 * n, order, h, pot, QuadraticKinetic())
    dy = torch.randn(3, 2 * n, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        _, tangent = jvp(layer, (torch.zeros(3, 2 * n, dtype=torch.float64),), (dy,))
    if order == 0:
        q, p = euler_step(dy[:, :n], dy[:, n:], lambda v: v, lambda v: v @ s, h)
    else:
        q, p = symplectic_step(dy[:, :n], dy[:, n:], lambda v: v, lambda v: v @ s, h, order)
    torch.testing.assert_close(tangent, torch.cat([q, p], -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", list(sm.METHODS))
def test_modal_depth_search_matches_dense_layers(method: str) -> None:
    """The study steps the linearized layers in S's eigenbasis (O(n) per layer). Stepping the
    same probes through the dense layers q -> S q in the original basis must confirm every
    verdict: stable at the L* found, unstable at L* - 1. Float64: the two paths differ by
    rounding (~1e-13 relative) on energies that sit at finite distance from the band edge."""
    n, band, horizon = 12, 10.0, 4.0
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(3, n, n, generator=gen, dtype=torch.float64)
    s = k.mT @ k
    lam, vec = torch.linalg.eigh(s)
    omega = lam.clamp(min=0).sqrt()
    v0 = sm.modal_probes(lam, gen)
    guess = torch.tensor([sm.theory_depth(method, float(r) * horizon, band) for r in omega[:, -1]])
    depths, _ = sm.smallest_stable_depths(method, omega, v0, horizon, band, guess)
    dp = v0 @ vec.mT  # dense momenta (B, k, n), unit energy since dq = 0

    def dense_stable(depth: torch.Tensor) -> torch.Tensor:
        h = (horizon / depth.double())[:, None, None]
        q, p, ok = torch.zeros_like(dp), dp, torch.ones(3, dtype=torch.bool)
        for j in range(int(depth.max())):
            q, p = sm.METHODS[method](q, p, lambda v: v, lambda v: v @ s, h)
            energy = ((q @ s) * q).sum(-1) + (p * p).sum(-1)
            inside = ((energy >= band**-2) & (energy <= band**2)).all(-1)
            ok &= inside | (j >= depth)
        return ok

    assert (depths > 1).all() and dense_stable(depths).all()
    assert not dense_stable(depths - 1).any()


def test_t_quantile_matches_tables() -> None:
    """Student-t 97.5% quantiles from printed tables: df 3 -> 3.182, df 7 -> 2.365."""
    assert sm.t_quantile(0.975, 3) == pytest.approx(3.1824, abs=1e-3)
    assert sm.t_quantile(0.975, 7) == pytest.approx(2.3646, abs=1e-3)


def test_stability_map_quick(tmp_path: Path) -> None:
    stdout = _run("depth_stability_map.py", tmp_path)
    assert (tmp_path / "stability_map.png").stat().st_size > 10_000
    assert (tmp_path / "table.md").read_text().startswith("## ")
    raw = pd.read_csv(tmp_path / "seeds.csv")
    fits = pd.read_csv(tmp_path / "fit.csv")
    stiffness = pd.read_csv(tmp_path / "stiffness.csv")
    assert set(raw["method"]) == set(sm.METHODS)
    assert set(raw["weights"]) == {"random", "trained"}
    fe = raw[raw["method"] == "forward_euler"]
    assert (fe["smallest_stable_depth"] == fe["theory"]).all()
    # The exact theory as the search's first probe: two evaluations, L* and L* - 1.
    assert (fe["evaluations"] == 2).all()
    sym = raw[raw["method"] != "forward_euler"]
    assert sym["ratio"].between(0.95, 1.3).all(), sym["ratio"].describe()
    # Quick widths 16-64: one width range (64-512 and >= 1024 hold fewer than two quick widths).
    assert list(fits["against"].unique()) == ["width 16-64", "rho_T, width 16-64", "rho_T"]
    for label in ("rho_T, width 16-64", "rho_T"):  # random, trained
        rho_t = fits[fits["against"] == label].set_index("method")
        assert abs(rho_t.loc["forward_euler", "exponent"] - 2) < 0.1
        for method in ("symplectic_euler", "stormer_verlet"):
            assert abs(rho_t.loc[method, "exponent"] - 1) < 0.1
    width = fits[fits["against"] == "width 16-64"].set_index("method")
    assert np.isfinite(width[["ci95_low", "ci95_high"]].to_numpy()).all()
    # Widths 16-64 sit where sigma_max(K)^2 is still below 4n: the exponent is that of the
    # exact one-mode theory at the measured rho, not yet the asymptotic 1 and 1/2. Forward
    # Euler matches it exactly (L* = theory); the symplectic L* of 10-24 layers are integers,
    # and one layer more or less moves a slope over a 4x width range by up to
    # ln(1.1)/ln(4) = 0.07, hence 0.1.
    fe_w = width.loc["forward_euler"]
    assert fe_w["exponent"] == pytest.approx(fe_w["theory_exponent"], abs=1e-12)
    methods = width.loc[list(sm.METHODS)]
    np.testing.assert_allclose(methods["exponent"], methods["theory_exponent"], atol=0.1)
    # ... and the width law enters through the stiffness, over the same systems: L*_FE ~ rho^2
    # up to the finite-rho T curvature of the theory (local slope 2.02 in rho T, i.e. 1%,
    # 0.012 on a rho^2 slope of 1.13) and L*_symplectic ~ rho (integers: 0.07, as above).
    rho2 = width.loc["stiffness rho^2"]
    assert rho2["exponent"] == pytest.approx(fe_w["rho2_exponent"], abs=1e-12)
    assert fe_w["exponent"] == pytest.approx(rho2["exponent"], abs=0.03)
    for method in ("symplectic_euler", "stormer_verlet"):
        assert width.loc[method, "exponent"] == pytest.approx(rho2["exponent"] / 2, abs=0.1)
    # Stiffness study: rho^2 / (2 w) = lambda_max(K^T K) / (4n) below 1 at small n, and
    # Johnstone's finite-n mean inside every width's 95% interval (fixed seeds, deterministic);
    # N(0, 1/n) entries would put it at ~1/n, a missing transpose or factor 2 at 2.
    assert list(stiffness["width"]) == [16, 32, 64, 128]
    assert (stiffness["rho2_over_2w"] < 1).all()
    assert (stiffness["ci95_low"] <= stiffness["johnstone"]).all()
    assert (stiffness["johnstone"] <= stiffness["ci95_high"]).all()
    assert "| method | width |" in stdout


def test_deep_classifier_quick(tmp_path: Path) -> None:
    """Depth 32: the tanh MLP's gradient has vanished (transmission < 1e-6, measured ~1e-10)
    and it stays at chance; the symplectic body keeps sigma_max >= 1 at every checkpoint, and
    its sigma_min is at most 1/sigma_max (singular values pair as (s, 1/s); both columns are
    worst cases over the batch)."""
    _run("depth_deep_classifier.py", tmp_path)
    assert (tmp_path / "deep_classifier.png").stat().st_size > 10_000
    curves = pd.read_csv(tmp_path / "curves.csv")
    layers = pd.read_csv(tmp_path / "layers.csv")
    tol = pd.read_csv(tmp_path / "tolerated.csv")
    tanh = curves[curves["model"] == "tanh_mlp"]
    assert (tanh["transmission_0"] < 1e-6).all() and (tanh["test_acc"] < 0.6).all()
    sym = layers[layers["model"] == "symplectic"]
    assert (sym["sigma_max"] >= 1 - 1e-9).all()
    assert (sym["sigma_min"] * sym["sigma_max"] <= 1 + 1e-9).all()
    assert (sym["defect"] < 1e-8).all()
    euler = curves[curves["model"] == "euler_resnet"]
    assert (euler["stability_max"] > 1).all()  # random W has eigenvalues with Re > 0
    assert set(tol["model"]) == {"tanh_mlp", "euler_resnet", "symplectic"}
