"""What the report reads from a saved run: the run itself, per-symmetry arrays, parameter sizes,
each symmetry's hyperparameters, and downsampling for figures.

Everything here is computed from the run store alone (``load_run``), never from a live model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from noether_dyn.store import Run, load_run

RunLike = Run | str | Path
"""A loaded :class:`~noether_dyn.store.Run` or the path of a run directory (or its store)."""

MAX_POINTS = 2000
"""Most points drawn per line: longer series are reduced by :func:`decimate`."""


class MissingData(Exception):
    """A figure or table whose data the run does not hold; the report shows the message as a
    note instead."""


def as_run(run: RunLike) -> Run:
    """``run`` itself when it is a :class:`Run`, else ``load_run(run)`` (raises ``StoreError``)."""
    return run if isinstance(run, Run) else load_run(run)


def decimate(
    x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of the line (x, y), keeping each bucket's minimum and maximum
    so that spikes survive (min-max decimation). Non-finite y values are dropped first."""
    x = np.asarray(x)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(y)
    if n <= max_points:
        return x, y
    width = -(-n // max(1, max_points // 2))  # bucket width, so that 2 * buckets <= max_points
    n_buckets = -(-n // width)
    padded = np.full(n_buckets * width, np.nan)
    padded[:n] = y
    blocks = padded.reshape(n_buckets, width)
    base = np.arange(n_buckets) * width
    picks = np.unique(
        np.concatenate([base + np.nanargmin(blocks, 1), base + np.nanargmax(blocks, 1)])
    )
    return x[picks], y[picks]


class ChargeCube:
    """``run.charges`` as (n_steps, n_symmetries) arrays, one per column, built on demand.

    ``steps`` are the logged steps that hold charges, ``names`` and ``kinds`` follow
    ``run.symmetries``; a missing (step, symmetry) cell is NaN.
    """

    def __init__(self, run: Run) -> None:
        self._charges = run.charges
        self.names: list[str] = [str(s) for s in run.symmetries["symmetry"]]
        self.kinds: list[str] = [str(k) for k in run.symmetries["kind"]]
        frame = self._charges
        if frame.empty or not self.names:
            self.steps = np.zeros(0, dtype=np.int64)
            self._row = self._col = np.zeros(0, dtype=np.int64)
        else:
            step = frame["step"].to_numpy(dtype=np.int64)
            self.steps = np.unique(step)
            self._row = np.searchsorted(self.steps, step)
            sym = frame["symmetry"]
            if (
                isinstance(sym.dtype, pd.CategoricalDtype)
                and list(sym.cat.categories) == self.names
            ):
                self._col = sym.cat.codes.to_numpy(dtype=np.int64)
            else:
                self._col = pd.Categorical(sym.astype(str), categories=self.names).codes.astype(
                    np.int64
                )
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, column: str) -> np.ndarray:
        if column not in self._cache:
            out = np.full((len(self.steps), len(self.names)), np.nan)
            if len(self._row):
                ok = self._col >= 0
                out[self._row[ok], self._col[ok]] = self._charges[column].to_numpy(float)[ok]
            self._cache[column] = out
        return self._cache[column]

    def index(self, symmetry: str) -> int:
        """Column of ``symmetry`` (KeyError naming the known ones when absent)."""
        try:
            return self.names.index(symmetry)
        except ValueError:
            raise KeyError(
                f"no symmetry {symmetry!r} in this run; known: {', '.join(self.names) or 'none'}"
            ) from None


_CUBES: weakref.WeakKeyDictionary[Run, ChargeCube] = weakref.WeakKeyDictionary()


def charge_cube(run: Run) -> ChargeCube:
    """The :class:`ChargeCube` of ``run`` (built once per run object)."""
    if run not in _CUBES:
        _CUBES[run] = ChargeCube(run)
    return _CUBES[run]


def param_sizes(run: Run) -> dict[str, int]:
    """Number of elements of each parameter, from ``meta["parameters"]`` shapes."""
    sizes = {}
    for p in run.meta.get("parameters", []) or []:
        shape = p.get("shape", [])
        sizes[str(p.get("name"))] = int(np.prod(shape)) if shape else 1
    return sizes


def layer_of(params: tuple[str, ...] | list[str]) -> str:
    """The modules a symmetry's parameters belong to (``fc1.weight`` -> ``fc1``), in order."""
    out: list[str] = []
    for p in params:
        mod = p.rsplit(".", 1)[0] if "." in p else p
        if mod not in out:
            out.append(mod)
    return " -> ".join(out)


@dataclass(frozen=True)
class Hyper:
    """Hyperparameters of the param group that holds a symmetry's first parameter.

    ``beta`` is the momentum the kinetic metric uses (SGD ``momentum``, Adam ``betas[0]``),
    ``decoupled`` says whether weight decay is a friction (AdamW) rather than an L2 term.
    """

    group: int
    lr: float
    weight_decay: float
    beta: float
    decoupled: bool
    optimizer: str


def hyper_for(run: Run, params: tuple[str, ...] | list[str]) -> Hyper | None:
    """The :class:`Hyper` of ``params[0]``'s param group, or None when the run does not say."""
    opt = run.meta.get("optimizer") or {}
    groups = opt.get("param_groups") or []
    group = 0
    for p in run.meta.get("parameters", []) or []:
        if params and p.get("name") == params[0]:
            group = int(p.get("group", 0))
            break
    if group >= len(groups):
        return None
    g = groups[group]
    return Hyper(
        group=group,
        lr=_num(g.get("lr")),
        weight_decay=_num(g.get("weight_decay", 0.0)),
        beta=_num(g.get("beta", g.get("momentum", 0.0))),
        decoupled=bool(g.get("decoupled_weight_decay", False)),
        optimizer=str(opt.get("class", "?")),
    )


def group_lr(run: Run, group: int) -> pd.Series:
    """The learning rate of param group ``group`` per logged step (schedulers included)."""
    g = run.groups
    if not g.empty and group in set(g["grp"]):
        rows = g[g["grp"] == group]
        return pd.Series(rows["lr"].to_numpy(), index=rows["step"].to_numpy())
    return pd.Series(run.steps["lr"].to_numpy(), index=run.steps["step"].to_numpy())


def tail_mask(n: int, fraction: float = 0.2) -> np.ndarray:
    """Boolean mask of the last ``fraction`` of ``n`` rows (at least one row when n > 0)."""
    mask = np.zeros(n, dtype=bool)
    if n:
        mask[max(0, n - max(1, int(round(n * fraction)))) :] = True
    return mask


def first_last(values: np.ndarray) -> tuple[float, float]:
    """First and last finite value of a 1-d array (NaN, NaN when none)."""
    finite = np.flatnonzero(np.isfinite(values))
    if not len(finite):
        return np.nan, np.nan
    return float(values[finite[0]]), float(values[finite[-1]])


def _num(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return np.nan


NOISY_GROUP_KEYS = frozenset(
    {"params", "foreach", "differentiable", "fused", "capturable", "maximize", "n_params"}
)
"""Param-group entries that are implementation switches, not hyperparameters."""


def param_group_table(run: Run) -> tuple[pd.DataFrame, list[str]]:
    """Every param group's hyperparameters, one row per group, and the hyperparameters whose
    values differ between groups (shown first, after ``group`` and ``parameters``).

    ``parameters`` names the modules whose tensors the group holds (from ``meta["parameters"]``).
    """
    opt = run.meta.get("optimizer") or {}
    groups = opt.get("param_groups") or []
    members: dict[int, list[str]] = {}
    for p in run.meta.get("parameters", []) or []:
        members.setdefault(int(p.get("group", 0)), []).append(str(p.get("name")))
    rows = []
    for i, g in enumerate(groups):
        names = members.get(i, [])
        shown = layer_of(names).replace(" -> ", ", ")
        rows.append(
            {
                "group": i,
                "parameters": f"{len(names)} tensors: {shown}" if names else "-",
                **{k: _cell(v) for k, v in g.items() if k not in NOISY_GROUP_KEYS},
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, []
    keys = [c for c in frame.columns if c not in ("group", "parameters")]
    differ = [c for c in keys if frame[c].astype(str).nunique(dropna=False) > 1]
    order = ["group", "parameters", *differ, *[c for c in keys if c not in differ]]
    return frame[order], differ


def _cell(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value
