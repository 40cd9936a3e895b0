"""The capture layer: hooks, schedules, closures, skipped steps, subclasses, bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import noether_dyn as nd
from noether_dyn.capture.monitor import MonitorFailure
from noether_dyn.store import StoreError
from tests.conftest import batch, bn_mlp, train


def test_one_line_watch_produces_a_readable_run(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = nd.watch(model, opt, run_dir)
    train(model, opt, mon, steps=7)
    mon.close()
    run = nd.load_run(run_dir)
    assert list(run.steps["step"]) == list(range(7))
    for col in ("step", "time", "lr", "loss", "kinetic"):
        assert col in run.steps
    assert np.isfinite(run.steps["loss"]).all()
    assert run.meta["optimizer"]["class"] == "SGD"
    assert run.meta["torch_version"] == torch.__version__
    assert run.meta["model"]["n_parameters"] == sum(p.numel() for p in model.parameters())
    # zero-config: detected on the first training batch, tracked from step 0
    assert "detected on the first training batch" in run.meta["symmetry_note"]
    assert run.meta["symmetries_from_step"] == 0 and len(run.symmetries) > 0
    assert set(run.charges["symmetry"]) == set(run.symmetries["symmetry"])


def test_scheduler_rate_and_time_is_running_sum(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    expected_lr = []
    with nd.watch(model, opt, run_dir) as mon:
        x, y = batch()
        for _ in range(10):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.log_loss(loss)
            expected_lr.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    steps = nd.load_run(run_dir).steps
    assert steps["lr"].tolist() == expected_lr
    assert steps["time"].to_numpy() == pytest.approx(
        np.concatenate([[0], np.cumsum(expected_lr)[:-1]])
    )
    # t/tau grows by 2 (1 - beta) / (1 + beta) per step, whatever the rate
    assert np.diff(steps["log_prefactor"]) == pytest.approx(2 * 0.5 / 1.5)


def test_every_k_stores_every_kth_step(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nd.watch(model, opt, run_dir, every=3) as mon:
        train(model, opt, mon, steps=10)
    steps = nd.load_run(run_dir).steps
    assert steps["step"].tolist() == [0, 3, 6, 9]
    assert steps["time"].to_numpy() == pytest.approx([0.0, 0.3, 0.6, 0.9])


def test_closure_step_logs_the_closure_loss(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    losses = []
    with nd.watch(model, opt, run_dir):
        for _ in range(4):

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                losses.append(float(loss.detach()))
                return loss

            opt.step(closure)
    steps = nd.load_run(run_dir).steps
    assert steps["loss"].tolist() == pytest.approx(losses, rel=1e-15)
    assert (steps["kinetic"] > 0).all()  # grads came from inside the closure


def test_lbfgs_closure_falls_back_and_runs(run_dir):
    model = bn_mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    x, y = batch()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with nd.watch(model, opt, run_dir) as mon:
        for _ in range(3):
            opt.step(closure)
    assert mon.adapter.fallback
    assert len(nd.load_run(run_dir).steps) == 3


def test_subclass_calling_super_step_is_counted_once(run_dir):
    class MySGD(torch.optim.SGD):
        def step(self, closure=None):
            return super().step(closure)

    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # hooks SGD.step too
    assert getattr(torch.optim.SGD.step, "hooked", False)
    model = bn_mlp()
    opt = MySGD(model.parameters(), lr=0.1)
    with nd.watch(model, opt, run_dir) as mon:
        train(model, opt, mon, steps=5)
    del other
    steps = nd.load_run(run_dir).steps
    assert steps["step"].tolist() == list(range(5))
    assert (steps["kinetic"] > 0).all()


def test_gradscaler_skipped_steps_are_not_counted(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x, y = batch()
    taken = 0
    with nd.watch(model, opt, run_dir) as mon:
        for k in range(6):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if k in (2, 4):
                loss = loss * float("inf")  # overflow: GradScaler skips optimizer.step
            mon.log_loss(loss)
            scaler.scale(loss).backward()
            before = model[0].weight.detach().clone()
            scaler.step(opt)
            scaler.update()
            taken += int(not torch.equal(before, model[0].weight.detach()))
    steps = nd.load_run(run_dir).steps
    assert taken == 4
    assert steps["step"].tolist() == list(range(taken))
    assert np.isfinite(steps["loss"]).all()  # the overflowed losses belonged to skipped steps


def test_parameters_without_gradient_and_frozen(run_dir):
    model = bn_mlp()
    model[0].bias.requires_grad_(False)  # frozen, still in the optimizer
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = batch()
    with nd.watch(model, opt, run_dir):
        for k in range(4):
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out, y)
            if k % 2:  # the head gets no gradient on odd steps
                loss = out[:, :0].sum() + (model[0](x) ** 2).mean()
            loss.backward()
            opt.step()
    steps = nd.load_run(run_dir).steps
    assert len(steps) == 4 and np.isfinite(steps["kinetic"]).all()


def test_nonfinite_loss_is_flagged_and_training_goes_on(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with nd.watch(model, opt, run_dir) as mon:
            for k in range(5):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                mon.log_loss(loss * float("nan") if k == 2 else loss)
                opt.step()
    run = nd.load_run(run_dir)
    assert len(run.steps) == 5
    flagged = run.events[run.events["kind"] == "nonfinite_loss"]
    assert flagged["step"].tolist() == [2]
    assert any("non-finite loss at step 2" in str(w.message) for w in caught)


def test_nonfinite_parameters_are_flagged(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(), nd.watch(model, opt, run_dir) as mon:
        warnings.simplefilter("ignore")
        train(model, opt, mon, steps=2)
        with torch.no_grad():
            model[3].weight[0, 0] = float("inf")
        train(model, opt, mon, steps=2)
    events = nd.load_run(run_dir).events
    assert 2 in events[events["kind"] == "nonfinite_params"]["step"].tolist()


def test_parameters_not_in_model_are_refused(run_dir):
    model = bn_mlp()
    stray = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([*model.parameters(), stray], lr=0.1)
    with pytest.raises(ValueError, match="not a parameter of the Sequential"):
        nd.watch(model, opt, run_dir)


def test_run_dir_holding_a_run_is_refused_unless_asked(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nd.watch(model, opt, run_dir).close()
    with pytest.raises(StoreError, match="already holds a run.*resume=True.*overwrite=True"):
        nd.watch(model, opt, run_dir)
    mon = nd.watch(model, opt, run_dir, overwrite=True)
    train(model, opt, mon, steps=2)
    mon.close()
    assert len(nd.load_run(run_dir).steps) == 2


def test_watch_twice_on_one_optimizer_is_refused(run_dir, tmp_path):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = nd.watch(model, opt, run_dir)
    with pytest.raises(RuntimeError, match="already watched"):
        nd.watch(model, opt, tmp_path / "other")
    mon.close()
    nd.watch(model, opt, tmp_path / "other").close()  # allowed once the first is closed


def test_bad_arguments_name_the_parameter(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="every must be a positive int"):
        nd.watch(model, opt, run_dir, every=0)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        nd.watch(model, "sgd", run_dir)
    with pytest.raises(ValueError, match="log_loss: expected a scalar"):
        with nd.watch(model, opt, run_dir, overwrite=True) as mon:
            mon.log_loss(torch.ones(3))


def test_close_detaches_hooks(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = nd.watch(model, opt, run_dir)
    train(model, opt, mon, steps=2)
    mon.close()
    train(model, opt, None, steps=3)
    assert mon.step == 2
    assert len(nd.load_run(run_dir).steps) == 2


def test_float32_run_has_finite_lagrangian(run_dir):
    model = bn_mlp(dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with nd.watch(model, opt, run_dir) as mon:
        train(model, opt, mon, steps=3)
    steps = nd.load_run(run_dir).steps
    assert np.isfinite(steps[["loss", "kinetic", "potential"]].to_numpy()).all()
    assert steps["l2"].eq(0).all()  # AdamW's decay is a friction, not part of V
    assert math.isclose(steps["potential"].iloc[0], steps["loss"].iloc[0])


def test_depth_profile_is_stored_with_the_run(run_dir):
    from noether_dyn.depth import SymplecticNet, profile

    torch.manual_seed(0)
    net = SymplecticNet(dim=4, depth=6, order=2).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(8, 4, dtype=torch.float64)
    with nd.watch(net, opt, run_dir) as mon:
        for _ in range(3):
            opt.zero_grad()
            loss = net(x).pow(2).mean()
            loss.backward()
            mon.log_loss(loss)
            opt.step()
        prof = profile(net, x)
        mon.log_depth_profile(prof)
        with pytest.raises(ValueError, match="lacks columns"):
            mon.log_depth_profile(prof.drop(columns=["sigma_min"]))
    stored = nd.load_run(run_dir).depth_profile
    assert stored["step"].unique().tolist() == [3]
    assert len(stored) == len(prof)
    np.testing.assert_allclose(stored["sigma_max"], prof["sigma_max"], rtol=1e-15)
    assert (stored["sigma_max"] >= 1 - 1e-12).all()  # the symplectic certificate, read back


def test_a_monitor_failure_never_stops_training(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = nd.watch(model, opt, run_dir)
    train(model, opt, mon, steps=3)
    mon.flush()
    model[0].bias.grad = None
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})  # unsupported change
    with pytest.warns(MonitorFailure, match="monitoring stopped at step 3.*param_group"):
        train(model, opt, mon, steps=2)  # the steps run
    train(model, opt, mon, steps=1)  # and the monitor stays out of the way
    mon.close()
    run = nd.load_run(run_dir)
    assert run.steps["step"].tolist() == [0, 1, 2]
    assert run.events["kind"].tolist() == ["monitor_error"]
