"""What streaming to TensorBoard costs (issue 15, item 4), in one process.

1. A flush's emit: ``SinkSet.emit`` of ``--rows`` logged steps with 0, 10 and 100 symmetries
   (12 step scalars + 11 per symmetry), to a no-op sink (the tag mapping alone) and to a
   ``TensorBoardSink``: milliseconds per flush and microseconds per scalar.
2. Training: a small BatchNorm MLP trained ``--steps`` steps under ``watch`` with and without a
   ``TensorBoardSink`` (``flush_every=100``), interleaved ``--repeats`` times; the median ratio.

Run: ``python benchmarks/sinks_overhead.py [--rows 100] [--steps 300] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import noether_dyn as nd
from noether_dyn.records import CHARGE_COLUMNS, STEP_COLUMNS
from noether_dyn.sinks import SinkSet, TensorBoardSink


class _Null:
    def write(self, step, scalars):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def emit_cost(rows: int, n_sym: int, tmp: Path) -> tuple[float, float, int]:
    """(ms per flush with a no-op sink, ms per flush to TensorBoard, scalars per flush)."""
    rng = np.random.default_rng(0)
    steps = rng.standard_normal((rows, len(STEP_COLUMNS)))
    steps[:, STEP_COLUMNS.index("step")] = np.arange(rows)
    charges = rng.standard_normal((rows, n_sym, len(CHARGE_COLUMNS)))
    names = [f"scale:{i}" for i in range(n_sym)]
    out = []
    for sink in (_Null(), TensorBoardSink(tmp / f"tb-{n_sym}")):
        sinks = SinkSet([sink], names)
        t0 = time.perf_counter()
        sinks.emit(steps, np.arange(rows), charges)
        out.append((time.perf_counter() - t0) * 1e3)
        sinks.close()
    n_scalars = rows * (len(STEP_COLUMNS) - 1 + n_sym * len(CHARGE_COLUMNS))
    return out[0], out[1], n_scalars


def train(run_dir: Path, steps: int, sinks: list) -> float:
    """Seconds for ``steps`` monitored steps (store and sinks closed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))
    x, y = torch.randn(128, 32), torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scale = nd.Symmetry("scale:0", "scale", ("0.weight", "0.bias"))
    t0 = time.perf_counter()
    with nd.watch(model, opt, run_dir, symmetries=[scale], flush_every=100, sinks=sinks) as mon:
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.log_loss(loss)
            opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"emit of one flush ({args.rows} logged steps)")
        print("symmetries  scalars  no-op ms  tensorboard ms  us/scalar (tensorboard)")
        for n_sym in (0, 10, 100):
            null_ms, tb_ms, n = emit_cost(args.rows, n_sym, tmp)
            print(f"{n_sym:10d}  {n:7d}  {null_ms:8.2f}  {tb_ms:14.2f}  {1e3 * tb_ms / n:9.2f}")
        base, streamed = [], []
        for i in range(args.repeats):
            base.append(train(tmp / f"a{i}", args.steps, []))
            streamed.append(train(tmp / f"b{i}", args.steps, [TensorBoardSink(tmp / f"tb{i}")]))
        b, s = statistics.median(base), statistics.median(streamed)
        print(
            f"\ntraining {args.steps} steps (median of {args.repeats}): watch {b:.3f} s, "
            f"watch + TensorBoardSink {s:.3f} s, ratio {s / b:.3f}"
        )


if __name__ == "__main__":
    main()
