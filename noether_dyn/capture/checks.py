"""Checks of ``watch()``'s arguments and inputs, and small facts the monitor asks about."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noether_dyn.records import STEP_SPEC
from noether_dyn.store.schema import STORE_FILENAME


def check_arguments(
    model: Any,
    optimizer: Any,
    every: Any,
    flush: tuple[Any, Any],
    resume: Any,
    overwrite: Any,
    fused: Any,
    previous: Callable[[], Any] | None,
    snapshot: Any = False,
    symmetries: Any = (),
) -> None:
    """Raise on a wrong type or value of ``watch()``'s arguments, naming the argument and the
    fix; ``flush`` is (flush_every, flush_seconds), ``previous`` the weak reference to a monitor
    already attached to ``optimizer`` (or None)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"watch: model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"watch: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    _integer("every", every, "log every k steps")
    flush_every, flush_seconds = flush
    _integer("flush_every", flush_every, "write to the store every k logged steps")
    if not _is_real(flush_seconds) or not flush_seconds > 0:
        message = (
            f"watch: flush_seconds must be a positive number of seconds, got {flush_seconds!r}."
        )
        raise _error(flush_seconds, message)
    for name, value in (("resume", resume), ("overwrite", overwrite), ("snapshot", snapshot)):
        if not isinstance(value, bool):
            raise TypeError(f"watch: {name} must be True or False, got {value!r}.")
    if resume and overwrite:
        raise ValueError("watch: resume=True and overwrite=True contradict; choose one.")
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"watch: fused must be None, True or False, got {fused!r}.")
    check_symmetry_list(symmetries)
    monitor = previous() if previous is not None else None
    if monitor is not None and not monitor._closed:
        raise RuntimeError(
            f"watch: this {type(optimizer).__name__} is already watched (run_dir "
            f"'{monitor.run_dir}'). Close that monitor first (monitor.close()) or keep "
            "using it."
        )


def check_symmetry_list(symmetries: Any) -> None:
    """Raise unless ``symmetries`` is a list or tuple (None allowed: detect them)."""
    if symmetries is not None and not isinstance(symmetries, (list, tuple)):
        raise TypeError(
            f"watch: symmetries must be a list of noether_dyn.Symmetry (or None to detect "
            f"them), got {type(symmetries).__name__}; wrap a single one: symmetries=[sym]."
        )


def check_detection(inputs: Any, targets: Any, loss_fn: Any) -> None:
    """Raise on ``watch()``'s detection arguments of a wrong type."""
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(
            f"watch: loss_fn must be callable (outputs, targets) -> loss, got "
            f"{type(loss_fn).__name__}."
        )


def run_dir_path(run_dir: Any) -> Path:
    """``run_dir`` as a Path: a non-empty str or os.PathLike; a path ending in ``run.sqlite`` (the
    store file itself) names its directory, as :func:`noether_dyn.load_run` accepts it."""
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(
            f"watch: run_dir must be a str or pathlib.Path (a directory), got "
            f"{type(run_dir).__name__}."
        )
    if not os.fspath(run_dir):
        raise ValueError(
            "watch: run_dir is empty (''), which would put the store in the working directory. "
            "Pass a directory name, e.g. run_dir='runs/exp1', or None for a timestamped one."
        )
    path = Path(run_dir)
    return path.parent if path.name == STORE_FILENAME else path


def _integer(name: str, value: Any, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _error(value, f"watch: {name} must be a positive int ({what}), got {value!r}.")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _error(value: Any, message: str) -> Exception:
    """TypeError for a value of the wrong type, ValueError for a number out of range."""
    return ValueError(message) if _is_real(value) else TypeError(message)


def depth_rows(profile: Any) -> np.ndarray:
    """A depth profile's rows (n_layers, 8) in the order the store takes them: the required
    columns, then ``stability``, ``h_max`` and ``max_real`` (NaN where the profile lacks them;
    ``noether_dyn.depth.stability`` gives the last two)."""
    required = ("layer", "sigma_max", "sigma_min", "defect", "transmission")
    missing = [c for c in required if c not in getattr(profile, "columns", ())]
    if missing:
        raise ValueError(
            f"log_depth_profile: the profile lacks columns {missing}; pass the DataFrame "
            "returned by noether_dyn.depth.profile(model, x)."
        )
    columns = [*required, "stability", "h_max", "max_real"]
    return profile.reindex(columns=columns).to_numpy(dtype=np.float64)


def reduction(column: str) -> str:
    """The declared cross-rank reduction of a step column (``records.STEP_SPEC``)."""
    return next(c.reduce for c in STEP_SPEC if c.name == column)


def is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def as_loss(loss: Any) -> torch.Tensor:
    """A logged loss as a detached 0-d tensor (float64 from a Python number); no sync."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"log_loss: expected a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
                "pass loss.mean() or the reduced loss."
            )
        return loss.detach().reshape(())
    return torch.tensor(float(loss), dtype=torch.float64)


def stored_state(writer: Any, symmetries: Any) -> dict[str, Any] | None:
    """The monitor state a resumed run's store holds (None before its first flush), after
    checking that its stored symmetries are the monitor's."""
    stored, mine = writer.symmetry_names(), [s.name for s in symmetries]
    if stored != mine:
        raise ValueError(
            f"watch(resume=True): the run at '{writer.run_dir}' tracks symmetries {stored}, "
            f"this monitor {mine}. Pass the same symmetries= (or the same inputs=) as the "
            "first run."
        )
    return writer.get_meta("monitor_state")
