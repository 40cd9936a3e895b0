"""Cost of weight decay's true share (noether_dyn.quantities.momentum.DecayShare) per step.

The true share under momentum or Adam's first moment needs one parameter-sized accumulator per
tracked tensor (+1x parameter bytes) and, per step, one fused multiply-add over it plus one dot
product per tensor (``share_stats``). This script measures, in one process with interleaved arms,
the median time of a training step (forward, backward, optimizer step, a copy of q_n and, for
Adam, its metric: what a monitor does anyway) with and without ``DecayShare.step`` +
``share_stats`` after it, on a float32 MLP (about 1.1M parameters) for
SGD with momentum and Adam with coupled L2, and prints the ratio, the added time against the
step, and the accumulator's bytes over the parameters' bytes.

Run: ``python benchmarks/decay_share.py [--steps N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from noether_dyn.quantities.momentum import DecayShare, share_stats


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 768), nn.ReLU(), nn.Linear(768, 10)
    )


def _bench(family: str, steps: int) -> dict:
    model = _model()
    params = list(model.parameters())
    if family == "sgd":
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.Adam(params, lr=1e-3, weight_decay=5e-4)
    share = DecayShare(family)
    x = torch.randn(64, 256)
    y = torch.randint(0, 10, (64,))
    cpu = torch.device("cpu")
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * steps + 10):
        on = bool(i % 2)
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        before = [p.detach().clone() for p in params]  # both arms: the monitor has q_n
        opt.step()
        k = i // 2 + 1
        group = opt.param_groups[0]
        metric, mom = None, group.get("momentum", 0.0)
        if family == "adam":  # both arms: the monitor reads the metric anyway
            b2 = group["betas"][1]
            metric = [
                (opt.state[p]["exp_avg_sq"] / (1 - b2**k)).sqrt() + group["eps"] for p in params
            ]
            mom = group["betas"][0]
        if on:
            e = share.step(before, group["lr"], group["weight_decay"], mom, 0.0, metric, k)
            share_stats(before, e, cpu)
        if i >= 10:
            times[on].append(time.perf_counter() - t0)
    base, with_share = statistics.median(times[False]), statistics.median(times[True])
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    acc_bytes = sum(a.numel() * a.element_size() for a in share.acc or [])
    return {
        "family": family,
        "params": sum(p.numel() for p in params),
        "step_ms": 1e3 * base,
        "ratio": with_share / base,
        "added/step": (with_share - base) / base,
        "acc/params": acc_bytes / param_bytes,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args(argv)
    rows = [_bench(f, args.steps) for f in ("sgd", "adam")]
    for r in rows:
        print(
            f"{r['family']:5s} params {r['params']:,}  step {r['step_ms']:.2f} ms  "
            f"ratio {r['ratio']:.3f}  added/step {r['added/step']:+.3f}  "
            f"acc/params {r['acc/params']:.2f}"
        )
    return rows


if __name__ == "__main__":
    main()
