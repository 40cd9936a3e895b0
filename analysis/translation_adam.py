"""Translation charge of a softmax head: conserved by SGD, broken by Adam's metric.

Kunin et al., "Neural Mechanics", ICLR 2021 (translation symmetry of softmax logits); Tanaka &
Kunin, "Noether's Learning Dynamics", NeurIPS 2021 (a preconditioner is a kinetic metric that
breaks the symmetry); docs/theory.md §3 and §3.1.

The charge is Q = <q_A, 1>, the sum of the head's weights and bias (A = ``head.weight,
head.bias``). Every gradient sums to zero over the classes, so the exact one-step decomposition
(§3.1) is ``Q_{n+1} - Q_n = <dq_n, 1> = decay + rule`` with ``decay = -eta lambda Q_n``,
``rule = -eta sum(G^{-1} u_n)`` and ``ksb = 0``: SGD (G = I, no weight decay) moves Q only by
rounding; Adam's per-coordinate metric G = diag(sqrt(v_hat) + eps) rescales the entries of a
zero-sum gradient differently, so its sum is no longer zero and ``rule`` carries the whole change;
AdamW adds ``decay``.

Runs (same init, same minibatches): SGD in float32 and in float64 (no weight decay), Adam (no
weight decay) and AdamW, float32. Table columns: ``theory`` (the monitor's ``predicted`` Q at
the last logged step: rounding-free gradient flow, Q decaying only by weight decay),
``measured`` (``charge`` there), ``residual = measured - theory``; ``measured_change`` =
Q_last - Q_0 and the cumulative sums of ``decay``, ``rule``, ``ksb`` over the steps in between;
``closure = measured_change - (sum decay + sum rule + sum ksb)`` (the §3.1 identity: zero up to
the rounding of Q itself); ``rule_share = sum rule / measured_change``. Two rounding scales for the
SGD rows: ``defect_drift = sum_n eta |<g_n, 1>|`` (from the ``defect`` column: what a non-zero
gradient sum could move) and ``rounding_scale = u sqrt(N) |q_A|`` (a random walk of one rounding,
unit roundoff u, of each entry of q per step).

The monitor takes dq_n as the difference of parameter snapshots (``watch(..., snapshot=True)``),
so ``closure`` is the rounding of the float32 reductions alone (about 4e-8 here). With the
toolkit's default, dq_n rebuilt from the optimizer's state, the rebuilt update misses the rounding
of q_{n+1} = q_n + dq_n: over 2000 float32 steps the closure was 2.0e-4 for AdamW (1.9e-5 of the
change, a systematic drift), 6.3e-6 for Adam, and 1.6e-6 for SGD, larger than SGD's whole drift.

Run: ``python analysis/translation_adam.py [--quick] [--out DIR]``.
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

STUDY = "translation_adam"
DIM, WIDTH, CLASSES = 32, 64, 8
SYMMETRY = "translation:head"


def summarize(label: str, run, model, opt_name: str, eta: float, lam: float, dtype) -> dict:
    """The table row of one run (module docstring)."""
    g = run.charge(SYMMETRY)
    q = g["charge"].to_numpy()
    head = torch.cat([model.head.weight.detach().flatten(), model.head.bias.detach()]).double()
    numel = head.numel()
    sums = {c: float(g[c].to_numpy()[:-1].sum()) for c in ("decay", "rule", "ksb")}
    change = q[-1] - q[0]
    grad_sum = g["defect"].to_numpy() * np.sqrt(g["grad_sq"].to_numpy() * numel)
    u = torch.finfo(dtype).eps / 2
    return {
        "run": label,
        "optimizer": opt_name,
        "dtype": str(dtype).removeprefix("torch."),
        "lr": eta,
        "weight_decay": lam,
        "steps": len(q),
        "Q_0": q[0],
        "theory": float(g["predicted"].iloc[-1]),
        "measured": q[-1],
        "residual": q[-1] - float(g["predicted"].iloc[-1]),
        "measured_change": change,
        "sum_decay": sums["decay"],
        "sum_rule": sums["rule"],
        "sum_ksb": sums["ksb"],
        "closure": change - sum(sums.values()),
        "rule_share": sums["rule"] / change if change != 0 else float("nan"),
        "defect_drift": float(eta * grad_sum[:-1].sum()),
        "rounding_scale": u * math.sqrt(len(q)) * float(head.norm()),
    }


def plot(runs: dict[str, tuple], table: pd.DataFrame):
    """Left: for the adaptive runs, the measured change of Q against the cumulative decomposition
    terms. Right: |Q_n - Q_0| of the SGD runs against their rounding scale (zeros omitted)."""
    sns.set_theme(style="whitegrid")
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = sns.color_palette("deep", len(runs))
    for (label, (run, row)), color in zip(runs.items(), colors, strict=True):
        g = run.charge(SYMMETRY)
        steps = g.index.to_numpy()
        q = g["charge"].to_numpy()
        if row["optimizer"] in ("Adam", "AdamW"):
            ax0.plot(steps, q - q[0], color=color, lw=2.0, alpha=0.5, label=f"{label}: Q_n - Q_0")
            cum = {c: np.concatenate([[0.0], np.cumsum(g[c].to_numpy()[:-1])]) for c in ("rule",)}
            ax0.plot(steps, cum["rule"], "--", color=color, lw=1.0, label=f"{label}: sum rule")
            if row["weight_decay"] > 0:
                decay = np.concatenate([[0.0], np.cumsum(g["decay"].to_numpy()[:-1])])
                ax0.plot(steps, decay, ":", color=color, lw=1.2, label=f"{label}: sum decay")
        else:
            drift = np.abs(q - q[0])
            drift = np.where(drift > 0, drift, np.nan)  # exact zeros have no logarithm
            ax1.semilogy(steps, drift, ".", ms=1.5, color=color, label=label)
            u = row["rounding_scale"] / math.sqrt(row["steps"])
            ax1.semilogy(steps, u * np.sqrt(steps + 1), "--", color=color, lw=1.0)
    ax0.set_title("adaptive rules: measured change = sum of rule (+ decay)")
    ax0.set_xlabel("step")
    ax0.set_ylabel("Q_n - Q_0 (sum of head weights and bias)")
    ax0.legend(fontsize=7)
    ax1.set_title("SGD: |Q_n - Q_0| (dots) vs u sqrt(n) |q_A| (dashed)")
    ax1.set_xlabel("step")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    return fig


def parse(argv: list[str] | None):
    p = parser(__doc__.split("\n")[0], STUDY, docs_page="docs/studies.md")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sgd-lr", type=float, default=0.1)
    p.add_argument("--adam-lr", type=float, default=1e-3)
    p.add_argument("--adamw-decay", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 200 if args.quick else 2000
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the study, write ``table.csv``, ``table.md`` and ``translation.png`` under ``--out``,
    print the markdown; returns the table (one row per run)."""
    args = parse(argv)
    docs = docs_command(args, __file__, argv)  # None without --write-docs
    start = time.perf_counter()
    configs = [
        ("sgd float32", "SGD", torch.float32, args.sgd_lr, 0.0),
        ("sgd float64", "SGD", torch.float64, args.sgd_lr, 0.0),
        ("adam", "Adam", torch.float32, args.adam_lr, 0.0),
        ("adamw", "AdamW", torch.float32, args.adam_lr, args.adamw_decay),
    ]
    rows, runs, seconds = [], {}, 0.0
    with RunDirs(args.runs) as dirs:
        for label, opt_name, dtype, eta, lam in configs:
            x, y = mixture(4096, DIM, CLASSES, seed=args.seed, label_noise=0.1, dtype=dtype)
            model = make_model(DIM, WIDTH, CLASSES, bn2=False, seed=args.seed, dtype=dtype)
            opt = getattr(torch.optim, opt_name)(model.parameters(), lr=eta, weight_decay=lam)
            out = train(
                model,
                opt,
                x,
                y,
                dirs(label.replace(" ", "_")),
                steps=args.steps,
                batch=args.batch,
                seed=args.seed,
                symmetries=model.symmetries(("translation",)),
            )
            seconds += out.seconds
            row = summarize(label, out.run, model, opt_name, eta, lam, dtype)
            rows.append(row)
            runs[label] = (out.run, row)
        table = pd.DataFrame(rows)
        fig = plot(runs, table)
    notes = [
        f"batch {args.batch}, seed {args.seed}; training {seconds:.1f} s, "
        f"total {time.perf_counter() - start:.1f} s."
    ]
    write_results(
        Path(args.out),
        "Translation charge: SGD vs Adam (Neural Mechanics; NLD; docs/theory.md §3.1)",
        {"table": table},
        fig,
        "translation.png",
        notes,
        docs=docs,
    )
    return table


if __name__ == "__main__":
    main()
