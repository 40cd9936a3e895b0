"""Weight decay's true share of a charge's change under every rule with coupled L2 (issue 13,
item 1; docs/theory.md §3.1; ``watch(..., exact_decay=True)``).

Identity checked: the stored ``decay`` column equals ``2 <q_n, E_n>_S`` (scale, rescale) or
``<E_n, 1>_S`` (translation), where E_n is the part of torch's update dq_n that the ``lambda q``
terms of the force put there, through the rule's buffer at the step's own preconditioner P_n.
E_n comes from an independent float64 rerun of each optimizer written here from torch's update
rules, with the buffer split in two (its gradient part and its decay part) and P_n from the full
force; the rerun's q_{n+1} is first checked against torch's parameters (1e-12 relative), so the
split is of the update torch really took. Then decay + rule + ksb = Q_{n+1} - Q_n still holds.

Tolerances: every quantity is a float64 dot or sum of <= a few hundred products, accumulated
over <= 30 steps of a linear recurrence with factors <= 1, so the rerun and the monitor agree to a
few hundred ulps of the column's scale: 1e-10 of max |column| leaves four orders of margin; the
rerun's parameters agree with torch's to ~1e-15 relative (different but equivalent operation
orders), 1e-12 leaves three. Model: ``tests.test_charges.exact_model`` (a 6-16-4 BatchNorm MLP,
BN eps 1e-30, float64), whose scale, rescale and translation symmetries hold to rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import noether_dyn as nd
from tests.conftest import batch
from tests.test_charges import SYMS, exact_model

STEPS = 30
TOL = 1e-10

CASES = {
    "sgd-heavy-ball": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-3)),
    "sgd-dampening": (
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, weight_decay=5e-3, dampening=0.3),
    ),
    "sgd-nesterov": (
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, weight_decay=5e-3, nesterov=True),
    ),
    "adam": (torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=5e-2)),
    "adam-amsgrad": (
        torch.optim.Adam,
        dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=5e-2, amsgrad=True),
    ),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=5e-2)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-2, alpha=0.9, weight_decay=5e-2)),
    "rmsprop-momentum-centered": (
        torch.optim.RMSprop,
        dict(lr=5e-3, alpha=0.9, weight_decay=5e-2, momentum=0.8, centered=True),
    ),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.05, weight_decay=5e-2)),
}


class Rerun:
    """One optimizer step of torch's rule in float64 per parameter, with the buffer's gradient
    part and decay part kept apart. ``step(q, g)`` returns (dq, E): the whole update and its
    decay part."""

    def __init__(self, cls: type, kw: dict) -> None:
        self.cls, self.kw, self.k = cls, kw, 0
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def step(self, name: str, q: torch.Tensor, g: torch.Tensor):
        kw, st = self.kw, self.state.setdefault(name, {})
        lam, lr = kw["weight_decay"], kw["lr"]
        u_g, u_l = g, lam * q  # the force's gradient and decay parts
        u = u_g + u_l
        if self.cls is torch.optim.SGD:
            beta, d = kw["momentum"], kw.get("dampening", 0.0)
            if "bg" not in st:  # torch's first buffer is the force itself, undamped
                st["bg"], st["bl"] = u_g.clone(), u_l.clone()
            else:
                st["bg"] = beta * st["bg"] + (1 - d) * u_g
                st["bl"] = beta * st["bl"] + (1 - d) * u_l
            if kw.get("nesterov"):
                return -lr * (u + beta * (st["bg"] + st["bl"])), -lr * (u_l + beta * st["bl"])
            return -lr * (st["bg"] + st["bl"]), -lr * st["bl"]
        if self.cls is torch.optim.AdamW:  # decoupled: q (1 - lr lambda), then Adam on g
            k = st["k"] = st.get("k", 0) + 1
            b1, b2 = kw["betas"]
            zero = torch.zeros_like(q)
            st["m"] = b1 * st.get("m", zero) + (1 - b1) * g
            st["v"] = b2 * st.get("v", zero) + (1 - b2) * g * g
            precond = st["v"].sqrt() / math.sqrt(1 - b2**k) + 1e-8
            return -lr * lam * q - lr / (1 - b1**k) * st["m"] / precond, -lr * lam * q
        if self.cls is torch.optim.Adam:
            b1, b2 = kw["betas"]
            k = st["k"] = st.get("k", 0) + 1
            zero = torch.zeros_like(q)
            st["mg"] = b1 * st.get("mg", zero) + (1 - b1) * u_g
            st["ml"] = b1 * st.get("ml", zero) + (1 - b1) * u_l
            st["v"] = b2 * st.get("v", zero) + (1 - b2) * u * u
            v = st["v"]
            if kw.get("amsgrad"):
                v = st["vmax"] = torch.maximum(st.get("vmax", zero), st["v"])
            precond = v.sqrt() / math.sqrt(1 - b2**k) + 1e-8
            c = -lr / (1 - b1**k)
            return c * (st["mg"] + st["ml"]) / precond, c * st["ml"] / precond
        if self.cls is torch.optim.RMSprop:
            alpha, mu = kw["alpha"], kw.get("momentum", 0.0)
            zero = torch.zeros_like(q)
            st["v"] = alpha * st.get("v", zero) + (1 - alpha) * u * u
            avg = st["v"]
            if kw.get("centered"):
                st["gbar"] = alpha * st.get("gbar", zero) + (1 - alpha) * u
                avg = avg - st["gbar"] ** 2
            precond = avg.sqrt() + 1e-8
            if not mu:
                return -lr * u / precond, -lr * u_l / precond
            st["bg"] = mu * st.get("bg", zero) + u_g / precond
            st["bl"] = mu * st.get("bl", zero) + u_l / precond
            return -lr * (st["bg"] + st["bl"]), -lr * st["bl"]
        st["sum"] = st.get("sum", torch.zeros_like(q)) + u * u  # Adagrad, lr_decay 0
        precond = st["sum"].sqrt() + 1e-10
        return -lr * u / precond, -lr * u_l / precond


def _run(case: str, run_dir, every: int):
    cls, kw = CASES[case]
    model = exact_model(0)
    opt = cls(model.parameters(), **kw)
    rerun = Rerun(cls, kw)
    x, y = batch(dtype=torch.float64, n=64)
    ref = []
    with nd.watch(model, opt, run_dir, symmetries=SYMS, every=every, exact_decay=True) as mon:
        for _ in range(STEPS):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            q = {k: p.detach().clone() for k, p in model.named_parameters()}
            opt.step()
            row = {}
            for name, p in model.named_parameters():
                dq, e = rerun.step(name, q[name], p.grad)
                scale = float(p.detach().abs().max())
                err = float((q[name] + dq - p.detach()).abs().max())
                assert err <= 1e-12 * scale, (case, name, err)  # the rerun is torch's step
                row[name] = (float((q[name] * e).sum()), float(e.sum()))
            ref.append(
                {
                    s.name: sum(
                        sg * (row[k][1] if s.kind == "translation" else 2 * row[k][0])
                        for k, sg in zip(s.params, s.signs)
                    )
                    for s in SYMS
                }
            )
        nbytes = mon._prediction.exact_decay.nbytes
    return nd.load_run(run_dir), ref, nbytes


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("every", [1, 3])
def test_decay_column_is_the_rerun_share(case, every, run_dir):
    run, ref, nbytes = _run(case, run_dir, every)
    assert run.meta["decay"]["by_symmetry"] == dict.fromkeys([s.name for s in SYMS], "exact")
    with_buffer = case.startswith(("sgd", "adam-")) or case == "adam" or "momentum" in case
    assert (nbytes > 0) == with_buffer, (case, nbytes)  # memory only where a buffer needs it
    for sym in SYMS:
        c = run.charge(sym.name)
        want = np.array([ref[int(s)][sym.name] for s in c.index])
        got = c["decay"].to_numpy()
        assert np.abs(got - want).max() <= TOL * np.abs(want).max(), (case, sym.name)
        if every == 1:
            total = (c["decay"] + c["rule"] + c["ksb"]).to_numpy()[:-1]
            change = np.diff(c["charge"].to_numpy())
            assert np.abs(total - change).max() <= TOL * np.abs(c["charge"]).max()


@pytest.mark.parametrize("case", ["sgd-nesterov", "adam", "rmsprop"])
def test_true_share_is_not_the_instantaneous_term(case, run_dir):
    """The instantaneous -2 eta lambda Q_n misses most of the share: through the buffer
    (momentum amplifies by ~1 / (1 - beta)) or through the preconditioner (1 / P_n >> 1 for
    small gradients)."""
    run, _, _ = _run(case, run_dir, 1)
    lr, lam = CASES[case][1]["lr"], CASES[case][1]["weight_decay"]
    c = run.charge(SYMS[0].name)  # scale
    naive = -2 * lr * lam * c["charge"].to_numpy()
    assert np.abs(c["decay"].to_numpy()[-1]) > 3 * np.abs(naive[-1]), case


def test_translation_share_is_the_whole_change_under_sgd_momentum(run_dir):
    """<g, 1>_S = 0: under SGD with momentum decay's share of translation is 100% of its
    change (the rule's part is rounding)."""
    run, _, _ = _run("sgd-nesterov", run_dir, 1)
    c = run.charge(SYMS[2].name)
    change = np.diff(c["charge"].to_numpy())
    np.testing.assert_allclose(c["decay"].to_numpy()[:-1], change, rtol=1e-9)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: torch.optim.ASGD(ps), "supports torch's SGD"),
        (lambda ps: torch.optim.Adagrad(ps, lr_decay=0.1), "not rebuilt"),
    ],
)
def test_exact_decay_refuses_what_it_cannot_split(make, match, run_dir):
    model = exact_model(0)
    with pytest.raises(ValueError, match=match):
        nd.watch(model, make(model.parameters()), run_dir, symmetries=SYMS, exact_decay=True)


def test_exact_decay_refuses_a_filled_buffer(run_dir):
    model = exact_model(0)
    opt = torch.optim.Adam(model.parameters(), weight_decay=1e-2)
    x, y = batch(dtype=torch.float64)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(ValueError, match="has not stepped yet"):
        nd.watch(model, opt, run_dir, symmetries=SYMS, exact_decay=True)


def test_adamw_default_decay_uses_torchs_own_rate(run_dir):
    """Without exact_decay, AdamW's decay column is still exact: -2 lr lambda Q_n with torch's
    own lr, although the stored rate carries Adam's bias correction lr / (1 - beta1^k)
    (``GroupHyper.decay_weight``). 1e-12 relative: one float64 product of a reduction."""
    cls, kw = CASES["adamw"]
    model = exact_model(0)
    opt = cls(model.parameters(), **kw)
    x, y = batch(dtype=torch.float64, n=64)
    with nd.watch(model, opt, run_dir, symmetries=SYMS) as mon:
        for _ in range(10):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.log_loss(loss)
            opt.step()
    run = nd.load_run(run_dir)
    b1 = kw["betas"][0]
    k = run.steps["step"].to_numpy() + 1
    np.testing.assert_allclose(run.steps["lr"], kw["lr"] / (1 - b1**k), rtol=1e-15)
    c = run.charge(SYMS[0].name)
    want = -2 * kw["lr"] * kw["weight_decay"] * c["charge"].to_numpy()
    np.testing.assert_allclose(c["decay"].to_numpy(), want, rtol=1e-12)
