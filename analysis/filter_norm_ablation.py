"""Filter-norm ablation: normalization as implicit adaptive optimization (NLD section 4).

Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural Networks",
NeurIPS 2021, section 4; docs/theory.md §4.

A float64 MLP ``fc1 -> BN -> ReLU -> fc2 -> BN -> ReLU -> head`` (``fc1``, ``fc2`` without bias,
so each is scale-invariant: symmetries ``scale:fc1``, ``scale:fc2``) learns a Gaussian mixture with
plain SGD (no momentum, no weight decay) at a low and a high rate, in two variants:

* ``free``: the weights feeding BatchNorm move freely. Their norm r grows (r_{n+1}^2 = r_n^2 +
  eta^2 |g_n|^2 exactly, given the symmetry), so the rate at which their direction moves,
  eta_eff = eta / r^2, decays: docs/theory.md §4's (r^4)' = (2 eta (1+beta)/(1-beta)^3) |ghat|^2,
  here
  (beta = 0, t = n eta) r^4_{n+1} - r^4_n = 2 eta^2 |ghat_n|^2 to first order in the step, an
  Adagrad-like accumulator (eta_eff = eta / sqrt(r_0^4 + 2 eta^2 sum |ghat|^2)), with
  |ghat|^2 = |g|^2 r^2 = ``grad_sq * charge`` (the gradient at unit norm).
* ``constrained``: after every ``optimizer.step()`` each filter (row of ``fc1.weight``,
  ``fc2.weight``) is projected back to its initial norm, so eta_eff stays fixed.

The projection runs outside the optimizer, so the monitor sees it only through the next step's
parameters: its ``charge`` and ``effective_lr`` (read at the pre-hook, after the projection) are
right, but its decomposition of step n (``decay + rule + ksb``) describes the unprojected update,
and ``charge[n+1] - charge[n]`` does not equal it; the difference ``decomp_gap`` is the norm the
projection removed (about -sum ksb). The constrained run's effective rate is therefore measured
directly from the weights after each projection (``eff_lr_direct``) and compared with the column.

Table, one row per (lr, variant, layer): final train loss (mean of the last 10% of steps), test
loss/accuracy (eval mode); ``eff_lr_start``/``eff_lr_end`` (the monitor's layer-level
``effective_lr`` = eta/|W|^2 at the first and last logged step), ``eff_lr_direct`` (eta/|W|^2
computed from the weights the last step started from, after their projection: it must equal
``eff_lr_end``), ``eff_lr_filter`` (there, the mean over filters of eta/|w_c|^2: each filter's own
rate, about n_filters times the layer-level one); r^4 with the layer-level r^2 = ``charge``:
``r4_0`` = r_0^4, ``r4_theory`` = r_0^4 + sum 2 eta^2 |ghat|^2 (first order), ``r4_measured`` =
r_N^4, ``r4_residual`` = (measured - theory) / (theory - r_0^4), the error as a fraction of the
predicted growth, and ``r4_step_term`` = sum eta^4 |g|^4 / (theory - r_0^4), the second-order term
of the exact r^4_{n+1} = (r_n^2 + eta^2 |g_n|^2)^2 that the first-order theory drops, and
``r4_defect_term`` = sum 2 r_n^2 |r^2_{n+1} - r^2_n - eta^2 |g_n|^2| / (theory - r_0^4), the most
that BatchNorm's symmetry defect (its eps) can add, from the ``defect`` column (r4 columns
are NaN for constrained runs, whose r is fixed by the projection); ``decomp_gap`` (above) and
``angle_ratio`` (mean ``angular_update`` of the monitor, the angle between q_n and the unprojected
q_n + dq_n, over the mean angle between consecutive projected weights, measured directly).

Run: ``python analysis/filter_norm_ablation.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

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
    evaluate,
    make_model,
    mixture,
    parser,
    plt,
    train,
    write_results,
)

STUDY = "filter_norm_ablation"
DIM, WIDTH, CLASSES = 32, 64, 8
LAYERS = ("fc1", "fc2")


class FilterProbe:
    """After each step: optionally project every filter of the BN-fed layers back to its initial
    norm, then record the layer's |W|^2, per-filter mean eta/|w_c|^2 and the angle moved."""

    def __init__(self, model: torch.nn.Module, eta: float, constrain: bool) -> None:
        self.weights = {name: getattr(model, name).weight for name in LAYERS}
        self.r0 = {n: w.detach().norm(dim=1, keepdim=True).clone() for n, w in self.weights.items()}
        self.prev = {n: w.detach().clone() for n, w in self.weights.items()}
        self.eta, self.constrain = eta, constrain

    @torch.no_grad()
    def __call__(self, step: int) -> dict:
        record: dict = {"step": step}
        for name, w in self.weights.items():
            if self.constrain:
                w.mul_(self.r0[name] / w.norm(dim=1, keepdim=True))
            prev, cur = self.prev[name].flatten(), w.flatten()
            cos = torch.dot(prev, cur) / (prev.norm() * cur.norm())
            record[f"{name}.norm_sq"] = float(cur.square().sum())
            record[f"{name}.eff_lr_filter"] = float((self.eta / w.square().sum(1)).mean())
            record[f"{name}.angle"] = float(torch.arccos(torch.clamp(cos, -1.0, 1.0)))
            self.prev[name].copy_(w)
        return record


def summarize(run, records: pd.DataFrame, eta: float, variant: str, test: tuple) -> list[dict]:
    """Rows (one per layer) of one run."""
    loss = run.steps["loss"].to_numpy()
    tail = max(1, len(loss) // 10)
    rows = []
    for name in LAYERS:
        g = run.charge(f"scale:{name}")
        q, gsq = g["charge"].to_numpy(), g["grad_sq"].to_numpy()
        # |Q_{n+1} - Q_n - eta^2 |g|^2| = 2 eta defect |g| |q|: its share of the r^4 growth
        defect_step = 2.0 * eta * g["defect"].to_numpy() * np.sqrt(gsq * q)
        growth = np.sum(2.0 * eta**2 * gsq[:-1] * q[:-1])
        free = variant == "free"
        terms = (g["decay"] + g["rule"] + g["ksb"]).to_numpy()[:-1]
        # records[k] holds the weights after step k (and its projection) = the monitor's row k + 1
        before_last = float(records[f"{name}.norm_sq"].iloc[-2])
        rows.append(
            {
                "lr": eta,
                "variant": variant,
                "layer": name,
                "train_loss": float(loss[-tail:].mean()),
                "test_loss": test[0],
                "test_acc": test[1],
                "eff_lr_start": float(g["effective_lr"].iloc[0]),
                "eff_lr_end": float(g["effective_lr"].iloc[-1]),
                "eff_lr_direct": eta / before_last,
                "eff_lr_filter": float(records[f"{name}.eff_lr_filter"].iloc[-2]),
                "r4_0": q[0] ** 2,
                "r4_theory": q[0] ** 2 + growth if free else float("nan"),
                "r4_measured": q[-1] ** 2,
                "r4_residual": (q[-1] ** 2 - q[0] ** 2 - growth) / growth if free else np.nan,
                "r4_step_term": float(np.sum(eta**4 * gsq[:-1] ** 2)) / growth if free else np.nan,
                "r4_defect_term": (
                    float(np.sum(2.0 * q[:-1] * defect_step[:-1])) / growth if free else np.nan
                ),
                "decomp_gap": float((q[-1] - q[0]) - terms.sum()),
                "angle_ratio": float(g["angular_update"].mean() / records[f"{name}.angle"].mean()),
            }
        )
    return rows


def plot(curves: dict[tuple, tuple]):
    """Effective rate, r^4 against its first-order theory, and the training loss, per run."""
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    lrs = sorted({k[0] for k in curves})
    colors = dict(zip(lrs, sns.color_palette("deep", len(lrs)), strict=True))
    for (eta, variant), (run, _) in curves.items():
        style = "-" if variant == "free" else "--"
        g = run.charge("scale:fc1")
        steps = g.index.to_numpy()
        q, gsq = g["charge"].to_numpy(), g["grad_sq"].to_numpy()
        axes[0].semilogy(
            steps, g["effective_lr"], style, color=colors[eta], label=f"lr={eta:g} {variant}"
        )
        if variant == "free":
            acc = q[0] ** 2 + np.concatenate([[0.0], np.cumsum(2.0 * eta**2 * gsq * q)[:-1]])
            axes[0].semilogy(steps, eta / np.sqrt(acc), ":", color="k", lw=0.8)
            axes[1].plot(steps, q**2 / q[0] ** 2, color=colors[eta], label=f"lr={eta:g} measured")
            axes[1].plot(steps, acc / q[0] ** 2, ":", color="k", lw=0.8)
        loss = pd.Series(run.steps["loss"].to_numpy()).rolling(25, min_periods=1).mean()
        axes[2].plot(
            run.steps["step"], loss, style, color=colors[eta], label=f"lr={eta:g} {variant}"
        )
    axes[0].set_title("fc1: eta_eff = eta/|W|^2 (dotted: Adagrad form)", fontsize=10)
    axes[1].set_title("fc1 free: r^4/r_0^4 (dotted: first-order theory)", fontsize=10)
    axes[1].set_yscale("log")
    axes[2].set_title("training loss (rolling mean of 25 steps)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def parse(argv: list[str] | None):
    p = parser(__doc__.split("\n")[0], STUDY, docs_page="docs/studies.md")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lrs", type=float, nargs=2, default=(0.05, 1.0), help="low and high rate")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 200 if args.quick else 2000
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the study, write ``table.csv``, ``table.md`` and ``filter_norm.png`` under ``--out``,
    print the markdown; returns the table (one row per lr, variant and layer)."""
    args = parse(argv)
    docs = docs_command(args, __file__, argv)  # None without --write-docs
    start = time.perf_counter()
    dt = torch.float64
    x, y = mixture(4096, DIM, CLASSES, seed=args.seed, label_noise=0.0, dtype=dt)
    x_test, y_test = mixture(2048, DIM, CLASSES, seed=args.seed, sample=1, dtype=dt)
    rows, curves, seconds = [], {}, 0.0
    with RunDirs(args.runs) as dirs:
        for eta in args.lrs:
            for variant in ("free", "constrained"):
                model = make_model(DIM, WIDTH, CLASSES, bn2=True, seed=args.seed, dtype=dt)
                opt = torch.optim.SGD(model.parameters(), lr=eta)
                probe = FilterProbe(model, eta, constrain=variant == "constrained")
                out = train(
                    model,
                    opt,
                    x,
                    y,
                    dirs(f"lr{eta:g}_{variant}"),
                    steps=args.steps,
                    batch=args.batch,
                    seed=args.seed,
                    symmetries=model.symmetries(("scale",)),
                    after_step=probe,
                )
                seconds += out.seconds
                records = pd.DataFrame(out.records)
                test = evaluate(model, x_test, y_test)
                rows += summarize(out.run, records, eta, variant, test)
                curves[(eta, variant)] = (out.run, records)
        table = pd.DataFrame(rows)
        fig = plot(curves)
    notes = [
        f"float64, SGD without momentum or weight decay, batch {args.batch}, {args.steps} steps, "
        f"seed {args.seed}; training {seconds:.1f} s, total {time.perf_counter() - start:.1f} s."
    ]
    write_results(
        Path(args.out),
        "Filter-norm ablation: free vs constrained BN-fed weights (NLD §4, docs/theory.md §4)",
        {"table": table},
        fig,
        "filter_norm.png",
        notes,
        docs=docs,
    )
    return table


if __name__ == "__main__":
    main()
