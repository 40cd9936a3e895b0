"""Exact momentum theory and weight decay's true share, on a float64 BatchNorm MLP.

Table ``shares`` (SGD, eta 0.05, beta 0.9, lambda 5e-3, 600 steps; Adam and RMSprop with coupled
L2): per symmetry, the sums over the run of the charge's change and of its split
(:mod:`noether_dyn.quantities.momentum`): ``decay_true`` (weight decay's share through the
buffer or the preconditioner), ``decay_naive`` (-2 eta lambda Q_n, resp. -eta lambda x_n: the
instantaneous term, the whole share only without momentum and preconditioner), ``rule`` and
``ksb``; ``closure`` = max per step |change - decay - rule - ksb| / |Q_n| (exact split);
``decay_fraction`` = decay_true / change (translation under SGD(M): 1, its whole change).

Table ``prediction`` (SGD with momentum): max over steps of |Q_pred - Q_meas| / max|Q| for the
exact discrete recurrence (:class:`~noether_dyn.quantities.momentum.MomentumPredictor`) and
for the continuous Neural-Mechanics ODE the monitor uses today
(:class:`~noether_dyn.quantities.theory.ChargePredictor`, regime "momentum"), at eta and eta/2
(same training time): the exact one sits at the symmetry defect (BatchNorm eps for scale,
rounding otherwise), the ODE's error falls with eta (first order).

Run: ``python analysis/momentum_theory.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis._common import make_model  # noqa: E402
from analysis._physics import (  # noqa: E402
    DocsBlock,
    Step,
    charge,
    parser,
    run,
    signed_dot,
    signed_sum,
    write_table,
)
from noether_dyn.quantities.momentum import DecayShare, MomentumPredictor  # noqa: E402
from noether_dyn.quantities.theory import ChargePredictor  # noqa: E402

LAMBDA = 5e-3


def _model():
    model = make_model(6, 8, 4, bn2=False, seed=0, dtype=torch.float64)
    return model, model.symmetries()


def shares(name: str, make_opt, family: str, steps: int) -> list[dict]:
    model, syms = _model()
    opt = make_opt(model.parameters())
    group = opt.param_groups[0]
    names = [k for k, _ in model.named_parameters()]
    share = DecayShare(family)
    acc = {
        s.name: dict(change=0.0, decay_true=0.0, decay_naive=0.0, rule=0.0, ksb=0.0) for s in syms
    }
    closure = {s.name: 0.0 for s in syms}

    def on_step(st: Step) -> None:
        state = [st.optimizer.state[p] for p in group["params"]]
        k = st.n + 1
        lr, lam = group["lr"], group["weight_decay"]
        if family == "sgd":
            mom, metric = group["momentum"], None
        elif family == "adam":
            mom, b2 = group["betas"]
            metric = [(s["exp_avg_sq"] / (1 - b2**k)).sqrt() + group["eps"] for s in state]
        else:
            mom = group["momentum"]
            metric = [s["square_avg"].sqrt() + group["eps"] for s in state]
        e = dict(zip(names, share.step([st.q[n] for n in names], lr, lam, mom, 0.0, metric, k)))
        dq = {n: st.dq(n) for n in names}
        for s in syms:
            q_n = charge(s, st.q)
            change = charge(s, st.q1) - q_n
            if s.kind == "translation":
                decay, first, ksb, naive = signed_sum(s, e), signed_sum(s, dq), 0.0, -lr * lam * q_n
            else:
                decay = 2 * signed_dot(s, st.q, e)
                first, ksb = 2 * signed_dot(s, st.q, dq), signed_dot(s, dq, dq)
                naive = -2 * lr * lam * q_n
            a = acc[s.name]
            a["change"] += change
            a["decay_true"] += decay
            a["decay_naive"] += naive
            a["rule"] += first - decay
            a["ksb"] += ksb
            closure[s.name] = max(closure[s.name], abs(change - first - ksb) / max(abs(q_n), 1e-3))

    run(model, opt, steps=steps, on_step=on_step)
    rows = []
    for s in syms:
        a = acc[s.name]
        rows.append(
            {
                "optimizer": name,
                "symmetry": s.name,
                **a,
                "closure": closure[s.name],
                "decay_fraction": a["decay_true"] / a["change"],
                "true_over_naive": a["decay_true"] / a["decay_naive"],
            }
        )
    return rows


def prediction(eta: float, total_time: float) -> list[dict]:
    model, syms = _model()
    beta = 0.9
    opt = torch.optim.SGD(model.parameters(), lr=eta, momentum=beta, weight_decay=LAMBDA)
    trans = [s.kind == "translation" for s in syms]
    exact = MomentumPredictor(torch.tensor(trans))
    ode = ChargePredictor("momentum", trans)
    named = dict(model.named_parameters())
    q0 = torch.tensor(
        [charge(s, {k: v.detach() for k, v in named.items()}) for s in syms], dtype=torch.float64
    )
    exact.start(q0)
    ode.start(q0)
    n_sym = len(syms)
    full = lambda v: torch.full((n_sym,), v, dtype=torch.float64)  # noqa: E731
    err_exact, err_ode, scale = [0.0] * n_sym, [0.0] * n_sym, [abs(float(v)) for v in q0]

    def on_step(st: Step) -> None:
        dq = {k: st.dq(k) for k in st.q}
        dsq = torch.tensor([signed_dot(s, dq, dq) for s in syms], dtype=torch.float64)
        pe = exact.advance(full(eta), full(beta), full(LAMBDA), dsq)
        ode.advance([eta] * n_sym, [beta] * n_sym, [LAMBDA] * n_sym, update_sq=dsq)
        for i, s in enumerate(syms):
            m = charge(s, st.q1)
            scale[i] = max(scale[i], abs(m))
            err_exact[i] = max(err_exact[i], abs(float(pe[i]) - m))
            err_ode[i] = max(err_ode[i], abs(float(ode.value[i]) - m))

    steps = int(round(total_time / eta))
    run(model, opt, steps=steps, on_step=on_step)
    return [
        {
            "eta": eta,
            "steps": steps,
            "symmetry": s.name,
            "rel_err_exact": err_exact[i] / scale[i],
            "rel_err_ode": err_ode[i] / scale[i],
        }
        for i, s in enumerate(syms)
    ]


def main(argv: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    args = parser(__doc__.splitlines()[0], "momentum_theory").parse_args(argv)
    docs = DocsBlock(args, __file__, argv)  # checks the docs block before measuring
    t0 = time.perf_counter()
    steps = 100 if args.quick else 600
    cases = [
        (
            "SGD(0.05, beta 0.9, L2 5e-3)",
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=LAMBDA),
            "sgd",
        ),
        (
            "Adam(1e-2, L2 1e-2)",
            lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
            "adam",
        ),
        (
            "RMSprop(1e-3, L2 1e-2)",
            lambda p: torch.optim.RMSprop(p, lr=1e-3, weight_decay=1e-2),
            "rmsprop",
        ),
    ]
    share_df = pd.DataFrame([r for c in cases for r in shares(*c, steps)])
    total = 5.0 if args.quick else 30.0
    pred_df = pd.DataFrame([r for eta in (0.05, 0.025) for r in prediction(eta, total)])
    out = Path(args.out)
    command = "python analysis/momentum_theory.py"
    write_table(
        share_df,
        out / "shares",
        "Weight decay's true share vs the naive column",
        command,
        docs=docs,
    )
    write_table(
        pred_df,
        out / "prediction",
        "Exact discrete vs continuous momentum prediction",
        command,
        docs=docs,
    )
    docs.write()
    print(share_df.to_string(), pred_df.to_string(), f"{time.perf_counter() - t0:.1f} s", sep="\n")
    return share_df, pred_df


if __name__ == "__main__":
    main()
