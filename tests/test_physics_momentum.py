"""Exact momentum theory (noether_dyn.quantities.momentum) against real torch.optim steps in
float64 on a BatchNorm MLP with a scale (fc1, BatchNorm eps = 0), a rescale (fc2's units against
the head) and a translation (softmax head) symmetry.

Identities and tolerances:

* MomentumPredictor rolls Q forward with the measured |dq|^2 (and <dq, b>_S for Nesterov). The
  recurrence is an identity of torch's update given <q, g>_S = 0, which holds here to rounding
  (eps = 1e-30 makes BatchNorm scale invariant to far below rounding; ReLU and softmax are
  exact). Both Q's are sums of O(100) float64 products of size ~|Q|, rounded each step: after
  N = 60 steps the accumulated error is ~ N * 100 * u * |Q| ~ 1e-12 |Q|; we require 1e-11
  relative to max_k |Q_k| over the run (translation charges start near 0, so they are compared
  to the largest value they reach).
* DecayShare: dq = E (decay part) + the gradient part, rebuilt here independently from the
  recorded gradients; elementwise the difference is the rounding of q_{n+1} (u |q| ~ 1e-16 |q|),
  required below 1e-13 max|q|. The charge closes: Q_{n+1} - Q_n = decay + rule + ksb to 1e-12
  |Q_n| (Q rounding).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis._common import make_model  # noqa: E402
from analysis._physics import Step, charge, run, signed_dot, signed_sum  # noqa: E402
from noether_dyn.quantities.momentum import (  # noqa: E402
    DecayShare,
    MomentumPredictor,
    TranslationDecayShare,
    share_stats,
    two_step_prediction,
)

STEPS = 60


def _model():
    model = make_model(6, 8, 4, bn2=False, seed=3, dtype=torch.float64)
    model.bn1.eps = 1e-30  # torch requires eps > 0; 1e-30 is far below rounding
    return model, model.symmetries()


def _predict(opt_kwargs: dict, schedule=None, nesterov: bool = False):
    model, syms = _model()
    opt = torch.optim.SGD(model.parameters(), **opt_kwargs)
    trans = torch.tensor([s.kind == "translation" for s in syms])
    pred = MomentumPredictor(trans, torch.full_like(trans, nesterov))
    named = dict(model.named_parameters())
    q0 = {k: p.detach().clone() for k, p in named.items()}
    pred.start(torch.tensor([charge(s, q0) for s in syms], dtype=torch.float64))
    rows: list[tuple[list[float], list[float], list[float]]] = []
    lam = opt_kwargs.get("weight_decay", 0.0)

    def on_step(st: Step) -> None:
        dq = {k: st.dq(k) for k in st.q}
        buf = {k: st.optimizer.state[p]["momentum_buffer"] for k, p in named.items()}
        g = st.optimizer.param_groups[0]
        n_sym = len(syms)
        predicted = pred.advance(
            eta=torch.full((n_sym,), float(g["lr"]), dtype=torch.float64),
            beta=torch.full((n_sym,), g["momentum"], dtype=torch.float64),
            lam=torch.full((n_sym,), lam, dtype=torch.float64),
            update_sq=torch.tensor([signed_dot(s, dq, dq) for s in syms], dtype=torch.float64),
            dampening=torch.full((n_sym,), g["dampening"], dtype=torch.float64),
            buffer_cross=torch.tensor([signed_dot(s, dq, buf) for s in syms], dtype=torch.float64),
        )
        measured = [charge(s, st.q1) for s in syms]
        rows.append((predicted.tolist(), measured, [signed_dot(s, dq, dq) for s in syms]))

    run(model, opt, steps=STEPS, schedule=schedule, on_step=on_step)
    return syms, rows, [charge(s, q0) for s in syms]


def _check(syms, rows, q0) -> None:
    for i, s in enumerate(syms):
        scale = max(abs(q0[i]), *(abs(r[1][i]) for r in rows))
        err = max(abs(r[0][i] - r[1][i]) for r in rows)
        assert err <= 1e-11 * scale, (s.name, err, scale)
        drift = max(abs(r[1][i] - q0[i]) for r in rows)
        assert drift > 1e-4 * scale, (s.name, drift)  # the charge did move: the test has teeth


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.05, momentum=0.9, weight_decay=5e-3),
        dict(lr=0.05, momentum=0.8, weight_decay=1e-2, dampening=0.3),
    ],
)
def test_momentum_predictor_exact(kwargs) -> None:
    _check(*_predict(kwargs))


def test_momentum_predictor_changing_rate() -> None:
    schedule = lambda n: 0.05 * (1.0 + 0.5 * math.sin(0.7 * n))  # noqa: E731
    _check(*_predict(dict(lr=0.05, momentum=0.9, weight_decay=5e-3, dampening=0.1), schedule))


def test_momentum_predictor_nesterov() -> None:
    _check(*_predict(dict(lr=0.03, momentum=0.9, weight_decay=5e-3, nesterov=True), None, True))


def test_predictor_without_start_raises() -> None:
    pred = MomentumPredictor(torch.tensor([False]))
    with pytest.raises(RuntimeError, match="start"):
        pred.advance(*(torch.ones(1),) * 4)
    nest = MomentumPredictor(torch.tensor([False]), torch.tensor([True]))
    nest.start(torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="buffer_cross"):
        nest.advance(*(torch.ones(1, dtype=torch.float64),) * 4)


def test_two_step_form_equals_state_form() -> None:
    """docs/theory.md §3.2b's recurrence, Q_{n+1} = (1+rho-2c)Q_n - rho Q_{n-1} + D_n + rho D_{n-1},
    is the predictor's state form with R eliminated: same numbers on arbitrary inputs (rounding
    of a 40-step linear recurrence with |coefficients| < 2: 1e-12 relative)."""
    gen = torch.Generator().manual_seed(0)
    d = (torch.rand(40, generator=gen, dtype=torch.float64) * 0.1).tolist()
    eta = (0.05 * (1 + torch.rand(40, generator=gen, dtype=torch.float64))).tolist()
    for trans in (False, True):
        pred = MomentumPredictor(torch.tensor([trans]))
        pred.start(torch.tensor([3.0], dtype=torch.float64))
        state = [3.0]
        for n in range(40):
            one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
            state.append(float(pred.advance(one(eta[n]), one(0.9), one(0.01), one(d[n]))[0]))
        ref = two_step_prediction([3.0], d, eta, 0.9, 0.01, translation=trans)
        assert max(abs(a - b) for a, b in zip(state, ref)) <= 1e-12 * max(map(abs, ref))


def _shares(opt_factory, family: str, nesterov: bool = False):
    """Run a real optimizer; per step: elementwise reconstruction error of dq from (decay part,
    independently rebuilt gradient part), and per symmetry (change, decay, rule, ksb)."""
    model, syms = _model()
    opt = opt_factory(model.parameters())
    group = opt.param_groups[0]
    names = [k for k, _ in model.named_parameters()]
    share = DecayShare(family, nesterov=nesterov)
    grad_acc: dict[str, torch.Tensor] = {}
    out = {"elem": 0.0, "qmax": 0.0, "rows": []}
    trans_share = TranslationDecayShare()

    def on_step(st: Step) -> None:
        q = [st.q[k] for k in names]
        state = [st.optimizer.state[p] for p in st.optimizer.param_groups[0]["params"]]
        lr, lam = group["lr"], group["weight_decay"]
        metric = None
        mom, damp, k = 0.0, 0.0, st.n + 1
        if family == "sgd":
            mom, damp = group["momentum"], group["dampening"]
        elif family == "adam":
            b1, b2 = group["betas"]
            mom = b1
            metric = [(s["exp_avg_sq"] / (1 - b2**k)).sqrt() + group["eps"] for s in state]
        elif family == "rmsprop":
            mom = group["momentum"]
            metric = [s["square_avg"].sqrt() + group["eps"] for s in state]
        e = share.step(q, lr, lam, momentum=mom, dampening=damp, metric=metric, step=k)
        # the gradient's part of dq, rebuilt from the recorded gradients alone
        rule = {}
        for i, name in enumerate(names):
            g = st.g[name]
            if family == "sgd":
                acc = grad_acc.get(name)
                grad_acc[name] = g.clone() if acc is None else mom * acc + (1 - damp) * g
                step = g + mom * grad_acc[name] if nesterov else grad_acc[name]
                rule[name] = -lr * step
            elif family == "adam":
                acc = grad_acc.get(name, torch.zeros_like(g))
                grad_acc[name] = mom * acc + (1 - mom) * g
                rule[name] = -lr / (1 - mom**k) * grad_acc[name] / metric[i]
            else:
                inc = g / metric[i]
                acc = grad_acc.get(name)
                grad_acc[name] = inc if acc is None or not mom else mom * acc + inc
                rule[name] = -lr * grad_acc[name]
        dq = {k_: st.dq(k_) for k_ in names}
        for i, name in enumerate(names):
            err = (dq[name] - e[i] - rule[name]).abs().max().item()
            out["elem"] = max(out["elem"], err)
            out["qmax"] = max(out["qmax"], st.q[name].abs().max().item())
        stats = share_stats(q, e, torch.device("cpu"))
        ed = dict(zip(names, e))
        row = []
        for s in syms:
            idx = [names.index(p) for p in s.params]
            signs = torch.tensor(s.signs, dtype=torch.float64)
            if s.kind == "translation":
                decay = float(signs @ stats[idx, 1])
                rule_s = signed_sum(s, rule)
                ksb = 0.0
                assert abs(decay - signed_sum(s, ed)) <= 1e-15 + 1e-12 * abs(decay)
            else:
                decay = 2.0 * float(signs @ stats[idx, 0])
                rule_s = 2.0 * signed_dot(s, st.q, rule)
                ksb = signed_dot(s, dq, dq)
            row.append((charge(s, st.q1) - charge(s, st.q), decay, rule_s, ksb, charge(s, st.q)))
        if family == "sgd":
            t = [i for i, s in enumerate(syms) if s.kind == "translation"]
            x = torch.tensor([charge(syms[i], st.q) for i in t], dtype=torch.float64)
            one = lambda v: torch.full_like(x, v)  # noqa: E731
            nest = torch.full_like(x, nesterov, dtype=torch.bool)
            scalar = trans_share.step(x, one(lr), one(mom), one(lam), one(damp), nest)
            for j, i in enumerate(t):
                row[i] = (*row[i], float(scalar[j]))
        out["rows"].append(row)

    run(model, opt, steps=STEPS, on_step=on_step)
    return syms, out


def _closure(syms, out) -> None:
    assert out["elem"] <= 1e-13 * out["qmax"], out["elem"]
    for row in out["rows"]:
        for s, (change, decay, rule, ksb, q, *_) in zip(syms, row):
            scale = max(abs(q), 1e-3)
            assert abs(change - (decay + rule + ksb)) <= 1e-12 * scale, s.name


@pytest.mark.parametrize(
    "kwargs,nesterov",
    [
        (dict(lr=0.05, momentum=0.9, weight_decay=5e-3), False),
        (dict(lr=0.05, momentum=0.8, weight_decay=1e-2, dampening=0.4), False),
        (dict(lr=0.03, momentum=0.9, weight_decay=5e-3, nesterov=True), True),
    ],
)
def test_sgd_momentum_decay_share(kwargs, nesterov) -> None:
    syms, out = _shares(lambda p: torch.optim.SGD(p, **kwargs), "sgd", nesterov)
    _closure(syms, out)
    t = next(i for i, s in enumerate(syms) if s.kind == "translation")
    total_change = sum(abs(r[t][0]) for r in out["rows"])
    for r in out["rows"]:
        change, decay, rule, _, _, scalar = r[t]
        # translation: the gradient part sums to zero exactly, so decay is the whole change
        assert abs(rule) <= 1e-13 * total_change
        assert abs(change - decay) <= 1e-12 * total_change
        # and the scalar recurrence on the measured charges gives the same share, no memory
        assert abs(scalar - decay) <= 1e-12 * total_change
    # the naive instantaneous share -2 eta lambda Q_n misses the buffer's memory: the true one
    # weighs sum_k beta^(n-k) (1 - d) <q_n, q_k> ~ (1 - d) / (1 - beta) Q_n once n >> 1/(1-beta);
    # over 60 steps (start-up included) at least half of that factor is reached
    sc = next(i for i, s in enumerate(syms) if s.kind == "scale")
    lr, lam = kwargs["lr"], kwargs["weight_decay"]
    d, beta = kwargs.get("dampening", 0.0), kwargs["momentum"]
    true = sum(r[sc][1] for r in out["rows"])
    naive = sum(-2 * lr * lam * r[sc][4] for r in out["rows"])
    assert true / naive > 0.5 * (1 - d) / (1 - beta)


def test_adam_coupled_decay_share() -> None:
    syms, out = _shares(
        lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2), "adam"
    )
    _closure(syms, out)
    sc = next(i for i, s in enumerate(syms) if s.kind == "scale")
    # through the preconditioner the share is far larger than -2 eta lambda Q
    true = sum(r[sc][1] for r in out["rows"])
    naive = sum(-2 * 1e-2 * 1e-2 * r[sc][4] for r in out["rows"])
    assert true / naive > 10.0


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rmsprop_coupled_decay_share(momentum: float) -> None:
    syms, out = _shares(
        lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=momentum, weight_decay=1e-2), "rmsprop"
    )
    _closure(syms, out)


def test_decoupled_and_errors() -> None:
    q = [torch.ones(3, dtype=torch.float64)]
    (e,) = DecayShare("adamw").step(q, lr=0.1, weight_decay=0.5)
    assert torch.equal(e, torch.full((3,), -0.05, dtype=torch.float64))
    with pytest.raises(ValueError, match="metric"):
        DecayShare("adam").step(q, lr=0.1, weight_decay=0.5, momentum=0.9)
    with pytest.raises(ValueError, match="family"):
        DecayShare("lion")


def test_decay_share_benchmark_wiring() -> None:
    """benchmarks/decay_share.py runs and reports the accumulator's memory: exactly one copy of
    the parameters under a rule with a buffer, none without (every tensor of its BatchNorm MLP
    is in a quadratic symmetry; its timings are the script's business, not this test's)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "decay_share.py"
    spec = importlib.util.spec_from_file_location("decay_share_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--steps", "2"])
    assert [r["rule"] for r in rows] == ["sgd", "sgd-nesterov", "adam", "rmsprop", "adagrad"]
    acc = [r["acc/params"] for r in rows]
    assert acc[2:] == [1.0, 0.0, 0.0]  # Adam: every tensor; no buffer: nothing
    # SGD: all but the head's bias, whose only symmetry (translation) needs no memory under SGD
    assert all(1.0 - 1e-4 < a < 1.0 for a in acc[:2]), acc
    assert all(r["step_ms"] > 0 and r["exact_ms"] > 0 for r in rows)
