"""Cost of ``watch(..., exact_decay=True)``: weight decay's true share (capture/decay.py) per step.

The true share under a buffer (SGD's momentum, Adam's first moment, RMSprop's momentum) needs one
parameter-sized accumulator per tracked tensor (+1x their bytes); every rule needs, per step, the
rebuilt update dq_n (for q_n = q_{n+1} - dq_n), the preconditioner P_n (adaptive rules), one pass
over the accumulator and two reductions per tensor. This script trains two copies of a float32
BatchNorm MLP (about 1.1M parameters, symmetries found by ``watch``) side by side in one process,
each under its own monitor (``every=10``), one with ``exact_decay=True``, stepping the arms in
alternation, and prints per rule the median step time of each arm (forward, backward, optimizer
step and the monitor), their ratio, and the accumulators' bytes over the parameters' bytes.

Run: ``python benchmarks/decay_share.py [--steps N]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import noether_dyn as nd

RULES = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=5e-4),
    "sgd-nesterov": lambda ps: torch.optim.SGD(
        ps, lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True
    ),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=5e-4),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, weight_decay=5e-4),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, weight_decay=5e-4),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(256, 1024),
        nn.BatchNorm1d(1024),
        nn.ReLU(),
        nn.Linear(1024, 768),
        nn.BatchNorm1d(768),
        nn.ReLU(),
        nn.Linear(768, 10),
    )


def _bench(rule: str, steps: int, root: Path) -> dict:
    x = torch.randn(64, 256)
    y = torch.randint(0, 10, (64,))
    arms = []
    for exact in (False, True):
        model = _model()
        opt = RULES[rule](model.parameters())
        mon = nd.watch(model, opt, root / f"{rule}-{exact}", every=10, exact_decay=exact)
        arms.append((model, opt, mon))
    times: list[list[float]] = [[], []]
    for i in range(2 * (steps + 5)):
        arm = i % 2
        model, opt, mon = arms[arm]
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        mon.log_loss(loss)
        opt.step()
        if i >= 10:
            times[arm].append(time.perf_counter() - t0)
    share = arms[1][2]._prediction.exact_decay
    param_bytes = sum(p.numel() * p.element_size() for p in arms[1][0].parameters())
    for _, _, mon in arms:
        mon.close()
    base, exact = statistics.median(times[0]), statistics.median(times[1])
    return {
        "rule": rule,
        "params": sum(p.numel() for p in arms[0][0].parameters()),
        "step_ms": 1e3 * base,
        "exact_ms": 1e3 * exact,
        "ratio": exact / base,
        "acc/params": (share.nbytes if share is not None else 0) / param_bytes,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rule in RULES:
            r = _bench(rule, args.steps, Path(tmp))
            rows.append(r)
            print(
                f"{r['rule']:12s} params {r['params']:,}  step {r['step_ms']:.2f} ms  "
                f"exact_decay {r['exact_ms']:.2f} ms  ratio {r['ratio']:.3f}  "
                f"acc/params {r['acc/params']:.2f}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
