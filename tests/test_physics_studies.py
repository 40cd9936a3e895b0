"""The physics studies of ``analysis/`` at CI size (``--quick``): each writes its tables, and
its numbers pass checks that a wrong theory module or a wrong study would fail.

* per_unit_laws: on every seed without dead units, P - rank(per-sample gradients) (an upper
  bound on the number of laws) equals the rank of the per-unit charges' Jacobian (a lower
  bound): 25 with cross-entropy, 16 with MSE; the charges are orthogonal to every gradient to
  rounding (1e-14 relative); each unit's change under SGD is its kinetic term (1e-13: Q ~ 1
  rounded in float64); the units' |dQ| exceed the layer's (cancellation inside the layer).
* matrix_charges: drift ~ eta^2 (log slope 2 within 0.01 from eta = 1e-4 down), below 1e-10 at
  eta = 1e-7, first-order part and closure at rounding (1e-14) under GD; decay, momentum and Adam
  break it at first order (> 1e-4, measured 6e-4 to 3.5).
* nld_equation_of_motion: the exact discrete law matches rescale and translation to 1e-12
  (rounding over 120 steps) and scale to 1e-3 (BatchNorm eps = 1e-5; measured 6e-5 to 2e-4);
  the ODE misses rescale by more than 1% (measured 3-9%) but follows translation (below 1e-3
  after the start-up).
* momentum_theory: the split closes to 1e-13 |Q| every step; translation's decay share under
  SGD with momentum is its whole change (1e-12); the true share exceeds the naive column by
  more than 5x under momentum (measured 9.7-9.9x; 1/(1 - beta) = 10 at equilibrium) and more
  than 10x under Adam and RMSprop with coupled L2 (measured 30-110x). The exact prediction is
  at rounding for rescale and translation (1e-12) and at the BatchNorm eps for scale (1e-4);
  the ODE's error is larger and falls with eta (ratio > 1.5 when eta halves: first order).
* bn_eps_residual: the scale residual of the exact predictions falls with eps by 1e4 per 1e4
  (within 20%) down to rounding (below 1e-14 at eps = 1e-30).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import (  # noqa: E402
    bn_eps_residual,
    matrix_charges,
    momentum_theory,
    nld_equation_of_motion,
    per_unit_laws,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _written(out: Path) -> None:
    assert (out / "table.csv").exists()
    assert (out / "table.md").read_text().startswith("## ")


def test_per_unit_laws(tmp_path: Path) -> None:
    laws, breaks = per_unit_laws.main(["--quick", "--out", str(tmp_path)])
    _written(tmp_path / "laws")
    _written(tmp_path / "breaking")
    alive = laws[laws["dead_units"] == 0]
    assert len(alive) >= 2
    for _, row in alive.iterrows():
        expected = 25 if row["loss"] == "cross_entropy" else 16
        assert row["upper_bound_P_minus_rank"] == expected
        assert row["rank_charge_jacobian"] == expected
        assert row["rank_stacked"] == row["params"]
        assert row["max_rel_J_dot_g"] < 1e-14
        assert row["sv_dropped_max"] < 1e-12 < 1e-6 < row["sv_kept_min"]
    assert (breaks["max_rel_change_minus_ksb"] < 1e-13).all()
    rescale = breaks[breaks["symmetry"].str.startswith("rescale")]
    assert (rescale["step_ratio"] > 1.0).all()


def test_matrix_charges(tmp_path: Path) -> None:
    scaling, breaking = matrix_charges.main(["--quick", "--out", str(tmp_path)])
    _written(tmp_path / "scaling")
    small = scaling[scaling["eta"] <= 1e-4]
    assert small["slope_vs_previous"].between(1.99, 2.01).all()
    assert float(scaling.loc[scaling["eta"] == 1e-7, "rel_drift"].iloc[0]) < 1e-10
    assert (scaling["first_order"] < 1e-14).all() and (scaling["closure"] < 1e-14).all()
    assert (scaling["pred_residual"] < 1e-14).all()
    rows = breaking.set_index("rule")
    assert rows.loc["GD", "first_order"] < 1e-14
    for rule in ("GD + L2 1e-2", "GD + momentum 0.9", "Adam"):
        assert rows.loc[rule, "first_order"] > 1e-4
    assert (breaking["closure"] < 1e-14).all()


def test_nld_equation_of_motion(tmp_path: Path) -> None:
    df = nld_equation_of_motion.main(["--quick", "--out", str(tmp_path)])
    _written(tmp_path)
    kind = df["symmetry"].str.split(":").str[0]
    assert (df.loc[kind != "scale", "rel_res_exact"] < 1e-12).all()
    assert (df.loc[kind == "scale", "rel_res_exact"] < 1e-3).all()
    assert (df.loc[kind == "rescale", "rel_res_ode"] > 1e-2).all()
    assert (df.loc[kind == "translation", "rel_res_ode_tail"] < 1e-3).all()


def test_bn_eps_residual(tmp_path: Path) -> None:
    df = bn_eps_residual.main(["--quick", "--out", str(tmp_path)])
    _written(tmp_path)
    for _, group in df.groupby("beta"):
        res = group.set_index("bn_eps")["rel_residual"]
        assert res[1e-5] / res[1e-9] == pytest.approx(1e4, rel=0.2)
        assert res[1e-30] < 1e-14
        assert res[1e-13] < 1e-12


def test_momentum_theory(tmp_path: Path) -> None:
    shares, pred = momentum_theory.main(["--quick", "--out", str(tmp_path)])
    _written(tmp_path / "shares")
    _written(tmp_path / "prediction")
    assert (shares["closure"] < 1e-13).all()
    sgd = shares[shares["optimizer"].str.startswith("SGD")].set_index("symmetry")
    assert sgd.loc["translation:head", "decay_fraction"] == pytest.approx(1.0, abs=1e-12)
    assert (sgd["true_over_naive"] > 5).all()
    adaptive = shares[~shares["optimizer"].str.startswith("SGD")]
    assert (adaptive["true_over_naive"] > 10).all()
    kind = pred["symmetry"].str.split(":").str[0]
    assert (pred.loc[kind != "scale", "rel_err_exact"] < 1e-12).all()
    assert (pred.loc[kind == "scale", "rel_err_exact"] < 1e-4).all()
    assert (pred["rel_err_ode"] > 10 * pred["rel_err_exact"]).all()
    by_eta = pred.pivot(index="symmetry", columns="eta", values="rel_err_ode")
    assert ((by_eta[0.05] / by_eta[0.025]).drop("scale:fc1") > 1.5).all()
