"""``optimizer.step(closure)``: the closure's loss is the step's loss; wrap it to catch it."""

from __future__ import annotations

from collections.abc import Callable

import torch


def has_closure(args: tuple, kwargs: dict) -> bool:
    """Whether ``step`` was called with a closure (keyword or positional)."""
    return kwargs.get("closure") is not None or (len(args) > 1 and args[1] is not None)


def wrap_closure(args: tuple, kwargs: dict, sink: Callable[[torch.Tensor], None]):
    """The pre-hook's return: ``(args, kwargs)`` with the closure wrapped so that the loss it
    returns goes to ``sink`` (a detached 0-d tensor), or None without a closure."""
    if "closure" in kwargs and kwargs["closure"] is not None:
        kwargs = dict(kwargs)
        kwargs["closure"] = _capturing(kwargs["closure"], sink)
        return args, kwargs
    if len(args) > 1 and args[1] is not None:
        return (args[0], _capturing(args[1], sink), *args[2:]), kwargs
    return None


def _capturing(closure: Callable, sink: Callable[[torch.Tensor], None]) -> Callable:
    def wrapped():
        loss = closure()
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            sink(loss.detach().reshape(()))
        elif isinstance(loss, (int, float)):
            sink(torch.tensor(float(loss), dtype=torch.float64))
        return loss

    return wrapped
