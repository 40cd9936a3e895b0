"""Per-optimizer adapters: the kinetic metric G and the Lagrangian's constants of each rule.

One file per family, as ``torch.optim`` has: ``sgd.py``, ``adam.py`` (Adam, AdamW),
``rmsprop.py``, ``adagrad.py``; ``euclidean.py`` is the fallback for any other optimizer.
"""

from __future__ import annotations

import torch

from noether_dyn.optimizers.adagrad import AdagradAdapter
from noether_dyn.optimizers.adam import AdamAdapter
from noether_dyn.optimizers.base import GroupHyper, Metric, OptimizerAdapter
from noether_dyn.optimizers.euclidean import EuclideanFallback
from noether_dyn.optimizers.rmsprop import RMSpropAdapter
from noether_dyn.optimizers.sgd import SGDAdapter

ADAPTERS: tuple[type[OptimizerAdapter], ...] = (
    SGDAdapter,
    AdamAdapter,
    RMSpropAdapter,
    AdagradAdapter,
)


def adapter_for(optimizer: torch.optim.Optimizer) -> OptimizerAdapter:
    """The adapter of ``optimizer``'s family (subclasses included), else the Euclidean fallback."""
    for adapter in ADAPTERS:
        if isinstance(optimizer, adapter.optimizers):
            return adapter()
    return EuclideanFallback()


def adapter_named(name: str | None) -> type[OptimizerAdapter] | None:
    """The adapter class whose ``name`` is ``name`` (as a run's metadata records it), or None."""
    for adapter in (*ADAPTERS, EuclideanFallback):
        if adapter.name == name:
            return adapter
    return None


__all__ = ["ADAPTERS", "GroupHyper", "Metric", "OptimizerAdapter", "adapter_for", "adapter_named"]
