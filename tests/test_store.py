"""The run store: crash safety, concurrent reading, bad files, schema versions, resume."""

from __future__ import annotations

import copy
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import noether_dyn as nd
from noether_dyn.store import SCHEMA_VERSION, StoreError
from tests.conftest import batch, bn_mlp

ROOT = Path(__file__).resolve().parents[1]

TRAINER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {root!r})
    import noether_dyn as nd
    from tests.conftest import bn_mlp, batch
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mon = nd.watch(model, opt, {run_dir!r}, flush_every=5, flush_seconds=3600)
    x, y = batch()
    step = 0
    while True:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        mon.log_loss(loss)
        opt.step()
        step += 1
        if step == 23:
            print("flushed", flush=True)
    """
)


def test_sigkill_loses_at_most_the_unflushed_steps(run_dir):
    code = TRAINER.format(root=str(ROOT), run_dir=str(run_dir))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "flushed"
        # readable while the run still writes
        live = nd.load_run(run_dir)
        assert len(live.steps) >= 20
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    run = nd.load_run(run_dir)
    steps = run.steps["step"].tolist()
    assert len(steps) >= 20 and len(steps) % 5 == 0
    assert steps == list(range(len(steps)))  # contiguous, nothing half-written
    assert np.isfinite(run.steps["kinetic"]).all()


def test_missing_store_names_the_path(tmp_path):
    with pytest.raises(StoreError, match=f"No noether-dyn run at '{tmp_path / 'nope'}'"):
        nd.load_run(tmp_path / "nope")


def test_empty_store(tmp_path):
    (tmp_path / "run.sqlite").write_bytes(b"")
    with pytest.raises(StoreError, match="empty \\(0 bytes\\)"):
        nd.load_run(tmp_path)


def test_garbage_store(tmp_path):
    (tmp_path / "run.sqlite").write_bytes(os.urandom(4096))
    with pytest.raises(StoreError, match="not a noether-dyn run store"):
        nd.load_run(tmp_path / "run.sqlite")


def test_truncated_sqlite_store(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nd.watch(model, opt, run_dir).close()
    path = run_dir / "run.sqlite"
    data = path.read_bytes()
    path.write_bytes(data[:100] + os.urandom(len(data) - 100))
    with pytest.raises(StoreError, match=str(path)):
        nd.load_run(run_dir)


def test_other_sqlite_file_is_refused(tmp_path):
    con = sqlite3.connect(tmp_path / "run.sqlite")
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="not a complete noether-dyn run store"):
        nd.load_run(tmp_path)


def test_future_schema_version_is_refused(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nd.watch(model, opt, run_dir).close()
    con = sqlite3.connect(run_dir / "run.sqlite")
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}.*Upgrade"):
        nd.load_run(run_dir)


def test_flush_by_seconds(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = nd.watch(model, opt, run_dir, flush_every=10_000, flush_seconds=0.05)
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        time.sleep(0.06)
    assert len(nd.load_run(run_dir).steps) == 3  # flushed without close()
    mon.close()


def _loop(model, opt, mon, steps, x, y):
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        mon.log_loss(loss)
        opt.step()


SYMS = [
    nd.Symmetry("scale:0", "scale", ("0.weight", "0.bias")),
    nd.Symmetry("translation:3", "translation", ("3.weight", "3.bias")),
]


def test_resume_continues_steps_and_accumulators(tmp_path):
    x, y = batch()
    # reference: one uninterrupted run of 12 steps
    ref_model = bn_mlp()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    with nd.watch(ref_model, ref_opt, tmp_path / "ref", symmetries=SYMS) as mon:
        _loop(ref_model, ref_opt, mon, 12, x, y)
    ref = nd.load_run(tmp_path / "ref")

    # interrupted: checkpoint at step 5, run on to 8, crash, resume from the checkpoint
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    mon = nd.watch(model, opt, tmp_path / "run", symmetries=SYMS)
    _loop(model, opt, mon, 5, x, y)
    ckpt = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "monitor": mon.state_dict()}
    )
    _loop(model, opt, mon, 3, x, y)
    mon.flush()  # steps 5..7 reached the store before the "crash"
    mon._writer.close()  # simulate the process dying: no close(), hooks gone with it
    for h in mon._handles:
        h.remove()

    model2 = bn_mlp(seed=99)
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt2.load_state_dict(ckpt["opt"])
    with nd.watch(model2, opt2, tmp_path / "run", symmetries=SYMS, resume=True) as mon2:
        mon2.load_state_dict(ckpt["monitor"])
        assert mon2.step == 5
        _loop(model2, opt2, mon2, 7, x, y)
    run = nd.load_run(tmp_path / "run")
    assert run.steps["step"].tolist() == list(range(12))
    cols = ["time", "lr", "loss", "kinetic", "log_prefactor"]
    np.testing.assert_allclose(run.steps[cols], ref.steps[cols], rtol=1e-12)
    c, rc = run.charges, ref.charges
    assert len(c) == len(rc) == 24
    num = ["charge", "predicted", "decay", "rule", "ksb"]
    np.testing.assert_allclose(c[num].to_numpy(), rc[num].to_numpy(), rtol=1e-10, atol=1e-14)
    assert "resume" in run.events["kind"].tolist()


def test_resume_from_the_store_alone(tmp_path):
    x, y = batch()
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with nd.watch(model, opt, tmp_path / "run") as mon:
        _loop(model, opt, mon, 4, x, y)
    with nd.watch(model, opt, tmp_path / "run", resume=True) as mon:
        assert mon.step == 4
        _loop(model, opt, mon, 3, x, y)
    steps = nd.load_run(tmp_path / "run").steps
    assert steps["step"].tolist() == list(range(7))
    assert steps["time"].iloc[-1] == pytest.approx(6 * 0.05)


def test_resume_without_a_run_is_refused(tmp_path):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(StoreError, match="Cannot resume: no run at"):
        nd.watch(model, opt, tmp_path / "none", resume=True)


def test_charges_table_is_long_format(run_dir):
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with nd.watch(model, opt, run_dir, symmetries=SYMS, flush_every=2) as mon:
        _loop(model, opt, mon, 5, *batch())
    run = nd.load_run(run_dir)
    assert isinstance(run.charges, pd.DataFrame)
    assert len(run.charges) == 10
    assert set(run.charges["symmetry"]) == {"scale:0", "translation:3"}
    assert run.charge("scale:0").index.tolist() == list(range(5))
    assert set(run.symmetries.columns) >= {"symmetry", "kind", "params", "verified", "defect"}
    with pytest.raises(KeyError, match="No symmetry 'nope'"):
        run.charge("nope")
