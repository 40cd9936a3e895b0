"""Subprocess worker of tests/test_capture_faults.py: kill a resuming monitor at a random point.

``python -m tests._resume_kill_worker RUN_DIR CHECKPOINT_JSON SEED`` opens the run with
``watch(resume=True)``, then calls ``load_state_dict`` (the checkpoint's step is before the stored
steps, so it truncates the store) and SIGKILLs its own process at the K-th traced event of that
call (Python lines of noether_dyn and SQLite virtual-machine progress callbacks alike), K drawn
from SEED over the events a dry run on a copy of the store counts. Prints ``survived`` when K fell
after the call's last event.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile

import numpy as np
import torch

import noether_dyn as nd
from tests.conftest import relu_mlp

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


def main() -> None:
    run_dir, ckpt, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(ckpt) as fh:
        state = json.load(fh)
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "run")
        shutil.copytree(run_dir, copy)
        dry = Counter(None)
        resume_and_load(copy, state, dry)
    kill_at = int(np.random.default_rng(seed).integers(1, dry.n + 2))
    print(f"events {dry.n} kill_at {kill_at}", flush=True)
    resume_and_load(run_dir, state, Counter(kill_at))
    print("survived", flush=True)


if __name__ == "__main__":
    main()
