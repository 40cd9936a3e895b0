"""What every optimizer adapter provides: the Lagrangian's constants and the kinetic metric.

docs/theory.md §2 (Tanaka & Kunin, "Noether's Learning Dynamics", NeurIPS 2021): a learning rule
``dq = -eta G^{-1} u`` with heavy-ball momentum beta follows ``L = e^{t/tau}(T - V)`` with kinetic
``T = (m/2) q'^T G q'``, mass ``m = eta (1 + beta) / 2`` and
``1/tau = 2 (1 - beta) / (eta (1 + beta))``.
An adapter reads, from a param group and the optimizer's own state, the rate eta, the momentum
beta, the weight decay lambda (coupled into V, or decoupled as a friction), and the diagonal of G.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

from noether_dyn.records import COEF_WIDTH, GroupHyper, Rule

__all__ = ["GroupHyper", "FusedStep", "Metric", "OptimizerAdapter"]

Metric = list[torch.Tensor] | float | None
"""Diagonal of G per parameter (same shapes), an isotropic factor c (G = c I), or None (G = I)."""


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


@dataclass(frozen=True)
class FusedStep:
    """One param group's update in elementwise form: the one statement of an optimizer's update
    rule, run by the compiled statistics program (:mod:`noether_dyn.quantities.fused`) and,
    tensor by tensor, by the eager backend (:mod:`noether_dyn.capture.eager`).

    rule: ``rule(q1, g, state, c) -> (dq, G, 1/G or None)`` for one tensor, G shaped like q1 or
    0-d (G = c I) (a module-level function: it is part of the compiled program's identity).
    states: per parameter, the state tensors the rule reads. coef: (len(params), COEF_WIDTH)
    float64 on the parameters' device, the row c of each parameter (built without a host-device
    sync).
    """

    rule: Rule
    states: list[tuple[torch.Tensor, ...]]
    coef: torch.Tensor


def coef_rows(rows: list[list[float]], device: torch.device) -> torch.Tensor:
    """Host coefficient rows, zero-padded to COEF_WIDTH, as a device tensor (non-blocking; the
    same rows give the same tensor, so that constant coefficients are copied once)."""
    return _coef_tensor(tuple(tuple(row) for row in rows), device)


@lru_cache(maxsize=64)
def _coef_tensor(rows: tuple[tuple[float, ...], ...], device: torch.device) -> torch.Tensor:
    padded = [list(row) + [0.0] * (COEF_WIDTH - len(row)) for row in rows]
    return (
        torch.tensor(padded, dtype=torch.float64)
        .reshape(-1, COEF_WIDTH)
        .to(device, non_blocking=True)
    )


def coefficient(c: Sequence[torch.Tensor], i: int, dtype: torch.dtype) -> torch.Tensor:
    """Coefficient ``i`` of a rule's row ``c`` as a 0-d tensor of ``dtype``: ``c[i].to(dtype)`` of
    the float64 row the compiled program passes, or the conversion an :class:`EagerRow` made once
    for all the tensors (and steps) that share the row. The rules read their coefficients
    through this one function, so that both backends run the same statement."""
    if isinstance(c, EagerRow):
        return c.cast(i, dtype)
    return c[i].to(dtype)


class EagerRow:
    """One parameter's coefficient row for the eager backend: ``row[i]`` is the float64 0-d
    coefficient (what a rule returns as an isotropic G), :meth:`cast` the same coefficient in a
    parameter's dtype. The whole (n, COEF_WIDTH) coefficient tensor is converted once per dtype
    and each row unbound once into 0-d tensors (:class:`EagerRows`), so that a rule run tensor by
    tensor makes no select and no conversion per coefficient.
    """

    __slots__ = ("rows", "index")

    def __init__(self, rows: EagerRows, index: int) -> None:
        self.rows = rows
        self.index = index

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows.values(self.index, torch.float64)[i]

    def cast(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        return self.rows.values(self.index, dtype)[i]


class EagerRows:
    """A param group's (n, COEF_WIDTH) float64 coefficients (:attr:`FusedStep.coef`) as one
    :class:`EagerRow` per parameter, converted lazily: one ``to`` and one ``unbind`` per dtype
    for the whole group, one ``unbind`` per row read. Reused while the coefficient tensor is the
    same (:func:`coef_rows` returns the same tensor for the same host rows: constant
    hyperparameters convert once per run)."""

    def __init__(self, coef: torch.Tensor) -> None:
        self.coef = coef
        self._rows: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}
        self._values: dict[tuple[int, torch.dtype], tuple[torch.Tensor, ...]] = {}
        self.rows = [EagerRow(self, r) for r in range(coef.shape[0])]

    def values(self, index: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Row ``index`` in ``dtype`` as 0-d tensors (converted from float64, as ``c[i].to``)."""
        key = (index, dtype)
        out = self._values.get(key)
        if out is None:
            rows = self._rows.get(dtype)
            if rows is None:
                rows = self._rows[dtype] = self.coef.to(dtype).unbind(0)
            out = self._values[key] = rows[index].unbind(0)
        return out


class OptimizerAdapter:
    """Reads one optimizer family. Subclasses set ``name``, ``metric_name`` and ``optimizers``."""

    name: ClassVar[str] = "euclidean"
    metric_name: ClassVar[str] = "G = I"
    optimizers: ClassVar[tuple[type, ...]] = ()
    fallback: ClassVar[bool] = False
    family: ClassVar[str] = "sgd"
    """The rule's family for docs/theory.md §4's effective rate (a key of
    ``noether_dyn.quantities.effective_rate.FAMILIES``: ``"sgd"``, ``"adam"``, ``"rmsprop"``,
    ``"adagrad"``). The Euclidean fallback declares ``"sgd"``: an unknown optimizer is read as a
    plain gradient step with G = I and no momentum, so eta_eff = eta / r^2 there is an
    assumption, flagged by ``metric_fallback`` in the run's metadata."""
    normalization: ClassVar[str | None] = None
    """How docs/theory.md §4 reads a scale-invariant layer under this rule (a key of
    ``noether_dyn.quantities.normalization.RULES``: ``"l2"`` for coupled L2 decay with heavy-ball
    momentum, ``"decoupled"`` for decoupled decay), None when the theory does not cover it."""

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

    def can_reconstruct(self, group: dict) -> bool:
        """Whether :meth:`fused_step` can rebuild this group's step from the optimizer's state,
        so that the monitor needs no snapshot of the parameters (no memory held per parameter)."""
        return False

    def momentum_buffers(
        self, optimizer: torch.optim.Optimizer, group: dict, params: list[torch.Tensor]
    ) -> list[torch.Tensor] | None:
        """The heavy-ball buffers b_n after the step, per parameter, for rules whose exact charge
        prediction reads them (SGD with Nesterov); None for every other rule."""
        return None

    def fused_step(
        self,
        optimizer: torch.optim.Optimizer,
        group: dict,
        params: list[torch.Tensor],
        device: torch.device,
        eager: bool = False,
    ) -> FusedStep | None:
        """The step just taken as an elementwise rule over ``params`` (all with a gradient and
        optimizer state): dq = q_{n+1} - q_n and G, rebuilt from the parameters after the step,
        their gradients and the optimizer's state (where the step depends on q_n, through
        coupled or decoupled decay, q_n = q_{n+1} - dq is solved for exactly). The one source of
        an adapter's update rule: both statistics backends run it. None when this group's update
        has no such form (:meth:`can_reconstruct` false: the monitor then takes the difference
        from a snapshot of q_n). ``eager``: the rule will run eagerly, tensor by tensor, where
        coefficients read on the host (CPU step counts) cost less than forming them in the rule.
        """
        return None


def step_count(state: dict) -> float | torch.Tensor:
    """The optimizer's step counter as a host float (CPU) or a device tensor (capturable)."""
    step = state["step"]
    if isinstance(step, torch.Tensor) and step.device.type != "cpu":
        return step
    return float(step)
