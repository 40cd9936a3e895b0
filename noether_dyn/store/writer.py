"""Writing a run store: one transaction per flush, write-ahead log so readers see a consistent run
while training writes, and nothing held only in memory beyond the steps since the last flush.

Guarantees (each tested in ``tests/test_store_faults.py``):

- creation is atomic (``noether_dyn.store.create``): a store is complete or absent;
- one live writer per run directory, across processes (``noether_dyn.store.lock``);
- every transaction runs under a ``threading.Lock``, so methods may be called from any thread;
- a failed write raises :class:`StoreWriteError` naming the path and the cause, and rolls back
  only its own transaction; ``close()`` never raises (it warns with :class:`StoreWarning`),
  checkpoints the write-ahead log and leaves WAL mode, so a finished run is one file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from noether_dyn.store.connection import cause, open_existing
from noether_dyn.store.create import (
    CREATING_SUFFIX,
    SYMMETRY_INSERT,
    add_unit_columns,
    create_store,
    dropped_rows,
    meta_rows,
    symmetry_rows,
)
from noether_dyn.store.errors import StoreError, StoreLockedError, StoreWarning, StoreWriteError
from noether_dyn.store.lock import WriterLock, describe, live_writer
from noether_dyn.store.schema import (
    BLOCK_TABLES,
    DDL,
    DEPTH_COLUMNS,
    GENERATION_KEY,
    GROUP_COLUMNS,
    MATRIX_CHARGE_DDL,
    MIGRATION_V2,
    SCHEMA_VERSION,
    STEP_COLUMNS,
    STORE_FILENAME,
)
from noether_dyn.symmetries.symmetry import Symmetry

# The write-ahead log is checkpointed into the store once it holds this many bytes of pages and
# truncated back to JOURNAL_LIMIT bytes after a checkpoint (SQLite's default, 1000 pages, let it
# reach 64 MiB with the 64 KiB pages of earlier stores).
WAL_CHECKPOINT_BYTES = 2 * 1024 * 1024
JOURNAL_LIMIT = 4 * 1024 * 1024
# At close, how long to wait for a reader's transaction before leaving the store in WAL mode.
CLOSE_BUSY_MS = 2000


class RunWriter:
    """Appends to ``<run_dir>/run.sqlite``.

    ``mode`` is ``"new"`` (refuse a directory that holds a run), ``"overwrite"`` (replace it) or
    ``"resume"`` (continue it; it must exist). ``meta`` (JSON values) and ``symmetries`` are
    stored in the creating commit (``new``/``overwrite``), so that a reader never sees a store
    without them; ``set_meta``/``set_symmetries`` after construction still work.

    Raises ``StoreLockedError`` while another live writer (any process, this one included) holds
    ``run_dir``, ``StoreWriteError`` when the store cannot be created or written, ``StoreError``
    for a bad ``run_dir`` or store.
    """

    def __init__(
        self,
        run_dir: str | Path,
        mode: str = "new",
        *,
        meta: dict[str, Any] | None = None,
        symmetries: Sequence[Symmetry] | None = None,
    ) -> None:
        if mode not in ("new", "overwrite", "resume"):
            raise ValueError(f"mode must be 'new', 'overwrite' or 'resume', got {mode!r}.")
        if mode == "resume" and (meta or symmetries):
            raise ValueError(
                "meta= and symmetries= are written when a run is created; with mode='resume' "
                "call set_meta()/set_symmetries() instead."
            )
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STORE_FILENAME
        self._tx = threading.Lock()
        self._closed = False
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise StoreError(
                f"run_dir '{self.run_dir}' is a file, not a directory. Pass a directory path."
            )
        if mode == "resume" and not self.path.exists():
            holder = live_writer(self.run_dir)
            if holder is not None:
                raise StoreLockedError(
                    f"Cannot resume '{self.path}': a live writer is creating it "
                    f"({describe(holder)}). Wait for it to end, or pass another run_dir."
                )
            raise StoreError(self._no_run_to_resume())
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot create run_dir '{self.run_dir}': {exc}.") from exc
        self._lock = WriterLock.acquire(self.run_dir, mode)
        try:
            self.con = self._open(mode, meta, symmetries)
        except BaseException:
            self._lock.release()
            raise

    def _open(
        self, mode: str, meta: dict[str, Any] | None, symmetries: Sequence[Symmetry] | None
    ) -> sqlite3.Connection:
        exists = self.path.exists()
        if mode == "resume":
            if not exists:  # removed between the check above and the lock
                raise StoreError(self._no_run_to_resume())
            con = open_existing(self.path, readonly=False, own_lock=True)
            _migrate(con, self.path)
        else:
            if exists and mode == "new":
                raise StoreError(
                    f"run_dir '{self.run_dir}' already holds a run ({self.path.name}). Pass "
                    "resume=True to continue it, overwrite=True to replace it, or another run_dir."
                )
            try:
                create_store(self.path, meta, symmetries)
            except (sqlite3.Error, OSError) as exc:
                raise StoreWriteError(
                    f"Creating the run store '{self.path}' failed: {_reason(exc)}. Nothing was "
                    "stored; a run that was there is unchanged."
                ) from exc
            con = open_existing(self.path, readonly=False, own_lock=True)
        try:
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("PRAGMA synchronous = NORMAL")
            page = con.execute("PRAGMA page_size").fetchone()[0]
            con.execute(f"PRAGMA wal_autocheckpoint = {max(1, WAL_CHECKPOINT_BYTES // page)}")
            con.execute(f"PRAGMA journal_size_limit = {JOURNAL_LIMIT}")
            con.commit()
        except sqlite3.Error as exc:
            con.close()
            raise StoreWriteError(
                f"Opening the run store '{self.path}' for writing failed: {cause(exc)}."
            ) from exc
        return con

    def _no_run_to_resume(self) -> str:
        interrupted = Path(f"{self.path}{CREATING_SUFFIX}").exists()
        return (
            f"Cannot resume: no run at '{self.path}'"
            + (
                " (an earlier creation was interrupted before its commit, so nothing was stored)"
                if interrupted
                else ""
            )
            + ". Drop resume=True to start a new run."
        )

    # ------------------------------------------------------------------ transactions
    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One transaction under the writer's thread lock; SQLite errors become
        ``StoreWriteError`` naming the path, and the transaction is rolled back."""
        with self._tx:
            if self._closed:
                raise StoreError(f"{what}: the writer of '{self.path}' is closed.")
            try:
                with self.con:
                    yield self.con
            except sqlite3.Error as exc:
                raise StoreWriteError(
                    f"{what} in the run store '{self.path}' failed: {cause(exc)}. Every earlier "
                    "flush is kept."
                ) from exc

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._transaction("Reading") as con:
            return con.execute(sql, params).fetchall()

    # ------------------------------------------------------------------ reads
    def last_step(self) -> int | None:
        row = self._query("SELECT MAX(step) FROM steps")[0]
        return None if row[0] is None else int(row[0])

    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        if not rows:
            return default
        try:
            return json.loads(rows[0][0])
        except (TypeError, ValueError, RecursionError) as exc:
            raise StoreError(
                f"The run store '{self.path}' holds invalid JSON in meta[{key!r}]: {exc}."
            ) from exc

    def symmetry_names(self) -> list[str]:
        return [r[0] for r in self._query("SELECT symmetry FROM symmetries ORDER BY idx")]

    # ------------------------------------------------------------------ writes
    def set_meta(self, items: dict[str, Any]) -> None:
        rows = meta_rows(items)
        with self._transaction("Writing metadata") as con:
            con.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", rows)

    def set_symmetries(
        self, symmetries: Sequence[Symmetry], dropped: Sequence[Any] | None = None
    ) -> None:
        """Store the tracked symmetries and, when given, the dropped candidates (records with
        ``name, kind, params, signs, defect, rule``, as ``noether_dyn.symmetries.Dropped``)."""
        rows = symmetry_rows(symmetries)
        drops = None if dropped is None else dropped_rows(dropped)
        with self._transaction("Writing the symmetries") as con:
            if drops is not None:
                con.execute("DELETE FROM dropped")
                con.executemany("INSERT INTO dropped VALUES (?, ?, ?, ?, ?, ?, ?)", drops)
            add_unit_columns(con)
            con.execute("DELETE FROM symmetries")
            con.executemany(SYMMETRY_INSERT, rows)

    def add_event(self, step: int | None, kind: str, message: str) -> None:
        """Record one event (a resume, a failure) in its own transaction."""
        with self._transaction("Writing an event") as con:
            con.execute(
                "INSERT INTO events VALUES (?, ?, ?)",
                (None if step is None else int(step), str(kind), str(message)),
            )

    def write_depth_profile(self, step: int, rows: np.ndarray) -> None:
        """Store a depth profile taken at ``step``: ``rows`` (n_layers, 8) in the order
        layer, sigma_max, sigma_min, defect, transmission, stability, h_max, max_real (rows of
        6, as version 1 took them, get NaN for the last two)."""
        width = len(DEPTH_COLUMNS) - 1
        if rows.ndim == 2 and rows.shape[1] < width:
            pad = np.full((rows.shape[0], width - rows.shape[1]), np.nan)
            rows = np.concatenate([rows, pad], axis=1)
        values = [(step, int(r[0]), *map(float, r[1:])) for r in rows.tolist()]
        sql = (
            f"INSERT INTO depth_profile ({', '.join(DEPTH_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(DEPTH_COLUMNS))})"
        )
        with self._transaction("Writing a depth profile") as con:
            con.execute("DELETE FROM depth_profile WHERE step = ?", (step,))
            con.executemany(sql, values)

    def truncate(
        self,
        first_dropped: int,
        *,
        meta: dict[str, Any] | None = None,
        event: tuple[int | None, str, str] | None = None,
    ) -> None:
        """Drop every step >= ``first_dropped`` (a resume from an earlier checkpoint) and, in the
        same transaction, write ``meta`` and the ``event`` ``(step, kind, message)``: a process
        killed at any moment leaves the store before or after all of it."""
        with self._transaction("Truncating") as con:
            for table in ("steps", "groups", "events", "depth_profile"):
                con.execute(f"DELETE FROM {table} WHERE step >= ?", (first_dropped,))
            if con.execute("PRAGMA table_info(matrix_charges)").fetchall():
                con.execute("DELETE FROM matrix_charges WHERE step >= ?", (first_dropped,))
            for table in BLOCK_TABLES:
                self._truncate_blocks(table, first_dropped)
            self._bump_generation()
            if event is not None:
                step, kind, message = event
                con.execute(
                    "INSERT INTO events VALUES (?, ?, ?)",
                    (None if step is None else int(step), str(kind), str(message)),
                )
            if meta:
                con.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta_rows(meta)
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
        matrix: tuple[np.ndarray, Sequence[str]] | None = None,
    ) -> None:
        """One flush, one transaction: rows of ``steps`` (n, len(STEP_COLUMNS)), ``groups``
        (k, len(GROUP_COLUMNS)), a charge block (``charges`` float64 of shape
        (len(charge_steps), n_symmetries, n_columns)), a tensor block (``tensors`` of shape
        (n, n_tensors, len(TENSOR_COLUMNS)), one per step row), events, updated metadata and
        the flush's matrix-charge rows (``matrix = (rows, names)`` as
        :meth:`write_matrix_charges` takes them): a flush is stored whole or not at all."""
        step_rows = _rows(steps, int_cols=1)
        group_rows = _rows(groups, int_cols=2)
        event_rows = list(events)
        meta_values = meta_rows(meta)
        matrix_rows = None if matrix is None else _matrix_rows(*matrix)
        with self._transaction("Writing a flush") as con:
            ph = ", ".join("?" * len(STEP_COLUMNS))
            con.executemany(f"INSERT OR REPLACE INTO steps VALUES ({ph})", step_rows)
            ph = ", ".join("?" * len(GROUP_COLUMNS))
            con.executemany(f"INSERT OR REPLACE INTO groups VALUES ({ph})", group_rows)
            self._insert_block("charge_blocks", charge_steps, charges)
            if tensors is not None:
                self._insert_block("tensor_blocks", steps[:, 0].astype(np.int64), tensors)
            con.executemany("INSERT INTO events VALUES (?, ?, ?)", event_rows)
            con.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta_values)
            if matrix_rows is not None:
                self._insert_matrix(matrix_rows)

    def write_matrix_charges(self, rows: np.ndarray, names: Sequence[str]) -> None:
        """Append matrix-charge rows alone, in their own transaction (a monitor's flush passes
        them to :meth:`append` instead, so that they land with their steps): ``rows`` float64
        (k, 8) in the order step, symmetry index (into ``names``), i, j, charge, first_order,
        kinetic, decay (``noether_dyn.capture.matrix.MATRIX_ROW``)."""
        values = _matrix_rows(rows, names)
        with self._transaction("Writing matrix charges"):
            self._insert_matrix(values)

    def _insert_matrix(self, values: list[tuple]) -> None:
        """Insert matrix-charge rows inside the caller's transaction (the optional table is
        created by the first)."""
        self.con.execute(MATRIX_CHARGE_DDL)
        self.con.executemany(
            "INSERT OR REPLACE INTO matrix_charges VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values
        )

    def _truncate_blocks(self, table: str, first_dropped: int) -> None:
        rows = self.con.execute(
            f"SELECT first_step, n_steps, steps, data FROM {table} WHERE first_step < ? "
            f"ORDER BY first_step DESC LIMIT 1",
            (first_dropped,),
        ).fetchall()
        self.con.execute(f"DELETE FROM {table} WHERE first_step >= ?", (first_dropped,))
        for first, n, steps_blob, data_blob in rows:
            steps = np.frombuffer(steps_blob, dtype="<i8")
            if not steps.size or steps[-1] < first_dropped:
                continue
            self.con.execute(f"DELETE FROM {table} WHERE first_step = ?", (first,))
            keep = steps < first_dropped
            data = np.frombuffer(data_blob, dtype="<f8").reshape(n, -1)[keep]
            self._insert_block(table, steps[keep], data)

    def _insert_block(self, table: str, steps: np.ndarray, data: np.ndarray) -> None:
        if not len(steps) or not data.size:
            return
        first = int(steps[0])
        if self.con.execute(f"SELECT 1 FROM {table} WHERE first_step = ?", (first,)).fetchone():
            self._bump_generation()  # a block replaced: a lazy reader must reload
        self.con.execute(
            f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?, ?)",
            (
                first,
                len(steps),
                np.ascontiguousarray(steps, dtype="<i8").tobytes(),
                np.ascontiguousarray(data, dtype="<f8").tobytes(),
            ),
        )

    def _bump_generation(self) -> None:
        """Count rewrites of stored blocks (``meta["block_generation"]``), so that a reader
        holding a snapshot's block index detects that it changed (see ``Run.charge_array``)."""
        self.con.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, COALESCE("
            "(SELECT CAST(value AS INTEGER) + 1 FROM meta WHERE key = ?), 1))",
            (GENERATION_KEY, GENERATION_KEY),
        )

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Checkpoint the write-ahead log, leave WAL mode (the finished run is one file, readable
        from read-only storage), close and release the writer lock. Idempotent; never raises:
        a step that fails is reported with a ``StoreWarning`` naming the path, and every
        completed flush stays in the store."""
        with self._tx:
            if self._closed:
                return
            self._closed = True
            try:
                self._finish()
            finally:
                try:
                    self.con.close()
                except Exception as exc:  # noqa: BLE001 - close() must not raise
                    _warn(f"closing the run store '{self.path}' failed: {_reason(exc)}")
                self._lock.release()

    def _finish(self) -> None:
        try:
            if self.con.in_transaction:  # a caller's uncommitted statements: not a flush
                self.con.rollback()
            self.con.execute(f"PRAGMA busy_timeout = {CLOSE_BUSY_MS}")
            self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            mode = self.con.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
        except sqlite3.Error as exc:
            _warn(
                f"the run store '{self.path}' could not leave WAL mode at close ({cause(exc)}); "
                "every completed flush is kept in it and its write-ahead log, readable where its "
                "directory is writable"
            )
            return
        if str(mode).lower() != "delete":
            _warn(
                f"the run store '{self.path}' stays in WAL mode (another connection was reading "
                "it at close); every completed flush is kept, readable where its directory is "
                "writable"
            )

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunWriter('{self.run_dir}', closed={self._closed})"


def _migrate(con: sqlite3.Connection, path: Path) -> None:
    """Bring an older store to :data:`SCHEMA_VERSION` in one transaction (new columns empty)."""
    if con.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    try:
        with con:
            for table, columns in MIGRATION_V2.items():
                have = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
                for column in columns:
                    if column.split()[0] not in have:
                        con.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
            for statement in DDL.split(";"):
                if "CREATE TABLE" in statement:
                    con.execute(statement)
            con.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                ("schema_version", json.dumps(SCHEMA_VERSION)),
            )
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except sqlite3.Error as exc:
        con.close()
        raise StoreWriteError(f"Migrating the run store '{path}' failed: {cause(exc)}.") from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, sqlite3.Error):
        return cause(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} (errno {exc.errno})"
    return f"{type(exc).__name__}: {exc}"


def _warn(message: str) -> None:
    warnings.warn(f"noether-dyn: {message}.", StoreWarning, stacklevel=4)


def _rows(array: np.ndarray, int_cols: int) -> list[tuple]:
    """float64 rows to tuples with the first ``int_cols`` columns as ints and NaN as NULL-free
    floats (SQLite stores NaN as NULL; the reader turns NULL back into NaN)."""
    out = []
    for row in array.tolist():
        out.append(tuple(int(v) for v in row[:int_cols]) + tuple(row[int_cols:]))
    return out


def _matrix_rows(rows: np.ndarray, names: Sequence[str]) -> list[tuple]:
    """Host matrix-charge rows (k, 8) float64 as the table's tuples (symmetry index -> name)."""
    ints = rows[:, :4].astype(np.int64)
    symbols = np.asarray(names, dtype=object)[ints[:, 1]]
    return list(
        zip(ints[:, 0].tolist(), symbols.tolist(), ints[:, 2].tolist(), ints[:, 3].tolist(),
            *(rows[:, k].tolist() for k in range(4, 8)))
    )  # fmt: skip
