"""BatchNorm's eps as the cause of the scale charge's residual.

A weight feeding BatchNorm is scale invariant only up to eps: BN divides by sqrt(var + eps), and
rescaling the weight by c rescales var by c^2 but not eps, so ``<g, q>`` is of order
``eps / (var + eps)`` times |g||q| instead of zero (Kunin et al., "Neural Mechanics", ICLR 2021,
note that normalization symmetries are exact only with eps = 0). The exact predictions of
:mod:`noether_dyn.quantities.momentum` (SGD with momentum) and docs/theory.md §3.2 (plain SGD)
assume the
symmetry, so their residual against the measured charge is the accumulated defect: it must
scale with eps down to float64 rounding.

Runs: the float64 BatchNorm MLP, ``fc1.weight`` (scale) with ``bn1.eps`` in {1e-5, 1e-9, 1e-13,
1e-30} (torch requires eps > 0; 1e-30 is the no-defect floor), SGD lr 0.05, weight decay 5e-3,
momentum 0 and 0.9, same seed and batches. Columns: ``defect_median`` (median over steps of
|<g, q>| / (|g| |q|)), ``pre_bn_var`` (mean pre-BatchNorm variance over channels at the end),
``rel_residual`` (max over steps of |Q_pred - Q_meas| / Q_meas) and ``ratio_to_previous_eps``.

Run: ``python analysis/bn_eps_residual.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis._common import make_model, mixture  # noqa: E402
from analysis._physics import DocsBlock, Step, charge, parser, run, signed_dot, write_table  # noqa: E402
from noether_dyn.quantities.momentum import MomentumPredictor  # noqa: E402

EPS = (1e-5, 1e-9, 1e-13, 1e-30)
LR, LAMBDA = 0.05, 5e-3


def one_run(eps: float, beta: float, steps: int) -> dict:
    model = make_model(6, 8, 4, bn2=False, seed=0, dtype=torch.float64)
    model.bn1.eps = eps
    (sym,) = model.symmetries(("scale",))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=beta, weight_decay=LAMBDA)
    named = dict(model.named_parameters())
    pred = MomentumPredictor(torch.tensor([False]))
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    pred.start(one(charge(sym, {k: v.detach() for k, v in named.items()})))
    defects: list[float] = []
    residual = 0.0

    def on_step(st: Step) -> None:
        nonlocal residual
        g, q = st.g["fc1.weight"], st.q["fc1.weight"]
        defects.append(float(abs((g * q).sum()) / (g.norm() * q.norm())))
        dq = {k: st.dq(k) for k in st.q}
        predicted = pred.advance(one(LR), one(beta), one(LAMBDA), one(signed_dot(sym, dq, dq)))
        measured = charge(sym, st.q1)
        residual = max(residual, abs(float(predicted[0]) - measured) / measured)

    run(model, opt, steps=steps, on_step=on_step)
    x, _ = mixture(256, 6, 4, seed=0, dtype=torch.float64)
    with torch.no_grad():
        var = float(model.fc1(x).var(0, unbiased=False).mean())
    return {
        "beta": beta,
        "bn_eps": eps,
        "steps": steps,
        "defect_median": float(torch.tensor(defects).median()),
        "pre_bn_var": var,
        "rel_residual": residual,
    }


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parser(__doc__.splitlines()[0], "bn_eps_residual").parse_args(argv)
    docs = DocsBlock(args, __file__, argv)  # checks the docs block before measuring
    t0 = time.perf_counter()
    steps = 60 if args.quick else 300
    rows = [one_run(eps, beta, steps) for beta in (0.0, 0.9) for eps in EPS]
    df = pd.DataFrame(rows)
    df["ratio_to_previous_eps"] = df.groupby("beta")["rel_residual"].transform(
        lambda s: s.shift(1) / s
    )
    write_table(
        df,
        Path(args.out),
        "Scale residual vs BatchNorm eps (exact SGD / SGD+momentum predictions)",
        "python analysis/bn_eps_residual.py",
        docs=docs,
    )
    docs.write()
    print(df.to_string(), f"{time.perf_counter() - t0:.1f} s", sep="\n")
    return df


if __name__ == "__main__":
    main()
