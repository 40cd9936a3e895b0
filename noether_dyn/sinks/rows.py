"""The scalars a sink receives: one ``{tag: value}`` mapping per logged step, built from the
host rows of a flush (or of a stored run) in the store's column layout
(:mod:`noether_dyn.records`).

Tags: ``noether/<column>`` for each column of the ``steps`` table but ``step`` (the x-axis), and
``noether/<column>/<symmetry>`` for each column of the charge table. NaN marks a value that does
not exist (a loss that was not logged, a scale-only column of a rescale symmetry) and is left
out; infinities are kept. A sink may take only some charge columns (its ``charge_columns``):
each scalar costs time in the sink (TensorBoard: ``benchmarks/sinks_overhead.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from noether_dyn.records import CHARGE_COLUMNS, STEP_COLUMNS

PREFIX = "noether"
_STEP = STEP_COLUMNS.index("step")


def step_tag(column: str) -> str:
    """The tag of a ``steps`` column, e.g. ``noether/loss``."""
    return f"{PREFIX}/{column}"


def symmetry_tag(column: str, symmetry: str) -> str:
    """The tag of a charge column of one symmetry, e.g. ``noether/charge/scale:fc1``."""
    return f"{PREFIX}/{column}/{symmetry}"


def check_charge_columns(charge_columns: Sequence[str] | None) -> tuple[str, ...] | None:
    """``charge_columns`` as a tuple (None: all of them), every name checked."""
    if charge_columns is None:
        return None
    if isinstance(charge_columns, str):
        charge_columns = (charge_columns,)
    unknown = [c for c in charge_columns if c not in CHARGE_COLUMNS]
    if unknown:
        raise ValueError(
            f"charge_columns: unknown column(s) {unknown}; choose from {', '.join(CHARGE_COLUMNS)}"
        )
    return tuple(charge_columns)


def scalar_rows(
    steps: np.ndarray,
    charge_steps: np.ndarray,
    charges: np.ndarray,
    symmetries: Sequence[str],
    charge_columns: Sequence[str] | None = None,
) -> list[tuple[int, dict[str, float]]]:
    """Per logged step, in step order: ``(step, {tag: value})``.

    Args:
        steps: float64 (n_steps, len(STEP_COLUMNS)), the ``steps`` table's rows.
        charge_steps: int (n_charged,), the steps that have charge rows (a subset of ``steps``).
        charges: float64 (n_charged, len(symmetries), len(CHARGE_COLUMNS)).
        symmetries: the symmetry names, in the order of ``charges``' second axis.
        charge_columns: the charge columns to include (None: all of ``CHARGE_COLUMNS``).
    """
    wanted = check_charge_columns(charge_columns) or CHARGE_COLUMNS
    steps = np.asarray(steps, dtype=np.float64).reshape(-1, len(STEP_COLUMNS))
    charges = np.asarray(charges, dtype=np.float64)
    step_tags = [(j, step_tag(c)) for j, c in enumerate(STEP_COLUMNS) if j != _STEP]
    charge_tags = [
        [(j, symmetry_tag(c, name)) for j, c in enumerate(CHARGE_COLUMNS) if c in wanted]
        for name in symmetries
    ]
    charged = {int(s): i for i, s in enumerate(np.asarray(charge_steps).tolist())}
    out = []
    for row in steps.tolist():
        step = int(row[_STEP])
        scalars = {tag: row[j] for j, tag in step_tags if not math.isnan(row[j])}
        i = charged.get(step)
        if i is not None:
            for tags, values in zip(charge_tags, charges[i].tolist()):
                scalars.update((tag, values[j]) for j, tag in tags if not math.isnan(values[j]))
        out.append((step, scalars))
    out.sort(key=lambda item: item[0])
    return out
