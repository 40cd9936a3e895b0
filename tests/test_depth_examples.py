"""The physics examples run and measure what their docstrings claim (shortened rollouts).

Claims checked (float64; numbers measured at full length are in docs/depth.md):
- free fall: the symplectic net on a polynomial potential extrapolates 400 m beyond its training
  heights with energy error < 1% (measured 2e-6); the log-cosh potential and the MLP map do not
  (> 10%, measured 6 and 45 times the launch kinetic energy).
- pendulum: the shared Fourier-potential Verlet net keeps the energy error < 1% on the training
  orbit and at an unseen amplitude (measured 1e-4), the MLP map's error is larger.
- Kepler: Verlet conserves the angular momentum of a central force exactly (rounding only, 1e-10
  over ~2500 Verlet substeps), its energy error stays < 1%, and the non-symplectic midpoint map on
  the same potential family drifts to more than twice the Verlet error within 10 periods.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import free_fall  # noqa: E402
import kepler_orbit  # noqa: E402
import pendulum_symplectic  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_torch_defaults():
    """The examples set float64 and one thread at import/run; restore for other tests."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def test_free_fall_extrapolates_with_structure() -> None:
    r = free_fall.main()
    assert r["symplectic_poly"]["energy_rollout"] < 1e-2
    assert r["symplectic_poly"]["height_error"] < 1e-2
    assert r["symplectic_logcosh"]["energy_rollout"] > 0.1
    assert r["mlp_map"]["energy_rollout"] > 0.1


def test_pendulum_energy_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pendulum_symplectic, "ROLLOUT", 1000)
    r = pendulum_symplectic.main()
    sym, mlp = r["symplectic_fourier"], r["mlp_map"]
    assert sym["train_orbit"] < 1e-2 and sym["unseen_q0_2.5"] < 1e-2
    assert mlp["unseen_q0_2.5"] > sym["unseen_q0_2.5"]


def test_kepler_symplecticity_matters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kepler_orbit, "PERIODS", 10)
    r = kepler_orbit.main()
    sym, mid = r["symplectic_verlet"], r["midpoint_rk2"]
    assert sym["angular_momentum"] < 1e-10
    assert sym["energy_100"] < 1e-2
    assert mid["energy_100"] > 2 * sym["energy_100"]
