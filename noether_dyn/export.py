"""Export a saved run as long-format tables (CSV or Parquet) for pandas, R, DuckDB or a
spreadsheet: one file per table, one row per (step[, symmetry | param group | tensor | layer]);
``matrix_charges`` (one row per step, GL record and entry) only for a run that stored it.

The schema is documented in ``docs/guide.md`` ("Export"). Charges and per-tensor statistics,
stored as binary blocks, come out as ordinary numeric columns. ``format="tensorboard"`` replays
the run's step scalars and charges into a TensorBoard event file instead, with the tags of
``watch(..., sinks=[...])`` (``docs/guide.md``, "Sinks").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from noether_dyn.records import STEP_COLUMNS
from noether_dyn.sinks import SinkSet, TensorBoardSink
from noether_dyn.store import Run, load_run

FORMATS = ("csv", "parquet", "tensorboard")
TABLES = (
    "steps", "groups", "charges", "tensors", "symmetries", "dropped", "events", "depth_profile",
    "matrix_charges",
)  # fmt: skip


def _frames(run: Run) -> dict:
    frames = {name: getattr(run, name) for name in TABLES}
    sym = frames["symmetries"].copy()
    # tuples have no CSV/Parquet type: a JSON list keeps them readable and unambiguous
    sym["params"] = sym["params"].map(lambda p: json.dumps(list(p)))
    sym["signs"] = sym["signs"].map(lambda s: json.dumps(list(s)))
    sym["slices"] = sym["slices"].map(lambda s: json.dumps([w and list(w) for w in s]))
    sym["verified"] = sym["verified"].astype("boolean")
    frames["symmetries"] = sym
    dropped = frames["dropped"].copy()
    for column in ("params", "signs"):
        dropped[column] = dropped[column].map(lambda v: json.dumps(list(v)))
    frames["dropped"] = dropped
    if frames["matrix_charges"].empty:  # optional: only runs watched with matrix_charges=
        del frames["matrix_charges"]
    return frames


def replay(run: Run | str | Path, sinks: Sequence[Any]) -> None:
    """Send a stored run's steps and charges to ``sinks``, as ``watch(..., sinks=)`` would
    have during training (the same tags and values), then close them. A sink's error is
    raised (nothing is dropped silently)."""
    run = run if isinstance(run, Run) else load_run(run)
    sink_set = SinkSet(sinks, list(run.symmetries["symmetry"]), strict=True)
    charge_steps, charges = run.charge_array()
    sink_set.emit(run.steps[list(STEP_COLUMNS)].to_numpy(dtype=float), charge_steps, charges)
    sink_set.close()


def _tensorboard(run: Run, out: Path) -> list[Path]:
    for old in out.glob("events.out.tfevents.*"):  # a second export replaces the first
        old.unlink()
    replay(run, [TensorBoardSink(out)])
    return sorted(out.glob("events.out.tfevents.*"))


def export_run(run: Run | str | Path, out_dir: str | Path, format: str = "csv") -> list[Path]:
    """Write every table of ``run`` into ``out_dir`` (created) as ``<table>.csv`` or
    ``<table>.parquet``, plus ``meta.json`` (the run's metadata); or, with
    ``format="tensorboard"``, its step scalars and charges as one TensorBoard event file (event
    files already directly in ``out_dir`` are replaced). Returns the written paths.

    Args:
        run: a :class:`~noether_dyn.store.Run` or the path of a run directory (or its
            ``run.sqlite``).
        out_dir: the output directory; existing files of the same names are replaced.
        format: ``"csv"``, ``"parquet"`` (needs ``pyarrow``) or ``"tensorboard"`` (needs
            ``tensorboard``).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError(
                "format='parquet' needs pyarrow: pip install pyarrow "
                "(or 'noether-dyn[export]'), or use format='csv'"
            ) from None
    if format == "tensorboard":
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ValueError(
                "format='tensorboard' needs tensorboard: pip install tensorboard "
                "(or 'noether-dyn[tensorboard]')"
            ) from None
    run = run if isinstance(run, Run) else load_run(run)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create output directory '{out}': {exc.strerror or exc}") from None
    if format == "tensorboard":
        return _tensorboard(run, out)
    written = []
    for name, frame in _frames(run).items():
        path = out / f"{name}.{format}"
        if format == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
        written.append(path)
    meta = out / "meta.json"
    meta.write_text(json.dumps(run.meta, indent=1, sort_keys=True), encoding="utf-8")
    written.append(meta)
    return written
