"""Creating a run store atomically: the schema, the initial metadata and the symmetries are built
in a temporary file beside the store, committed, synced, and renamed into place. A process killed
at any moment leaves either no ``run.sqlite`` or a complete one (plus, at worst, a temporary file
that the next writer removes). The caller holds the run directory's writer lock."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from noether_dyn.store.schema import DDL, UNIT_COLUMNS
from noether_dyn.symmetries.symmetry import Symmetry

CREATING_SUFFIX = ".creating"
# A flush touches a few pages of each table, each written whole to the write-ahead log: 4 KiB
# pages log about 9x fewer bytes per flush than 64 KiB ones, and read large blocks as fast
# (benchmarks/store_wal.py). Stores written before keep their 64 KiB pages.
PAGE_SIZE = 4096
_SIDE_FILES = ("-wal", "-shm", "-journal")


SYMMETRY_INSERT = (
    "INSERT INTO symmetries (idx, symmetry, kind, params, signs, verified, defect, note, "
    "exactness, parent, slices) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
"""Insert of one :func:`symmetry_rows` row (columns named: an older store gains the optional
unit columns at the end, :func:`add_unit_columns`)."""


def add_unit_columns(con: sqlite3.Connection) -> None:
    """Add the optional per-unit columns (:data:`UNIT_COLUMNS`) to a store created without them
    (additive: the schema version stays)."""
    have = {r[1] for r in con.execute("PRAGMA table_info(symmetries)")}
    for column in UNIT_COLUMNS:
        if column.split()[0] not in have:
            con.execute(f"ALTER TABLE symmetries ADD COLUMN {column}")


def symmetry_rows(symmetries: Sequence[Symmetry]) -> list[tuple]:
    """Rows of the ``symmetries`` table, ``idx`` in the given order."""
    bad = [s for s in symmetries if not isinstance(s, Symmetry)]
    if isinstance(symmetries, (str, bytes)) or bad:
        raise TypeError(
            "symmetries must be a sequence of noether_dyn.Symmetry, got "
            f"{type(symmetries).__name__} holding {type(bad[0]).__name__ if bad else 'text'}."
        )
    return [
        (
            i,
            s.name,
            s.kind,
            json.dumps(list(s.params)),
            json.dumps(list(s.signs)),
            None if s.verified is None else int(s.verified),
            s.defect,
            s.note,
            s.exactness,
            s.parent,
            json.dumps([None if w is None else list(w) for w in s.slices]),
        )
        for i, s in enumerate(symmetries)
    ]


def dropped_rows(dropped: Sequence[Any]) -> list[tuple]:
    """Rows of the ``dropped`` table, from records with name, kind, params, signs, defect, rule."""
    return [
        (i, str(d.name), str(d.kind), json.dumps(list(d.params)), json.dumps(list(d.signs)),
         None if d.defect is None else float(d.defect), str(d.rule))
        for i, d in enumerate(dropped)
    ]  # fmt: skip


def meta_rows(items: dict[str, Any]) -> list[tuple[str, str]]:
    """``(key, JSON value)`` rows of the ``meta`` table."""
    if not isinstance(items, dict):
        raise TypeError(f"meta must be a dict of JSON values, got {type(items).__name__}.")
    rows = []
    for k, v in items.items():
        try:
            rows.append((str(k), json.dumps(v, allow_nan=True)))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"meta[{k!r}] is not JSON-serializable: {exc}.") from None
    return rows


def remove_store(path: Path) -> None:
    """Delete ``path`` and its side files (write-ahead log, shared memory, rollback journal),
    the store first: a log left without its store is never applied to a new one, because every
    new store is renamed into place only after its side files are gone."""
    for suffix in ("", *_SIDE_FILES):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def remove_leftovers(path: Path) -> None:
    """Delete the temporary files of an interrupted creation."""
    remove_store(Path(f"{path}{CREATING_SUFFIX}"))


def create_store(
    path: Path,
    meta: dict[str, Any] | None = None,
    symmetries: Sequence[Symmetry] | None = None,
) -> None:
    """Build a complete store at ``path`` (replacing one there) in one commit and one rename."""
    tmp = Path(f"{path}{CREATING_SUFFIX}")
    remove_leftovers(path)
    try:
        _build(tmp, meta, symmetries)
        _fsync(tmp)
    except BaseException:
        remove_leftovers(path)
        raise
    remove_store(path)
    os.replace(tmp, path)
    _fsync(path.parent)


def _build(tmp: Path, meta: dict[str, Any] | None, symmetries: Sequence[Symmetry] | None) -> None:
    con = sqlite3.connect(tmp, isolation_level=None)
    try:
        con.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        con.execute("PRAGMA journal_mode = DELETE")
        con.execute("PRAGMA synchronous = FULL")
        con.execute("BEGIN")
        for statement in DDL.split(";"):
            if statement.strip():
                con.execute(statement)
        if meta:
            con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta_rows(meta))
        if symmetries:
            con.executemany(
                SYMMETRY_INSERT,
                symmetry_rows(symmetries),
            )
        con.execute("COMMIT")
        # Born in WAL mode: opening it for writing then needs no rollback-journal write (a kill
        # during that switch would leave a hot journal that read-only readers cannot replay).
        con.execute("PRAGMA journal_mode = WAL")
    finally:
        con.close()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
