"""Equilibrium angular update of normalized weights under SGD+momentum and AdamW.

Wan, Zhu, Zhang, Sun, "Spherical Motion Dynamics: Learning Dynamics of Normalized Neural Network
using SGD and Weight Decay", NeurIPS 2021 (SMD); Kosson, Messmer, Jaggi, "Rotational Equilibrium:
How Weight Decay Balances Learning Across Neural Networks", ICML 2024 (RE); docs/theory.md §4.

A scale-invariant weight (here ``fc1.weight`` and ``fc2.weight``, each feeding BatchNorm, no bias)
trained with weight decay reaches an equilibrium norm where the norm growth from the (orthogonal)
gradient steps balances the decay; there the angle it turns per step is, for independent minibatch
noise,

* SGD, momentum beta, L2 decay lambda (SMD): ``sqrt(2 eta lambda / (1 + beta))``;
* AdamW, beta1, decoupled decay lambda (RE): ``sqrt(2 eta lambda (1 - beta1) / (1 + beta1))``.

A float64 MLP ``fc1 -> BN -> ReLU -> fc2 -> BN -> ReLU -> head`` learns a Gaussian mixture with
30% label noise (the loss cannot reach zero, so minibatch gradients stay noisy) from random
batches, for three (eta, lambda) settings per optimizer (two with ``--quick``). The norm relaxes
to equilibrium in about 1/(4 eta lambda/(1-beta)) steps (SGDM, the r^4 decay rate of docs/theory.md
§4)
or 1/(2 eta lambda) (AdamW, whose update size does not depend on r); the settings keep that under
a tenth of the run. Weight decay acts on the two scale-invariant weights only (the usual practice
of exempting norm gains and biases). With decay on every parameter, the strongest AdamW setting
shrank the first BatchNorm's gain until the second layer's pre-BN variance fell to the order of
BatchNorm's eps, which broke that layer's scale invariance (its ``defect`` grew from 6e-6 to
3e-2) and pulled its angular update to 0.79 of theory.

Columns (one row per optimizer, setting and layer): ``theory`` (the formula above), ``measured``
(mean of the monitor's ``angular_update`` over the last third of the steps), ``residual`` =
measured - theory and ``ratio`` = measured / theory; ``window_drift`` = (mean over the last third)
/ (mean over the middle third) - 1 (near 0 when equilibrium was reached); ``relax_steps`` (the
relaxation time above), ``defect_late`` (median symmetry ``defect`` over the last third: the
formulas assume an exact scale symmetry) and ``eff_lr_end`` (the monitor's ``effective_lr``).

Run: ``python analysis/angular_equilibrium.py [--quick] [--out DIR]``.
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

STUDY = "angular_equilibrium"
DIM, WIDTH, CLASSES = 32, 64, 8
LAYERS = ("fc1", "fc2")
BETA = 0.9
SETTINGS = {
    "SGD": ((0.1, 5e-3), (0.05, 2e-2), (0.2, 1e-3)),
    "AdamW": ((1e-2, 0.5), (5e-3, 2.0), (2e-2, 0.1)),
}


def theory(opt_name: str, eta: float, lam: float, beta: float = BETA) -> float:
    """Equilibrium angular update per step: SMD for SGD+momentum, RE for AdamW (radians)."""
    if opt_name == "SGD":
        return math.sqrt(2.0 * eta * lam / (1.0 + beta))
    return math.sqrt(2.0 * eta * lam * (1.0 - beta) / (1.0 + beta))


def relax_steps(opt_name: str, eta: float, lam: float, beta: float = BETA) -> float:
    """Steps for the norm to relax to equilibrium (module docstring)."""
    if opt_name == "SGD":
        return (1.0 - beta) / (4.0 * eta * lam)
    return 1.0 / (2.0 * eta * lam)


def make_optimizer(
    opt_name: str, model: torch.nn.Module, eta: float, lam: float
) -> torch.optim.Optimizer:
    """SGD(momentum BETA, L2 decay) or AdamW(betas (BETA, 0.999), decoupled decay), with weight
    decay on the scale-invariant weights only (param group 0) and none on the rest (group 1)."""
    decayed = [getattr(model, name).weight for name in LAYERS]
    rest = [p for p in model.parameters() if all(p is not w for w in decayed)]
    groups = [{"params": decayed, "weight_decay": lam}, {"params": rest, "weight_decay": 0.0}]
    if opt_name == "SGD":
        return torch.optim.SGD(groups, lr=eta, momentum=BETA)
    return torch.optim.AdamW(groups, lr=eta, betas=(BETA, 0.999))


def summarize(run, opt_name: str, eta: float, lam: float) -> list[dict]:
    rows = []
    for name in LAYERS:
        g = run.charge(f"scale:{name}")
        angle = g["angular_update"].to_numpy()
        n = len(angle)
        late, middle = angle[2 * n // 3 :].mean(), angle[n // 3 : 2 * n // 3].mean()
        th = theory(opt_name, eta, lam)
        rows.append(
            {
                "optimizer": opt_name,
                "lr": eta,
                "weight_decay": lam,
                "eta_lambda": eta * lam,
                "steps": n,
                "layer": name,
                "theory": th,
                "measured": late,
                "residual": late - th,
                "ratio": late / th,
                "window_drift": late / middle - 1.0,
                "relax_steps": relax_steps(opt_name, eta, lam),
                "defect_late": float(np.median(g["defect"].to_numpy()[2 * n // 3 :])),
                "eff_lr_end": float(g["effective_lr"].iloc[-1]),
            }
        )
    return rows


def plot(runs: dict[tuple, object]):
    """Angular update of fc1 per step (rolling mean) over its theory, one panel per optimizer."""
    sns.set_theme(style="whitegrid")
    opts = list(dict.fromkeys(k[0] for k in runs))
    fig, axes = plt.subplots(1, len(opts), figsize=(5.6 * len(opts), 4.2), squeeze=False)
    for ax, opt_name in zip(axes[0], opts):
        keys = [k for k in runs if k[0] == opt_name]
        colors = sns.color_palette("deep", len(keys))
        for (_, eta, lam), color in zip(keys, colors, strict=True):
            g = runs[(opt_name, eta, lam)].charge("scale:fc1")
            smooth = pd.Series(g["angular_update"].to_numpy()).rolling(50, min_periods=1).mean()
            ax.plot(g.index, smooth, color=color, lw=1.0, label=f"eta={eta:g}, lambda={lam:g}")
            ax.axhline(theory(opt_name, eta, lam), color=color, ls="--", lw=1.0)
            n = len(g)
            ax.axvspan(g.index[2 * n // 3], g.index[-1], color="0.9", zorder=0)
        ax.set_title(f"{opt_name} (beta{'1' if opt_name == 'AdamW' else ''}={BETA}): fc1")
        ax.set_xlabel("step")
        ax.set_ylabel("angle per step (rad), rolling mean of 50")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def parse(argv: list[str] | None):
    p = parser(__doc__.split("\n")[0], STUDY, docs_page="docs/studies.md")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 600 if args.quick else 3000
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the study, write ``table.csv``, ``table.md`` and ``angular.png`` under ``--out``,
    print the markdown; returns the table (one row per optimizer, setting and layer)."""
    args = parse(argv)
    docs = docs_command(args, __file__, argv)  # None without --write-docs
    start = time.perf_counter()
    dt = torch.float64
    x, y = mixture(4096, DIM, CLASSES, seed=args.seed, label_noise=0.3, dtype=dt)
    settings = {k: v[:2] for k, v in SETTINGS.items()} if args.quick else SETTINGS
    rows, runs, seconds = [], {}, 0.0
    with RunDirs(args.runs) as dirs:
        for opt_name, pairs in settings.items():
            for eta, lam in pairs:
                model = make_model(DIM, WIDTH, CLASSES, bn2=True, seed=args.seed, dtype=dt)
                opt = make_optimizer(opt_name, model, eta, lam)
                out = train(
                    model,
                    opt,
                    x,
                    y,
                    dirs(f"{opt_name}_lr{eta:g}_wd{lam:g}"),
                    steps=args.steps,
                    batch=args.batch,
                    seed=args.seed,
                    symmetries=model.symmetries(("scale",)),
                )
                seconds += out.seconds
                rows += summarize(out.run, opt_name, eta, lam)
                runs[(opt_name, eta, lam)] = out.run
        table = pd.DataFrame(rows)
        fig = plot(runs)
    notes = [
        f"float64, batch {args.batch}, {args.steps} steps, beta = beta1 = {BETA}, "
        f"AdamW beta2 = 0.999, seed {args.seed}; training {seconds:.1f} s, "
        f"total {time.perf_counter() - start:.1f} s."
    ]
    write_results(
        Path(args.out),
        "Equilibrium angular update: SGD+momentum (SMD) and AdamW (RE)",
        {"table": table},
        fig,
        "angular.png",
        notes,
        docs=docs,
    )
    return table


if __name__ == "__main__":
    main()
