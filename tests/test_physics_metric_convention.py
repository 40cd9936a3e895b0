"""One metric convention (noether_dyn.quantities.metric_convention): Adam with a frozen second
moment is SGD with dampening beta1, and the convention gives both the same metric, kinetic
energy and NLD charge.

Construction (both real torch optimizers, float64): Adam with ``amsgrad=True``, betas
(0.9, 0.0) and ``max_exp_avg_sq`` preset to (1 - eps)^2 everywhere (above every g^2 of the run,
checked), so its preconditioner sqrt(max v) / 1 + eps is 1 up to an ulp and frozen; beside it
torch SGD with momentum = dampening = 0.9, its buffer preset to 0 (so its first step is damped
like Adam's first moment), and ``lr_n = lr / (1 - 0.9^k)``. Then dq agrees elementwise to the
rounding of q (1e-13 max|q|), the convention's G agree to 1e-15, and T, C to 1e-12 relative
(float64 sums of ~100 terms). The old convention (G = sqrt(v_hat) + eps, no 1/(1 - beta1)) is off
by exactly 1 - beta1 = 0.1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis._common import make_model, mixture  # noqa: E402
from noether_dyn.quantities.metric_convention import (  # noqa: E402
    adam_rate,
    kinetic,
    metric,
    nld_charge,
)

LR, B1, EPS, STEPS = 1e-2, 0.9, 1e-8, 30


def test_frozen_adam_is_dampened_sgd() -> None:
    models = [make_model(6, 8, 4, bn2=False, seed=5, dtype=torch.float64) for _ in range(2)]
    pa, ps = list(models[0].parameters()), list(models[1].parameters())
    adam = torch.optim.Adam(pa, lr=LR, betas=(B1, 0.0), eps=EPS, amsgrad=True)
    sgd = torch.optim.SGD(ps, lr=LR, momentum=B1, dampening=B1)
    frozen = (1.0 - EPS) ** 2
    for p in pa:
        adam.state[p] = {
            "step": torch.tensor(0.0, dtype=torch.float64),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
            "max_exp_avg_sq": torch.full_like(p, frozen),
        }
    for p in ps:
        sgd.state[p] = {"momentum_buffer": torch.zeros_like(p)}
    x, y = mixture(128, 6, 4, seed=1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    rom = models[0].symmetries()[1]  # rescale:fc2, with signs
    names = [n for n, _ in models[0].named_parameters()]
    for n in range(STEPS):
        idx = torch.randint(0, 128, (32,), generator=gen)
        sgd.param_groups[0]["lr"] = LR / (1.0 - B1 ** (n + 1))
        before = [[p.detach().clone() for p in ps_] for ps_ in (pa, ps)]
        gmax = 0.0
        for model, opt in zip(models, (adam, sgd)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            gmax = max(gmax, max(float(p.grad.abs().max()) for p in model.parameters()))
            opt.step()
        assert gmax**2 < frozen  # the preset maximum really froze the second moment
        dqa = [p.detach() - q for p, q in zip(pa, before[0])]
        dqs = [p.detach() - q for p, q in zip(ps, before[1])]
        qmax = max(float(q.abs().max()) for q in before[0])
        assert max(float((a - b).abs().max()) for a, b in zip(dqa, dqs)) <= 1e-13 * qmax
        precond = [st["max_exp_avg_sq"].sqrt() + EPS for st in (adam.state[p] for p in pa)]
        ga = metric("adam", preconditioner=precond, beta1=B1)
        gs = metric("sgd", dampening=B1)
        assert all(torch.allclose(g, torch.full_like(g, gs), rtol=1e-15, atol=0) for g in ga)
        eta_a, eta_s = adam_rate(LR, B1, n + 1), sgd.param_groups[0]["lr"]
        assert eta_a == eta_s
        ta, ts = kinetic(eta_a, B1, ga, dqa), kinetic(eta_s, B1, gs, dqs)
        assert ta == pytest.approx(ts, rel=1e-12)
        idx_r = [names.index(nm) for nm in rom.params]
        xi = [before[0][i] * sgn for i, sgn in zip(idx_r, rom.signs)]  # rescale's generator
        ca = nld_charge(B1, [ga[i] for i in idx_r], [dqa[i] for i in idx_r], xi)
        cs = nld_charge(B1, gs, [dqs[i] for i in idx_r], xi)
        assert ca == pytest.approx(cs, rel=1e-12)
        old = kinetic(eta_a, B1, precond, dqa)  # G = sqrt(v_hat) + eps: the old adapter's
        assert old / ta == pytest.approx(1.0 - B1, rel=1e-12)


def test_sgd_first_step_and_errors() -> None:
    assert metric("sgd", dampening=0.5, first_step=True) == 1.0
    assert metric("sgd", dampening=0.5) == 2.0
    with pytest.raises(ValueError, match="preconditioner"):
        metric("adam", beta1=0.9)
    with pytest.raises(ValueError, match="dampening"):
        metric("sgd", dampening=1.0)
    with pytest.raises(ValueError, match="family"):
        metric("lion")


def test_frozen_adam_is_dampened_sgd_through_the_monitor(tmp_path) -> None:
    """The same construction as :func:`test_frozen_adam_is_dampened_sgd`, each run under its own
    ``nd.watch`` (every step logged): the stored rate of the Adam group is the convention's
    lr / (1 - beta1^k), equal to the SGD run's scheduled lr; and the stored kinetic energy (step
    and group rows), mass, and every symmetry's nld_charge and nld_ksb agree between the runs.
    Tolerance 1e-10 relative: the two runs' updates agree to the rounding of q (1e-13 of max|q|,
    checked above), and each stored value is a float64 sum of ~100 such products."""
    import noether_dyn as nd

    models = [make_model(6, 8, 4, bn2=False, seed=5, dtype=torch.float64) for _ in range(2)]
    pa, ps = list(models[0].parameters()), list(models[1].parameters())
    adam = torch.optim.Adam(pa, lr=LR, betas=(B1, 0.0), eps=EPS, amsgrad=True)
    sgd = torch.optim.SGD(ps, lr=LR, momentum=B1, dampening=B1)
    frozen = (1.0 - EPS) ** 2
    for p in pa:
        adam.state[p] = {
            "step": torch.tensor(0.0, dtype=torch.float64),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
            "max_exp_avg_sq": torch.full_like(p, frozen),
        }
    for p in ps:
        sgd.state[p] = {"momentum_buffer": torch.zeros_like(p)}
    x, y = mixture(128, 6, 4, seed=1, dtype=torch.float64)
    syms = models[0].symmetries()
    monitors = [
        nd.watch(m, o, tmp_path / name, symmetries=syms, every=1)
        for m, o, name in zip(models, (adam, sgd), ("adam", "sgd"))
    ]
    gen = torch.Generator().manual_seed(2)
    for n in range(STEPS):
        idx = torch.randint(0, 128, (32,), generator=gen)
        sgd.param_groups[0]["lr"] = LR / (1.0 - B1 ** (n + 1))
        for model, opt, mon in zip(models, (adam, sgd), monitors):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            mon.log_loss(loss)
            opt.step()
    for mon in monitors:
        mon.close()
    ra, rs = (nd.load_run(tmp_path / name) for name in ("adam", "sgd"))
    want_lr = [LR / (1.0 - B1 ** (k + 1)) for k in range(STEPS)]
    assert ra.steps["lr"].to_numpy() == pytest.approx(want_lr, rel=1e-15)
    assert ra.steps["lr"].to_numpy() == pytest.approx(rs.steps["lr"].to_numpy(), rel=1e-15)
    assert ra.steps["kinetic"].to_numpy() == pytest.approx(rs.steps["kinetic"], rel=1e-10)
    for col in ("kinetic", "mass"):
        assert ra.groups[col].to_numpy() == pytest.approx(rs.groups[col].to_numpy(), rel=1e-10)
    for sym in syms:
        ca, cs = ra.charge(sym.name), rs.charge(sym.name)
        for col in ("charge", "nld_charge", "nld_ksb"):
            scale = max(float(abs(cs[col]).max()), 1e-300)
            err = float(abs(ca[col].to_numpy() - cs[col].to_numpy()).max())
            # + 1e-15: translation's nld_charge is rounding in both runs (the update sums to 0
            # over the classes: ~1e-17 here, entries |dq| <= 1e-2)
            assert err <= 1e-10 * scale + 1e-15, (sym.name, col, err, scale)
