"""Matrix-valued charges of a two-layer linear network: conservation under small-step gradient
descent, and how weight decay, momentum and Adam break it (noether_dyn.quantities.matrix_charges).

``y = W2 (W1 x + b1) + b2`` with W1: 5 x 6, W2: 4 x 5 (width n = 5: 15 independent entries of
C = W1 W1^T + b1 b1^T - W2^T W2), full-batch mean squared error on 128 fixed float64 samples
(deterministic, so every run is exactly reproducible).

Table ``scaling``: gradient descent without decay for 100 steps at eta = 1e-2 ... 1e-7. Per
step the charge moves only by its kinetic term eta^2 (G_L G_L^T - G_R G_R^T), so the relative
drift |C_N - C_0|_F / |C_0|_F falls as eta^2 (slope 2.00 on log-log from eta = 1e-4 down):
5.6e-10 at eta = 1e-6 and 5.6e-12 at eta = 1e-7, with the first-order part at rounding
(1e-15) at every eta. ``pred_residual`` is the largest |C_n - C_pred,n|_F / |C_0|_F of
the exact matrix prediction ``C_{n+1} = (1 - eta lambda)^2 C_n + eta^2 (G_L G_L^T -
G_R G_R^T)`` rolled from C_0 (rounding level at every eta).

Table ``breaking`` (eta as given, 100 steps): the summed first-order and kinetic parts of the
change (Frobenius norms relative to |C_0|_F) and the closure error of the exact split. Decay
breaks at first order (-2 eta lambda C), momentum through its buffer (old gradients are not
orthogonal to the new L, R), Adam through its preconditioner.

Every number is read back from a monitored run: ``nd.watch(..., matrix_charges=[record])`` with
the record that ``find_matrix_symmetries`` promotes, the table ``matrix_charges`` of the run store
(``run.matrix_charge``). The drift is ``C_N - C_0`` with ``C_N`` the last stored row's charge plus
its stored change.

Run: ``python analysis/matrix_charges.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import noether_dyn as nd  # noqa: E402
from analysis._physics import DocsBlock, parser, write_table  # noqa: E402
from noether_dyn.quantities.matrix_charges import gd_prediction  # noqa: E402
from noether_dyn.store import load_run  # noqa: E402
from noether_dyn.symmetries.matrix import MatrixSymmetry, find_matrix_symmetries  # noqa: E402


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 6, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(6, 4, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(
        128, 4, generator=gen, dtype=torch.float64
    )
    return x, y


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).double()


def record() -> MatrixSymmetry:
    """The net's one GL record ("gl:0>1", n = 5), found and checked by
    ``find_matrix_symmetries`` (float64 defect at rounding)."""
    x, y = data()
    (found,) = find_matrix_symmetries(net(), x, y, nn.MSELoss())
    return found


def train(make_opt, steps: int, predict: tuple[float, float] | None = None) -> dict:
    """Full-batch training watched by ``nd.watch(..., matrix_charges=[record])``; the table is
    read back from the run store (``run.matrix_charge``): drift, summed split, closure of the
    stored split and the residual of the exact GD prediction rolled from C_0 (the loss gradients
    for it are read in the loop, before each step)."""
    model = net()
    x, y = data()
    opt = make_opt(model.parameters())
    rec = record()
    grads = []
    with tempfile.TemporaryDirectory() as tmp:
        mon = nd.watch(model, opt, Path(tmp) / "run", symmetries=[], matrix_charges=[rec])
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            mon.log_loss(loss)
            if predict is not None:
                grads.append(tuple(m.clone() for m in rec.matrices(
                    {n: p.grad for n, p in model.named_parameters()})))  # fmt: skip
            opt.step()
        mon.close()
        run = load_run(Path(tmp) / "run")
        c = run.matrix_charge(rec.name)
        first = run.matrix_charge(rec.name, "first_order")
        ksb = run.matrix_charge(rec.name, "kinetic")
    scale = float(np.linalg.norm(c[0]))
    c_end = c[-1] + first[-1] + ksb[-1]  # C_N: the last stored row's C plus its change
    closure = float(np.abs(c[1:] - c[:-1] - first[:-1] - ksb[:-1]).max(initial=0.0)) / scale
    pred_res = float("nan")
    if predict is not None:
        after = np.concatenate([c[1:], c_end[None]])
        pred, pred_res = torch.from_numpy(c[0]), 0.0
        for k in range(steps):
            pred = gd_prediction(pred, *grads[k], *predict)
            pred_res = max(pred_res, float(np.linalg.norm(pred.numpy() - after[k])) / scale)
    return {
        "rel_drift": float(np.linalg.norm(c_end - c[0])) / scale,
        "first_order": float(np.linalg.norm(first.sum(0))) / scale,
        "kinetic": float(np.linalg.norm(ksb.sum(0))) / scale,
        "closure": closure,
        "pred_residual": pred_res,
    }


def scaling(steps: int) -> pd.DataFrame:
    rows = []
    for eta in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
        r = train(lambda p, e=eta: torch.optim.SGD(p, lr=e), steps, predict=(eta, 0.0))
        rows.append({"eta": eta, "steps": steps, **r})
    df = pd.DataFrame(rows)
    logs = [math.log10(v) for v in df["rel_drift"]]
    df["slope_vs_previous"] = [float("nan")] + [logs[i - 1] - logs[i] for i in range(1, len(logs))]
    return df


def breaking(steps: int) -> pd.DataFrame:
    cases = [
        ("GD", 1e-2, 0.0, lambda p: torch.optim.SGD(p, lr=1e-2), (1e-2, 0.0)),
        (
            "GD + L2 1e-2",
            1e-2,
            1e-2,
            lambda p: torch.optim.SGD(p, lr=1e-2, weight_decay=1e-2),
            (1e-2, 1e-2),
        ),
        ("GD + momentum 0.9", 1e-2, 0.0, lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9), None),
        ("Adam", 1e-3, 0.0, lambda p: torch.optim.Adam(p, lr=1e-3), None),
        ("GD (eta 1e-3)", 1e-3, 0.0, lambda p: torch.optim.SGD(p, lr=1e-3), (1e-3, 0.0)),
        (
            "GD + L2 1e-2 (eta 1e-3)",
            1e-3,
            1e-2,
            lambda p: torch.optim.SGD(p, lr=1e-3, weight_decay=1e-2),
            (1e-3, 1e-2),
        ),
    ]
    rows = []
    for name, eta, lam, make, predict in cases:
        rows.append(
            {
                "rule": name,
                "eta": eta,
                "weight_decay": lam,
                "steps": steps,
                **train(make, steps, predict),
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    args = parser(__doc__.splitlines()[0], "matrix_charges").parse_args(argv)
    docs = DocsBlock(args, __file__, argv)  # checks the docs block before measuring
    t0 = time.perf_counter()
    steps = 30 if args.quick else 100
    scale_df, break_df = scaling(steps), breaking(steps)
    out = Path(args.out)
    command = "python analysis/matrix_charges.py"
    write_table(
        scale_df,
        out / "scaling",
        "GL charge of a 2-layer linear net under small-step GD",
        command,
        docs=docs,
    )
    write_table(break_df, out / "breaking", "What breaks the GL charge", command, docs=docs)
    docs.write()
    print(scale_df.to_string(), break_df.to_string(), f"{time.perf_counter() - t0:.1f} s", sep="\n")
    return scale_df, break_df


if __name__ == "__main__":
    main()
