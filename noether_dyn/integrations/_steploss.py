"""The loss of one optimizer step as a framework computed it, fed to the monitor before the step.

Shared by the framework callbacks: the pieces of one step (one per micro-batch under gradient
accumulation, each already divided as the framework divides it) are summed on their device, the
sum is averaged over data-parallel ranks (the loss whose gradient DDP's averaged gradient is),
and the result goes to ``monitor.log_loss`` before the optimizer step runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from noether_dyn.capture import Monitor, watch
from noether_dyn.capture.wrappers import unwrap_optimizer


class StepLoss:
    """Running sum of the loss pieces of the current optimizer step (no host-device sync)."""

    def __init__(self) -> None:
        self._total: torch.Tensor | None = None

    def add(self, piece: torch.Tensor) -> None:
        """Add one micro-batch's share of the step loss (a scalar tensor, detached here)."""
        piece = piece.detach().reshape(())
        self._total = piece if self._total is None else self._total + piece

    def clear(self) -> None:
        self._total = None

    def take(self, device: torch.device, scale: float = 1.0) -> torch.Tensor | None:
        """The step's loss, divided by ``scale`` (a mixed-precision loss scale) and averaged over
        the ranks of the default process group; resets the sum. ``None`` when no piece came and
        the run is not distributed (distributed, every rank joins the all-reduce, NaN if empty,
        so that the collective calls match)."""
        total, self._total = self._total, None
        if total is not None and scale != 1.0:
            total = total / scale
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return total
        if total is None:
            total = torch.tensor(float("nan"), device=device)
        total = total.to(device=device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / dist.get_world_size()


class LoggedLossWins:
    """A step post-hook that makes the loss given to ``monitor.log_loss`` during a step win over
    the loss returned by a closure passed to ``optimizer.step(closure)``.

    The monitor prefers a loss logged while the step runs (Lightning's ``on_before_optimizer_step``
    runs inside the step's closure) over the closure's return, which for Lightning is the last
    micro-batch's loss divided by the accumulation count, not the step's loss. This hook only
    tracks whether the callback logged in the current step.
    """

    def __init__(self) -> None:
        self.monitor: Monitor | None = None
        self.logged = False

    def __call__(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.logged = False

    def log(self, loss: torch.Tensor | None) -> None:
        """``monitor.log_loss(loss)`` for the coming step (nothing when ``loss`` is None)."""
        if loss is not None and self.monitor is not None:
            self.monitor.log_loss(loss)
            self.logged = True


def attach(
    model: torch.nn.Module,
    optimizer: Any,
    run_dir: str | Path | None,
    watch_kwargs: dict[str, Any],
) -> tuple[Monitor, LoggedLossWins, RemovableHandle]:
    """``watch(model, optimizer, run_dir, **watch_kwargs)`` with a :class:`LoggedLossWins` hook
    registered on the torch optimizer first. Returns the monitor, the hook and its handle."""
    torch_optimizer = unwrap_optimizer(optimizer)
    wins = LoggedLossWins()
    handle = torch_optimizer.register_step_post_hook(wins)
    try:
        monitor = watch(model, torch_optimizer, run_dir, **watch_kwargs)
    except BaseException:
        handle.remove()
        raise
    wins.monitor = monitor
    return monitor, wins, handle
