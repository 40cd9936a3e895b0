"""Three Noether charges of a BatchNorm/ReLU/softmax network under SGD, against Neural Mechanics.

Kunin, Sagastuy-Brena, Ganguli, Yamins, Tanaka, "Neural Mechanics: Symmetry and Broken
Conservation Laws in Deep Learning Dynamics", ICLR 2021; docs/theory.md §3.2-3.3.

A float64 MLP ``fc1 -> BN -> ReLU -> fc2 -> ReLU -> head`` learns a Gaussian mixture (10% label
noise) from random minibatches. Three symmetries are declared by hand: scale of ``fc1.weight``
(it feeds BatchNorm), rescale of the ReLU units of ``fc2`` (in: ``fc2.weight, fc2.bias``; out:
``head.weight``), translation of the softmax head (``head.weight, head.bias``). Runs:

* ``sgd``: SGD with weight decay. The monitor's prediction (regime "sgd", docs/theory.md §3.2) is
exact
  given the symmetry, so ``charge - predicted`` is the accumulated symmetry defect. Per step the
  residual is ``r_n = -2 (1 - eta lambda) eta <g_n, xi(q_n)>`` (scale; translation:
  ``-eta <g_n, 1>``), whose size is ``2 (1 - eta lambda) eta defect_n |g_n| |xi_n|`` with the
  ``defect`` column, so ``|charge - predicted| <= defect_bound``, the same sum with every term
  positive (equality when <g, xi> keeps its sign). ``defect_bound`` needs |g_A| and |xi|
  unsigned, which the run holds for scale (``grad_sq``, ``charge``) and translation
  (``grad_sq``, number of entries) but not for rescale (signed differences): NaN there.
  ``defect_identity`` checks the per-step statement for scale: max_n of
  | |r_n| - 2 (1 - eta lambda) eta defect_n |g_n| |q_n| | / max_n |r_n|, with
  r_n = Q_{n+1} - (1 - eta lambda)^2 Q_n - eta^2 |g_n|^2 from the columns (NaN for translation,
  whose r_n is pure rounding, and rescale).
* ``momentum`` at rates eta and eta/2, for the same continuous time T = steps * eta: the
  continuous theory of §3.3 (damped oscillator driven by the measured |q'|^2). Its residual is a
  discretization error; the ``scaling`` table gives its apparent order in eta.

Columns: ``theory`` (the monitor's ``predicted``, or ``predicted_ode`` under momentum, at the
last logged step), ``measured``
(``charge`` there), ``residual = measured - theory``, ``rel_residual = |residual| / max_n |Q_n|``,
``rel_to_change = max_n |Q_n - predicted_n| / max_n |Q_n - Q_0|`` (the error as a fraction of what
the theory had to predict), ``defect_median``, ``defect_bound`` and ``defect_identity`` (above).

Run: ``python analysis/charges_sgd.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
import torch

if __package__ in (None, ""):  # run as a file: make ``analysis`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis._common import (  # noqa: E402
    RunDirs,
    docs_command,
    make_model,
    mixture,
    parser,
    plt,
    train,
    write_results,
)

STUDY = "charges_sgd"
DIM, WIDTH, CLASSES = 32, 64, 8


def defect_terms(
    g: pd.DataFrame, kind: str, eta: float, lam: float, numel: int
) -> tuple[float, float]:
    """For one symmetry's rows ``g`` of an "sgd"-regime run: the bound on |charge - predicted| at
    the last row implied by the measured defect, and (scale only) the largest relative mismatch
    between the per-step residual |r_n| and the size the defect gives it (module docstring).
    NaN where the run's columns do not determine them."""
    if kind == "rescale":
        return float("nan"), float("nan")
    q, gsq, defect = (g[c].to_numpy() for c in ("charge", "grad_sq", "defect"))
    if kind == "scale":
        factor = (1.0 - eta * lam) ** 2
        size = 2.0 * (1.0 - eta * lam) * eta * defect * np.sqrt(gsq * q)
        r = q[1:] - factor * q[:-1] - eta**2 * gsq[:-1]
        identity = float(np.max(np.abs(np.abs(r) - size[:-1])) / np.max(np.abs(r)))
    else:
        factor = 1.0 - eta * lam
        size = eta * defect * np.sqrt(gsq * numel)
        identity = float("nan")
    bound = 0.0
    for s in size[:-1]:
        bound = factor * bound + s
    return bound, identity


def _theory(g) -> np.ndarray:
    """The continuous theory's column: ``predicted_ode`` under momentum (where ``predicted`` is
    the exact discrete recurrence), else ``predicted``."""
    ode = g["predicted_ode"] if "predicted_ode" in g else None
    return (ode if ode is not None and ode.notna().any() else g["predicted"]).to_numpy()


def summarize(run, regime: str, eta: float, beta: float, lam: float, steps: int, numel: dict):
    """One table row per symmetry of ``run``."""
    rows = []
    for sym in run.symmetries.itertuples():
        g = run.charge(sym.symmetry)
        q, pred = g["charge"].to_numpy(), _theory(g)
        err = np.abs(q - pred)
        change = np.max(np.abs(q - q[0]))
        bound, identity = (
            defect_terms(g, sym.kind, eta, lam, numel[sym.symmetry])
            if regime == "sgd"
            else (float("nan"), float("nan"))
        )
        rows.append(
            {
                "regime": regime,
                "lr": eta,
                "momentum": beta,
                "weight_decay": lam,
                "steps": steps,
                "symmetry": sym.symmetry,
                "Q_0": q[0],
                "theory": pred[-1],
                "measured": q[-1],
                "residual": q[-1] - pred[-1],
                "rel_residual": err[-1] / np.max(np.abs(q)),
                "rel_to_change": err.max() / change if change > 0 else float("nan"),
                "defect_median": float(np.median(g["defect"])),
                "defect_bound": bound,
                "defect_identity": identity,
            }
        )
    return rows


def scaling_table(table: pd.DataFrame) -> pd.DataFrame:
    """Apparent order p of the momentum residual in eta: rel_to_change ~ eta^p."""
    mom = table[table["regime"] == "momentum"]
    hi_lr, lo_lr = mom["lr"].max(), mom["lr"].min()
    rows = []
    for sym, g in mom.groupby("symmetry", sort=False):
        hi = float(g.loc[g["lr"] == hi_lr, "rel_to_change"].iloc[0])
        lo = float(g.loc[g["lr"] == lo_lr, "rel_to_change"].iloc[0])
        rows.append(
            {
                "symmetry": sym,
                "lr_high": hi_lr,
                "lr_low": lo_lr,
                "rel_to_change_high": hi,
                "rel_to_change_low": lo,
                "ratio": hi / lo,
                "order": math.log(hi / lo) / math.log(hi_lr / lo_lr),
            }
        )
    return pd.DataFrame(rows)


def plot(runs: dict[str, tuple], table: pd.DataFrame):
    """Top: measured charge (solid) and theory (dashed) against continuous time t; bottom: the
    error |Q - predicted| over the charge's range, log scale."""
    sns.set_theme(style="whitegrid")
    names = list(table["symmetry"].unique())
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 6.6), sharex="col")
    colors = dict(zip(runs, sns.color_palette("deep", len(runs)), strict=True))
    for label, (run, _) in runs.items():
        t = run.steps.set_index("step")["time"]
        for j, name in enumerate(names):
            g = run.charge(name)
            tt = t.loc[g.index].to_numpy()
            q, pred = g["charge"].to_numpy(), _theory(g)
            axes[0, j].plot(tt, q, color=colors[label], lw=1.2, label=f"{label} measured")
            axes[0, j].plot(tt, pred, "--", color=colors[label], lw=1.0, label=f"{label} theory")
            scale = max(np.max(np.abs(q - q[0])), 1e-300)
            axes[1, j].semilogy(tt, np.abs(q - pred) / scale + 1e-18, color=colors[label], lw=1.0)
            axes[0, j].set_title(name)
    for j in range(len(names)):
        axes[1, j].set_xlabel("continuous time t = sum eta")
    axes[0, 0].set_ylabel("charge Q")
    axes[1, 0].set_ylabel("|Q - theory| / max|Q - Q_0|")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def parse(argv: list[str] | None):
    p = parser(__doc__.split("\n")[0], STUDY, docs_page="docs/studies.md")
    p.add_argument("--steps", type=int, default=None, help="steps of the sgd run")
    p.add_argument("--lr", type=float, default=0.1, help="rate of the sgd run")
    p.add_argument("--momentum-lr", type=float, default=0.02, help="higher momentum-run rate")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-3)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 150 if args.quick else 1500
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the study, write ``table.csv``, ``scaling.csv``, ``table.md`` and ``charges.png`` under
    ``--out``, print the markdown; returns the main table (one row per run and symmetry)."""
    args = parse(argv)
    docs = docs_command(args, __file__, argv)  # None without --write-docs
    start = time.perf_counter()
    x, y = mixture(4096, DIM, CLASSES, seed=args.seed, label_noise=0.1, dtype=torch.float64)
    lam, beta = args.weight_decay, args.momentum
    configs = [
        ("sgd", args.lr, 0.0, args.steps),
        ("momentum", args.momentum_lr, beta, args.steps),
        ("momentum", args.momentum_lr / 2, beta, 2 * args.steps),
    ]
    rows, runs, seconds = [], {}, []
    with RunDirs(args.runs) as dirs:
        for regime, eta, b, steps in configs:
            model = make_model(DIM, WIDTH, CLASSES, bn2=False, seed=args.seed, dtype=torch.float64)
            numel = {
                s.name: sum(dict(model.named_parameters())[p].numel() for p in s.params)
                for s in model.symmetries()
            }
            opt = torch.optim.SGD(model.parameters(), lr=eta, momentum=b, weight_decay=lam)
            label = f"{regime} lr={eta:g}"
            out = train(
                model,
                opt,
                x,
                y,
                dirs(label.replace(" ", "_")),
                steps=steps,
                batch=args.batch,
                seed=args.seed,
                symmetries=model.symmetries(),
            )
            assert out.run.meta["optimizer"]["prediction"] == regime
            seconds.append(out.seconds)
            runs[label] = (out.run, regime)
            rows += summarize(out.run, regime, eta, b, lam, steps, numel)
        table = pd.DataFrame(rows)
        scaling = scaling_table(table)
        fig = plot(runs, table)
    notes = [
        f"float64, batch {args.batch}, seed {args.seed}; training {sum(seconds):.1f} s, "
        f"total {time.perf_counter() - start:.1f} s."
    ]
    write_results(
        Path(args.out),
        "Charges under SGD and SGD+momentum (Neural Mechanics, docs/theory.md §3.2-3.3)",
        {"table": table, "scaling": scaling},
        fig,
        "charges.png",
        notes,
        docs=docs,
    )
    return table


if __name__ == "__main__":
    main()
