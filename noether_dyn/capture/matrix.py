"""Matrix-valued charges in a monitored run: ``watch(..., matrix_charges=...)``.

At each logged step n the pre-hook copies q_n of the parameters the GL records read (only those
tensors, whole, in their own dtype: :attr:`MatrixCharges.snapshot_bytes` is what is held, the
size of those parameters; nothing is held between logged steps but the buffer), and the post-hook
reads q_{n+1} and forms, per record, ``C_n = L_n L_n^T - R_n R_n^T`` and the exact split of
``C_{n+1} - C_n = first_order + kinetic`` (:func:`~noether_dyn.quantities.matrix_charges.
batched_split`) in float64, on the device, batched over the records of one shape (all heads of
a model at once). ``dL = L_{n+1} - L_n`` is formed in float64, where the difference of two
float32 (or 16-bit) values is exact: the split closes to float64 rounding whatever the optimizer.

``decay`` is ``-2 eta lambda C_n``. That is weight decay's whole share of ``first_order`` for
plain SGD with coupled L2 (momentum 0) and for decoupled decay (AdamW), where the update holds
``-eta lambda q`` itself. Under SGD with momentum it is the instantaneous term only: the decay
that reaches C later through the momentum buffer is not in it (``watch(exact_decay=True)`` does
not change this column). Under a preconditioned rule with coupled L2 (Adam, RMSprop, Adagrad
with weight_decay) it is NaN (not formed). 0 without decay. ``meta["matrix_decay"]`` names which
of these holds per param group: ``"none"``, ``"exact"``, ``"instantaneous"`` or ``"nan"``.
Rows stay on the device until a flush (no host sync per step) and are written in that flush's
transaction, with its steps: one row per record, step and upper-triangle entry (i <= j),
n(n+1)/2 per record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from noether_dyn.capture.tracked import Tracked
from noether_dyn.quantities.matrix_charges import batched_split
from noether_dyn.records import StepPlan
from noether_dyn.symmetries.matrix import MatrixSymmetry

MATRIX_ROW = ("step", "symmetry", "i", "j", "charge", "first_order", "kinetic", "decay")
"""Columns of a host row (``symmetry``: the record's index in ``meta["matrix_symmetries"]``)."""


def decay_rule(adapter_name: str, weight_decay: float, beta: float, decoupled: bool) -> str:
    """What the ``decay`` column (-2 eta lambda C_n) is for one param group: ``"none"`` (no
    decay: 0), ``"exact"`` (decay's whole first-order share), ``"instantaneous"`` (SGD with
    momentum: the instantaneous term only, not the share through the buffer) or ``"nan"``
    (a preconditioner with coupled L2: NaN)."""
    if weight_decay == 0.0:
        return "none"
    if decoupled:
        return "exact"
    if adapter_name == "sgd":
        return "exact" if beta == 0.0 else "instantaneous"
    return "nan"


class MatrixCharges:
    """Per logged step, the GL charges of ``records`` and their exact split.

    Args:
        records: the :class:`~noether_dyn.symmetries.matrix.MatrixSymmetry` records (verified or
            declared); every parameter they read must be tracked by the optimizer.
        tracked: the monitor's :class:`~noether_dyn.capture.tracked.Tracked`.
        adapter_name: the optimizer adapter's ``name`` (for the decay rule).
    """

    def __init__(
        self, records: Sequence[MatrixSymmetry], tracked: Tracked, adapter_name: str
    ) -> None:
        self.records = list(records)
        names = [r.name for r in self.records]
        if len(set(names)) != len(names):
            raise ValueError(f"matrix_charges: record names repeat: {names}.")
        missing = sorted({p for r in self.records for p in r.params} - set(tracked.index))
        if missing:
            raise ValueError(
                f"matrix_charges: the records read {missing}, which the optimizer does not track."
            )
        if tracked.sharded:
            raise ValueError("matrix_charges: sharded (FSDP2) parameters are not supported.")
        self.adapter_name = adapter_name
        self.device = tracked.device
        self.live = {p: tracked.params[tracked.index[p]] for r in self.records for p in r.params}
        self.group_of = {p: tracked.group_of[tracked.index[p]] for p in self.live}
        self.snap: dict[str, torch.Tensor] = {}
        # batches: records of one (n, a, b) shape go through one bmm
        shapes: dict[tuple[int, int, int], list[int]] = {}
        for k, r in enumerate(self.records):
            left, right = r.matrices(self.live)
            shapes.setdefault((r.n, left.shape[1], right.shape[1]), []).append(k)
        self.batches = list(shapes.values())
        self._triu: dict[int, torch.Tensor] = {}
        self._ids = {
            tuple(b): torch.tensor(b, dtype=torch.float64, device=self.device) for b in self.batches
        }
        self._coef: torch.Tensor | None = None
        self.pending: list[torch.Tensor] = []

    @property
    def snapshot_bytes(self) -> int:
        """Bytes held in the copies of q_n (the size of the parameters the records read)."""
        return sum(s.numel() * s.element_size() for s in self.snap.values())

    def meta(self) -> dict[str, Any]:
        """What the store keeps about the records (``meta["matrix_symmetries"]``)."""
        return {"matrix_symmetries": [r.to_dict() for r in self.records]}

    def before(self, plan: StepPlan) -> None:
        """Pre-hook of a logged step: copy q_n of the records' parameters; fix the decay factor
        ``-2 eta lambda`` (NaN under rule ``"nan"``) of each record from the step's constants."""
        with torch.no_grad():
            for p, t in self.live.items():
                if p not in self.snap:
                    self.snap[p] = torch.empty_like(t)
                self.snap[p].copy_(t)
        coef = []
        for r in self.records:
            groups = {self.group_of[p] for p in r.params}
            values = set()
            for g in groups:
                h = plan.hypers[g]
                rule = decay_rule(self.adapter_name, h.weight_decay, h.beta, h.decoupled)
                values.add(
                    0.0 if rule == "none" else np.nan if rule == "nan"
                    else -2.0 * h.lr * h.weight_decay
                )  # fmt: skip
            coef.append(values.pop() if len(values) == 1 else np.nan)
        self._coef = torch.tensor(coef, dtype=torch.float64, device=self.device)

    def after(self, step: int) -> None:
        """Post-hook of a logged step: form and keep (on the device) the rows of step ``step``."""
        if self._coef is None:
            return
        with torch.no_grad():
            for batch in self.batches:
                pairs0 = [self.records[k].matrices(self.snap) for k in batch]
                pairs1 = [self.records[k].matrices(self.live) for k in batch]
                l0 = torch.stack([a.to(torch.float64) for a, _ in pairs0])
                r0 = torch.stack([b.to(torch.float64) for _, b in pairs0])
                dl = torch.stack([a.to(torch.float64) for a, _ in pairs1]) - l0
                dr = torch.stack([b.to(torch.float64) for _, b in pairs1]) - r0
                charge, first, kinetic = batched_split(l0, r0, dl, dr)
                self.pending.append(self._rows(step, batch, charge, first, kinetic))
        self._coef = None

    def _rows(self, step: int, batch: list[int], charge, first, kinetic) -> torch.Tensor:
        n = charge.shape[1]
        if n not in self._triu:
            self._triu[n] = torch.triu_indices(n, n, device=self.device)
        i, j = self._triu[n]
        b, m = len(batch), i.numel()
        decay = self._coef[batch].unsqueeze(1) * charge[:, i, j]
        f64 = dict(dtype=torch.float64, device=self.device)
        cols = [
            torch.full((b, m), float(step), **f64),
            self._ids[tuple(batch)].unsqueeze(1).expand(b, m),
            i.to(torch.float64).expand(b, m),
            j.to(torch.float64).expand(b, m),
            charge[:, i, j],
            first[:, i, j],
            kinetic[:, i, j],
            decay,
        ]
        return torch.stack(cols, dim=-1).reshape(b * m, len(MATRIX_ROW))

    def take(self) -> np.ndarray | None:
        """The rows since the last take, (n_rows, len(MATRIX_ROW)) float64 on the host (one
        device-to-host copy), or None."""
        if not self.pending:
            return None
        rows, self.pending = torch.cat(self.pending).cpu().numpy(), []
        return rows

    def take_for_store(self) -> tuple[np.ndarray, list[str]] | None:
        """The pending rows and the record names, as ``RunWriter.append(matrix=)`` takes them
        (written in the flush's own transaction), or None."""
        rows = self.take()
        return None if rows is None else (rows, [r.name for r in self.records])
