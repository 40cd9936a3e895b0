"""Quick start: watch a training loop with one line, then read the run back.

A small BatchNorm MLP learns a synthetic 4-class problem with SGD + momentum + weight decay.
Run: ``python examples/quickstart.py [--out DIR] [--steps N]``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import noether_dyn as nd


def main(argv: list[str] | None = None) -> nd.Run:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/quickstart", help="run directory (replaced)")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(2048, 20)
    y = (x[:, :4] @ torch.randn(4, 4)).argmax(1)
    model = nn.Sequential(
        nn.Linear(20, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 4),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()

    # the one added line: the symmetries are found on the first batch the loop trains on
    monitor = nd.watch(model, optimizer, args.out, overwrite=True)
    with monitor:
        for _ in range(args.steps):
            idx = torch.randint(0, len(x), (128,))
            loss = loss_fn(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            monitor.log_loss(loss)  # optional: the potential V
            optimizer.step()

    run = nd.load_run(args.out)
    print(run)
    print(run.steps[["step", "time", "loss", "kinetic", "log_prefactor"]].tail(3).to_string())
    last = run.charges[run.charges["step"] == run.charges["step"].max()]
    print(last[["symmetry", "charge", "predicted", "defect"]].to_string(index=False))
    return run


if __name__ == "__main__":
    main()
