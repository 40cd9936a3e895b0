"""Writing a run store: one transaction per flush, write-ahead log so readers see a consistent run
while training writes, and nothing held only in memory beyond the steps since the last flush."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from noether_dyn.store.connection import open_existing
from noether_dyn.store.errors import StoreError
from noether_dyn.store.schema import (
    BLOCK_TABLES,
    DDL,
    DEPTH_COLUMNS,
    GROUP_COLUMNS,
    MIGRATION_V2,
    SCHEMA_VERSION,
    STEP_COLUMNS,
    STORE_FILENAME,
)
from noether_dyn.symmetries.symmetry import Symmetry


class RunWriter:
    """Appends to ``<run_dir>/run.sqlite``.

    ``mode`` is ``"new"`` (refuse a directory that holds a run), ``"overwrite"`` (replace it) or
    ``"resume"`` (continue it; it must exist).
    """

    def __init__(self, run_dir: str | Path, mode: str = "new") -> None:
        if mode not in ("new", "overwrite", "resume"):
            raise ValueError(f"mode must be 'new', 'overwrite' or 'resume', got {mode!r}.")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STORE_FILENAME
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise StoreError(
                f"run_dir '{self.run_dir}' is a file, not a directory. Pass a directory path."
            )
        exists = self.path.exists()
        if mode == "resume":
            if not exists:
                raise StoreError(
                    f"Cannot resume: no run at '{self.path}'. Drop resume=True to start a new run."
                )
            self.con = open_existing(self.path, readonly=False)
            self._migrate()
        else:
            if exists and mode == "new":
                raise StoreError(
                    f"run_dir '{self.run_dir}' already holds a run ({self.path.name}). Pass "
                    "resume=True to continue it, overwrite=True to replace it, or another run_dir."
                )
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"Cannot create run_dir '{self.run_dir}': {exc}.") from exc
            if exists:
                for suffix in ("", "-wal", "-shm"):
                    Path(str(self.path) + suffix).unlink(missing_ok=True)
            self.con = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
            self.con.execute("PRAGMA page_size = 65536")  # charge blocks are large blobs
            self.con.executescript(DDL)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.commit()

    def last_step(self) -> int | None:
        row = self.con.execute("SELECT MAX(step) FROM steps").fetchone()
        return None if row[0] is None else int(row[0])

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, items: dict[str, Any]) -> None:
        with self.con:
            self.con.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in items.items()],
            )

    def symmetry_names(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT symmetry FROM symmetries ORDER BY idx")]

    def set_symmetries(
        self, symmetries: Sequence[Symmetry], dropped: Sequence[Any] | None = None
    ) -> None:
        """Store the tracked symmetries and, when given, the dropped candidates (records with
        ``name, kind, params, signs, defect, rule``, as ``noether_dyn.symmetries.Dropped``)."""
        with self.con:
            if dropped is not None:
                self.con.execute("DELETE FROM dropped")
                self.con.executemany(
                    "INSERT INTO dropped VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (i, d.name, d.kind, json.dumps(list(d.params)), json.dumps(list(d.signs)),
                         d.defect, d.rule)
                        for i, d in enumerate(dropped)
                    ],
                )  # fmt: skip
            self.con.execute("DELETE FROM symmetries")
            self.con.executemany(
                "INSERT INTO symmetries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
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
                    )
                    for i, s in enumerate(symmetries)
                ],
            )

    def write_depth_profile(self, step: int, rows: np.ndarray) -> None:
        """Store a depth profile taken at ``step``: ``rows`` (n_layers, 8) in the order
        layer, sigma_max, sigma_min, defect, transmission, stability, h_max, max_real (rows of
        6, as version 1 took them, get NaN for the last two)."""
        width = len(DEPTH_COLUMNS) - 1
        if rows.ndim == 2 and rows.shape[1] < width:
            pad = np.full((rows.shape[0], width - rows.shape[1]), np.nan)
            rows = np.concatenate([rows, pad], axis=1)
        with self.con:
            self.con.execute("DELETE FROM depth_profile WHERE step = ?", (step,))
            self.con.executemany(
                f"INSERT INTO depth_profile ({', '.join(DEPTH_COLUMNS)}) VALUES "
                f"({', '.join('?' * len(DEPTH_COLUMNS))})",
                [(step, int(r[0]), *map(float, r[1:])) for r in rows.tolist()],
            )

    def add_event(self, step: int, kind: str, message: str) -> None:
        """Record one event (``events(step, kind, message)``) in its own transaction."""
        with self.con:
            self.con.execute("INSERT INTO events VALUES (?, ?, ?)", (step, kind, message))

    def truncate(
        self,
        first_dropped: int,
        *,
        meta: dict[str, Any] | None = None,
        event: tuple[str, str] | None = None,
    ) -> None:
        """Drop every step >= ``first_dropped`` (a resume from an earlier checkpoint); in the same
        transaction set the ``meta`` items and record ``event`` = (kind, message) at step
        ``first_dropped``, so that a reader never sees the store truncated without them."""
        with self.con:
            self.con.execute("DELETE FROM steps WHERE step >= ?", (first_dropped,))
            self.con.execute("DELETE FROM groups WHERE step >= ?", (first_dropped,))
            self.con.execute("DELETE FROM events WHERE step >= ?", (first_dropped,))
            self.con.execute("DELETE FROM depth_profile WHERE step >= ?", (first_dropped,))
            for table in BLOCK_TABLES:
                self._truncate_blocks(table, first_dropped)
            if event is not None:
                self.con.execute(
                    "INSERT INTO events VALUES (?, ?, ?)", (first_dropped, event[0], event[1])
                )
            if meta:
                self.con.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [(k, json.dumps(v)) for k, v in meta.items()],
                )

    def _truncate_blocks(self, table: str, first_dropped: int) -> None:
        rows = self.con.execute(f"SELECT first_step, n_steps, steps, data FROM {table}").fetchall()
        for first, n, steps_blob, data_blob in rows:
            steps = np.frombuffer(steps_blob, dtype="<i8")
            if steps.size and steps[-1] < first_dropped:
                continue
            self.con.execute(f"DELETE FROM {table} WHERE first_step = ?", (first,))
            keep = steps < first_dropped
            if keep.any():
                data = np.frombuffer(data_blob, dtype="<f8").reshape(n, -1)[keep]
                self._insert_block(table, steps[keep], data)

    def _insert_block(self, table: str, steps: np.ndarray, data: np.ndarray) -> None:
        if not len(steps) or not data.size:
            return
        self.con.execute(
            f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?, ?)",
            (
                int(steps[0]),
                len(steps),
                np.ascontiguousarray(steps, dtype="<i8").tobytes(),
                np.ascontiguousarray(data, dtype="<f8").tobytes(),
            ),
        )

    def append(
        self,
        steps: np.ndarray,
        groups: np.ndarray,
        charge_steps: np.ndarray,
        charges: np.ndarray,
        events: Iterable[tuple[int, str, str]],
        meta: dict[str, Any],
        tensors: np.ndarray | None = None,
    ) -> None:
        """One flush, one transaction: rows of ``steps`` (n, len(STEP_COLUMNS)), ``groups``
        (k, len(GROUP_COLUMNS)), a charge block (``charges`` float64 of shape
        (len(charge_steps), n_symmetries, n_columns)), a tensor block (``tensors`` of shape
        (n, n_tensors, len(TENSOR_COLUMNS)), one per step row), events and updated metadata."""
        try:
            with self.con:
                ph = ", ".join("?" * len(STEP_COLUMNS))
                self.con.executemany(
                    f"INSERT OR REPLACE INTO steps VALUES ({ph})", _rows(steps, int_cols=1)
                )
                ph = ", ".join("?" * len(GROUP_COLUMNS))
                self.con.executemany(
                    f"INSERT OR REPLACE INTO groups VALUES ({ph})", _rows(groups, int_cols=2)
                )
                self._insert_block("charge_blocks", charge_steps, charges)
                if tensors is not None:
                    self._insert_block("tensor_blocks", steps[:, 0].astype(np.int64), tensors)
                self.con.executemany("INSERT INTO events VALUES (?, ?, ?)", list(events))
                self.con.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [(k, json.dumps(v)) for k, v in meta.items()],
                )
        except sqlite3.Error as exc:
            raise StoreError(f"Writing the run store '{self.path}' failed: {exc}.") from exc

    def close(self) -> None:
        self.con.close()

    def _migrate(self) -> None:
        """Bring an older store to :data:`SCHEMA_VERSION` in one transaction (new columns empty)."""
        if self.con.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        try:
            with self.con:
                for table, columns in MIGRATION_V2.items():
                    have = {r[1] for r in self.con.execute(f"PRAGMA table_info({table})")}
                    for column in columns:
                        if column.split()[0] not in have:
                            self.con.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
                for statement in DDL.split(";"):
                    if "CREATE TABLE" in statement:
                        self.con.execute(statement)
                self.con.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    ("schema_version", json.dumps(SCHEMA_VERSION)),
                )
                self.con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StoreError(f"Migrating the run store '{self.path}' failed: {exc}.") from exc


def _rows(array: np.ndarray, int_cols: int) -> list[tuple]:
    """float64 rows to tuples with the first ``int_cols`` columns as ints and NaN as NULL-free
    floats (SQLite stores NaN as NULL; the reader turns NULL back into NaN)."""
    out = []
    for row in array.tolist():
        out.append(tuple(int(v) for v in row[:int_cols]) + tuple(row[int_cols:]))
    return out
