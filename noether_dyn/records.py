"""Shared records: the column layouts of what a step stores and the typed values passed between
the phases of a monitored step. A leaf module: it imports nothing else from the package, so that
every layer (optimizers, symmetries, quantities, store, capture, report) can import it.

Every stored or reduced column is declared once here, with how its per-rank values combine when
the parameters are sharded over ranks (FSDP2):

``"sum"``
    a sum over parameter entries: the global value is the sum of the per-rank values
    (one all-reduce);
``"mean"``
    the same value measured on every rank (the loss): averaged over ranks;
``"global"``
    known globally on every rank (an entry count): restored after the all-reduce, not summed;
``"derived"``
    computed after the reduction from reduced statistics (norms, kinetic energy, charges);
``"host"``
    a host value every rank holds alike (step number, time, rates, wall time): never reduced.

The store schema (``noether_dyn.store.schema``) takes its column lists from here, and every
host-side reshape takes its width from the length of a tuple below (never a literal count).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # annotations only: `import noether_dyn` (and the CLI's --help) loads no torch
    import torch

VERSION = "0.1.0"
"""The package version (``noether_dyn.__version__``), recorded in every run's metadata."""

REDUCTIONS = ("sum", "mean", "global", "derived", "host")


class Column(NamedTuple):
    """One column: its name and its cross-rank reduction (one of :data:`REDUCTIONS`)."""

    name: str
    reduce: str


def _names(columns: tuple[Column, ...]) -> tuple[str, ...]:
    return tuple(c.name for c in columns)


STATS_SPEC: tuple[Column, ...] = (
    Column("QQ", "sum"),  # |q_n|^2
    Column("QS", "sum"),  # sum(q_n)
    Column("GG", "sum"),  # |g_n|^2
    Column("GQ", "sum"),  # <g_n, q_n>
    Column("GS", "sum"),  # sum(g_n)
    Column("NUMEL", "global"),  # number of entries
    Column("DD", "sum"),  # |dq_n|^2
    Column("DQ", "sum"),  # <q_n, dq_n>
    Column("DS", "sum"),  # sum(dq_n)
    Column("GDD", "sum"),  # <G dq_n, dq_n>
    Column("GDQ", "sum"),  # <G dq_n, q_n>
    Column("GDS", "sum"),  # sum(G dq_n)
    Column("IG", "sum"),  # sum(1 / G_ii)
)
"""The per-tensor statistics of a logged step (``noether_dyn.quantities.charges``), one
float64 row of shape (len(STATS),) per parameter tensor."""
STATS = _names(STATS_SPEC)
S_ = {name: i for i, name in enumerate(STATS)}
SUMMED_STATS = tuple(i for i, c in enumerate(STATS_SPEC) if c.reduce == "sum")
"""Positions of the statistics that are sums over entries (added over ranks)."""
GLOBAL_STATS = tuple(i for i, c in enumerate(STATS_SPEC) if c.reduce == "global")
"""Positions of the statistics known globally (restored after the all-reduce)."""

STEP_SPEC: tuple[Column, ...] = (
    Column("step", "host"),
    Column("time", "host"),
    Column("lr", "host"),
    Column("loss", "mean"),
    Column("l2", "derived"),
    Column("potential", "derived"),
    Column("kinetic", "derived"),
    Column("log_prefactor", "host"),
    Column("param_norm", "derived"),
    Column("grad_norm", "derived"),
    Column("update_norm", "derived"),
    Column("wall_time", "host"),
)
"""Table ``steps``: one row per logged step (units in ``noether_dyn.store.schema``)."""
STEP_COLUMNS = _names(STEP_SPEC)
STEP_HOST = ("step", "time", "lr", "log_prefactor", "wall_time")
"""The step columns the monitor knows on the host, in :class:`StepRecord` order."""
STEP_DEVICE = ("loss", "l2", "kinetic", "param_norm", "grad_norm", "update_norm")
"""The step columns computed on the device, in the order of the step row of
``noether_dyn.quantities.step_rows.StepRows`` (``potential`` = loss + l2 is formed on the host)."""

GROUP_SPEC: tuple[Column, ...] = (
    Column("step", "host"),
    Column("grp", "host"),
    Column("lr", "host"),
    Column("momentum", "host"),
    Column("weight_decay", "host"),
    Column("mass", "host"),
    Column("kinetic", "derived"),
    Column("l2", "derived"),
    Column("log_prefactor", "host"),
)
"""Table ``groups``: one row per logged step and param group."""
GROUP_COLUMNS = _names(GROUP_SPEC)
GROUP_HOST = ("grp", "lr", "momentum", "weight_decay", "mass", "log_prefactor")
GROUP_DEVICE = ("kinetic", "l2")

CHARGE_SPEC: tuple[Column, ...] = tuple(
    Column(name, "derived")
    for name in (
        "charge",
        "predicted",
        "predicted_ode",
        "decay",
        "rule",
        "ksb",
        "defect",
        "nld_charge",
        "nld_ksb",
        "grad_sq",
        "effective_lr",
        "angular_update",
    )
)
"""The charge table's columns: per logged step and symmetry. ``predicted`` is the theory's
exact discrete prediction where one exists (SGD with or without momentum), else gradient flow
(adaptive rules); ``predicted_ode`` is the continuous ODE of Neural Mechanics for SGD with
momentum (NaN under the other rules), so that its modified-equation error is itself measured."""
CHARGE_COLUMNS = _names(CHARGE_SPEC)
COL = {name: i for i, name in enumerate(CHARGE_COLUMNS)}

TENSOR_SPEC: tuple[Column, ...] = tuple(
    Column(name, "derived")
    for name in ("sq_norm", "grad_sq", "update_sq", "metric_update_sq", "inv_metric")
)
"""The tensor table's columns: per logged step and parameter tensor."""
TENSOR_COLUMNS = _names(TENSOR_SPEC)

COEF_WIDTH = 6
"""Columns of the per-tensor coefficient matrix an elementwise update rule reads (unused: 0)."""

Rule = Callable[..., tuple]
"""``rule(q1, g, state, c) -> (dq, G, 1/G or None)``: one optimizer step in elementwise form for
one tensor (q1 the parameter after the step, g its gradient, state the optimizer's state tensors,
c a float64 row of :data:`COEF_WIDTH` coefficients); G is a tensor shaped like q1 (diagonal
metric) or a 0-d tensor (G = c I)."""


@dataclass(frozen=True)
class GroupHyper:
    """The constants of one param group at one step (host floats).

    lr: the rate eta of this step (after schedulers, Adagrad's lr_decay and Adam's bias
    correction 1 / (1 - beta1^k) included: the rate that multiplies the rule's buffer,
    docs/conventions.md), in parameter units per unit of the preconditioned gradient. beta: the
    heavy-ball momentum of the rule. weight_decay: lambda. decoupled: True when the decay is a
    friction on q (AdamW) rather than an L2 term of the potential V. bias_correction: the factor
    ``lr`` carries over the optimizer's own rate (Adam: 1 / (1 - beta1^k); 1 elsewhere), so that
    a decoupled decay, which torch applies with its own rate, is ``(lr / bias_correction) lambda``.
    """

    lr: float
    beta: float
    weight_decay: float
    decoupled: bool
    bias_correction: float = 1.0

    @property
    def decay_weight(self) -> float:
        """lambda_eff with ``lr * lambda_eff`` the per-step decay rate of the instantaneous term:
        lambda, except a decoupled decay, whose rate is torch's own ``lr`` (without Adam's bias
        correction): lambda / bias_correction."""
        return self.weight_decay / self.bias_correction if self.decoupled else self.weight_decay

    @property
    def mass(self) -> float:
        """m = eta (1 + beta) / 2."""
        return self.lr * (1.0 + self.beta) / 2.0

    @property
    def log_prefactor_rate(self) -> float:
        """d(t/tau) per step = eta / tau = 2 (1 - beta) / (1 + beta) (dimensionless)."""
        return 2.0 * (1.0 - self.beta) / (1.0 + self.beta)


@dataclass
class StepPlan:
    """What the pre-hook decided for one optimizer step, and what it read before the step.

    hypers: per param group, the step's constants. logged: whether the step stores a row.
    rebuild: per group, whether dq is rebuilt from the optimizer's state (else a snapshot).
    fused: whether the compiled program computes the statistics. The tensors are read from q_n
    before the step on the eager path (each (n_tensors,) float64 on the device, or None):
    ``qq`` |q_n|^2, ``qs`` sum(q_n) (zero off translation tensors), ``gq`` <g_n, q_n> at the
    positions ``gq_index`` (symmetry tensors holding a gradient). After the step: ``loss_logged``
    whether a loss was logged, ``grad_sq``/``update_sq`` the reduced per-tensor |g|^2 and |dq|^2
    of a logged step (for the prediction), ``advanced`` whether the compiled program already
    rolled the prediction. ``next_logged``: the next step stores a row whatever happens (its
    statistics will hold sum(q_{n+1}), so nothing needs to read it after this step).
    """

    hypers: list[GroupHyper]
    logged: bool
    rebuild: list[bool]
    fused: bool
    qq: torch.Tensor | None = None
    qs: torch.Tensor | None = None
    gq: torch.Tensor | None = None
    gq_index: list[int] | None = None
    loss_logged: bool = False
    grad_sq: torch.Tensor | None = None
    update_sq: torch.Tensor | None = None
    advanced: bool = False
    next_logged: bool = False
    slices: torch.Tensor | None = None
    """Per-unit symmetries: (n_slots - n_tensors, 3) |q_n|^2, sum(q_n), <g_n, q_n> per slice,
    read before the step (``noether_dyn.quantities.charges.slices_before``)."""


@dataclass
class StepRecord:
    """One logged step, held until a flush: host values in :data:`STEP_HOST` order
    (``host``), per group its :data:`GROUP_HOST` values (``groups_host``) and the
    device tensors (``row`` (len(STEP_DEVICE),), ``groups`` (n_groups, len(GROUP_DEVICE)),
    ``charges`` (n_symmetries, len(CHARGE_COLUMNS)) or None, ``tensors``
    (n_tensors, len(TENSOR_COLUMNS))); ``loss_logged``: whether the loss column is a
    measurement (NaN otherwise, and then not a non-finite event)."""

    host: list[float]
    row: torch.Tensor
    groups_host: list[list[float]]
    groups: torch.Tensor
    charges: torch.Tensor | None
    loss_logged: bool
    tensors: torch.Tensor
