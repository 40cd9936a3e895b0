"""Thread-CPU A/B of the eager statistics path: plain, watched by an older revision, watched by
the working tree, in one process (docs/performance.md, "Small models on the eager path").

The older revision's package is exported with ``git archive`` into a temporary folder and
imported as ``noether_dyn_old`` (its imports renamed), so both versions run side by side on
identical models. Each round runs one training step per arm, the arms' order rotated; a step is
timed with ``time.thread_time`` (CPU time of this thread: on a loaded machine wall time mostly
measures descheduling). Printed: the median added ``opt.step()`` CPU time per logged step of each
watched arm over the plain one (ms, interquartile range of the paired differences in brackets,
share of the plain whole step's CPU time), and new/old ratios of the added time, overall and
per fifth of the run.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/eager_ab.py --old HEAD~3 --size 1 --opt adamw
--sym 1`` (size: index into ``overhead.sweep_mlp``: 0 = 0.06M, 1 = 0.27M parameters).
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from overhead import sweep_mlp  # noqa: E402

import noether_dyn as nd  # noqa: E402


def import_old(rev: str, folder: Path):
    """The package at git revision ``rev`` imported as ``noether_dyn_old``."""
    blob = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "noether_dyn"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "noether_dyn").rename(folder / "noether_dyn_old")
    for path in (folder / "noether_dyn_old").rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\bnoether_dyn\b", "noether_dyn_old", text))
    sys.path.insert(0, str(folder))
    return importlib.import_module("noether_dyn_old")


def make(lib, args, run_dir: Path):
    """(model, optimizer, x, y, monitor or None) on the eager path (``fused=False``)."""
    torch.manual_seed(0)
    model, x, y = sweep_mlp(args.size)
    if args.opt == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    monitor = None
    if lib is not None:
        kw = {} if args.sym else {"symmetries": []}
        monitor = lib.watch(
            model, opt, run_dir / lib.__name__, fused=False, overwrite=True,
            flush_every=10**9, flush_seconds=1e9, **kw,
        )  # fmt: skip
    return model, opt, x, y, monitor


def step(arm) -> tuple[float, float]:
    """One training step; the thread CPU time of the whole step and of its ``opt.step()`` (s)."""
    model, opt, x, y, monitor = arm
    start = time.thread_time()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if monitor is not None:
        monitor.log_loss(loss)
    t0 = time.thread_time()
    opt.step()
    end = time.thread_time()
    return end - start, end - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", default="HEAD", help="git revision of the old arm")
    p.add_argument("--size", type=int, default=1)
    p.add_argument("--opt", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--sym", type=int, default=0, help="1: detected symmetries, 0: none")
    p.add_argument("--rounds", type=int, default=150)
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        old = import_old(args.old, Path(tmp) / "pkg")
        arms = {n: make(lib, args, Path(tmp)) for n, lib in (("plain", None), ("old", old),
                                                            ("new", nd))}  # fmt: skip
        names = list(arms)
        for _ in range(20):  # warm-up (also past symmetry detection)
            for n in names:
                step(arms[n])
        times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names[r % 3 :] + names[: r % 3]:
                times[n].append(step(arms[n]))
        for arm in arms.values():
            if arm[4] is not None:
                arm[4].close()
    plain = statistics.median(whole for whole, _ in times["plain"])
    added = {}
    for n in ("old", "new"):
        diffs = [w[1] - q[1] for w, q in zip(times[n], times["plain"])]
        lo, med, hi = statistics.quantiles(diffs, n=4)
        added[n] = statistics.median(diffs)
        print(f"{n}: added {added[n] * 1e3:.2f} ms [{lo * 1e3:.2f}, {hi * 1e3:.2f}], "
              f"{added[n] / plain:.0%} of the plain step ({plain * 1e3:.2f} ms)")  # fmt: skip
    k = args.rounds // 5
    blocks = []
    for b in range(5):
        part = slice(b * k, (b + 1) * k)
        med = {
            n: statistics.median(w[1] - q[1] for w, q in zip(times[n][part], times["plain"][part]))
            for n in ("old", "new")
        }
        blocks.append(med["new"] / med["old"])
    print(f"new/old added: {added['new'] / added['old']:.2f} (per fifth: "
          + " ".join(f"{b:.2f}" for b in blocks) + ")")  # fmt: skip


if __name__ == "__main__":
    main()
