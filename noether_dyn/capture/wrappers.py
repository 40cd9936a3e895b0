"""Seeing through optimizer wrappers to the ``torch.optim.Optimizer`` that really steps.

Frameworks hand callbacks a wrapper, not the optimizer: accelerate's ``AcceleratedOptimizer``
(the HF Trainer's) and Lightning's ``LightningOptimizer``. Both subclass or imitate
``torch.optim.Optimizer`` without being initialized as one (no step-hook tables of their own), so
hooks must go on the optimizer they hold in ``.optimizer``.
"""

from __future__ import annotations

from typing import Any

import torch

_MAX_DEPTH = 16


def unwrap_optimizer(obj: Any, argument: str = "optimizer") -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` at the end of ``obj``'s ``.optimizer`` chain.

    ``obj`` itself is returned when it is an initialized torch optimizer (one that ran
    ``Optimizer.__init__``, so it owns its step hooks), even if it holds another optimizer in
    ``.optimizer`` (a Lookahead-style optimizer steps itself). Any other object is followed
    through its ``.optimizer`` attribute: accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer`` and any wrapper of the same shape.

    Raises:
        TypeError: the chain does not end at an initialized torch optimizer; the message names
            ``argument`` and each object on the chain.
    """
    chain = [obj]
    current = obj
    for _ in range(_MAX_DEPTH):
        if _is_initialized_optimizer(current):
            return current
        inner = getattr(current, "optimizer", None)
        if inner is None or any(inner is seen for seen in chain):
            break
        chain.append(inner)
        current = inner
    path = " -> ".join(f"{type(o).__module__}.{type(o).__qualname__}" for o in chain)
    raise TypeError(
        f"watch: {argument} must be a torch.optim.Optimizer or a wrapper holding one in "
        f"'.optimizer' (accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer); got "
        f"{path}, which does not end at one. Pass the torch optimizer itself (the one whose "
        "step() updates the parameters)."
    )


def _is_initialized_optimizer(obj: Any) -> bool:
    """A torch optimizer that ran ``Optimizer.__init__`` (wrappers that only subclass or imitate
    the class lack its per-instance hook tables)."""
    return isinstance(obj, torch.optim.Optimizer) and "_optimizer_step_pre_hooks" in vars(obj)
