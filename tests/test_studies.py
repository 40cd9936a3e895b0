"""The charge studies of ``analysis/`` at CI size: each ``main([..., "--quick", "--out", tmp])``
writes its table, figure and markdown, and its numbers pass checks that a wrong toolkit or a
wrong study would fail.

Identities and tolerances (docs/theory.md §3-4):

* charges_sgd, regime "sgd": ``predicted`` is exact given the symmetry (§3.2), so in float64
  ``|charge - predicted|`` is bounded by the accumulated symmetry defect (``defect_bound``) plus
  the rounding of the charge itself (1e-12 relative: a few hundred steps of float64 updates,
  u = 1.1e-16, on charges of |Q| ~ 10), and per step the residual has the defect's size (to
  1e-6 relative: rounding of Q ~ 20 against residuals ~ 1e-6); the exactly symmetric rescale
  (ReLU) and translation (softmax) charges must match to 1e-10 relative. Regime "momentum"
  (§3.3, continuous theory): its error is a discretization error, first order in eta, so halving
  eta must shrink it (order > 0.5).
* translation_adam (§3.1): SGD without decay moves Q = sum(head) only by rounding (below 20x the
  run's rounding scales); under Adam (no decay) ``rule`` carries the whole change (closure within
  1e-5 relative: Q is summed in float32) and the change is > 1e3 times SGD's drift.
* filter_norm_ablation (§4): the r^4 residual of the free runs is the dropped second-order step
  term up to the BatchNorm-eps defect; the constrained runs' effective rate equals the one measured
  directly and does not move; the free high-rate run's effective rate decays.
* angular_equilibrium (SMD, RE): the quick run reaches equilibrium (relaxation times 25-100 steps
  against 600 steps); measured/theory ratios were 0.98-1.01, the band [0.9, 1.1] allows seed
  variation but rejects a wrong momentum factor ((1 + beta)^{1/2} = 1.38).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import (  # noqa: E402
    angular_equilibrium,
    charges_sgd,
    filter_norm_ablation,
    translation_adam,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _outputs(out: Path, figure: str, csvs: tuple[str, ...] = ("table",)) -> None:
    assert (out / figure).stat().st_size > 10_000
    assert (out / "table.md").read_text().startswith("## ")
    for name in csvs:
        assert (out / f"{name}.csv").exists()


def test_charges_sgd(tmp_path: Path) -> None:
    table = charges_sgd.main(["--quick", "--out", str(tmp_path)])
    _outputs(tmp_path, "charges.png", ("table", "scaling"))
    assert {"theory", "measured", "residual", "rel_residual", "defect_bound"} <= set(table.columns)
    sgd = table[table["regime"] == "sgd"].set_index("symmetry")
    scale = sgd.loc["scale:fc1"]
    assert scale["defect_median"] > 0  # BatchNorm's eps breaks the scale symmetry, a little
    rounding = 1e-12 * abs(scale["measured"])
    assert abs(scale["residual"]) <= scale["defect_bound"] * (1 + 1e-6) + rounding
    assert scale["rel_residual"] < 1e-4
    # per step, |r_n| is the defect's size; rounding of Q ~ 20 (2e-15) against |r_n| ~ 1e-6
    assert scale["defect_identity"] < 1e-6
    for name in ("rescale:fc2", "translation:head"):
        assert sgd.loc[name, "rel_residual"] < 1e-10
    mom = table[table["regime"] == "momentum"]
    assert set(mom["lr"]) == {0.02, 0.01}
    assert (mom["rel_to_change"] < 0.05).all()
    scaling = charges_sgd.scaling_table(table)
    assert (scaling["order"] > 0.5).all()


def test_translation_adam(tmp_path: Path) -> None:
    table = translation_adam.main(["--quick", "--out", str(tmp_path)])
    _outputs(tmp_path, "translation.png")
    assert {"theory", "measured", "residual", "sum_rule", "closure"} <= set(table.columns)
    rows = table.set_index("run")
    for run in ("sgd float32", "sgd float64"):
        r = rows.loc[run]
        assert r["sum_ksb"] == 0 and r["sum_decay"] == 0
        assert abs(r["measured_change"]) < 20 * (r["rounding_scale"] + r["defect_drift"])
    assert abs(rows.loc["sgd float64", "measured_change"]) < 1e-12
    adam = rows.loc["adam"]
    assert adam["sum_decay"] == 0 and adam["sum_ksb"] == 0
    assert abs(adam["closure"]) < 1e-5 * abs(adam["measured_change"])
    assert abs(adam["sum_rule"] - adam["measured_change"]) < 1e-5 * abs(adam["measured_change"])
    assert abs(adam["measured_change"]) > 1e3 * abs(rows.loc["sgd float32", "measured_change"])
    adamw = rows.loc["adamw"]
    assert adamw["sum_decay"] != 0 and abs(adamw["closure"]) < 1e-5 * abs(adamw["measured_change"])


def test_filter_norm_ablation(tmp_path: Path) -> None:
    table = filter_norm_ablation.main(["--quick", "--out", str(tmp_path)])
    _outputs(tmp_path, "filter_norm.png")
    assert {"r4_theory", "r4_measured", "r4_residual", "eff_lr_direct"} <= set(table.columns)
    free = table[table["variant"] == "free"]
    gap = (free["r4_residual"] - free["r4_step_term"]).abs()
    assert (gap <= free["r4_defect_term"] + 1e-9).all()
    assert (free["decomp_gap"].abs() < 1e-9 * free["r4_0"]).all()
    con = table[table["variant"] == "constrained"]
    np.testing.assert_allclose(con["eff_lr_end"], con["eff_lr_direct"], rtol=1e-10)
    np.testing.assert_allclose(con["eff_lr_end"], con["eff_lr_start"], rtol=1e-10)
    assert (con["decomp_gap"] < 0).all()  # the projection removed norm the monitor did not see
    high = free[free["lr"] == free["lr"].max()]
    assert (high["eff_lr_end"] < 0.5 * high["eff_lr_start"]).all()


def test_angular_equilibrium(tmp_path: Path) -> None:
    table = angular_equilibrium.main(["--quick", "--out", str(tmp_path)])
    _outputs(tmp_path, "angular.png")
    assert {"theory", "measured", "residual", "ratio"} <= set(table.columns)
    assert set(table["optimizer"]) == {"SGD", "AdamW"}
    assert (table["steps"] > 5 * table["relax_steps"]).all()
    assert table["ratio"].between(0.9, 1.1).all(), table[["optimizer", "lr", "layer", "ratio"]]
