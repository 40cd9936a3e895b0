"""What every optimizer adapter provides: the Lagrangian's constants and the kinetic metric.

THEORY.md §2 (Tanaka & Kunin, "Noether's Learning Dynamics", NeurIPS 2021): a learning rule
``dq = -eta G^{-1} u`` with heavy-ball momentum beta follows ``L = e^{t/tau}(T - V)`` with kinetic
``T = (m/2) q'^T G q'``, mass ``m = eta (1 + beta) / 2`` and
``1/tau = 2 (1 - beta) / (eta (1 + beta))``.
An adapter reads, from a param group and the optimizer's own state, the rate eta, the momentum
beta, the weight decay lambda (coupled into V, or decoupled as a friction), and the diagonal of G.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

Metric = list[torch.Tensor] | float | None
"""Diagonal of G per parameter (same shapes), an isotropic factor c (G = c I), or None (G = I)."""


@dataclass(frozen=True)
class GroupHyper:
    """The constants of one param group at one step (host floats).

    lr: the rate eta of this step (after schedulers, Adagrad's lr_decay included), in parameter
    units per unit of the preconditioned gradient. beta: the heavy-ball momentum of the rule.
    weight_decay: lambda. decoupled: True when the decay is a friction on q (AdamW) rather than an
    L2 term of the potential V.
    """

    lr: float
    beta: float
    weight_decay: float
    decoupled: bool

    @property
    def mass(self) -> float:
        """m = eta (1 + beta) / 2."""
        return self.lr * (1.0 + self.beta) / 2.0

    @property
    def log_prefactor_rate(self) -> float:
        """d(t/tau) per step = eta / tau = 2 (1 - beta) / (1 + beta) (dimensionless)."""
        return 2.0 * (1.0 - self.beta) / (1.0 + self.beta)


def scalar(x: float | torch.Tensor) -> float:
    """A hyperparameter as a host float. Tensors on the CPU only: no device sync."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(
                "noether-dyn reads hyperparameters on the host; a learning rate or beta held as a "
                f"{x.device.type} tensor would force a device sync every step. Keep it a float "
                "or a CPU tensor."
            )
        return float(x)
    return float(x)


class OptimizerAdapter:
    """Reads one optimizer family. Subclasses set ``name``, ``metric_name`` and ``optimizers``."""

    name: ClassVar[str] = "euclidean"
    metric_name: ClassVar[str] = "G = I"
    optimizers: ClassVar[tuple[type, ...]] = ()
    fallback: ClassVar[bool] = False

    def hyper(self, optimizer: torch.optim.Optimizer, group: dict) -> GroupHyper:
        """The group's constants for the step that is about to run (read in the pre-hook)."""
        return GroupHyper(
            lr=scalar(group.get("lr", 0.0)),
            beta=0.0,
            weight_decay=scalar(group.get("weight_decay", 0.0)),
            decoupled=False,
        )

    def metric(
        self, optimizer: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]
    ) -> Metric:
        """Diagonal of the metric G that preconditioned the step just taken (read after it)."""
        return None
