"""One live writer per run directory: an exclusive ``flock`` on ``<run_dir>/run.lock``, held for
the writer's lifetime and released by the operating system when its process dies.

The lock file also holds the holder's identity (JSON: ``pid``, ``host``, ``since`` in ISO 8601
UTC, ``mode``) so that a refused writer, or a reader, can name it. The file is never deleted (a
deleted lock file would let a second writer lock a new file of the same name). Locks are per open
file, so a second writer in the same process is refused too; a writer dropped without
``close()`` releases it when garbage-collected. A forked child closes its copy of
the descriptor, so that a child outliving a killed writer (a data-loader worker) cannot keep the
run locked.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Any

from noether_dyn.store.errors import StoreError, StoreLockedError

LOCK_FILENAME = "run.lock"
# A reader's probe holds a shared lock for microseconds; a writer retries this long before it
# concludes that another writer holds the run.
_ACQUIRE_S = 1.0
_HELD: weakref.WeakSet[WriterLock] = weakref.WeakSet()


class WriterLock:
    """The exclusive writer lock of one run directory (see the module docstring)."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, run_dir: Path, mode: str) -> WriterLock:
        """Lock ``run_dir`` for writing, or raise ``StoreLockedError`` naming the live writer.
        ``run_dir`` must exist."""
        path = run_dir / LOCK_FILENAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(
                f"Cannot create the writer lock '{path}': {exc.strerror or exc}. The run "
                "directory must be writable to write a run; pass a writable run_dir."
            ) from exc
        deadline = time.monotonic() + _ACQUIRE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise StoreError(f"Cannot lock '{path}': {exc.strerror or exc}.") from exc
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                holder = _read_holder(fd)
                os.close(fd)
                raise StoreLockedError(
                    f"run_dir '{run_dir}' is held by a live writer ({describe(holder)}); a "
                    f"second writer ({mode!r}) would mix its rows into that run or destroy it. "
                    "Close the other monitor (monitor.close()) or wait for its process to end, "
                    "or pass another run_dir."
                ) from None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mode": mode,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        lock = cls(fd, path)
        _HELD.add(lock)
        return lock

    def __del__(self) -> None:  # a writer dropped without close(): nothing can use the lock
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit the OS releases it anyway
            pass

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Clear the holder record and unlock. Idempotent; never raises."""
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a full or read-only disk: the stale record is ignored once unlocked
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def live_writer(run_dir: Path) -> dict[str, Any] | None:
    """The holder record of the writer that holds ``run_dir`` now, or None when no live writer
    holds it (or the directory has no lock file). Creates nothing."""
    try:
        fd = os.open(run_dir / LOCK_FILENAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return _read_holder(fd)
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe(holder: dict[str, Any]) -> str:
    """'pid 123 on host h since 2026-01-01T00:00:00+00:00' (parts unknown are said so)."""
    pid = holder.get("pid")
    this = " (this process)" if pid == os.getpid() else ""
    return (
        f"pid {pid if pid is not None else 'unknown'}{this} on host "
        f"{holder.get('host', 'unknown')} since {holder.get('since', 'unknown')}"
    )


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _close_in_child() -> None:
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)
