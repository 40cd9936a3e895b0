"""Checks that turn a malformed store into one ``StoreError`` naming the path and what is wrong,
before anything is allocated from the file's claims (a blob's length is checked against its
``n_steps`` and the symmetry or tensor count with SQL ``length()``, without reading it)."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from noether_dyn.store.errors import StoreError
from noether_dyn.store.schema import DEPTH_COLUMNS, GROUP_COLUMNS, STEP_COLUMNS
from noether_dyn.symmetries.kinds import kind_names
from noether_dyn.symmetries.symmetry import Symmetry

_NUM = ("integer", "real", "null")
_INT = ("integer",)
_TEXT = ("text",)
# SQLite storage classes allowed per column of every table.
COLUMN_TYPES: dict[str, dict[str, tuple[str, ...]]] = {
    "meta": {"key": _TEXT, "value": _TEXT},
    "steps": {"step": _INT, **{c: _NUM for c in STEP_COLUMNS[1:]}},
    "groups": {"step": _INT, "grp": _INT, **{c: _NUM for c in GROUP_COLUMNS[2:]}},
    "symmetries": {
        "idx": _INT,
        "symmetry": _TEXT,
        "kind": _TEXT,
        "params": _TEXT,
        "signs": _TEXT,
        "verified": ("integer", "null"),
        "defect": _NUM,
        "note": ("text", "null"),
        "exactness": ("text", "null"),
        "parent": ("text", "null"),
        "slices": ("text", "null"),
    },
    "dropped": {
        "idx": _INT,
        "symmetry": _TEXT,
        "kind": _TEXT,
        "params": _TEXT,
        "signs": _TEXT,
        "defect": _NUM,
        "rule": _TEXT,
    },
    "charge_blocks": {"first_step": _INT, "n_steps": _INT, "steps": ("blob",), "data": ("blob",)},
    "tensor_blocks": {"first_step": _INT, "n_steps": _INT, "steps": ("blob",), "data": ("blob",)},
    "events": {"step": ("integer", "null"), "kind": _TEXT, "message": _TEXT},
    "depth_profile": {"step": _INT, "layer": _INT, **{c: _NUM for c in DEPTH_COLUMNS[2:]}},
    "matrix_charges": {
        "step": _INT,
        "symmetry": _TEXT,
        "i": _INT,
        "j": _INT,
        **{c: _NUM for c in ("charge", "first_order", "kinetic", "decay")},
    },  # fmt: skip
}
# Added by schema version 2: a version-1 store lacks them (read as empty), nothing else may.
OPTIONAL_COLUMNS: dict[str, frozenset[str]] = {
    "symmetries": frozenset({"exactness", "parent", "slices"}),
    "depth_profile": frozenset({"h_max", "max_real"}),
}
OPTIONAL_TABLES = frozenset({"dropped", "matrix_charges"})
# JSON nesting deeper than this is refused before parsing (the store writes at most 4 levels).
MAX_JSON_DEPTH = 32
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def fail(path: Path, what: str) -> StoreError:
    return StoreError(f"The run store '{path}' is malformed: {what}. It cannot be read.")


def check_columns(
    con: sqlite3.Connection, path: Path, scanned_elsewhere: frozenset[str] = frozenset()
) -> None:
    """Every table has its columns, each holding only the storage classes it may hold (the
    tables in ``scanned_elsewhere`` are checked row by row as they are read, with
    :func:`row_ok_sql` and :func:`raise_bad_value`)."""
    for table, types in COLUMN_TYPES.items():
        have = present_columns(con, table)
        if not have and table in OPTIONAL_TABLES:
            continue
        optional = OPTIONAL_COLUMNS.get(table, frozenset())
        missing = [c for c in types if c not in have and c not in optional]
        if missing:
            raise fail(path, f"table {table} lacks the columns {missing}")
        if table not in scanned_elsewhere:
            raise_bad_value(con, path, table)


def present_columns(con: sqlite3.Connection, table: str) -> set[str]:
    """The columns ``table`` has (empty when it does not exist)."""
    return {r[1] for r in con.execute(f"PRAGMA table_info({table})")}


def row_ok_sql(table: str, have: set[str] | None = None) -> str:
    """An SQL expression, 1 where every column of the row (of those in ``have``, default all)
    holds an allowed storage class."""
    types = COLUMN_TYPES[table]
    cols = [c for c in types if have is None or c in have]
    return " AND ".join(f"typeof({c}) IN ({', '.join(repr(t) for t in types[c])})" for c in cols)


def raise_bad_value(con: sqlite3.Connection, path: Path, table: str) -> None:
    """Raise ``StoreError`` naming the first value of ``table`` of a disallowed storage class."""
    types = COLUMN_TYPES[table]
    have = present_columns(con, table)
    cols = [c for c in types if c in have]
    row = con.execute(
        f"SELECT {', '.join(f'typeof({c})' for c in cols)} FROM {table} "
        f"WHERE NOT ({row_ok_sql(table, have)}) LIMIT 1"
    ).fetchone()
    if row is not None:
        col, got = next((c, t) for c, t in zip(cols, row) if t not in types[c])
        raise fail(path, f"{table}.{col} holds a {got} value where {types[col]} is expected")


def check_unique(path: Path, what: str, keys: np.ndarray) -> None:
    """``keys`` (n, k) int64 rows, sorted: no row repeats."""
    if len(keys) > 1 and (np.diff(keys, axis=0) == 0).all(axis=1).any():
        raise fail(path, f"{what} holds duplicated rows")


def decode_json(path: Path, where: str, text: str) -> Any:
    """``json.loads`` with bounded nesting, every failure a ``StoreError`` naming ``where``."""
    depth = 0
    for bracket in _BRACKET.findall(_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise fail(path, f"{where} nests JSON deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise fail(path, f"{where} is not valid JSON ({exc})") from None


def check_meta(path: Path, meta: dict[str, Any]) -> None:
    """The metadata the reader and the report index into have the types they expect."""
    for key in ("model", "optimizer", "monitor_state"):
        if key in meta and not isinstance(meta[key], (dict, type(None))):
            raise fail(path, f"meta[{key!r}] is a {type(meta[key]).__name__}, not an object")
    for key in ("command", "started", "symmetry_note", "noether_dyn_version", "torch_version"):
        if key in meta and not isinstance(meta[key], (str, type(None))):
            raise fail(path, f"meta[{key!r}] is a {type(meta[key]).__name__}, not a string")
    for key in ("every", "schema_version", "block_generation"):
        if key in meta and not _is_int(meta[key]):
            raise fail(path, f"meta[{key!r}] is {meta[key]!r}, not an integer")
    params = meta.get("parameters", [])
    if not isinstance(params, list):
        raise fail(path, f"meta['parameters'] is a {type(params).__name__}, not a list")
    for i, p in enumerate(params):
        ok = (
            isinstance(p, dict)
            and isinstance(p.get("name"), str)
            and _is_int(p.get("group"))
            and (
                "shape" not in p
                or (isinstance(p["shape"], list) and all(_is_int(d) for d in p["shape"]))
            )
        )
        if not ok:
            raise fail(
                path,
                f"meta['parameters'][{i}] is {str(p)[:80]!r}, not an object with a string name, "
                "an integer group and a list of integers as shape",
            )


def check_symmetry(
    path: Path, name: str, kind: str, params: Any, signs: Any, parent: Any = "", slices: Any = ()
) -> None:
    if kind not in kind_names():  # the registry: a kind registered by a plug-in reads too
        raise fail(path, f"symmetry {name!r} has kind {kind[:40]!r}, not one of {kind_names()}")
    if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
        raise fail(path, f"symmetry {name!r}: params is {str(params)[:80]}, not a list of names")
    if not isinstance(signs, list) or not all(
        isinstance(s, (int, float)) and not isinstance(s, bool) for s in signs
    ):
        raise fail(path, f"symmetry {name!r}: signs is {str(signs)[:80]}, not a list of numbers")
    if not isinstance(parent, str) or not isinstance(slices, list):
        raise fail(path, f"symmetry {name!r}: parent must be text and slices a JSON list")
    try:
        Symmetry(name, kind, tuple(params), tuple(signs), parent=parent,
                 slices=tuple(None if w is None else tuple(w) if isinstance(w, list) else w
                              for w in slices))  # fmt: skip
    except (ValueError, TypeError) as exc:
        raise fail(path, f"symmetry {name[:80]!r} is invalid: {exc}") from None


def check_block_index(
    path: Path, table: str, index: list[tuple], n_rows: int, n_cols: tuple[int, ...]
) -> list[int]:
    """Rows ``(first_step, n_steps, steps_length, data_length)`` of a block table, ordered by
    first_step: lengths agree with n_steps, the row count (symmetries or tensors) and one of the
    column counts ``n_cols`` (the current layout first, then older ones). Checked before any blob
    is read. Returns each block's column count."""
    widths = []
    for first, n, steps_len, data_len in index:
        if n < 1:
            raise fail(path, f"{table} block at step {first} has n_steps = {n}")
        if steps_len != 8 * n:
            raise fail(
                path,
                f"{table} block at step {first}: its steps blob holds {steps_len} bytes, not "
                f"8 x n_steps = {8 * n}",
            )
        width = next((c for c in n_cols if data_len == 8 * n * n_rows * c), None)
        if width is None or (n_rows == 0 and data_len):
            n_col = n_cols[0]
            raise fail(
                path,
                f"{table} block at step {first}: its data blob holds {data_len} bytes, not "
                f"8 x {n} steps x {n_rows} rows x {n_col} columns = {8 * n * n_rows * n_col}",
            )
        widths.append(width)
    return widths


def check_block_steps(
    path: Path, table: str, first: int, steps: np.ndarray, previous_last: int
) -> None:
    """A block's steps start at its key, increase strictly, and follow the previous block's."""
    if steps[0] != first:
        raise fail(path, f"{table} block at step {first} starts at step {int(steps[0])}")
    if len(steps) > 1 and not (np.diff(steps) > 0).all():
        raise fail(path, f"{table} block at step {first} holds steps out of order or repeated")
    if first <= previous_last:
        raise fail(
            path,
            f"{table} block at step {first} overlaps the block before it (which ends at step "
            f"{previous_last})",
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
