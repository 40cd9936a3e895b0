"""Checks of ``watch()``'s arguments and inputs, and small facts the monitor asks about."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from noether_dyn.records import STEP_SPEC


def check_arguments(
    model: Any,
    optimizer: Any,
    every: Any,
    flush_every: int,
    flush_seconds: float,
    resume: bool,
    overwrite: bool,
) -> None:
    """Raise on a wrong type or value, naming the argument and the fix."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"watch: model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"watch: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"watch: every must be a positive int (log every k steps), got {every!r}.")
    if flush_every < 1 or flush_seconds <= 0:
        raise ValueError(
            f"watch: flush_every must be >= 1 and flush_seconds > 0, got {flush_every!r} and "
            f"{flush_seconds!r}."
        )
    if resume and overwrite:
        raise ValueError("watch: resume=True and overwrite=True contradict; choose one.")


def check_fused(fused: Any) -> None:
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"watch: fused must be None, True or False, got {fused!r}.")


def check_unwatched(optimizer: torch.optim.Optimizer, previous: Any) -> None:
    """Raise when ``previous`` (the monitor already attached, or None) is still open."""
    if previous is not None and not previous._closed:
        raise RuntimeError(
            f"watch: this {type(optimizer).__name__} is already watched (run_dir "
            f"'{previous.run_dir}'). Close that monitor first (monitor.close()) or keep "
            "using it."
        )


def depth_rows(profile: Any) -> np.ndarray:
    """A depth profile's rows (n_layers, 6) in the order the store takes them."""
    required = ("layer", "sigma_max", "sigma_min", "defect", "transmission")
    missing = [c for c in required if c not in getattr(profile, "columns", ())]
    if missing:
        raise ValueError(
            f"log_depth_profile: the profile lacks columns {missing}; pass the DataFrame "
            "returned by noether_dyn.depth.profile(model, x)."
        )
    return profile.reindex(columns=[*required, "stability"]).to_numpy(dtype=np.float64)


def reduction(column: str) -> str:
    """The declared cross-rank reduction of a step column (``records.STEP_SPEC``)."""
    return next(c.reduce for c in STEP_SPEC if c.name == column)


def is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
