"""Fault injection on the capture side (issue 14, items 2, 5, 9 and 10): 16-bit and complex
parameters, duplicated parameters, wrong arguments, storage failures, threads and kills."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import noether_dyn as nd
from noether_dyn.capture.monitor import MonitorFailure
from noether_dyn.store import StoreError
from tests.conftest import relu_mlp, train

ROOT = Path(__file__).resolve().parents[1]
RESCALE = nd.Symmetry("r", "rescale", ("0.weight", "0.bias", "2.weight"), (1.0, 1.0, -1.0))


def _charge64(model: nn.Module) -> float:
    """The rescale charge |W1|^2 + |b1|^2 - |W2|^2 recomputed in float64 from the parameters."""
    p = {n: t.detach().to(torch.float64) for n, t in model.named_parameters()}
    return float(p["0.weight"].square().sum() + p["0.bias"].square().sum()
                 - p["2.weight"].square().sum())  # fmt: skip


# --- item 9: 16-bit parameters --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_16bit_charge_follows_its_true_value_and_the_split_closes(run_dir, dtype, fused, opt_name):
    """Every statistic of a bf16/fp16 model is a float64 sum of products of 16-bit numbers (each
    product exact in float64) and dq = q_{n+1} - q_n is exact in float64, so the only error is
    float64 summation rounding: at most n_entries * eps64 = 132 * 1.1e-16 ~ 1.5e-14 of |Q| for
    these 132 entries. The tolerance 1e-12 |Q| leaves a factor ~70 over that bound; the old
    code, accumulating in the parameter's dtype, missed by ~2e-3 |Q| and kept the charge
    constant while the true one moved."""
    model = relu_mlp(dtype=dtype)
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        if opt_name == "sgd"
        else torch.optim.Adam(model.parameters(), lr=3e-3, eps=1e-3, weight_decay=1e-3)  # fp16 eps
    )
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 6, generator=gen).to(dtype), torch.randint(0, 4, (32,), generator=gen)
    true, norms = [], []
    with nd.watch(model, opt, run_dir, symmetries=[RESCALE], fused=fused) as mon:
        for _ in range(8):
            true.append(_charge64(model))
            norms.append(torch.cat([p.detach().double().flatten() for p in model.parameters()]))
            loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad()
            loss.backward()
            mon.log_loss(loss)
            opt.step()
    c = nd.load_run(run_dir).charges
    q, true = c["charge"].to_numpy(), np.array(true)
    norms = np.array([float(v.norm()) for v in norms])
    scale = np.abs(true).max()
    np.testing.assert_allclose(q, true, rtol=0, atol=1e-12 * scale)
    assert len(np.unique(true)) == len(true)  # the true charge moved at every step ...
    assert len(np.unique(q)) == len(q)  # ... and so did the measured one
    split = (c["decay"] + c["rule"] + c["ksb"]).to_numpy()[:-1]
    np.testing.assert_allclose(split, np.diff(true), rtol=0, atol=1e-12 * scale)
    # |q_n| over all tensors (param_norm) from the same float64 accumulation
    stored = nd.load_run(run_dir).steps["param_norm"].to_numpy()
    np.testing.assert_allclose(stored, norms, rtol=1e-12)


def test_complex_parameters_are_refused_and_nothing_is_written(run_dir):
    model = nn.Sequential(nn.Linear(3, 2)).to(torch.complex64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"'0\.weight' is complex.*real"):
        nd.watch(model, opt, run_dir)
    assert not run_dir.exists()


def test_a_parameter_listed_twice_is_refused_and_nothing_is_written(run_dir):
    model = relu_mlp()
    w = model[0].weight
    with pytest.warns(UserWarning, match="duplicate"):  # torch's own warning, then ours
        opt = torch.optim.SGD([w, w, model[2].weight], lr=0.1)
    with pytest.raises(ValueError, match=r"'0\.weight' twice.*each parameter once"):
        nd.watch(model, opt, run_dir)
    assert not run_dir.exists()


# --- item 9: run_dir and Symmetry shapes ----------------------------------------------------


def test_empty_run_dir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = relu_mlp()
    with pytest.raises(ValueError, match="run_dir is empty"):
        nd.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), "")
    assert list(tmp_path.iterdir()) == []


def test_run_dir_ending_in_the_store_file_names_its_directory(tmp_path):
    """Chosen: a path ending in run.sqlite is the store itself, as load_run reads it."""
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nd.watch(model, opt, tmp_path / "a" / "run.sqlite") as mon:
        assert mon.run_dir == tmp_path / "a"
        train(model, opt, mon, steps=3)
    assert (tmp_path / "a" / "run.sqlite").is_file()
    assert not (tmp_path / "a" / "run.sqlite" / "run.sqlite").exists()
    assert nd.load_run(tmp_path / "a").steps["step"].tolist() == [0, 1, 2]


def test_symmetry_given_one_name_as_a_string_wraps_it():
    s = nd.Symmetry("x", "scale", "fc.weight")
    assert s.params == ("fc.weight",) and s.signs == (1.0,)


def _watch_case(**kwargs):
    def call(run_dir):
        model = relu_mlp()
        args = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
        args["run_dir"] = run_dir
        args.update(kwargs)
        return nd.watch(args.pop("model"), args.pop("optimizer"), args.pop("run_dir"), **args)

    return call


def _sym(**kwargs):
    args = {"name": "s", "kind": "scale", "params": ("a",)} | kwargs
    return lambda run_dir: nd.Symmetry(**args)


WRONG = [
    ("model", _watch_case(model="net")),
    ("optimizer", _watch_case(optimizer="sgd")),
    ("run_dir", _watch_case(run_dir=3)),
    ("run_dir", _watch_case(run_dir=b"runs")),
    ("every", _watch_case(every="2")),
    ("every", _watch_case(every=1.5)),
    ("every", _watch_case(every=True)),
    ("flush_every", _watch_case(flush_every="10")),
    ("flush_every", _watch_case(flush_every=0.5)),
    ("flush_seconds", _watch_case(flush_seconds="1")),
    ("flush_seconds", _watch_case(flush_seconds=None)),
    ("resume", _watch_case(resume="yes")),
    ("overwrite", _watch_case(overwrite=1)),
    ("snapshot", _watch_case(snapshot="no")),
    ("fused", _watch_case(fused="auto")),
    ("symmetries", _watch_case(symmetries="scale:0")),
    ("symmetries", _watch_case(symmetries=RESCALE)),
    ("symmetries", _watch_case(symmetries=["scale:0"])),
    ("loss_fn", _watch_case(inputs=torch.zeros(2, 6, dtype=torch.float64), loss_fn="ce")),
    ("name", _sym(name=3)),
    ("kind", _sym(kind=2)),
    ("params", _sym(params=5)),
    ("params", _sym(params=[1, 2])),
    ("signs", _sym(signs="+")),
    ("signs", _sym(signs=["a"])),
    ("verified", _sym(verified="yes")),
    ("defect", _sym(defect="small")),
    ("note", _sym(note=3)),
    ("exactness", _sym(exactness=1)),
    ("path", lambda d: nd.load_run(3)),
    ("path", lambda d: nd.load_run(None)),
    ("path", lambda d: nd.load_run("")),
    ("run", lambda d: nd.report(3, d / "r.html")),
    ("path", lambda d: nd.report(d, None)),
    ("format", lambda d: nd.report(d, d / "r.html", format=3)),
    ("format", lambda d: nd.report(d, d / "r.html", format="pdf")),
    ("path", lambda d: nd.report(d, d / "r.pdf")),
    ("run_a", lambda d: nd.compare(1, d, d / "c.html")),
    ("run_b", lambda d: nd.compare(d, None, d / "c.html")),
    ("path", lambda d: nd.compare(d, d, 2)),
    ("format", lambda d: nd.compare(d, d, d / "c.html", format=["md"])),
]


@pytest.mark.parametrize("name, call", WRONG, ids=[f"{i}-{n}" for i, (n, _) in enumerate(WRONG)])
def test_wrong_arguments_name_the_argument(run_dir, name, call):
    with pytest.raises((TypeError, ValueError)) as info:
        call(run_dir)
    assert name in str(info.value)
    assert not run_dir.exists()  # refused before anything was written


def test_the_argument_table_is_long_enough():
    assert len(WRONG) >= 25


# --- item 5: storage failures ---------------------------------------------------------------


def test_a_storage_error_at_watch_is_a_store_error_naming_the_path(run_dir, monkeypatch):
    from noether_dyn.store import create

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(create, "meta_rows", full)  # raised inside the creating transaction
    model = relu_mlp()
    with pytest.raises(StoreError, match=f"{run_dir}.*disk is full") as info:
        nd.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir)
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)


def _full(*args, **kwargs):
    raise sqlite3.OperationalError("database or disk is full")


def test_close_never_raises_and_keeps_every_completed_flush(run_dir):
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = nd.watch(model, opt, run_dir, symmetries=[RESCALE], flush_every=2)
    train(model, opt, mon, steps=5)  # steps 0-3 flushed, step 4 pending
    mon._store.writer.append = _full  # the documented seam (capture.storage.StoreHandle.writer)
    mon._store.writer.set_meta = _full
    with pytest.warns(MonitorFailure, match=str(run_dir)):
        mon.close()  # must not raise
    run = nd.load_run(run_dir)
    assert run.steps["step"].tolist() == [0, 1, 2, 3]
    assert len(run.charges) == 4
    assert "monitor_error" in run.events["kind"].tolist()


def test_close_warns_when_the_connection_cannot_close(run_dir):
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = nd.watch(model, opt, run_dir)
    train(model, opt, mon, steps=2)
    con = mon._store.writer.con
    mon._store.writer.close = _full
    with pytest.warns(MonitorFailure, match=f"closing the run store '{run_dir}"):
        mon.close()
    con.close()
    assert nd.load_run(run_dir).steps["step"].tolist() == [0, 1]


def test_training_goes_on_when_a_flush_fails_mid_run(run_dir):
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = nd.watch(model, opt, run_dir, flush_every=2)
    train(model, opt, mon, steps=4)
    mon._store.writer.append = _full
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(MonitorFailure, match=f"flush.*{run_dir}"):
        train(model, opt, mon, steps=6)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # trained on
    assert mon.step == 6  # monitoring stopped at the failed flush (steps 4 and 5 lost)
    state = mon.state_dict()  # neither raises nor warns again
    assert state["step"] == 6
    mon.close()
    run = nd.load_run(run_dir)
    assert run.steps["step"].tolist() == [0, 1, 2, 3]
    assert run.meta["monitor_state"]["step"] == 4  # the store's state matches its steps
    assert "monitor_error" in run.events["kind"].tolist()


# --- item 10: wall time and threads ---------------------------------------------------------


def test_wall_time_continues_across_resume(tmp_path):
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = nd.watch(model, opt, tmp_path / "run")
    for _ in range(3):
        train(model, opt, mon, steps=1)
        time.sleep(0.1)
    mon.close()
    first = nd.load_run(tmp_path / "run").steps["wall_time"].to_numpy()
    assert first[-1] >= 0.2
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    with nd.watch(model, opt2, tmp_path / "run", resume=True) as mon2:
        train(model, opt2, mon2, steps=2)
    wall = nd.load_run(tmp_path / "run").steps["wall_time"].to_numpy()
    assert len(wall) == 5
    assert (np.diff(wall) >= 0).all(), wall  # no restart at 0
    assert wall[3] >= first[-1] + 0.1  # the sleep after step 2 counted before the close


def test_state_dict_from_another_thread_does_not_stop_monitoring(run_dir):
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = nd.watch(model, opt, run_dir, symmetries=[RESCALE], flush_every=1)
    errors, stop = [], threading.Event()

    def checkpointer():
        while not stop.is_set():
            try:
                mon.state_dict()
            except Exception as exc:  # reported below
                errors.append(exc)

    thread = threading.Thread(target=checkpointer)
    thread.start()
    try:
        # 200 steps: on the old code the two threads' transactions collided within ~150 steps
        train(model, opt, mon, steps=200)  # a MonitorFailure would raise here (pyproject)
    finally:
        stop.set()
        thread.join()
    mon.close()
    assert errors == []
    run = nd.load_run(run_dir)
    assert run.steps["step"].tolist() == list(range(200))
    assert "monitor_error" not in run.events["kind"].tolist()


# --- item 2: no gap after a kill inside load_state_dict -------------------------------------


def test_a_kill_anywhere_inside_load_state_dict_leaves_no_gap(tmp_path):
    """A checkpoint at step 4, the store at step 9, then a process resumes from the checkpoint
    and is SIGKILLed inside load_state_dict, at ~60 points spread over every Python line and
    SQLite VM step of it (tests/_resume_kill_worker.py). Each time, the next resume must continue
    without a gap: from before the truncation (steps 0-9, resumed at 10) or after it (steps 0-3,
    resumed at 4). Truncation and the stored monitor state in two transactions would leave
    steps 0-3 with the state at 10: a resume at 10 and a gap 4-9."""
    run = tmp_path / "run"
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with nd.watch(model, opt, run, symmetries=[RESCALE], flush_every=3) as mon:
        train(model, opt, mon, steps=4)
        ckpt = mon.state_dict()
        train(model, opt, mon, steps=6)
    (tmp_path / "ckpt.json").write_text(json.dumps(ckpt))
    proc = subprocess.run(
        [sys.executable, "-m", "tests._resume_kill_worker", str(run), str(tmp_path / "ckpt.json"),
         "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    results = out["results"]
    assert len(results) >= 50 and sum(r["killed"] for r in results) >= 50
    for r in results:
        assert r["start"] in (4, 10), r
        assert r["steps"] == list(range(r["start"] + 3)), r
    # the sweep reached both sides of the commit
    assert {r["start"] for r in results if r["killed"]} == {4, 10}


def test_nd_report_is_callable_whichever_import_came_first(tmp_path):
    """``import noether_dyn.report.sections`` (as the CLI does) binds ``nd.report`` to the
    package; calling it must still write the report."""
    import importlib

    importlib.import_module("noether_dyn.report.sections")
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nd.watch(model, opt, tmp_path / "run", symmetries=[RESCALE]) as mon:
        train(model, opt, mon, steps=3)
    out = nd.report(tmp_path / "run", tmp_path / "r.html")
    assert out.read_text().startswith("<!DOCTYPE html>")
