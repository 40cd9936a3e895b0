"""Checks of ``watch()``'s arguments and inputs, and small facts the monitor asks about."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from noether_dyn.records import STEP_SPEC


def check_arguments(
    model: Any,
    optimizer: Any,
    every: Any,
    flush: tuple[int, float],
    resume: bool,
    overwrite: bool,
    fused: Any,
    previous: Callable[[], Any] | None,
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
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"watch: every must be a positive int (log every k steps), got {every!r}.")
    flush_every, flush_seconds = flush
    if flush_every < 1 or flush_seconds <= 0:
        raise ValueError(
            f"watch: flush_every must be >= 1 and flush_seconds > 0, got {flush_every!r} and "
            f"{flush_seconds!r}."
        )
    if resume and overwrite:
        raise ValueError("watch: resume=True and overwrite=True contradict; choose one.")
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"watch: fused must be None, True or False, got {fused!r}.")
    monitor = previous() if previous is not None else None
    if monitor is not None and not monitor._closed:
        raise RuntimeError(
            f"watch: this {type(optimizer).__name__} is already watched (run_dir "
            f"'{monitor.run_dir}'). Close that monitor first (monitor.close()) or keep "
            "using it."
        )


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


def check_resume(stored: list[str], symmetries: Any, run_dir: Any) -> None:
    """Raise when a resumed run's stored symmetries differ from the monitor's."""
    mine = [s.name for s in symmetries]
    if stored != mine:
        raise ValueError(
            f"watch(resume=True): the run at '{run_dir}' tracks symmetries {stored}, "
            f"this monitor {mine}. Pass the same symmetries= (or the same inputs=) as the "
            "first run."
        )
