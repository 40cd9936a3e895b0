"""Opening a run store: path resolution and the checks that turn a bad file into one clear error."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from noether_dyn.store.errors import StoreError
from noether_dyn.store.schema import REQUIRED_TABLES, SCHEMA_VERSION, STORE_FILENAME

_SQLITE_MAGIC = b"SQLite format 3\x00"


def store_path(path: str | Path) -> Path:
    """``path`` if it names a file (or ends in ``run.sqlite``), else ``path / run.sqlite``."""
    path = Path(path)
    return path if path.is_file() or path.name == STORE_FILENAME else path / STORE_FILENAME


def open_existing(path: str | Path, *, readonly: bool) -> sqlite3.Connection:
    """Connect to an existing store, checking that it is one and that its version is known."""
    file = store_path(path)
    if not file.exists():
        raise StoreError(
            f"No noether-dyn run at '{path}': '{file}' does not exist. Pass the run_dir given "
            "to noether_dyn.watch (or the run.sqlite file inside it)."
        )
    size = file.stat().st_size
    if size == 0:
        raise StoreError(
            f"The run store '{file}' is empty (0 bytes): the run never flushed. Delete it, or "
            "rerun with watch(..., overwrite=True)."
        )
    with open(file, "rb") as fh:
        magic = fh.read(len(_SQLITE_MAGIC))
    if magic != _SQLITE_MAGIC:
        raise StoreError(
            f"'{file}' is not a noether-dyn run store (not an SQLite file; corrupted or another "
            "file). Point to the run.sqlite that noether_dyn.watch wrote."
        )
    uri = f"{file.resolve().as_uri()}?mode={'ro' if readonly else 'rw'}"
    try:
        con = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False)
        version = con.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"The run store '{file}' is corrupted and cannot be read: {exc}.") from exc
    if version > SCHEMA_VERSION:
        con.close()
        raise StoreError(
            f"The run store '{file}' has schema version {version}, newer than this noether-dyn "
            f"reads (version {SCHEMA_VERSION}). Upgrade noether-dyn to read it."
        )
    missing = REQUIRED_TABLES - tables
    if version < 1 or missing:
        con.close()
        raise StoreError(
            f"'{file}' is not a complete noether-dyn run store (schema version {version}, "
            f"missing tables: {sorted(missing) or 'none'}). Point to a run written by "
            "noether_dyn.watch."
        )
    return con
