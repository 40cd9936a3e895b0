"""Reading a run store: ``load_run(path) -> Run`` with pandas DataFrames."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from noether_dyn.store.connection import open_existing, store_path
from noether_dyn.store.schema import (
    CHARGE_COLUMNS,
    DEPTH_COLUMNS,
    GROUP_COLUMNS,
    LEGACY_CHARGE_COLUMNS,
    STEP_COLUMNS,
    TENSOR_COLUMNS,
)


class Run:
    """A saved run, read once from its store (safe while the run is still writing: the reader
    sees the last completed flush).

    Attributes (pandas DataFrames unless said):
        meta: dict of the run's metadata (JSON values; see ``noether_dyn.store.schema``).
        steps: one row per logged step: ``step, time, lr, loss, l2, potential, kinetic,
            log_prefactor, param_norm, grad_norm, update_norm, wall_time``.
        groups: the same per param group (``step, grp, lr, momentum, weight_decay, mass, kinetic,
            l2, log_prefactor``).
        symmetries: ``symmetry, kind, params, signs, verified, defect, note``.
        charges: long format, one row per symmetry and logged step: ``step, symmetry, kind`` and
            the columns of ``noether_dyn.store.schema.CHARGE_COLUMNS``.
        tensors: long format, one row per parameter tensor and logged step: ``step, param,
            group`` and ``sq_norm, grad_sq, update_sq, metric_update_sq, inv_metric`` (see
            ``noether_dyn.store.schema``); read on first use.
        events: ``step, kind, message``.
        depth_profile: ``step, layer, sigma_max, sigma_min, defect, transmission, stability``
            (empty unless ``Monitor.log_depth_profile`` was called).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = store_path(path)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        con = open_existing(path, readonly=True)
        try:
            self.meta: dict[str, Any] = {
                k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")
            }
            self.steps = _frame(con, "steps", STEP_COLUMNS, "step")
            self.groups = _frame(con, "groups", GROUP_COLUMNS, "step, grp")
            sym = con.execute(
                "SELECT symmetry, kind, params, signs, verified, defect, note FROM symmetries "
                "ORDER BY idx"
            ).fetchall()
            self.symmetries = pd.DataFrame(
                [
                    (
                        name,
                        kind,
                        tuple(json.loads(params)),
                        tuple(json.loads(signs)),
                        None if verified is None else bool(verified),
                        np.nan if defect is None else defect,
                        note or "",
                    )
                    for name, kind, params, signs, verified, defect, note in sym
                ],
                columns=["symmetry", "kind", "params", "signs", "verified", "defect", "note"],
            )
            self.depth_profile = _frame(con, "depth_profile", DEPTH_COLUMNS, "step, layer")
            self.events = pd.DataFrame(
                con.execute("SELECT step, kind, message FROM events ORDER BY step").fetchall(),
                columns=["step", "kind", "message"],
            )
        finally:
            con.close()

    def charge_array(self) -> tuple[np.ndarray, np.ndarray]:
        """The charge table as arrays: steps (n_steps,) int64 and data float64 of shape
        (n_steps, n_symmetries, len(CHARGE_COLUMNS)), symmetries in ``self.symmetries`` order.
        Read from the store on first use (``load_run`` itself reads no charge data)."""
        if "charge_blocks" not in self._arrays:
            # schema versions before 2 lack columns (predicted_ode): read their width, NaN-fill
            cols = LEGACY_CHARGE_COLUMNS.get(self.meta.get("schema_version"), CHARGE_COLUMNS)
            steps, data = self._read_blocks("charge_blocks", len(self.symmetries), len(cols))
            if cols != CHARGE_COLUMNS:
                full = np.full(data.shape[:2] + (len(CHARGE_COLUMNS),), np.nan)
                full[..., [CHARGE_COLUMNS.index(c) for c in cols]] = data
                data = full
            self._arrays["charge_blocks"] = steps, data
        return self._arrays["charge_blocks"]

    def tensor_array(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-tensor statistics as arrays: steps (n_steps,) int64 and data float64 of shape
        (n_steps, n_tensors, len(TENSOR_COLUMNS)), tensors in ``meta["parameters"]`` order."""
        if "tensor_blocks" not in self._arrays:
            self._arrays["tensor_blocks"] = self._read_blocks(
                "tensor_blocks", len(self.meta.get("parameters", [])), len(TENSOR_COLUMNS)
            )
        return self._arrays["tensor_blocks"]

    def _read_blocks(self, table: str, n_rows: int, n_col: int) -> tuple[np.ndarray, np.ndarray]:
        con = open_existing(self.path, readonly=True)
        try:
            blocks = con.execute(
                f"SELECT n_steps, steps, data FROM {table} ORDER BY first_step"
            ).fetchall()
        finally:
            con.close()
        if not blocks or n_rows == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, n_rows, n_col))
        steps = np.concatenate([np.frombuffer(s, dtype="<i8") for _, s, _ in blocks])
        data = np.empty((len(steps), n_rows, n_col))
        at = 0
        for n, _, d in blocks:
            data[at : at + n] = np.frombuffer(d, dtype="<f8").reshape(n, n_rows, n_col)
            at += n
        last = self.steps["step"].max() if len(self.steps) else -1
        keep = steps <= last  # the same flush as the steps table, if the run writes on
        return steps[keep], data[keep]

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

    def __repr__(self) -> str:
        return (
            f"Run('{self.path}', steps={len(self.steps)}, symmetries={len(self.symmetries)}, "
            f"optimizer={self.meta.get('optimizer', {}).get('class')})"
        )


def _frame(con, table: str, columns: tuple[str, ...], order: str) -> pd.DataFrame:
    rows = con.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}").fetchall()
    frame = pd.DataFrame(rows, columns=list(columns))
    for c in columns:
        if c in ("step", "grp", "layer"):
            frame[c] = frame[c].astype("int64")
        else:
            frame[c] = pd.to_numeric(frame[c], errors="coerce").astype("float64")
    return frame


def load_run(path: str | Path) -> Run:
    """Read the run at ``path`` (a ``run_dir`` given to ``watch``, or its ``run.sqlite``).

    Raises ``StoreError`` naming the path for a missing, empty, corrupted or future-version store.
    """
    return Run(path)
