"""With ``fused=None`` the compiled program is built in a background thread while the eager path
serves the logged steps (capture/plan.py); the steps switch to it once it is ready.

A fake Inductor stands in for the compiler: it blocks until the test releases it (a cold compile
of any length, without timing anything) and returns the traced graph itself, which runs the
same program uncompiled. So the switch is tested on the real tracing, variant and signature
code, and the rows after the switch are those of the program, compared with an eager run to the
float64 bounds of tests/test_fused.py (the same float64 model, the same two paths).
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn

import noether_dyn as nd
from noether_dyn.capture import plan as plan_module
from noether_dyn.capture.plan import BackgroundCompile
from tests.conftest import batch, bn_mlp
from tests.test_fused import OPTIMIZERS, SYMS, _compare, _record_stats

WAIT = 120.0  # seconds: a bound on a fake compile that returns at once, not a measurement


class FakeInductor:
    """``standalone_compile`` that waits for ``release`` and returns the traced graph (or
    raises ``error``); records the threads it ran in."""

    def __init__(self, error: Exception | None = None) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.error = error
        self.threads: list[str] = []

    def standalone_compile(self, graph, inputs, **kwargs):
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.release.wait(WAIT), "the test never released the fake compile"
        if self.error is not None:
            raise self.error
        return graph


@pytest.fixture
def fake_inductor(monkeypatch):
    fake = FakeInductor()
    monkeypatch.setattr(torch._inductor, "standalone_compile", fake.standalone_compile)
    monkeypatch.setattr(plan_module, "FUSED_MIN_NUMEL", 0)  # the tiny model picks the program
    monkeypatch.setattr(plan_module, "COMPILE_AFTER_STEPS", 0)  # compile from the first step
    return fake


def _step(model, opt, mon, x, y) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    mon.log_loss(loss)
    opt.step()


def _watched(tmp_path, name: str, fused: bool | None):
    model = bn_mlp()
    opt = OPTIMIZERS[name](model)
    mon = nd.watch(model, opt, tmp_path / f"{name}-{fused}", symmetries=SYMS, fused=fused)
    mon._planner.progress = None
    _record_stats(mon)
    return model, opt, mon


def _eager_reference(tmp_path, name: str, steps: int):
    model, opt, mon = _watched(tmp_path, name, False)
    x, y = batch(1, dtype=torch.float64)
    for _ in range(steps):
        _step(model, opt, mon, x, y)
    mon.close()
    return nd.load_run(mon.run_dir), mon


@pytest.mark.parametrize("name", ["sgd-momentum-wd", "adamw-two-groups"])
def test_eager_steps_until_the_background_compile_is_ready_then_the_program(
    tmp_path, fake_inductor, name
):
    model, opt, mon = _watched(tmp_path, name, None)
    planner = mon._planner
    assert mon.fused and planner.in_background
    x, y = batch(1, dtype=torch.float64)
    for _ in range(3):  # the compile is held: every step is served, by the eager path
        _step(model, opt, mon, x, y)
    assert planner.background is not None and planner.background.state == "running"
    assert not mon.compiled.compiled_ok
    assert fake_inductor.entered.wait(WAIT), "the program is traced, then compiled"
    assert fake_inductor.threads == ["noether-dyn-compile"], "compiled once, off the step"
    assert len(mon.recorded) == 3

    fake_inductor.release.set()
    for _ in range(6):  # a new input signature (the prediction's) compiles in the background too
        assert planner.background is None or planner.background.wait(WAIT)
        _step(model, opt, mon, x, y)
    assert mon.compiled.compiled_ok, "the steps switched to the program"
    assert set(fake_inductor.threads) == {"noether-dyn-compile"}
    mon.close()
    assert mon.fused
    _compare((nd.load_run(mon.run_dir), mon), _eager_reference(tmp_path, name, 9))


def test_a_small_model_compiles_once_its_eager_statistics_have_cost_the_rent(tmp_path, monkeypatch):
    """Below FUSED_MIN_NUMEL the background compile waits until the eager statistics' time
    reaches the rent (ski rental): not a step before, and at the first logged step after."""
    fake = FakeInductor()
    fake.release.set()
    monkeypatch.setattr(torch._inductor, "standalone_compile", fake.standalone_compile)
    monkeypatch.setattr(plan_module, "COMPILE_AFTER_STEPS", 0)
    model, opt, mon = _watched(tmp_path, "sgd-momentum-wd", None)
    planner = mon._planner
    assert planner.rent_seconds == plan_module.COMPILE_RENT_SECONDS
    x, y = batch(1, dtype=torch.float64)
    _step(model, opt, mon, x, y)
    spent = planner.eager_seconds
    assert spent > 0, "the eager statistics' time is counted"
    planner.rent_seconds = spent * 3.5  # a rent the next steps reach, but not the next one
    seen = []
    for _ in range(200):  # the first step may be slower than the next ones
        _step(model, opt, mon, x, y)
        seen.append((planner.eager_seconds, planner.background is not None))
        if planner.background is not None:
            break
    assert seen[-1][1], f"no compile once the rent was spent: {seen}"
    # a step's check reads a total between the one after the step before and its own (the
    # step's rows are counted after the check): started at the rent, not before, and not later
    # than the step after the one whose total reached it
    totals = [spent] + [total for total, _ in seen]
    assert totals[-1] >= planner.rent_seconds, "the compile started before the rent was spent"
    assert all(total < planner.rent_seconds for total in totals[:-2]), (
        totals,
        planner.rent_seconds,
    )
    assert planner.background.wait(WAIT) and planner.background.state == "ready"
    for _ in range(4):  # the prediction's signature compiles in the background too
        assert planner.background is None or planner.background.wait(WAIT)
        _step(model, opt, mon, x, y)
    assert mon.compiled.compiled_ok, "the steps switched to the program"
    mon.close()


def test_the_trace_runs_in_the_training_thread_and_only_the_compile_in_the_background(
    tmp_path, fake_inductor, monkeypatch
):
    """FX tracing patches process-wide state (nn.Module.__call__, __getattr__) and reads the
    optimizer's state: a trace in the compile thread raced with the training (Adam's program
    failed inside its rule while another monitor stepped). The trace runs in the step."""
    from noether_dyn.quantities.fused import StatsProgram

    traced_in: list[str] = []
    trace = StatsProgram._trace

    def recording(self, flat, args):
        traced_in.append(threading.current_thread().name)
        return trace(self, flat, args)

    monkeypatch.setattr(StatsProgram, "_trace", recording)
    fake_inductor.release.set()
    model, opt, mon = _watched(tmp_path, "adamw-two-groups", None)
    x, y = batch(1, dtype=torch.float64)
    for _ in range(6):
        assert mon._planner.background is None or mon._planner.background.wait(WAIT)
        _step(model, opt, mon, x, y)
    assert mon.compiled.compiled_ok
    assert traced_in and set(traced_in) == {threading.main_thread().name}, traced_in
    assert set(fake_inductor.threads) == {"noether-dyn-compile"}
    mon.close()


def test_failed_background_compile_warns_once_and_stays_eager(tmp_path, fake_inductor):
    fake_inductor.error = RuntimeError("no C++ compiler found")
    fake_inductor.release.set()
    model, opt, mon = _watched(tmp_path, "adamw-two-groups", None)
    x, y = batch(1, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            assert mon._planner.background is None or mon._planner.background.wait(WAIT)
            _step(model, opt, mon, x, y)
    messages = [str(w.message) for w in caught if "fused statistics" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler found" in messages[0]
    assert mon.fused is False and not mon.compiled.compiled_ok
    mon.close()
    _compare((nd.load_run(mon.run_dir), mon), _eager_reference(tmp_path, "adamw-two-groups", 5))


def test_explicit_fused_compiles_in_the_step(tmp_path, fake_inductor):
    fake_inductor.release.set()
    model, opt, mon = _watched(tmp_path, "sgd-momentum-wd", True)
    x, y = batch(1, dtype=torch.float64)
    _step(model, opt, mon, x, y)
    assert not mon._planner.in_background and mon._planner.background is None
    assert mon.compiled.compiled_ok
    assert fake_inductor.threads == [threading.main_thread().name]
    mon.close()


def test_many_tensors_skip_compiling_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "FUSED_MIN_NUMEL", 0)
    monkeypatch.setattr(plan_module, "FUSED_MAX_TENSORS", 3)  # bn_mlp tracks 6 tensors
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nd.watch(model, opt, tmp_path / "auto") as mon:
        assert mon.fused is False
    with nd.watch(model, opt, tmp_path / "asked", fused=True) as mon:
        assert mon.fused is True


def test_a_slow_background_compile_prints_a_line_and_another_when_ready():
    lines: list[str] = []
    release = threading.Event()
    announced = threading.Event()

    def progress(line: str) -> None:
        lines.append(line)
        announced.set()

    job = BackgroundCompile(lambda: release.wait(WAIT), "6 tensors", progress, after=0.01)
    assert announced.wait(WAIT), "no progress line while the compile runs"
    assert job.state == "running" and len(lines) == 1
    assert "in the background" in lines[0] and "6 tensors" in lines[0]
    release.set()
    assert job.wait(WAIT) and job.state == "ready"
    assert len(lines) == 2 and "compiled in" in lines[1]


def test_a_quick_background_compile_prints_nothing():
    lines: list[str] = []
    job = BackgroundCompile(lambda: True, "6 tensors", lines.append, after=WAIT)
    assert job.wait(WAIT) and job.state == "ready"
    assert lines == []
    job = BackgroundCompile(lambda: False, "6 tensors", lines.append, after=WAIT)
    assert job.wait(WAIT) and job.state == "unavailable"
    assert lines == []
