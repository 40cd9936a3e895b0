"""The run store under faults: SIGKILL during creation, concurrent readers and writers, a second
writer, full and read-only storage, threads, and a zoo of crafted (malformed) stores.

Processes are forked from the test process (the store needs nothing the fork could break), so
that a kill loop costs milliseconds per kill instead of an interpreter start."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

import noether_dyn as nd
from noether_dyn.store import (
    CHARGE_COLUMNS,
    RunWriter,
    StoreError,
    StoreLockedError,
    StoreWarning,
    StoreWriteError,
    load_run,
)
from noether_dyn.store import connection as store_connection
from noether_dyn.store import writer as store_writer
from noether_dyn.store.lock import LOCK_FILENAME, WriterLock
from noether_dyn.store.schema import GROUP_COLUMNS, STEP_COLUMNS, TENSOR_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
SYMS = [
    nd.Symmetry("scale:a", "scale", ("a.weight", "a.bias")),
    nd.Symmetry("rescale:a", "rescale", ("a.weight", "a.bias", "b.weight"), (1, 1, -1)),
]
PARAMS = [
    {"name": "a.weight", "shape": [4, 3], "group": 0},
    {"name": "a.bias", "shape": [4], "group": 0},
    {"name": "b.weight", "shape": [2, 4], "group": 0},
]
META = {"schema_version": 1, "every": 1, "parameters": PARAMS, "optimizer": {"class": "SGD"}}


def flush_arrays(first: int, n: int, n_sym: int = 2, n_par: int = 3, seed: int = 0):
    """Arrays of one flush of steps first..first+n-1 whose values encode their step (every
    column of row s is s + 0.5 plus a column offset), so that a mixed read is visible."""
    steps = np.arange(first, first + n, dtype=np.float64)
    step_rows = np.column_stack([steps] + [steps + 0.5 + j for j in range(len(STEP_COLUMNS) - 1)])
    group_rows = np.column_stack(
        [steps, np.zeros(n)] + [steps + 0.5 for _ in range(len(GROUP_COLUMNS) - 2)]
    )
    charges = np.broadcast_to((steps + 0.5)[:, None, None], (n, n_sym, len(CHARGE_COLUMNS))).copy()
    tensors = np.broadcast_to((steps + 0.25)[:, None, None], (n, n_par, len(TENSOR_COLUMNS))).copy()
    return step_rows, group_rows, steps.astype(np.int64), charges, tensors


def append(writer: RunWriter, first: int, n: int) -> None:
    step_rows, group_rows, charge_steps, charges, tensors = flush_arrays(first, n)
    writer.append(
        step_rows,
        group_rows,
        charge_steps,
        charges,
        [(first, "flush", f"flush at {first}")],
        {"monitor_state": {"step": first + n}},
        tensors=tensors,
    )


def write_run(run_dir: Path, flushes: int = 3, per: int = 4) -> Path:
    with RunWriter(run_dir, "new", meta=META, symmetries=SYMS) as w:
        for k in range(flushes):
            append(w, k * per, per)
    return run_dir / "run.sqlite"


def assert_consistent(run) -> int:
    """Every table of ``run`` holds the same steps 0..n-1 and the meta that flush wrote."""
    steps = run.steps["step"].to_numpy()
    n = len(steps)
    assert steps.tolist() == list(range(n))
    assert run.groups["step"].tolist() == steps.tolist()
    c_steps, c = run.charge_array()
    t_steps, t = run.tensor_array()
    assert c_steps.tolist() == steps.tolist() and t_steps.tolist() == steps.tolist()
    np.testing.assert_array_equal(c[:, :, 0], np.repeat((steps + 0.5)[:, None], 2, axis=1))
    np.testing.assert_array_equal(t[:, :, 0], np.repeat((steps + 0.25)[:, None], 3, axis=1))
    if n:
        assert run.meta["monitor_state"]["step"] == n
    return n


def fork(target) -> int:
    """Run ``target()`` in a forked child that leaves with os._exit (never returns)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            target()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def kill(pid: int) -> None:
    """SIGKILL the forked child ``pid`` and reap it (if it has not ended and been reaped)."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


# ---------------------------------------------------------------------- item 1: atomic creation
def test_sigkill_during_creation_leaves_no_store_or_a_complete_one(tmp_path):
    """A child creates stores in a loop (lock, temp file, schema, meta, symmetries, rename);
    it is killed at random moments. Every directory then holds no run.sqlite or a complete one,
    and an interrupted one is resumed with a clear refusal or recreated with mode='new'."""
    rng = random.Random(0)

    def create_forever(base: Path):
        for i in range(10**6):
            RunWriter(base / f"r{i}", "new", meta=META, symmetries=SYMS).close()

    t0 = time.perf_counter()
    RunWriter(tmp_path / "timed", "new", meta=META, symmetries=SYMS).close()
    cycle = time.perf_counter() - t0
    # a forked child can be much slower than its parent (copy-on-write faults of a large test
    # process's heap as Python touches its objects): time one creation the way the children run
    # it, fork included, so that the kills land anywhere in a child's first 2-3 creations
    t0 = time.perf_counter()
    pid = fork(
        lambda: RunWriter(tmp_path / "timed-child", "new", meta=META, symmetries=SYMS).close()
    )
    os.waitpid(pid, 0)
    cycle = max(cycle, time.perf_counter() - t0)
    interrupted = complete = 0
    for k in range(40):
        base = tmp_path / f"child{k}"
        base.mkdir()
        pid = fork(lambda b=base: create_forever(b))
        time.sleep(rng.uniform(0.0, 2.5 * cycle))
        kill(pid)
        for d in sorted(base.iterdir()):
            store = d / "run.sqlite"
            if not store.exists():
                interrupted += 1
                with pytest.raises(StoreError, match="Cannot resume: no run at.*Drop resume=True"):
                    RunWriter(d, "resume")
                RunWriter(d, "new", meta=META, symmetries=SYMS).close()
            else:
                complete += 1
            run = load_run(d)
            assert run.meta == META
            assert run.symmetries["symmetry"].tolist() == [s.name for s in SYMS]
            assert len(run.steps) == 0
    assert interrupted >= 5, f"only {interrupted} kills landed inside a creation"
    assert complete > 0


def test_resume_of_an_old_half_created_store_says_what_to_do(tmp_path):
    """A 0-byte store and a store without tables (left by earlier versions killed at creation)
    are refused by resume with the fix, and replaced by overwrite."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "run.sqlite").write_bytes(b"")
    with pytest.raises(StoreError, match=r"empty \(0 bytes\).*overwrite=True"):
        RunWriter(tmp_path / "empty", "resume")
    con = sqlite3.connect(tmp_path / "bare.sqlite")
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.commit()
    con.close()
    (tmp_path / "bare").mkdir()
    shutil.move(tmp_path / "bare.sqlite", tmp_path / "bare" / "run.sqlite")
    with pytest.raises(StoreError, match="missing tables.*overwrite=True"):
        RunWriter(tmp_path / "bare", "resume")
    for name in ("empty", "bare"):
        RunWriter(tmp_path / name, "overwrite", meta=META, symmetries=SYMS).close()
        assert load_run(tmp_path / name).meta == META


def test_old_call_style_still_works(run_dir):
    w = RunWriter(run_dir, "new")
    w.set_meta(META)
    w.set_symmetries(SYMS)
    append(w, 0, 3)
    w.close()
    assert assert_consistent(load_run(run_dir)) == 3


def test_writer_arguments_are_checked_with_their_names(run_dir):
    with pytest.raises(ValueError, match="mode must be"):
        RunWriter(run_dir, "append")
    with pytest.raises(TypeError, match="symmetries must be a sequence of noether_dyn.Symmetry"):
        RunWriter(run_dir, "new", symmetries=["scale:a"])
    with pytest.raises(TypeError, match=r"meta\['bad'\] is not JSON-serializable"):
        RunWriter(run_dir, "new", meta={"bad": object()})
    assert not (run_dir / "run.sqlite").exists()  # nothing half-created
    write_run(run_dir)
    with pytest.raises(ValueError, match="mode='resume'.*set_meta"):
        RunWriter(run_dir, "resume", meta=META)
    with RunWriter(run_dir, "resume") as w:
        with pytest.raises(TypeError, match="meta must be a dict"):
            w.set_meta([("every", 1)])
    assert load_run(run_dir).meta == {**META, "monitor_state": {"step": 12}}


# ---------------------------------------------------------------------- item 2: one snapshot
def test_load_run_reads_one_snapshot_while_a_writer_appends(run_dir):
    """A forked writer appends flushes as fast as it can; every load_run sees every table (steps,
    groups, charges, tensors, meta) at the same flush."""
    write_run(run_dir, flushes=1, per=2)

    def writer():
        with RunWriter(run_dir, "resume") as w:
            for k in range(1, 1000):
                append(w, 2 * k, 2)
                time.sleep(0.002)

    pid = fork(writer)
    try:
        seen = set()
        while len(seen) < 15 and os.waitpid(pid, os.WNOHANG) == (0, 0):
            seen.add(assert_consistent(load_run(run_dir)))
    finally:
        kill(pid)
    assert len(seen) >= 15, "the writer did not progress between reads"
    assert_consistent(load_run(run_dir))


def test_lazy_blocks_stay_those_of_the_snapshot(run_dir):
    write_run(run_dir, flushes=2, per=3)
    run = load_run(run_dir)
    with RunWriter(run_dir, "resume") as w:
        append(w, 6, 3)  # appended after the snapshot: not part of it
    assert assert_consistent(run) == 6
    run = load_run(run_dir)
    with RunWriter(run_dir, "resume") as w:
        w.truncate(4)  # rewrites the block that held steps 3..5
        append(w, 4, 3)
    with pytest.raises(StoreError, match="rewritten.*Call load_run again"):
        run.charge_array()
    assert assert_consistent(load_run(run_dir)) == 7


def test_truncate_with_meta_and_event_is_one_transaction(run_dir):
    write_run(run_dir, flushes=3, per=4)
    with RunWriter(run_dir, "resume") as w:
        with pytest.raises(TypeError):  # fails inside the transaction: nothing is dropped
            w.truncate(5, meta={"monitor_state": object()}, event=(5, "resume", "x"))
        assert w.last_step() == 11
        w.truncate(5, meta={"monitor_state": {"step": 5}}, event=(5, "resume", "resumed at 5"))
    run = load_run(run_dir)
    assert assert_consistent(run) == 5
    assert run.events[run.events["kind"] == "resume"]["message"].tolist() == ["resumed at 5"]


# ---------------------------------------------------------------------- item 3: one writer
def test_second_writer_in_the_same_process_is_refused(run_dir):
    w = RunWriter(run_dir, "new", meta=META, symmetries=SYMS)
    append(w, 0, 2)
    pattern = rf"pid {os.getpid()} \(this process\) on host {re.escape(socket.gethostname())} since"
    for mode in ("overwrite", "resume"):
        with pytest.raises(StoreLockedError, match=pattern):
            RunWriter(run_dir, mode)
    with pytest.raises(StoreError, match="already holds a run|live writer"):
        RunWriter(run_dir, "new")
    append(w, 2, 2)  # the first writer is untouched
    w.close()
    with RunWriter(run_dir, "resume") as w2:  # released at close
        append(w2, 4, 2)
    assert assert_consistent(load_run(run_dir)) == 6


def test_writer_in_another_process_is_refused_and_a_sigkill_releases_it(run_dir):
    write_run(run_dir, flushes=1, per=2)
    ready_r, ready_w = os.pipe()

    def hold():
        w = RunWriter(run_dir, "resume")
        os.write(ready_w, b"1")
        time.sleep(600)
        w.close()

    pid = fork(hold)
    assert os.read(ready_r, 1) == b"1"
    try:
        for mode in ("overwrite", "resume"):
            with pytest.raises(StoreLockedError, match=rf"held by a live writer \(pid {pid} on"):
                RunWriter(run_dir, mode)
        assert assert_consistent(load_run(run_dir)) == 2  # readers are never blocked
    finally:
        kill(pid)
    with RunWriter(run_dir, "resume") as w:  # the OS released the dead writer's lock
        append(w, 2, 2)
    assert assert_consistent(load_run(run_dir)) == 4


def test_a_forked_child_does_not_keep_a_dead_writers_lock(run_dir):
    """A writer process forks a child (a data-loader worker) and is killed; the child lives on,
    and the run can still be resumed."""
    write_run(run_dir, flushes=1, per=2)
    r, wfd = os.pipe()

    def writer():
        w = RunWriter(run_dir, "resume")
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        os.write(wfd, str(child).encode().ljust(16))
        time.sleep(600)
        w.close()

    pid = fork(writer)
    grandchild = int(os.read(r, 16))
    kill(pid)
    try:
        with RunWriter(run_dir, "resume") as w:
            append(w, 2, 2)
    finally:
        os.kill(grandchild, signal.SIGKILL)


def test_reader_of_a_young_store_is_told_a_writer_is_live(tmp_path):
    """While a writer holds the lock, a missing, empty or incomplete store is its start-up: the
    reader is told to wait, never advised to overwrite it."""
    for name, content in (("missing", None), ("empty", b""), ("bare", "bare")):
        d = tmp_path / name
        d.mkdir()
        if content == b"":
            (d / "run.sqlite").write_bytes(b"")
        elif content == "bare":
            sqlite3.connect(d / "run.sqlite").execute("CREATE TABLE meta (k)").connection.close()
        lock = WriterLock.acquire(d, "new")
        try:
            with pytest.raises(StoreLockedError) as info:
                load_run(d)
            message = str(info.value)
            assert f"pid {os.getpid()}" in message and "do not overwrite" in message
            assert "overwrite=True" not in message
        finally:
            lock.release()
        if content is not None:  # with no writer live, the advice to replace it is safe
            with pytest.raises(StoreError, match="overwrite=True"):
                load_run(d)
    assert (tmp_path / "missing" / LOCK_FILENAME).read_bytes() == b""  # holder record cleared


# ---------------------------------------------------------------------- item 4: full, read-only
def test_disk_full_raises_store_write_error_and_keeps_every_flush(run_dir):
    """An injected full disk (PRAGMA max_page_count at the store's size): writes raise
    StoreWriteError naming the path and the cause, close() does not raise, and the store keeps
    every flush that completed."""
    w = RunWriter(run_dir, "new", meta=META, symmetries=SYMS)
    append(w, 0, 4)
    pages = w.con.execute("PRAGMA page_count").fetchone()[0]
    w.con.execute(f"PRAGMA max_page_count = {pages}")
    big = np.random.default_rng(0).random((4, 2, len(CHARGE_COLUMNS)))
    step_rows, group_rows, charge_steps, _, tensors = flush_arrays(4, 4)
    for _ in range(3):  # a full disk stays full: each attempt fails cleanly
        with pytest.raises(StoreWriteError, match=rf"'{re.escape(str(w.path))}'.*full"):
            w.append(step_rows, group_rows, charge_steps, np.tile(big, (1, 1, 999)), [], {})
    with pytest.raises(StoreWriteError, match="full"):
        w.set_meta({"pad": "x" * 200_000})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.close()
    w.close()  # idempotent
    assert not Path(f"{w.path}-wal").exists() and not Path(f"{w.path}-shm").exists()
    assert assert_consistent(load_run(run_dir)) == 4


def test_close_never_raises_and_warns_with_the_path(run_dir, monkeypatch):
    """A reader holding a read transaction at close keeps the store in WAL mode: close() warns
    (naming the path) instead of raising, and the store keeps every flush."""
    monkeypatch.setattr(store_writer, "CLOSE_BUSY_MS", 50)
    w = RunWriter(run_dir, "new", meta=META, symmetries=SYMS)
    append(w, 0, 3)
    reader = sqlite3.connect(run_dir / "run.sqlite", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM steps").fetchone()
    with pytest.warns(StoreWarning, match=re.escape(str(w.path))):
        w.close()
    reader.close()
    assert assert_consistent(load_run(run_dir)) == 3
    # and close() after the connection itself broke
    other = run_dir.parent / "b"
    w2 = RunWriter(other, "new", meta=META, symmetries=SYMS)
    append(w2, 0, 2)
    w2.con.close()
    with pytest.warns(StoreWarning, match=re.escape(str(w2.path))):
        w2.close()
    assert assert_consistent(load_run(other)) == 2
    with RunWriter(other, "resume"):  # its lock was released all the same
        pass


def test_a_closed_run_is_one_file_in_rollback_mode(run_dir):
    path = write_run(run_dir)
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith("run.sqlite-")]
    header = path.read_bytes()[:20]
    assert header[18] == header[19] == 1, "file format 1: rollback journal, not WAL"


def test_reader_falls_back_to_immutable_where_mode_ro_cannot_open(run_dir, monkeypatch):
    """Read-only media: where the mode=ro open fails, the reader opens the file immutable, and
    warns when a write-ahead log beside it goes unread."""
    write_run(run_dir)
    real = store_connection._connect
    opened = []

    def refuse_ro(file, mode, immutable=False):
        opened.append(immutable)
        if not immutable:
            raise sqlite3.OperationalError("unable to open database file")
        return real(file, mode, immutable)

    monkeypatch.setattr(store_connection, "_connect", refuse_ro)
    assert assert_consistent(load_run(run_dir)) == 12
    assert opened[:2] == [False, True]
    Path(f"{run_dir / 'run.sqlite'}-wal").write_bytes(b"x" * 100)
    with pytest.warns(StoreWarning, match="write-ahead log.*not read"):
        load_run(run_dir)


def test_read_only_open_refuses_a_hot_rollback_journal(run_dir, monkeypatch):
    """An immutable open would ignore a rollback journal left by an interrupted write (and read
    half a transaction): the reader refuses, naming the journal and the fix."""
    write_run(run_dir)
    Path(f"{run_dir / 'run.sqlite'}-journal").write_bytes(b"\xd9\xd5\x05\xf9" + b"\0" * 508)

    def refuse_ro(file, mode, immutable=False):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(store_connection, "_connect", refuse_ro)
    with pytest.raises(StoreError, match="rollback journal.*Copy the run directory"):
        load_run(run_dir)


def test_reader_rolls_back_a_killed_writes_journal(run_dir):
    """A process killed inside a rollback-mode write (as at close, leaving WAL mode) leaves a hot
    journal; a reader with a writable directory lets SQLite roll it back and reads the store as
    it was before that write."""
    path = write_run(run_dir)
    before = (run_dir / "run.sqlite").read_bytes()

    def killed_mid_write():
        con = sqlite3.connect(path, isolation_level=None)
        con.execute("PRAGMA cache_size = 1")  # spill the change into the file before commit
        con.execute("BEGIN")
        for i in range(2000):
            con.execute("INSERT INTO events VALUES (?, 'junk', ?)", (i, "x" * 500))
        os.kill(os.getpid(), signal.SIGKILL)

    pid = fork(killed_mid_write)
    os.waitpid(pid, 0)
    assert Path(f"{path}-journal").stat().st_size > 0
    assert (run_dir / "run.sqlite").read_bytes() != before, "the write reached the file"
    run = load_run(run_dir)
    assert assert_consistent(run) == 12 and "junk" not in set(run.events["kind"])
    assert not Path(f"{path}-journal").exists()


def test_resume_while_a_writer_creates_the_run_names_it(run_dir):
    run_dir.mkdir()
    lock = WriterLock.acquire(run_dir, "new")
    try:
        with pytest.raises(StoreLockedError, match=f"creating it \\(pid {os.getpid()}"):
            RunWriter(run_dir, "resume")
    finally:
        lock.release()


READ_ONLY_AND_FULL = textwrap.dedent(
    """
    import os, shutil, subprocess, sys, warnings
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from tests.test_store_faults import META, SYMS, append, assert_consistent
    from noether_dyn.store import RunWriter, StoreError, StoreWriteError, load_run
    base = Path({base!r})
    def mount(*args):
        subprocess.run(["mount", *args], check=True)
    # a finished run and a killed writer's run (still in WAL mode), on a read-only bind mount
    done, killed, ro = base / "done", base / "killed", base / "ro"
    w = RunWriter(done, "new", meta=META, symmetries=SYMS); append(w, 0, 4); w.close()
    w = RunWriter(killed, "new", meta=META, symmetries=SYMS); append(w, 0, 4)
    shutil.copytree(killed, base / "killed_copy")  # the files as a SIGKILL leaves them
    w.close()
    ro.mkdir()
    mount("--bind", str(base), str(ro)); mount("-o", "remount,bind,ro", str(ro))
    assert assert_consistent(load_run(ro / "done")) == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n = assert_consistent(load_run(ro / "killed_copy"))
    print("killed copy read", n, [str(c.message)[:60] for c in caught])
    for target, mode in ((ro / "new", "new"), (ro / "done", "resume")):
        try:
            RunWriter(target, mode)
        except StoreError as exc:
            assert str(target) in str(exc), exc
            print("read-only refused", mode)
    # a full disk: an 8 MiB tmpfs
    full = base / "full"; full.mkdir()
    mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(full))
    w = RunWriter(full / "run", "new", meta=META, symmetries=SYMS)
    done_steps, k = 0, 0
    try:
        while True:
            append(w, 2 * k, 2); k += 1; done_steps = 2 * k
    except StoreWriteError as exc:
        assert str(full / "run") in str(exc) and "full" in str(exc), exc
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w.close()
    n = assert_consistent(load_run(full / "run"))
    assert n == done_steps, (n, done_steps)
    print("full ok", n, [str(c.message)[:80] for c in caught])
    """
)


def _can_mount() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs unshare -m (root) for real mounts")
def test_real_read_only_mount_and_full_tmpfs(tmp_path):
    """On real storage, in a private mount namespace: a finished run and a killed writer's run
    read from a read-only bind mount, where new and resumed writers are refused with
    StoreError; an 8 MiB tmpfs fills up, the writer raises StoreWriteError naming the path,
    close() does not raise, and the store holds every completed flush."""
    code = READ_ONLY_AND_FULL.format(root=str(ROOT), base=str(tmp_path))
    proc = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "full ok" in proc.stdout and "killed copy read 4" in proc.stdout
    assert "read-only refused new" in proc.stdout and "read-only refused resume" in proc.stdout


def test_wal_stays_small_during_training(run_dir):
    """100 flushes of 176 kB: the write-ahead log is checkpointed every 2 MiB and truncated to
    4 MiB, instead of growing with every flush up to SQLite's default checkpoint (1000 pages)."""
    w = RunWriter(run_dir, "new", meta=META, symmetries=SYMS)
    wal = Path(f"{w.path}-wal")
    rng = np.random.default_rng(0)
    largest = 0
    for k in range(100):
        step_rows, group_rows, charge_steps, _, tensors = flush_arrays(k, 1)
        charges = rng.random((1, 2, len(CHARGE_COLUMNS) * 1000))  # about 176 kB per flush
        w.append(step_rows, group_rows, charge_steps, charges, [], {})
        largest = max(largest, wal.stat().st_size)
    w.close()
    limit = store_writer.JOURNAL_LIMIT + 2 * store_writer.WAL_CHECKPOINT_BYTES
    assert largest <= limit, f"WAL reached {largest} bytes"


# ---------------------------------------------------------------------- item 6: threads
def test_writer_methods_from_many_threads(run_dir):
    """Flushes, metadata and events from four threads at once (a state_dict() from another
    thread): no "cannot start a transaction within a transaction", every row stored."""
    w = RunWriter(run_dir, "new", meta=META, symmetries=SYMS)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for k in range(40):
                first = (t * 40 + k) * 2
                step_rows, group_rows, charge_steps, charges, tensors = flush_arrays(first, 2)
                w.append(step_rows, group_rows, charge_steps, charges, [], {}, tensors=tensors)
                w.set_meta({f"thread{t}": k})
                w.add_event(first, "note", f"thread {t} flush {k}")
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.set_meta({"monitor_state": {"step": 320}})
    w.close()
    assert not errors, errors[:3]
    run = load_run(run_dir)
    assert assert_consistent(run) == 320
    assert len(run.events) == 160 and all(run.meta[f"thread{t}"] == 39 for t in range(4))


# ---------------------------------------------------------------------- item 5: crafted stores
def _sql(*statements: str):
    def mutate(con: sqlite3.Connection) -> None:
        for s in statements:
            con.execute(s)

    return mutate


def _meta(key: str, value: str):
    return _sql(f"INSERT OR REPLACE INTO meta VALUES ('{key}', '{value}')")


def _blob(table: str, column: str, data: bytes, where: str = "first_step = 4", **extra):
    def mutate(con: sqlite3.Connection) -> None:
        sets = ", ".join([f"{column} = ?", *(f"{k} = {v}" for k, v in extra.items())])
        con.execute(f"UPDATE {table} SET {sets} WHERE {where}", (data,))

    return mutate


def _without_key(table: str, columns: str, dup_where: str):
    """Recreate ``table`` without its primary key and duplicate the rows of ``dup_where``."""
    return _sql(
        f"CREATE TABLE t2 AS SELECT * FROM {table}",
        f"DROP TABLE {table}",
        f"CREATE TABLE {table} ({columns})",
        f"INSERT INTO {table} SELECT * FROM t2",
        f"INSERT INTO {table} SELECT * FROM t2 WHERE {dup_where}",
        "DROP TABLE t2",
    )


def _steps_blob(values) -> bytes:
    return np.asarray(values, dtype="<i8").tobytes()


STEPS_COLS = ", ".join(["step INTEGER", *(f"{c} REAL" for c in STEP_COLUMNS[1:])])
CRAFTED = {
    "missing table": (_sql("DROP TABLE groups"), "missing tables"),
    "user_version 0": (_sql("PRAGMA user_version = 0"), "schema version 0"),
    "user_version -1": (_sql("PRAGMA user_version = -1"), "schema version -1"),
    "user_version 99": (_sql("PRAGMA user_version = 99"), "schema version 99"),
    "missing column": (
        _sql(
            "CREATE TABLE s2 AS SELECT step, time FROM steps",
            "DROP TABLE steps",
            "ALTER TABLE s2 RENAME TO steps",
        ),
        "steps lacks the columns",
    ),
    "meta bad JSON": (_meta("every", "{"), r"meta\['every'\] is not valid JSON"),
    "meta deep JSON": (_meta("model", "[" * 200_000 + "]" * 200_000), "deeper than 32"),
    "meta value not text": (
        _sql("UPDATE meta SET value = X'00' WHERE key = 'every'"),
        "meta.value holds a blob",
    ),
    "meta parameters not a list": (_meta("parameters", '"abc"'), "not a list"),
    "meta parameter without name": (_meta("parameters", '[{"group": 0}]'), "parameters'\\]\\[0\\]"),
    "meta optimizer a list": (_meta("optimizer", "[1, 2]"), "optimizer.*not an object"),
    "meta every a string": (_meta("every", '"1"'), "every.*not an integer"),
    "meta duplicated key": (
        _without_key("meta", "key TEXT, value TEXT", "key = 'every'"),
        "key 'every' twice",
    ),
    "steps text value": (_sql("UPDATE steps SET loss = 'abc' WHERE step = 3"), "steps.loss"),
    "steps duplicated": (_without_key("steps", STEPS_COLS, "step = 2"), "steps.*duplicated"),
    "groups text key": (_sql("UPDATE groups SET grp = 'x' WHERE step = 1"), "groups.grp"),
    "symmetry params bad JSON": (
        _sql("UPDATE symmetries SET params = '[1' WHERE idx = 0"),
        "params is not valid JSON",
    ),
    "symmetry params a string": (
        _sql("""UPDATE symmetries SET params = '"a.weight"' WHERE idx = 0"""),
        "not a list of names",
    ),
    "symmetry signs mismatched": (
        _sql("UPDATE symmetries SET signs = '[1]' WHERE idx = 1"),
        "signs for 3 params",
    ),
    "symmetry unknown kind": (
        _sql("UPDATE symmetries SET kind = 'boost' WHERE idx = 0"),
        "kind 'boost'",
    ),
    "symmetry names repeated": (
        _without_key(
            "symmetries",
            "idx INTEGER, symmetry TEXT, kind TEXT, params TEXT, signs TEXT, verified INTEGER, "
            "defect REAL, note TEXT, exactness TEXT, parent TEXT, slices TEXT",
            "idx = 0",
        ),
        "names a symmetry twice",
    ),
    "events message a blob": (_sql("UPDATE events SET message = X'00'"), "events.message"),
    "depth text value": (
        _sql("INSERT INTO depth_profile VALUES (0, 0, 'x', 1, 1, 1, 1, 1, 1)"),
        "depth_profile.sigma_max",
    ),
    "1M-step blob, n_steps=1": (
        _blob("charge_blocks", "steps", _steps_blob(np.arange(4, 4 + 10**6)), n_steps=1),
        "steps blob holds 8000000 bytes, not 8 x n_steps = 8",
    ),
    "1M-step blob and n_steps": (
        _blob("charge_blocks", "steps", _steps_blob(np.arange(4, 4 + 10**6)), n_steps=10**6),
        "data blob holds",
    ),
    "data blob short": (_blob("charge_blocks", "data", b"\0" * 8), "data blob holds 8 bytes"),
    "data blob huge": (_blob("tensor_blocks", "data", b"\0" * 8 * 10**6), "data blob holds"),
    "n_steps zero": (_sql("UPDATE charge_blocks SET n_steps = 0 WHERE first_step = 4"), "= 0"),
    "n_steps negative": (_sql("UPDATE tensor_blocks SET n_steps = -5"), "= -5"),
    "steps blob as text": (
        _sql("UPDATE charge_blocks SET steps = 'abcdefgh' WHERE first_step = 0"),
        "charge_blocks.steps holds a text",
    ),
    "blocks overlap": (
        _blob("charge_blocks", "steps", _steps_blob([2, 3, 4, 5]), first_step=2),
        "block at step 2 overlaps the block before it",
    ),
    "block key disagrees with its steps": (
        _blob("tensor_blocks", "steps", _steps_blob([3, 4, 5, 6]), where="first_step = 4"),
        "starts at step 3",
    ),
    "block repeated": (
        _without_key(
            "charge_blocks",
            "first_step INTEGER, n_steps INTEGER, steps BLOB, data BLOB",
            "first_step = 4",
        ),
        "overlaps the block before it",
    ),
    "block steps out of order": (
        _blob("charge_blocks", "steps", _steps_blob([4, 6, 5, 7])),
        "out of order or repeated",
    ),
    "tensor count shrunk": (
        _meta("parameters", json.dumps(PARAMS[:2])),
        "tensor_blocks block at step 0: its data blob",
    ),
    "block generation not an int": (_meta("block_generation", '"x"'), "not an integer"),
}


@pytest.fixture(scope="module")
def valid_store(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("valid") / "run", flushes=3, per=4)


def test_valid_store_reads(valid_store):
    assert assert_consistent(load_run(valid_store)) == 12


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_store_raises_store_error_with_bounded_memory(case, valid_store, tmp_path):
    """Each crafted store raises StoreError naming the file and what is wrong, and reading it
    allocates at most twice the file's size plus 4 MiB (tracemalloc peak, numpy included)."""
    mutate, expected = CRAFTED[case]
    path = tmp_path / "run.sqlite"
    shutil.copy(valid_store, path)
    con = sqlite3.connect(path)
    mutate(con)
    con.commit()
    con.execute("VACUUM")
    con.close()
    size = path.stat().st_size
    tracemalloc.start()
    try:
        with pytest.raises(StoreError) as info:
            run = load_run(path)
            run.charge_array()
            run.tensor_array()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert str(path) in message
    assert re.search(expected, message), message
    assert peak <= 2 * size + 4 * 2**20, f"{peak} bytes allocated for a {size}-byte file"
