"""Reading a run store: ``load_run(path) -> Run`` with pandas DataFrames.

``load_run`` reads every table in one read transaction (one consistent snapshot, even while a
writer appends) and checks what it reads (``noether_dyn.store.checks``). The large charge and
tensor blocks are read on first use, in a second transaction that first checks that the blocks of
the snapshot are unchanged (same file, same ``block_generation``), and fails otherwise.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from noether_dyn.store import checks
from noether_dyn.store.connection import cause, open_existing, store_path
from noether_dyn.store.errors import StoreError
from noether_dyn.store.schema import (
    BLOCK_TABLES,
    CHARGE_COLUMNS,
    DEPTH_COLUMNS,
    DROPPED_COLUMNS,
    GENERATION_KEY,
    GROUP_COLUMNS,
    LEGACY_CHARGE_COLUMNS,
    MATRIX_CHARGE_COLUMNS,
    STEP_COLUMNS,
    SYMMETRY_COLUMNS,
    TENSOR_COLUMNS,
)

_FRAME_TABLES = frozenset({"steps", "groups", "depth_profile", "matrix_charges"})


@dataclass(frozen=True)
class _BlockIndex:
    """The blocks of one block table in a snapshot: keys, step counts and all steps."""

    first: list[int]
    n_steps: list[int]
    steps: np.ndarray
    n_rows: int
    n_col: int
    widths: list[int]
    """Each block's column count (``n_col``, or fewer in blocks of an older layout)."""


class Run:
    """A saved run, read once from its store (safe while the run is still writing: the reader
    sees the last completed flush).

    Attributes (pandas DataFrames unless said):
        meta: dict of the run's metadata (JSON values; see ``noether_dyn.store.schema``).
        steps: one row per logged step: ``step, time, lr, loss, l2, potential, kinetic,
            log_prefactor, param_norm, grad_norm, update_norm, wall_time``.
        groups: the same per param group (``step, grp, lr, momentum, weight_decay, mass, kinetic,
            l2, log_prefactor``).
        symmetries: ``symmetry, kind, params, signs, verified, defect, note, exactness,
            parent, slices`` (``parent``: the layer-level symmetry a per-unit one refines, ``""``
            for a layer-level one; ``slices``: per parameter None or ``(dim, index)``).
        charges: long format, one row per symmetry and logged step: ``step, symmetry, kind`` and
            the columns of ``noether_dyn.store.schema.CHARGE_COLUMNS``.
        tensors: long format, one row per parameter tensor and logged step: ``step, param,
            group`` and ``sq_norm, grad_sq, update_sq, metric_update_sq, inv_metric`` (see
            ``noether_dyn.store.schema``); read on first use.
        events: ``step, kind, message``.
        depth_profile: ``step, layer, sigma_max, sigma_min, defect, transmission, stability``
            (empty unless ``Monitor.log_depth_profile`` was called).
        matrix_charges: long format, one row per logged step, GL record and upper-triangle
            entry (i <= j): ``step, symmetry, i, j, charge, first_order, kinetic, decay, rule``
            (``rule = first_order - decay``; ``decay`` is -2 eta lambda C_n, under SGD with
            momentum its instantaneous term only and NaN under Adam-type coupled L2, as
            ``meta["matrix_decay"]`` says per group); empty unless the run was watched with
            ``matrix_charges=`` (the records: ``meta["matrix_symmetries"]``). See
            :meth:`matrix_charge` for one record as (steps, n, n) arrays.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = store_path(path)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        con = open_existing(path, readonly=True)
        try:
            self._identity = _identity(self.path)
            con.isolation_level = None
            con.execute("BEGIN")  # one read transaction: every table from the same commit
            self._read(con)
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"The run store '{self.path}' is corrupted and cannot be read: {cause(exc)}."
            ) from exc
        finally:
            con.close()

    def _read(self, con: sqlite3.Connection) -> None:
        path = self.path
        checks.check_columns(con, path, scanned_elsewhere=_FRAME_TABLES)
        meta: dict[str, Any] = {}
        for key, value in con.execute("SELECT key, value FROM meta ORDER BY key"):
            if key in meta:
                raise checks.fail(path, f"meta holds the key {key[:80]!r} twice")
            meta[key] = checks.decode_json(path, f"meta[{key[:80]!r}]", value)
        checks.check_meta(path, meta)
        self.meta = meta
        self._generation = int(meta.get(GENERATION_KEY, 0))
        self.steps = _frame(con, path, "steps", STEP_COLUMNS, ("step",))
        self.groups = _frame(con, path, "groups", GROUP_COLUMNS, ("step", "grp"))
        self.depth_profile = _frame(con, path, "depth_profile", DEPTH_COLUMNS, ("step", "layer"))
        self.symmetries = _symmetries(con, path)
        self.dropped = _dropped(con, path)
        self.matrix_charges = _matrix_charges(con, path)
        self.events = pd.DataFrame(
            con.execute("SELECT step, kind, message FROM events ORDER BY step").fetchall(),
            columns=["step", "kind", "message"],
        )
        n_rows = {
            "charge_blocks": (len(self.symmetries), len(CHARGE_COLUMNS)),
            "tensor_blocks": (len(meta.get("parameters", [])), len(TENSOR_COLUMNS)),
        }
        self._blocks = {t: _block_index(con, path, t, *n_rows[t]) for t in BLOCK_TABLES}

    def charge_array(self) -> tuple[np.ndarray, np.ndarray]:
        """The charge table as arrays: steps (n_steps,) int64 and data float64 of shape
        (n_steps, n_symmetries, len(CHARGE_COLUMNS)), symmetries in ``self.symmetries`` order.
        Read from the store on first use (``load_run`` itself reads no charge data); raises
        ``StoreError`` if the run's blocks were rewritten (a resume from an earlier step) or the
        file replaced since ``load_run``: load the run again."""
        if "charge_blocks" not in self._arrays:
            self._arrays["charge_blocks"] = self._read_blocks("charge_blocks")
        return self._arrays["charge_blocks"]

    def tensor_array(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-tensor statistics as arrays: steps (n_steps,) int64 and data float64 of shape
        (n_steps, n_tensors, len(TENSOR_COLUMNS)), tensors in ``meta["parameters"]`` order.
        Read on first use, like :meth:`charge_array`."""
        if "tensor_blocks" not in self._arrays:
            self._arrays["tensor_blocks"] = self._read_blocks("tensor_blocks")
        return self._arrays["tensor_blocks"]

    def _read_blocks(self, table: str) -> tuple[np.ndarray, np.ndarray]:
        index = self._blocks[table]
        if not index.first or index.n_rows == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, index.n_rows, index.n_col))
        data = np.empty((len(index.steps), index.n_rows, index.n_col))
        con = open_existing(self.path, readonly=True)
        try:
            con.isolation_level = None
            con.execute("BEGIN")
            row = con.execute("SELECT value FROM meta WHERE key = ?", (GENERATION_KEY,)).fetchone()
            generation = int(checks.decode_json(self.path, GENERATION_KEY, row[0])) if row else 0
            if generation != self._generation or _identity(self.path) != self._identity:
                raise StoreError(
                    f"The run store '{self.path}' was rewritten (resumed from an earlier step, "
                    "or replaced) after load_run read it. Call load_run again."
                )
            at = 0
            for first, n, width in zip(index.first, index.n_steps, index.widths):
                head = con.execute(
                    f"SELECT n_steps, length(data) FROM {table} WHERE first_step = ?", (first,)
                ).fetchone()
                if head != (n, n * 8 * index.n_rows * width):
                    raise StoreError(
                        f"The run store '{self.path}' changed after load_run read it ({table} "
                        f"block at step {first}). Call load_run again."
                    )
                (blob,) = con.execute(
                    f"SELECT data FROM {table} WHERE first_step = ?", (first,)
                ).fetchone()
                block = np.frombuffer(blob, dtype="<f8").reshape(n, index.n_rows, width)
                if width == index.n_col:
                    data[at : at + n] = block
                else:  # an older layout: its columns in place, the newer ones NaN
                    data[at : at + n] = np.nan
                    data[at : at + n, :, _legacy_positions(width)] = block
                at += n
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"The run store '{self.path}' is corrupted and cannot be read: {cause(exc)}."
            ) from exc
        finally:
            con.close()
        return index.steps, data

    @cached_property
    def tensors(self) -> pd.DataFrame:
        steps, data = self.tensor_array()
        params = self.meta.get("parameters", [])
        names = [p["name"] for p in params]
        n_t, n_steps = len(names), len(steps)
        frame = {
            "step": np.repeat(steps, n_t),
            "param": pd.Categorical.from_codes(
                np.tile(np.arange(n_t, dtype=np.int32), n_steps), names
            ),
            "group": np.tile(np.array([p["group"] for p in params], dtype=np.int64), n_steps),
        }
        flat = data.reshape(-1, len(TENSOR_COLUMNS))
        for j, c in enumerate(TENSOR_COLUMNS):
            frame[c] = flat[:, j]
        return pd.DataFrame(frame, copy=False)

    @cached_property
    def charges(self) -> pd.DataFrame:
        steps, data = self.charge_array()
        names = list(self.symmetries["symmetry"])
        kind_names = sorted(set(self.symmetries["kind"]))
        kind_codes = np.array([kind_names.index(k) for k in self.symmetries["kind"]], dtype=np.int8)
        n_sym, n_steps = len(names), len(steps)
        frame = {
            "step": np.repeat(steps, n_sym),
            "symmetry": pd.Categorical.from_codes(
                np.tile(np.arange(n_sym, dtype=np.int32), n_steps), names
            ),
            "kind": pd.Categorical.from_codes(np.tile(kind_codes, n_steps), kind_names),
        }
        flat = data.reshape(-1, len(CHARGE_COLUMNS))
        for j, c in enumerate(CHARGE_COLUMNS):
            frame[c] = flat[:, j]
        return pd.DataFrame(frame, copy=False)

    def charge(self, symmetry: str) -> pd.DataFrame:
        """The rows of one symmetry, indexed by step."""
        known = set(self.symmetries["symmetry"])
        if symmetry not in known:
            raise KeyError(
                f"No symmetry {symmetry!r} in run '{self.path}'. Known: {sorted(known) or 'none'}."
            )
        c = self.charges
        return c[c["symmetry"] == symmetry].set_index("step")

    def matrix_charge(self, symmetry: str, column: str = "charge") -> np.ndarray:
        """One GL record's ``column`` (``charge``, ``first_order``, ``kinetic``, ``decay`` or
        ``rule``) as a float64 array (n_steps, n, n), symmetric, steps in the order of
        ``self.matrix_charges`` (ascending; ``matrix_charge_steps`` gives them)."""
        m = self.matrix_charges
        rows = m[m["symmetry"] == symmetry]
        if rows.empty:
            known = sorted(set(m["symmetry"]))
            raise KeyError(
                f"No matrix charge {symmetry!r} in run '{self.path}'. Known: {known or 'none'}."
            )
        if column not in MATRIX_CHARGE_COLUMNS[4:] + ("rule",):
            raise ValueError(f"column must be one of {MATRIX_CHARGE_COLUMNS[4:] + ('rule',)}.")
        steps, at = np.unique(rows["step"].to_numpy(), return_inverse=True)
        i, j = rows["i"].to_numpy(), rows["j"].to_numpy()
        n = int(max(i.max(), j.max())) + 1
        out = np.full((len(steps), n, n), np.nan)
        values = rows[column].to_numpy(dtype=np.float64)
        out[at, i, j] = values
        out[at, j, i] = values
        return out

    def matrix_charge_steps(self, symmetry: str) -> np.ndarray:
        """The logged steps of :meth:`matrix_charge` (int64, ascending)."""
        m = self.matrix_charges
        return np.unique(m.loc[m["symmetry"] == symmetry, "step"].to_numpy())

    def __repr__(self) -> str:
        return (
            f"Run('{self.path}', steps={len(self.steps)}, symmetries={len(self.symmetries)}, "
            f"optimizer={self.meta.get('optimizer', {}).get('class')})"
        )


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _frame(
    con: sqlite3.Connection, path: Path, table: str, columns: tuple[str, ...], key: tuple[str, ...]
) -> pd.DataFrame:
    have = checks.present_columns(con, table)  # a version-1 store lacks version 2's columns
    picked = ", ".join(c if c in have else f"NULL AS {c}" for c in columns)
    rows = con.execute(
        f"SELECT {picked}, {checks.row_ok_sql(table, have)} FROM {table} ORDER BY {', '.join(key)}"
    ).fetchall()
    frame = pd.DataFrame(rows, columns=[*columns, "_ok"])
    if not frame["_ok"].all():
        checks.raise_bad_value(con, path, table)
    frame = frame.drop(columns="_ok")
    for c in columns:
        if c in key:
            frame[c] = frame[c].astype("int64")
        else:
            frame[c] = pd.to_numeric(frame[c]).astype("float64")
    checks.check_unique(path, f"table {table} (key {', '.join(key)})", frame[list(key)].to_numpy())
    return frame


def _symmetries(con: sqlite3.Connection, path: Path) -> pd.DataFrame:
    rows = []
    have = checks.present_columns(con, "symmetries")
    optional = ", ".join(c if c in have else "NULL" for c in ("exactness", "parent", "slices"))
    for name, kind, params, signs, verified, defect, note, exact, parent, slices in con.execute(
        "SELECT symmetry, kind, params, signs, verified, defect, note, "
        f"{optional} FROM symmetries ORDER BY idx"
    ):
        where = f"symmetry {name[:80]!r}"
        params = checks.decode_json(path, f"{where}: params", params)
        signs = checks.decode_json(path, f"{where}: signs", signs)
        parent = parent or ""
        slices = [] if slices is None else checks.decode_json(path, f"{where}: slices", slices)
        checks.check_symmetry(path, name, kind, params, signs, parent, slices)
        rows.append(
            (
                name,
                kind,
                tuple(params),
                tuple(signs),
                None if verified is None else bool(verified),
                np.nan if defect is None else float(defect),
                note or "",
                exact or "",
                parent,
                tuple(None if w is None else tuple(w) for w in slices),
            )
        )
    frame = pd.DataFrame(rows, columns=list(SYMMETRY_COLUMNS))
    if frame["symmetry"].duplicated().any():
        raise checks.fail(path, "table symmetries names a symmetry twice")
    return frame


def _dropped(con: sqlite3.Connection, path: Path) -> pd.DataFrame:
    """The detected candidates that were not tracked (version 2; none in a version-1 store)."""
    rows = []
    if checks.present_columns(con, "dropped"):
        for name, kind, params, signs, defect, rule in con.execute(
            "SELECT symmetry, kind, params, signs, defect, rule FROM dropped ORDER BY idx"
        ):
            where = f"dropped candidate {name[:80]!r}"
            params = checks.decode_json(path, f"{where}: params", params)
            signs = checks.decode_json(path, f"{where}: signs", signs)
            if not isinstance(params, list) or not isinstance(signs, list):
                raise checks.fail(path, f"{where}: params and signs must be JSON lists")
            rows.append(
                (name, kind, tuple(params), tuple(signs),
                 np.nan if defect is None else float(defect), rule)
            )  # fmt: skip
    return pd.DataFrame(rows, columns=list(DROPPED_COLUMNS))


def _matrix_charges(con: sqlite3.Connection, path: Path) -> pd.DataFrame:
    """The optional matrix-charge table (empty frame when the run has none)."""
    columns = [*MATRIX_CHARGE_COLUMNS, "rule"]
    have = checks.present_columns(con, "matrix_charges")
    if not have:
        frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
        return frame.astype({"step": "int64", "symmetry": "object", "i": "int64", "j": "int64"})
    rows = con.execute(
        f"SELECT {', '.join(MATRIX_CHARGE_COLUMNS)}, {checks.row_ok_sql('matrix_charges', have)} "
        "FROM matrix_charges ORDER BY step, symmetry, i, j"
    ).fetchall()
    frame = pd.DataFrame(rows, columns=[*MATRIX_CHARGE_COLUMNS, "_ok"])
    if not frame["_ok"].all():
        checks.raise_bad_value(con, path, "matrix_charges")
    frame = frame.drop(columns="_ok")
    for c in ("step", "i", "j"):
        frame[c] = frame[c].astype("int64")
    for c in MATRIX_CHARGE_COLUMNS[4:]:
        frame[c] = pd.to_numeric(frame[c]).astype("float64")
    frame["rule"] = frame["first_order"] - frame["decay"]
    return frame


def _legacy_positions(width: int) -> list[int]:
    """Where the columns of an older charge layout of ``width`` columns sit in CHARGE_COLUMNS."""
    cols = next(c for c in LEGACY_CHARGE_COLUMNS.values() if len(c) == width)
    return [CHARGE_COLUMNS.index(c) for c in cols]


def _block_index(
    con: sqlite3.Connection, path: Path, table: str, n_rows: int, n_col: int
) -> _BlockIndex:
    legacy = [len(c) for c in LEGACY_CHARGE_COLUMNS.values()] if table == "charge_blocks" else []
    """Check a block table's lengths without reading its blobs, then read and check its steps."""
    index = con.execute(
        f"SELECT first_step, n_steps, length(steps), length(data) FROM {table} ORDER BY first_step"
    ).fetchall()
    widths = checks.check_block_index(path, table, index, n_rows, (n_col, *legacy))
    parts, last = [], -(2**63)
    for (first, *_), (blob,) in zip(
        index, con.execute(f"SELECT steps FROM {table} ORDER BY first_step")
    ):
        steps = np.frombuffer(blob, dtype="<i8")
        checks.check_block_steps(path, table, first, steps, last)
        parts.append(steps)
        last = int(steps[-1])
    steps = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return _BlockIndex([r[0] for r in index], [r[1] for r in index], steps, n_rows, n_col, widths)


def load_run(path: str | Path) -> Run:
    """Read the run at ``path`` (a ``run_dir`` given to ``watch``, or its ``run.sqlite``).

    Raises ``StoreError`` naming the path for a missing, empty, corrupted or future-version store,
    ``TypeError``/``ValueError`` naming ``path`` when it is not a non-empty path.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise (ValueError if isinstance(path, str) else TypeError)(
            f"load_run: path must be a run directory or its run.sqlite (a non-empty str or "
            f"pathlib.Path), got {path!r}."
        )
    return Run(path)
