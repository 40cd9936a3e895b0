"""Smoke-and-substance tests for the depth studies: each ``--quick`` run, in a subprocess (the
studies pin torch to one thread), writes its figure and tables with the expected content."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "analysis" / script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_stability_map_quick(tmp_path: Path) -> None:
    stdout = _run("depth_stability_map.py", tmp_path)
    assert (tmp_path / "stability_map.png").stat().st_size > 0
    table = pd.read_csv(tmp_path / "table.csv")
    fits = pd.read_csv(tmp_path / "fit.csv")
    assert {"model", "width", "median_depth", "q25", "q75", "censored"} <= set(table.columns)
    assert set(table["model"]) == {"euler", "symplectic_euler"}
    assert set(table["width"]) == {8, 16, 32, 64}
    # Every quick run leaves the band (c = 10) well before max depth 2000 at h = 0.2, so the
    # medians are measured, not censored, and the fitted exponents are finite.
    assert (table["censored"] == 0).all()
    assert (table["median_depth"] > 1).all() and (table["median_depth"] < 2000).all()
    assert np.isfinite(fits["exponent"]).all() and (fits["widths_fitted"] == 4).all()
    assert "| model | width |" in stdout


def test_deep_classifier_quick(tmp_path: Path) -> None:
    """Depth 64: the tanh MLP's first-layer gradient has vanished (< 1e-10, measured ~1e-20)
    and it stays at chance; the symplectic net receives O(1e-2) gradients and fits the spirals."""
    stdout = _run("depth_deep_classifier.py", tmp_path)
    assert (tmp_path / "deep_classifier.png").stat().st_size > 0
    table = pd.read_csv(tmp_path / "table.csv").set_index("model")
    assert {"grad_first_layer", "train_acc", "test_acc", "sigma_max_body"} <= set(table.columns)
    assert table.loc["tanh_mlp", "grad_first_layer"] < 1e-10
    assert table.loc["tanh_mlp", "test_acc"] < 0.6
    assert table.loc["symplectic", "grad_first_layer"] > 1e-4
    assert table.loc["symplectic", "sigma_max_body"] >= 1.0
    assert table.loc["symplectic", "test_acc"] > 0.9
    assert "| model | depth |" in stdout
