"""Write-ahead log during training: its largest size, the log bytes one flush adds, the store's
size and the time to read it back, for SQLite settings side by side in one process.

A real run: an MLP with BatchNorm (``--layers`` hidden layers of 64) trained with SGD+momentum
under ``noether_dyn.watch`` (``--steps`` steps, a flush every ``--flush`` steps). The arms:

- ``before``: 64 KiB pages with SQLite's default checkpoint (every 1000 pages) and no size limit
  on the log (the store before issue 14);
- ``64 KiB pages``: the store's checkpoint thresholds (``noether_dyn.store.writer``: a
  checkpoint every ``WAL_CHECKPOINT_BYTES``, the log truncated to ``JOURNAL_LIMIT`` bytes) with
  64 KiB pages;
- ``store``: the store's settings (``create.PAGE_SIZE`` pages).

Run: ``python benchmarks/store_wal.py [--steps 1000] [--flush 10] [--layers 8]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import noether_dyn as nd
from noether_dyn.store import create, writer


def _model(layers: int) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Linear(16, 64)]
    for _ in range(layers):
        mods += [nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64)]
    return nn.Sequential(*mods, nn.ReLU(), nn.Linear(64, 4))


def run_arm(run_dir: Path, steps: int, flush: int, layers: int) -> dict[str, float]:
    model = _model(layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    mon = nd.watch(model, opt, run_dir, inputs=x, flush_every=flush, flush_seconds=3600)
    wal = run_dir / "run.sqlite-wal"
    sizes, growth = [], []
    for n in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        mon.log_loss(loss)
        before = wal.stat().st_size if wal.exists() else 0
        opt.step()
        if (n + 1) % flush == 0:
            after = wal.stat().st_size if wal.exists() else 0
            sizes.append(after)
            if after > before:
                growth.append(after - before)
    symmetries = len(mon.symmetries)
    mon.close()
    t0 = time.perf_counter()
    run = nd.load_run(run_dir)
    run.charge_array()
    run.tensor_array()
    read_s = time.perf_counter() - t0
    return {
        "symmetries": symmetries,
        "largest WAL MB": max(sizes) / 2**20,
        "WAL kB/flush": statistics.median(growth) / 1024 if growth else float("nan"),
        "store MB": os.path.getsize(run_dir / "run.sqlite") / 2**20,
        "read s": read_s,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--flush", type=int, default=10)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args(argv)
    page, budget, limit = create.PAGE_SIZE, writer.WAL_CHECKPOINT_BYTES, writer.JOURNAL_LIMIT
    arms = {
        "before": (65536, 1000 * 65536, -1),
        "64 KiB pages": (65536, budget, limit),
        "store": (page, budget, limit),
    }
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, (page_size, checkpoint, journal) in arms.items():
                create.PAGE_SIZE = page_size
                writer.WAL_CHECKPOINT_BYTES = checkpoint
                writer.JOURNAL_LIMIT = journal
                row = {
                    "arm": name,
                    **run_arm(Path(tmp) / name, args.steps, args.flush, args.layers),
                }
                rows.append(row)
                print(
                    "  ".join(
                        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()
                    ),
                    flush=True,
                )
    finally:
        create.PAGE_SIZE, writer.WAL_CHECKPOINT_BYTES, writer.JOURNAL_LIMIT = page, budget, limit
    return rows


if __name__ == "__main__":
    main()
