"""Subprocess worker of tests/test_matrix_charges_monitor.py: kill a flush that carries matrix
charges at many points and report what each store holds.

``python -m tests._matrix_kill_worker ROOT N_POINTS``: a run of a two-layer linear net (one
rescale symmetry, one GL record, ``flush_every=2``) trains 6 steps; its third flush (steps 4
and 5, from the step hook) is the one under test. A dry run counts the events of that flush:
Python lines of noether_dyn and SQLite virtual-machine progress callbacks alike. Then, for
about N_POINTS kill points K spread evenly over them (and the last N_POINTS / 4 events
densely), a forked process trains the same run in a fresh directory and SIGKILLs itself at
event K, and this process reads the store it left. Prints one JSON object: the event count
and, per K, whether the fork was killed and the steps of the ``steps`` table, of the charge
block and of the ``matrix_charges`` table.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
from torch import nn

import noether_dyn as nd
from noether_dyn.symmetries.matrix import MatrixSymmetry

SYMS = [nd.Symmetry("r", "rescale", ("0.weight", "0.bias", "1.weight"), (1.0, 1.0, -1.0))]
GL = MatrixSymmetry.from_dict(
    {"name": "gl:0>1", "kind": "composed", "n": 5,
     "left": [["0.weight", 0, 0, 5], ["0.bias", 0, 0, 5]], "right": [["1.weight", 1, 0, 5]]}
)  # fmt: skip


class Counter:
    """Counts events; at event ``kill_at`` the process SIGKILLs itself."""

    def __init__(self, kill_at: int | None) -> None:
        self.n, self.kill_at = 0, kill_at

    def tick(self) -> int:
        self.n += 1
        if self.kill_at is not None and self.n >= self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0

    def trace(self, frame, event, arg):
        if "noether_dyn" not in frame.f_code.co_filename:
            return None
        if event == "line":
            self.tick()
        return self.trace


def train(run_dir: str, counter: Counter) -> None:
    """6 SGD steps; the events of the third flush (after step 5) go to ``counter``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).double()
    x = torch.randn(32, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = x[:, :4].clone()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = nd.watch(model, opt, run_dir, symmetries=SYMS, matrix_charges=[GL], flush_every=2)
    for step in range(6):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.log_loss(loss)
        if step == 5:  # this step's end flushes steps 4 and 5: count (and kill) inside it
            mon.flush = counted(mon.flush, mon._writer.con, counter)
        opt.step()
    mon.close()


def counted(flush, con, counter: Counter):
    """``flush`` with ``counter`` ticking on every SQLite VM step and noether_dyn line."""

    def run() -> None:
        con.set_progress_handler(counter.tick, 1)
        sys.settrace(counter.trace)
        try:
            flush()
        finally:
            sys.settrace(None)
            con.set_progress_handler(None, 1)

    return run


def stored(run_dir: str) -> dict:
    run = nd.load_run(run_dir)
    charge_steps, _ = run.charge_array()
    return {
        "steps": sorted(int(s) for s in run.steps["step"]),
        "charge_steps": sorted(int(s) for s in charge_steps),
        "matrix_steps": sorted({int(s) for s in run.matrix_charges["step"]}),
    }


def main() -> None:
    root, n_points = sys.argv[1], int(sys.argv[2])
    dry = Counter(None)
    train(os.path.join(root, "dry"), dry)
    results = [{"kill_at": None, "killed": False, **stored(os.path.join(root, "dry"))}]
    spread = range(1, dry.n + 2, max(1, (dry.n + 1) // n_points))
    tail = range(max(1, dry.n - n_points // 4), dry.n + 2)
    for kill_at in sorted(set(spread) | set(tail)):
        run_dir = os.path.join(root, f"k{kill_at}")
        pid = os.fork()
        if pid == 0:  # the process that dies at event kill_at
            try:
                train(run_dir, Counter(kill_at))
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        results.append({"kill_at": kill_at, "killed": killed, **stored(run_dir)})
    print(json.dumps({"events": dry.n, "results": results}), flush=True)


if __name__ == "__main__":
    main()
