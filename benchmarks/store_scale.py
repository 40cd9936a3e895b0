"""Run store at scale: N steps x S symmetries written through the real writer, then read back.

Prints the store's bytes per step, the time of ``load_run`` (metadata, steps, groups, symmetries
and the raw charge blocks) and the time to materialize the long ``run.charges`` table.
Target (issue "Performance"): 100k steps x 200 symmetries, ``load_run`` in <= 3 s.

Run: ``python benchmarks/store_scale.py [--steps 100000] [--symmetries 200] [--block 1000]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import noether_dyn as nd
from noether_dyn.store import CHARGE_COLUMNS, RunWriter
from noether_dyn.store.schema import GROUP_COLUMNS, STEP_COLUMNS


def write_store(path: Path, steps: int, n_sym: int, block: int) -> float:
    """Write a synthetic run; returns the seconds spent in the writer."""
    writer = RunWriter(path, "new")
    writer.set_meta({"schema_version": 1, "optimizer": {"class": "SGD"}, "every": 1})
    writer.set_symmetries(
        [nd.Symmetry(f"scale:layer{i}", "scale", (f"layer{i}.weight",)) for i in range(n_sym)]
    )
    rng = np.random.default_rng(0)
    spent = 0.0
    for first in range(0, steps, block):
        n = min(block, steps - first)
        idx = np.arange(first, first + n, dtype=np.float64)
        step_rows = np.column_stack([idx, *rng.random((len(STEP_COLUMNS) - 1, n))])
        group_rows = np.column_stack([idx, np.zeros(n), *rng.random((len(GROUP_COLUMNS) - 2, n))])
        charges = rng.random((n, n_sym, len(CHARGE_COLUMNS)))
        t0 = time.perf_counter()
        writer.append(step_rows, group_rows, idx.astype(np.int64), charges, [], {})
        spent += time.perf_counter() - t0
    writer.close()
    return spent


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--symmetries", type=int, default=200)
    parser.add_argument("--block", type=int, default=1000, help="steps per flush")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run"
        write_s = write_store(path, args.steps, args.symmetries, args.block)
        size = sum(f.stat().st_size for f in path.iterdir())
        t0 = time.perf_counter()
        run = nd.load_run(path)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        charges = run.charges
        charges_s = time.perf_counter() - t0
        assert len(charges) == args.steps * args.symmetries
        assert len(run.steps) == args.steps
    result = {
        "steps": args.steps,
        "symmetries": args.symmetries,
        "bytes/step": size / args.steps,
        "write s/1k steps": write_s / args.steps * 1000,
        "load_run s": load_s,
        "run.charges s": charges_s,
    }
    for k, v in result.items():
        print(f"{k:>18}: {v:,.3f}" if isinstance(v, float) else f"{k:>18}: {v:,}")
    return result


if __name__ == "__main__":
    main()
