"""Subprocess worker of tests/test_capture_faults.py: kill a resuming monitor at a random point.

``python -m tests._resume_kill_worker RUN_DIR CHECKPOINT_JSON N_POINTS``: a dry run on a copy of
the store counts the events of ``load_state_dict`` after ``watch(resume=True)`` (the checkpoint's
step is before the stored steps, so it truncates the store): Python lines of noether_dyn and
SQLite virtual-machine progress callbacks alike. Then, for about N_POINTS kill points K evenly
spread over all of them, a forked process repeats that on a fresh copy and SIGKILLs itself at
event K, and this process resumes the copy as a new run would (``watch(resume=True)``, 3 steps).
Prints one JSON object: the event count and, per K, whether the fork was killed, the resumed
step and the stored steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile

import torch

import noether_dyn as nd
from tests.conftest import relu_mlp, train

SYMS = [nd.Symmetry("r", "rescale", ("0.weight", "0.bias", "2.weight"), (1.0, 1.0, -1.0))]


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


def resume_and_load(run_dir: str, state: dict, counter: Counter) -> None:
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mon = nd.watch(model, opt, run_dir, symmetries=SYMS, resume=True)
    mon._writer.con.set_progress_handler(counter.tick, 1)
    sys.settrace(counter.trace)
    try:
        mon.load_state_dict(state)
    finally:
        sys.settrace(None)
        mon._writer.con.set_progress_handler(None, 1)
    mon.close()


def resume_after(run_dir: str) -> dict:
    """Resume the run as a new process would and train 3 steps: where it started, its steps."""
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with nd.watch(model, opt, run_dir, symmetries=SYMS, resume=True) as mon:
        start = mon.step
        train(model, opt, mon, steps=3)
    return {"start": start, "steps": nd.load_run(run_dir).steps["step"].tolist()}


def main() -> None:
    run_dir, ckpt, n_points = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(ckpt) as fh:
        state = json.load(fh)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        dry = Counter(None)
        shutil.copytree(run_dir, os.path.join(tmp, "dry"))
        resume_and_load(os.path.join(tmp, "dry"), state, dry)
        spread = range(1, dry.n + 2, max(1, (dry.n + 1) // n_points))
        # and the last events densely: the commit sits near the end of load_state_dict
        tail = range(max(1, dry.n - n_points // 4), dry.n + 2)
        for kill_at in sorted(set(spread) | set(tail)):
            copy = os.path.join(tmp, f"k{kill_at}")
            shutil.copytree(run_dir, copy)
            pid = os.fork()
            if pid == 0:  # the process that dies at event kill_at
                try:
                    resume_and_load(copy, state, Counter(kill_at))
                finally:
                    os._exit(0)
            _, status = os.waitpid(pid, 0)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            results.append({"kill_at": kill_at, "killed": killed, **resume_after(copy)})
    print(json.dumps({"events": dry.n, "results": results}), flush=True)


if __name__ == "__main__":
    main()
