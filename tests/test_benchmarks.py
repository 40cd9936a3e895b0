"""The overhead benchmark's wiring (``benchmarks/overhead.py``), on a tiny model: its rows are
measurements and judgements, not timings this test checks (speed belongs to the script)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def load_overhead():
    spec = importlib.util.spec_from_file_location("overhead", ROOT / "benchmarks" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny():
    model = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.randn(8, 12), torch.randint(0, 3, (8,))


def test_overhead_case_row(tmp_path, monkeypatch):
    bench = load_overhead()
    monkeypatch.setitem(bench.WORKLOADS, "tiny", tiny)
    row = bench.run_case("tiny", "sgd-momentum", 1, 4, tmp_path, fused=False)
    assert row["steps"] == 4 and row["symmetries"] >= 2
    for key in (
        "ratio", "added/floor", "added/floor in step", "added/state floor", "added/step", "+-",
        "hook/step",
    ):  # fmt: skip
        assert math.isfinite(row[key]), key
    assert row["ratio"] > 0 and row["+-"] >= 0
    assert row["mem/params"] == 0.0, "SGD's update is rebuilt from its buffers: nothing held"
    assert row["fused"] == "no", "fused=False: the eager path"
    assert row["time ok"] in ("yes", "NO") and row["mem ok"] == "yes"
    assert math.isnan(row["peak+/params"]), "peak memory is measured on CUDA only"


def test_overhead_judges_every_row_and_sizes_steps_by_time(tmp_path, monkeypatch):
    bench = load_overhead()
    monkeypatch.setitem(bench.WORKLOADS, "tiny", tiny)
    # a 1 s floor: an every=1 row passes
    monkeypatch.setattr(bench, "_floor_pass", lambda model, opt=None: 1.0)
    row = bench.run_case("tiny", "adamw", 1, None, tmp_path, seconds=0.0, fused=False)
    assert row["steps"] == 20, "the fewest steps per arm when the time budget is spent"
    assert row["time ok"] == "yes", "every=1 is judged against the (here 1 s) state floor"
    # every=10 is judged against 1% of the step, whatever the floor
    row = bench.run_case("tiny", "adamw", 10, 4, tmp_path / "a", fused=False)
    assert row["time ok"] == ("yes" if row["added/step"] <= 0.01 else "NO")
    # a vanishing floor: only 2% of the step counts
    monkeypatch.setattr(bench, "_floor_pass", lambda model, opt=None: 1e-12)
    row = bench.run_case("tiny", "adamw", 1, 4, tmp_path / "b", fused=False)
    added = row["added/step"]
    assert row["time ok"] == ("yes" if added <= 0.02 else "NO")


def test_overhead_time_target_is_issue_18s():
    bench = load_overhead()
    assert bench.time_target("sgd-momentum", 1, 1.0, 0.1, 0.3) == 0.2
    assert bench.time_target("sgd-momentum", 1, 1.0, 0.001, 0.3) == 0.02
    assert bench.time_target("adamw", 1, 1.0, 0.1, 0.3) == pytest.approx(0.45)
    assert bench.time_target("adamw", 1, 1.0, 0.1, 0.001) == 0.02
    assert bench.time_target("rmsprop", 10, 1.0, 0.1, 0.3) == 0.01


def test_overhead_sweep_rows_cover_both_families_and_the_zero_symmetry_case(capsys):
    """``--sweep``: per family and size, a row with the detected symmetries and one with none,
    on the path asked for (the wiring only: 2 steps per arm)."""
    bench = load_overhead()
    rows = bench.main(
        ["--sweep", "--sizes", "50k", "--path", "eager", "--steps", "2"]
        + ["--optimizer", "sgd-momentum", "--every", "1"]
    )
    got = {(r["workload"], r["symmetries"] > 0) for r in rows}
    assert got == {("mlp-50k", True), ("mlp-50k", False), ("cnn-50k", True), ("cnn-50k", False)}
    assert all(r["path"] == "eager" and r["fused"] == "no" for r in rows)
    assert all(40_000 <= r["params"] <= 80_000 for r in rows), "the 50k size"
    assert all(r["optimizer"] == "sgd-momentum" and r["every"] == 1 for r in rows)
    assert capsys.readouterr().out.count("| mlp-50k |") == 2


def test_small_models_rows_judge_each_monitor_against_the_allowance(capsys):
    """``benchmarks/small_models.py``: the plain step, the allowance and each monitor's added
    time (the wiring only: 3 rounds; the compiled arms skipped, so no compile)."""
    spec = importlib.util.spec_from_file_location(
        "small_models", ROOT / "benchmarks" / "small_models.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (row,) = bench.main(
        ["--rounds", "3", "--sizes", "50k", "--optimizers", "adamw", "--no-compiled"]
    )
    assert row["model"] == "mlp-50k" and row["optimizer"] == "adamw"
    assert 40_000 <= row["params"] <= 80_000
    assert row["step ms"] > 0 and row["allowance ms"] >= 0.02 * row["step ms"]
    for kind in ("minimal", "eager", "eager+sym"):
        assert math.isfinite(row[kind]), kind
    assert math.isnan(row["compiled"]) and math.isnan(row["compiled+sym"])
    out = capsys.readouterr().out
    assert "| mlp-50k | 0.06M | adamw |" in out and out.rstrip().endswith("| - | - |")


def test_cockpit_compare_times_noether_dyn_and_cockpit_or_says_cockpit_is_missing(
    capsys, monkeypatch
):
    """``benchmarks/cockpit_compare.py --quick``: the wiring only (3 rounds on the 0.06M MLP, the
    eager arm, so no Inductor compile). With Cockpit made unimportable the script prints the skip
    message and still times the noether-dyn arm; where Cockpit is installed its economy arm runs
    too (skipped with a message where it is not: CI does not install it)."""
    import sys

    import pytest

    spec = importlib.util.spec_from_file_location(
        "cockpit_compare", ROOT / "benchmarks" / "cockpit_compare.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with monkeypatch.context() as patch:  # an import of None in sys.modules raises ImportError
        patch.setitem(sys.modules, "backpack", None)
        patch.setitem(sys.modules, "cockpit", None)
        (row,) = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "Cockpit is not importable here" in out and bench.INSTALL in out
    assert row["model"] == "mlp-50k" and row["optimizer"] == "sgd-momentum"
    assert 40_000 <= row["params"] <= 80_000 and row["step ms"] > 0
    assert math.isfinite(row["noether-dyn eager ms"])
    assert row["monitor steps"] == {"noether-dyn eager": 2 + 3}, "2 warm-up steps + 3 rounds"
    assert math.isnan(row["noether-dyn ms"]) and row["fused"] == "-", "quick: nothing compiled"
    assert math.isnan(row["cockpit ms"]) and row["cockpit steps"] == 0
    assert out.rstrip().endswith("| - | - | - | 3 (0) |")

    api, reason = bench.load_cockpit()
    if api is None:
        pytest.skip(f"Cockpit is not importable ({reason}): its arm is not checked here")
    (row,) = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "not importable" not in out
    assert row["cockpit steps"] == 3 and row["cockpit tracked"] == 2 + 3
    economy = {"Alpha", "Distance", "GradHist1d", "GradNorm", "InnerTest", "Loss", "NormTest"}
    assert economy | {"OrthoTest", "UpdateSize"} == set(row["cockpit quantities"])
    assert math.isfinite(row["cockpit ms"]) and math.isfinite(row["noether-dyn eager ms"])
    assert "| mlp-50k | 0.06M | sgd-momentum |" in out and out.rstrip().endswith("| - | 3 (3) |")
