"""Charges and the exact decomposition of their change (docs/theory.md §3, §3.1, §3.2).

The model is Linear -> BatchNorm(eps=1e-30, below the rounding of the variance) -> ReLU -> Linear,
in float64, where the three symmetries are exact: scale of (0.weight, 0.bias) (BatchNorm in train
mode, eps negligible), rescale of the BN affine (1.weight, 1.bias) against the head's weight
(3.weight) through ReLU, and translation of the head (3.weight, 3.bias) under softmax cross-entropy.

Tolerances. float64: every identity below is algebraic; the only error is rounding in sums of a
few hundred terms (relative ~1e-15), so 1e-10 relative leaves five orders of margin. float32:
each charge is a float32 reduction of N <= 300 terms with relative error <= ~log2(N) eps32
(pairwise summation), so the decomposition holds to 64 eps32 (|Q_n| + |Q_{n+1}|) absolute.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import noether_dyn as nd
from noether_dyn.symmetries import kinds
from tests.conftest import batch

SYMS = [
    nd.Symmetry("scale:0", "scale", ("0.weight", "0.bias")),
    nd.Symmetry("rescale:1", "rescale", ("1.weight", "1.bias", "3.weight"), (1, 1, -1)),
    nd.Symmetry("translation:3", "translation", ("3.weight", "3.bias")),
]


def exact_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16, eps=1e-30), nn.ReLU(), nn.Linear(16, 4)
    )
    with torch.no_grad():  # a non-trivial affine, so the rescale charge moves
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.3, 0.3)
    return model.to(dtype)


OPTIMIZERS = {
    "sgd-wd": lambda ps: torch.optim.SGD(ps, lr=0.2, weight_decay=5e-3),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
}


def run_with(make, run_dir, steps=12, dtype=torch.float64, every=1, seed=0):
    model = exact_model(seed, dtype)
    opt = make(model.parameters())
    x, y = batch(dtype=dtype, n=64)
    snaps = []
    with nd.watch(model, opt, run_dir, symmetries=SYMS, every=every) as mon:
        for _ in range(steps):
            snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.log_loss(loss)
            opt.step()
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return nd.load_run(run_dir), snaps, opt


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_decomposition_is_exact_float64(name, run_dir):
    run, snaps, _ = run_with(OPTIMIZERS[name], run_dir)
    for sym in SYMS:
        c = run.charge(sym.name)
        # measured charge equals <q, xi(q)> of the parameters before each update
        direct = [float(sym.charge(s)) for s in snaps[:-1]]
        np.testing.assert_allclose(c["charge"], direct, rtol=1e-12)
        change = np.diff([float(sym.charge(s)) for s in snaps])
        parts = (c["decay"] + c["rule"] + c["ksb"]).to_numpy()
        assert np.all(np.abs(change) > 1e-6 * np.abs(c["charge"]))  # the identity is not 0 = 0
        np.testing.assert_allclose(parts, change, rtol=1e-10, err_msg=f"{name} {sym.name}")
        if sym.kind == "translation":
            assert (c["ksb"] == 0).all()


def test_decomposition_float32(run_dir):
    run, snaps, _ = run_with(OPTIMIZERS["sgd-momentum"], run_dir, dtype=torch.float32)
    eps32 = float(torch.finfo(torch.float32).eps)
    for sym in SYMS:
        c = run.charge(sym.name)
        q = np.array([float(sym.charge({k: v.double() for k, v in s.items()})) for s in snaps])
        parts = (c["decay"] + c["rule"] + c["ksb"]).to_numpy()
        unsigned = (
            np.array([sum(float((s[n].double() ** 2).sum()) for n in sym.params) for s in snaps])
            if sym.kind != "translation"
            else np.array(
                [sum(float(s[n].double().abs().sum()) for n in sym.params) for s in snaps]
            )
        )
        tol = 64 * eps32 * (unsigned[:-1] + unsigned[1:])
        assert np.all(np.abs(parts - np.diff(q)) <= tol), sym.name


def test_sgd_rule_term_vanishes_by_symmetry(run_dir):
    """Plain SGD: 2<q, dq>_xi = -2 eta lambda Q exactly, so the rule term is rounding only."""
    run, _, _ = run_with(OPTIMIZERS["sgd-wd"], run_dir)
    for sym in SYMS:
        c = run.charge(sym.name)
        scale = np.abs(c["decay"]).to_numpy() + np.abs(c["ksb"]).to_numpy()
        assert np.all(np.abs(c["rule"]) <= 1e-9 * scale + 1e-15), sym.name
        assert (c["defect"] < 1e-10).all(), sym.name


@pytest.mark.parametrize("name", ["sgd-momentum", "adam", "rmsprop"])
def test_rule_term_breaks_for_momentum_and_metrics(name, run_dir):
    """The rule term moves the quadratic charges under momentum and metrics. Translation under
    SGD with momentum is the exception: its whole change is weight decay's share through the
    buffer (the ``decay`` column since issue 13), so its rule is rounding only."""
    run, _, _ = run_with(OPTIMIZERS[name], run_dir)
    for sym in SYMS:
        c = run.charge(sym.name).iloc[2:]
        if name == "sgd-momentum" and sym.kind == "translation":
            assert (np.abs(c["rule"]) <= 1e-12 * np.abs(c["charge"]).max()).all()
            continue
        assert (np.abs(c["rule"]) > 1e-6 * np.abs(c["charge"])).any(), sym.name


def test_translation_conserved_by_sgd_broken_by_adam(tmp_path):
    sgd, _, _ = run_with(lambda ps: torch.optim.SGD(ps, lr=0.2), tmp_path / "sgd")
    adam, _, _ = run_with(lambda ps: torch.optim.Adam(ps, lr=1e-2), tmp_path / "adam")
    q_sgd = sgd.charge("translation:3")["charge"].to_numpy()
    q_adam = adam.charge("translation:3")["charge"].to_numpy()
    assert np.ptp(q_sgd) <= 1e-12 * max(1.0, np.abs(q_sgd).max())
    assert np.ptp(q_adam) > 1e-3
    # no decay and no kinetic term for translation: Adam's metric (the rule) is all the change
    rule = adam.charge("translation:3")["rule"].to_numpy()
    np.testing.assert_allclose(rule[:-1], np.diff(q_adam), rtol=1e-9)


def test_sgd_prediction_is_exact(run_dir):
    """docs/theory.md §3.2: Q_{n+1} = (1 - eta lambda)^2 Q_n + eta^2 |g_A|^2 (translation: (1 - eta
    lambda) Q_n), rolled from Q_0 with the measured gradients; exact symmetries, so the residual
    is rounding."""
    run, _, _ = run_with(OPTIMIZERS["sgd-wd"], run_dir, steps=30)
    assert run.meta["optimizer"]["prediction"] == "sgd"
    for sym in SYMS:
        c = run.charge(sym.name)
        np.testing.assert_allclose(c["predicted"], c["charge"], rtol=1e-10, err_msg=sym.name)
        assert np.ptp(c["charge"]) > 1e-4 * np.abs(c["charge"]).max()  # the charge did move


@pytest.mark.parametrize("name", ["sgd-wd", "sgd-momentum"])
def test_prediction_sees_every_step_when_logging_every_k(name, tmp_path):
    full, _, _ = run_with(OPTIMIZERS[name], tmp_path / "a", steps=13)
    sparse, _, _ = run_with(OPTIMIZERS[name], tmp_path / "b", steps=13, every=4)
    a = full.charges.set_index(["step", "symmetry"])
    b = sparse.charges.set_index(["step", "symmetry"])
    assert sorted({s for s, _ in b.index}) == [0, 4, 8, 12]
    np.testing.assert_allclose(
        b["predicted"].to_numpy(), a.loc[b.index, "predicted"].to_numpy(), rtol=1e-12
    )


def test_effective_lr_angular_update_and_nld_charge(run_dir):
    run, snaps, opt = run_with(OPTIMIZERS["sgd-momentum"], run_dir, steps=5)
    c = run.charge("scale:0")
    params = ("0.weight", "0.bias")
    for n in range(5):
        q0 = torch.cat([snaps[n][k].flatten() for k in params])
        q1 = torch.cat([snaps[n + 1][k].flatten() for k in params])
        eff = 0.1 / ((1 - 0.9) * float(q0 @ q0))
        assert c["effective_lr"].iloc[n] == pytest.approx(eff, rel=1e-12)
        cos = float(q0 @ q1 / (q0.norm() * q1.norm()))
        angle = math.acos(min(1.0, cos))
        assert c["angular_update"].iloc[n] == pytest.approx(angle, rel=1e-6)
        # C = m <G q', xi> with G = I, q' = dq / eta, xi = q: (1 + beta)/2 <dq, q>
        assert c["nld_charge"].iloc[n] == pytest.approx(
            (1.9 / 2) * float((q1 - q0) @ q0), rel=1e-10
        )
        # d_s T = m |q'|^2 = (1 + beta) / (2 eta) |dq|^2
        assert c["nld_ksb"].iloc[n] == pytest.approx(
            1.9 / 0.2 * float((q1 - q0) @ (q1 - q0)), rel=1e-10
        )
    assert np.isnan(run.charge("rescale:1")["effective_lr"]).all()


def test_declared_non_symmetry_shows_its_defect(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    fake = nd.Symmetry("rescale:tanh", "rescale", ("0.weight", "0.bias", "2.weight"), (1, 1, -1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch(n=64)
    with nd.watch(model, opt, run_dir, symmetries=[fake]) as mon:
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.log_loss(loss)
            opt.step()
    c = nd.load_run(run_dir).charge("rescale:tanh")
    assert (c["defect"] > 1e-3).all()
    assert (np.abs(c["rule"]) > 1e-6).all()  # the broken symmetry moves the charge at first order


def test_unknown_symmetry_parameter_is_refused(run_dir):
    model = exact_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bad = nd.Symmetry("scale:x", "scale", ("0.weight", "nope.weight"))
    with pytest.raises(ValueError, match="names \\['nope.weight'\\], not parameters of the model"):
        nd.watch(model, opt, run_dir, symmetries=[bad])


def test_symmetry_record_validates():
    with pytest.raises(ValueError, match="kind must be one of"):
        nd.Symmetry("a", "rotation", ("w",))
    with pytest.raises(ValueError, match="one sign per parameter"):
        nd.Symmetry("a", "rescale", ("w", "v"), (1,))
    s = nd.Symmetry("a", "rescale", ("w", "v"), (1, -1))
    q = {"w": torch.ones(2), "v": torch.full((3,), 2.0)}
    assert torch.equal(s.generator(q)["v"], torch.full((3,), -2.0))
    assert float(s.charge(q)) == pytest.approx(2 - 12)


def test_watch_detects_and_verifies_from_a_batch(run_dir):
    model = exact_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch(n=64)
    mon = nd.watch(model, opt, run_dir, inputs=x, targets=y, loss_fn=nn.CrossEntropyLoss())
    # translation:0 is 0.bias alone: BatchNorm subtracts each channel's batch mean
    names = {"scale:0", "rescale:1", "translation:0", "translation:3"}
    assert {s.name for s in mon.symmetries} == names
    assert all(s.verified for s in mon.symmetries)
    mon.close()
    table = nd.load_run(run_dir).symmetries
    assert table["verified"].tolist() == [True] * 4
    assert (table["defect"] < 1e-8).all()


def test_model_without_symmetry_gives_a_run_that_says_so(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 6, dtype=torch.float64)
    t = torch.randn(16, 1, dtype=torch.float64)
    with nd.watch(model, opt, run_dir, inputs=x, targets=t, loss_fn=nn.MSELoss()) as mon:
        assert mon.symmetries == []
        loss = nn.functional.mse_loss(model(x), t)
        loss.backward()
        opt.step()
    run = nd.load_run(run_dir)
    assert run.symmetries.empty and run.charges.empty
    assert "no symmetry" in run.meta["symmetry_note"]
    assert len(run.steps) == 1


def test_declared_symmetry_failing_verification_is_kept_with_its_defect(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    fake = nd.Symmetry("rescale:tanh", "rescale", ("0.weight", "0.bias", "2.weight"), (1, 1, -1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch(n=64)
    mon = nd.watch(
        model, opt, run_dir, symmetries=[fake], inputs=x, targets=y, loss_fn=nn.CrossEntropyLoss()
    )
    mon.close()
    row = nd.load_run(run_dir).symmetries.iloc[0]
    assert row["symmetry"] == "rescale:tanh"
    assert row["verified"] in (False,)  # checked and failed, not None (unchecked)
    assert row["defect"] > 1e-3


@settings(max_examples=12, deadline=None)
@given(
    lr=st.floats(1e-3, 0.3),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    weight_decay=st.sampled_from([0.0, 1e-3, 1e-2]),
    nesterov=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_decomposition_holds_for_any_sgd_hyperparameters(
    lr, momentum, weight_decay, nesterov, seed, tmp_path_factory
):
    """docs/theory.md §3.1 is an identity of the update, whatever the hyperparameters (float64)."""
    nesterov = nesterov and momentum > 0
    run, snaps, _ = run_with(
        lambda ps: torch.optim.SGD(
            ps, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
        ),
        tmp_path_factory.mktemp("h") / "run",
        steps=4,
        seed=seed,
    )
    for sym in SYMS:
        c = run.charge(sym.name)
        q = np.array([float(sym.charge(s)) for s in snaps])
        parts = (c["decay"] + c["rule"] + c["ksb"]).to_numpy()
        scale = np.abs(q[:-1]) + np.abs(q[1:])
        assert np.all(np.abs(parts - np.diff(q)) <= 1e-12 * scale), sym.name


def test_closure_and_plain_steps_give_the_same_charges(tmp_path):
    """<g, q_n> is read before the step, or (with a closure, whose gradients exist only inside
    the step) rebuilt after it as <g, q_{n+1}> - <g, dq>: both give the same rows."""
    runs = {}
    for closure in (False, True):
        model = exact_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = batch(n=64)
        with nd.watch(model, opt, tmp_path / str(closure), symmetries=SYMS) as mon:
            for _ in range(4):

                def step_loss(model=model, opt=opt, x=x, y=y):
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                if closure:
                    opt.step(step_loss)
                else:
                    mon.log_loss(step_loss())
                    opt.step()
        runs[closure] = nd.load_run(tmp_path / str(closure)).charges
    cols = ["charge", "decay", "rule", "ksb", "nld_charge", "grad_sq"]
    np.testing.assert_allclose(runs[True][cols], runs[False][cols], rtol=1e-10, atol=1e-15)
    # the defect is a ratio of a rounding-level numerator: compare it absolutely
    np.testing.assert_allclose(runs[True]["defect"], runs[False]["defect"], atol=1e-12)


class _Shift(kinds.Kind):
    """A test-local kind: xi = 2 s_A 1 on each tensor, Q = 2 <q, 1>_s. Linear in q, so it decays
    at first order and has no kinetic breaking: written here from the Kind interface alone."""

    name = "test-shift"
    linear = True
    stats = frozenset({"QS", "GS", "DS", "GDS"})

    def generator(self, q, sign):
        return torch.full_like(q, 2.0 * sign)

    def charge(self, signs, x):
        return 2.0 * (signs @ x["QS"])

    def columns(self, signs, x, eta, lam, half_m, lead):
        decay = -2.0 * (signs @ (eta * lam * x["QS"]))
        zero = torch.zeros(signs.shape[0], dtype=signs.dtype, device=signs.device)
        return {
            "charge": 2.0 * (signs @ x["QS"]),
            "decay": decay,
            "rule": 2.0 * (signs @ x["DS"]) - decay,
            "ksb": zero,
            "nld_charge": 2.0 * (signs @ (half_m * x["GDS"])),
            "nld_ksb": zero,
            "g_xi": 2.0 * (signs @ x["GS"]),
            "xi_sq": 4.0 * (signs.abs() @ x["NUMEL"]),
        }


@pytest.fixture
def shift_kind():
    kind = kinds.register(_Shift())
    yield kind
    kinds.unregister(kind.name)


@pytest.mark.parametrize("name", ["sgd-wd", "adamw"])
def test_a_registered_kind_runs_with_no_special_case(tmp_path, shift_kind, name):
    """A kind registered from outside the package is monitored like a built-in one: its charge
    is twice the translation charge of the same tensors, its change splits into decay + rule
    exactly (float64: 1e-10 relative, as above), and the prediction runs (flow regime: the
    first-order decay factor of a linear charge)."""
    shift = nd.Symmetry("test-shift:3", "test-shift", ("3.weight", "3.bias"))
    assert shift.charge({"3.weight": torch.ones(2, 2), "3.bias": torch.ones(2)}) == 12.0
    model = exact_model()
    opt = OPTIMIZERS[name](model.parameters())
    x, y = batch(dtype=torch.float64, n=64)
    with nd.watch(model, opt, tmp_path / "run", symmetries=[*SYMS, shift]) as mon:
        for _ in range(6):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            mon.log_loss(loss)
            opt.step()
    charges = nd.load_run(tmp_path / "run").charges
    mine = charges[charges["symmetry"] == "test-shift:3"].sort_values("step")
    trans = charges[charges["symmetry"] == "translation:3"].sort_values("step")
    q = mine["charge"].to_numpy()
    assert q == pytest.approx(2.0 * trans["charge"].to_numpy(), rel=1e-12, abs=1e-12)
    change = np.diff(q)
    split = (mine["decay"] + mine["rule"] + mine["ksb"]).to_numpy()[:-1]
    assert change == pytest.approx(split, rel=1e-10, abs=1e-10 * np.abs(q).max())
    assert (mine["ksb"] == 0).all() and np.isfinite(mine["predicted"]).all()
    assert mine["predicted"].iloc[0] == q[0]
