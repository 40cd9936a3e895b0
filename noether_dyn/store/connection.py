"""Opening a run store: path resolution and the checks that turn a bad file into one clear error."""

from __future__ import annotations

import os
import sqlite3
import warnings
from pathlib import Path

from noether_dyn.store.errors import StoreError, StoreLockedError, StoreWarning
from noether_dyn.store.lock import describe, live_writer
from noether_dyn.store.schema import REQUIRED_TABLES, SCHEMA_VERSION, STORE_FILENAME

_SQLITE_MAGIC = b"SQLite format 3\x00"
_CAUSES = {
    "SQLITE_FULL": "the disk is full (free space, or move run_dir to a larger disk)",
    "SQLITE_READONLY": "the store or its directory is read-only (pass a writable run_dir)",
    "SQLITE_IOERR": "an I/O error (check the disk)",
    "SQLITE_CANTOPEN": "the file cannot be opened (check the path and its permissions)",
    "SQLITE_BUSY": "another connection holds the store locked",
    "SQLITE_CORRUPT": "the file is corrupted",
    "SQLITE_NOTADB": "the file is not an SQLite database",
}


def store_path(path: str | Path) -> Path:
    """``path`` if it names a file (or ends in ``run.sqlite``), else ``path / run.sqlite``."""
    path = Path(path)
    return path if path.is_file() or path.name == STORE_FILENAME else path / STORE_FILENAME


def cause(exc: BaseException) -> str:
    """SQLite's message for ``exc`` with its error name and, when known, what it means."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    meaning = _CAUSES.get(name) or _CAUSES.get("_".join(name.split("_")[:2]))
    text = f"{exc} ({name})" if name else str(exc)
    return f"{text}: {meaning}" if meaning else text


def _not_ready(file: Path, what: str, advice: str, own_lock: bool) -> StoreError:
    """A store that is missing or incomplete: say so, and never advise destroying a live run."""
    holder = None if own_lock else live_writer(file.parent)
    if holder is not None:
        return StoreLockedError(
            f"{what}, and a live writer holds the run ({describe(holder)}): it is starting up "
            "and has not committed its first flush. Wait and read it again; do not overwrite it."
        )
    return StoreError(f"{what}. {advice}")


def open_existing(
    path: str | Path, *, readonly: bool, own_lock: bool = False
) -> sqlite3.Connection:
    """Connect to an existing store, checking that it is one and that its version is known.
    ``own_lock``: the caller holds the run's writer lock (a missing or incomplete store is then
    not another writer's start-up).

    Read-only connections open with ``mode=ro``; where that fails (read-only media or a directory
    the reader cannot write, for a store left in WAL mode) they fall back to ``immutable=1``,
    warning when a write-ahead log beside the file then goes unread."""
    file = store_path(path)
    if not file.exists():
        raise _not_ready(
            file,
            f"No noether-dyn run at '{path}': '{file}' does not exist",
            "Pass the run_dir given to noether_dyn.watch (or the run.sqlite file inside it).",
            own_lock,
        )
    size = file.stat().st_size
    if size == 0:
        raise _not_ready(
            file,
            f"The run store '{file}' is empty (0 bytes)",
            "Its creation was interrupted before anything was stored. Delete it, or rerun with "
            "watch(..., overwrite=True).",
            own_lock,
        )
    try:
        with open(file, "rb") as fh:
            magic = fh.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise StoreError(f"Cannot read the run store '{file}': {exc.strerror or exc}.") from exc
    if magic != _SQLITE_MAGIC:
        raise StoreError(
            f"'{file}' is not a noether-dyn run store (not an SQLite file; corrupted or another "
            "file). Point to the run.sqlite that noether_dyn.watch wrote."
        )
    journal = Path(f"{file}-journal")
    if readonly and _hot(journal) and os.access(file.parent, os.W_OK):
        _roll_back(file)
    try:
        con = _connect(file, "ro" if readonly else "rw")
        version, tables = _version_and_tables(con)
    except sqlite3.DatabaseError as exc:
        if not readonly:
            raise StoreError(f"Cannot open the run store '{file}': {cause(exc)}.") from exc
        if _hot(journal):
            raise StoreError(
                f"The run store '{file}' cannot be opened read-only ({cause(exc)}) and has a "
                f"rollback journal '{journal}' from an interrupted write, which only a writable "
                "open can roll back. Copy the run directory to writable storage and read it there."
            ) from exc
        try:
            con = _connect(file, "ro", immutable=True)
            version, tables = _version_and_tables(con)
        except sqlite3.DatabaseError as exc2:
            raise StoreError(
                f"The run store '{file}' is corrupted and cannot be read: {cause(exc2)}."
            ) from exc2
        wal = Path(f"{file}-wal")
        if wal.exists() and wal.stat().st_size > 0:
            warnings.warn(
                f"The run store '{file}' could only be opened as immutable (read-only storage) "
                f"and its write-ahead log '{wal}' ({wal.stat().st_size} bytes) was not read: the "
                "latest flushes may be missing. Copy the run directory to writable storage to "
                "read them.",
                StoreWarning,
                stacklevel=3,
            )
    if version > SCHEMA_VERSION:
        con.close()
        raise StoreError(
            f"The run store '{file}' has schema version {version}, newer than this noether-dyn "
            f"reads (version {SCHEMA_VERSION}). Upgrade noether-dyn to read it."
        )
    missing = REQUIRED_TABLES - tables
    if version < 1 or missing:
        con.close()
        raise _not_ready(
            file,
            f"'{file}' is not a complete noether-dyn run store (schema version {version}, "
            f"missing tables: {sorted(missing) or 'none'})",
            "Point to a run written by noether_dyn.watch; a run whose creation was interrupted "
            "holds nothing and can be replaced with watch(..., overwrite=True).",
            own_lock,
        )
    return con


def _hot(journal: Path) -> bool:
    try:
        return journal.stat().st_size > 0
    except OSError:
        return False


def _roll_back(file: Path) -> None:
    """Let SQLite roll back the rollback journal of a write interrupted by a kill (a read-only
    connection cannot); SQLite itself leaves a journal alone while its writer still lives."""
    try:
        con = _connect(file, "rw")
        try:
            con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError:
        pass  # the read-only open that follows reports what is wrong


def _connect(file: Path, mode: str, immutable: bool = False) -> sqlite3.Connection:
    uri = f"{file.resolve().as_uri()}?mode={mode}" + ("&immutable=1" if immutable else "")
    return sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False)


def _version_and_tables(con: sqlite3.Connection) -> tuple[int, set[str]]:
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError:
        con.close()
        raise
    return version, tables
