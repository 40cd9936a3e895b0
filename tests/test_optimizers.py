"""The kinetic term T = (m/2) q'^T G q' of every supported optimizer, against an independent
computation from parameter snapshots and the optimizer's state (docs/theory.md §2).

float64 throughout: the monitor and the reference differ only in summation order, so the
relative difference is a few ulps times the number of terms; 1e-12 leaves three orders of margin.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import noether_dyn as nd
from tests.conftest import batch, bn_mlp

RTOL = 1e-12


def _adam_metric(opt, group, p):
    """G = (sqrt(v_hat) + eps) / (1 - beta1): the first moment is a buffer dampened by beta1,
    and docs/conventions.md puts the dampening in G = P / (1 - d), as for SGD."""
    st = opt.state[p]
    v = st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]
    precond = (v / (1 - group["betas"][1] ** float(st["step"]))).sqrt() + group["eps"]
    return precond / (1 - group["betas"][0])


def _rmsprop_metric(opt, group, p):
    st = opt.state[p]
    v = st["square_avg"]
    if group["centered"]:
        v = v - st["grad_avg"] ** 2
    return v.sqrt() + group["eps"]


def _adagrad_metric(opt, group, p):
    return opt.state[p]["sum"].sqrt() + group["eps"]


CASES = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.1), lambda o, g, p: 1.0, 0.0),
    "sgd-momentum-wd": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
        lambda o, g, p: 1.0,
        0.9,
    ),
    "sgd-nesterov": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True),
        lambda o, g, p: 1.0,
        0.8,
    ),
    "sgd-dampening": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5, dampening=0.3),
        lambda o, g, p: 1.0 / 0.7,
        0.5,
    ),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=1e-3), _rmsprop_metric, 0.0),
    "rmsprop-momentum-centered": (
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.7, centered=True, weight_decay=1e-4),
        _rmsprop_metric,
        0.7,
    ),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-4), _adam_metric, 0.9),
    "adam-amsgrad": (
        lambda ps: torch.optim.Adam(ps, lr=1e-3, betas=(0.8, 0.99), amsgrad=True),
        _adam_metric,
        0.8,
    ),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1), _adam_metric, 0.9),
    "adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=0.05), _adagrad_metric, 0.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kinetic_matches_snapshots(case, run_dir):
    make, metric, beta = CASES[case]
    model = bn_mlp()
    opt = make(model.parameters())
    x, y = batch()
    expected = []
    with nd.watch(model, opt, run_dir) as mon:
        for k in range(6):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            mon.log_loss(loss)
            before = [p.detach().clone() for p in model.parameters()]
            lr = opt.param_groups[0]["lr"]
            if case.startswith("adam"):  # the convention's rate: Adam's bias correction in eta
                lr = lr / (1.0 - beta ** (k + 1))
            opt.step()
            group = opt.param_groups[0]
            total = 0.0
            for p, q0 in zip(model.parameters(), before):
                dq = p.detach() - q0
                g = metric(opt, group, p)
                if case == "sgd-dampening" and k == 0:
                    g = 1.0  # torch's first buffer is undamped (b_0 = u_0): G = I there
                total += float((g * dq * dq).sum())
            mass = lr * (1 + beta) / 2
            expected.append(mass / 2 * total / lr**2)
    run = nd.load_run(run_dir)
    got = run.steps["kinetic"].to_numpy()
    assert len(got) == 6
    for g, e in zip(got, expected):
        assert math.isclose(g, e, rel_tol=RTOL), (case, g, e)
    assert run.meta["optimizer"]["metric_fallback"] is False


def test_adagrad_lr_decay_rate(run_dir):
    model = bn_mlp()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1, lr_decay=0.5)
    x, y = batch()
    with nd.watch(model, opt, run_dir):
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    lr = nd.load_run(run_dir).steps["lr"].to_numpy()
    assert lr == pytest.approx([0.1 / (1 + k * 0.5) for k in range(4)], rel=1e-15)


def test_unknown_optimizer_falls_back_to_euclidean(run_dir):
    model = bn_mlp()
    opt = torch.optim.Adamax(model.parameters(), lr=1e-2)
    x, y = batch()
    with nd.watch(model, opt, run_dir) as mon:
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            dq2 = sum(
                float(((p.detach() - q) ** 2).sum()) for p, q in zip(model.parameters(), before)
            )
    assert mon.adapter.fallback
    run = nd.load_run(run_dir)
    assert run.meta["optimizer"]["metric_fallback"] is True
    assert "fallback" in run.meta["optimizer"]["metric"]
    # G = I and beta = 0: T = dq^2 / (4 eta)
    assert run.steps["kinetic"].iloc[-1] == pytest.approx(dq2 / (4 * 1e-2), rel=RTOL)


def test_param_groups_have_their_own_kinetic(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.1, "momentum": 0.9},
            {"params": list(model[1].parameters()) + list(model[3].parameters()), "lr": 0.01},
        ]
    )
    x, y = batch()
    with nd.watch(model, opt, run_dir):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
    dq2 = [float(((p.detach() - q) ** 2).sum()) for p, q in zip(model.parameters(), before)]
    run = nd.load_run(run_dir)
    groups = run.groups.set_index("grp")
    assert groups.loc[0, "kinetic"] == pytest.approx((1 + 0.9) / (4 * 0.1) * sum(dq2[:2]), rel=RTOL)
    assert groups.loc[1, "kinetic"] == pytest.approx(1 / (4 * 0.01) * sum(dq2[2:]), rel=RTOL)
    assert groups.loc[0, "mass"] == pytest.approx(0.1 * 1.9 / 2)
    assert run.steps["kinetic"].iloc[0] == pytest.approx(groups["kinetic"].sum(), rel=RTOL)


REBUILD_CASES = {
    "sgd-wd-maximize": lambda ps: torch.optim.SGD(ps, lr=0.05, weight_decay=1e-2, maximize=True),
    "sgd-nesterov-wd": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    "sgd-momentum-dampening": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-2
    ),
    "rmsprop-wd": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, weight_decay=1e-2),
    "rmsprop-centered-momentum": lambda ps: torch.optim.RMSprop(
        ps, lr=1e-3, momentum=0.5, centered=True
    ),
    "adam-l2": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-2),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, amsgrad=True),
    "adam-decoupled-flag": lambda ps: torch.optim.Adam(
        ps, lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True
    ),
    "adagrad-wd": lambda ps: torch.optim.Adagrad(ps, lr=0.05, weight_decay=1e-2),
}

SYMS = [
    nd.Symmetry("scale:0", "scale", ("0.weight", "0.bias")),
    nd.Symmetry("rescale:1", "rescale", ("1.weight", "1.bias", "3.weight"), (1, 1, -1)),
    nd.Symmetry("translation:3", "translation", ("3.weight", "3.bias")),
]


@pytest.mark.parametrize("case", sorted(REBUILD_CASES))
def test_update_rebuilt_from_state_equals_snapshot(case, tmp_path):
    """The update rebuilt from the optimizer's state (no parameter copy held) equals the
    snapshot difference up to the rounding of q_{n+1}: relative 1e-12 in float64."""
    runs = {}
    for snapshot in (True, False):
        model = bn_mlp()
        opt = REBUILD_CASES[case](model.parameters())
        x, y = batch()
        mon = nd.watch(model, opt, tmp_path / str(snapshot), symmetries=SYMS, snapshot=snapshot)
        for _ in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.log_loss(loss)
            opt.step()
        held = mon.snapshot_bytes
        mon.close()
        runs[snapshot] = nd.load_run(tmp_path / str(snapshot))
        if not snapshot:
            assert held == 0  # nothing per parameter held by the monitor
    a, b = runs[True], runs[False]
    assert a.steps["kinetic"].to_numpy() == pytest.approx(b.steps["kinetic"].to_numpy(), rel=RTOL)
    for col in ("charge", "decay", "rule", "ksb", "nld_charge", "nld_ksb", "angular_update"):
        x, y = a.charges[col].to_numpy(), b.charges[col].to_numpy()
        scale = abs(a.charges["decay"]).to_numpy() + abs(a.charges["ksb"]).to_numpy()
        mask = ~(abs(x) <= 1e-6 * scale)  # the rule term of plain SGD is rounding only
        if col == "angular_update":
            mask = ~pd.isna(x)
        assert x[mask] == pytest.approx(y[mask], rel=1e-9), col


def test_per_tensor_statistics_and_adaptive_rates(run_dir):
    """run.tensors: |q|^2 before the step, and lr * inv_metric = the mean per-coordinate rate
    eta / (sqrt(v) + eps) of RMSprop after the step, per parameter tensor."""
    model = bn_mlp()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    x, y = batch()
    with nd.watch(model, opt, run_dir) as mon:
        for _ in range(3):
            before = {n: float((p.detach() ** 2).sum()) for n, p in model.named_parameters()}
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.log_loss(loss)
            opt.step()
    tensors = nd.load_run(run_dir).tensors
    last = tensors[tensors["step"] == 2].set_index("param")
    assert len(tensors) == 3 * len(list(model.parameters()))
    for name, p in model.named_parameters():
        rate = float((1e-3 / (opt.state[p]["square_avg"].sqrt() + 1e-8)).mean())
        assert 1e-3 * last.loc[name, "inv_metric"] == pytest.approx(rate, rel=RTOL)
        assert last.loc[name, "sq_norm"] == pytest.approx(before[name], rel=RTOL)


def test_sgd_inverse_metric_is_one(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with nd.watch(model, opt, run_dir) as mon:
        x, y = batch()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        mon.log_loss(loss)
        opt.step()
    tensors = nd.load_run(run_dir).tensors
    assert (tensors["inv_metric"] == 1.0).all()
    np.testing.assert_allclose(tensors["update_sq"], tensors["metric_update_sq"], rtol=RTOL)
