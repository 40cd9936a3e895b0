"""The eager statistics backend: per-tensor statistics from foreach reductions over the update.

dq and G dq are rebuilt from the optimizer's state by its adapter (or taken as the difference from
a snapshot of q_n), then reduced to the (n_tensors, len(STATS)) float64 statistics of
:mod:`noether_dyn.quantities.charges` in a few stacked reductions. q_n's own reductions are read
in the pre-hook (:meth:`EagerStats.read_before`) when the step's gradients are already there.
"""

from __future__ import annotations

import torch

from noether_dyn.capture.tracked import Tracked
from noether_dyn.optimizers import OptimizerAdapter
from noether_dyn.quantities.charges import ChargeMatrix
from noether_dyn.quantities.reductions import dots, inverse_sums, sq_norms, sums
from noether_dyn.records import STATS, StepPlan


class EagerStats:
    """Eager statistics of the tracked tensors; also owns the snapshots of q_n (only for groups
    whose update the adapter cannot rebuild, or with ``snapshot=True``)."""

    def __init__(self, tracked: Tracked, matrix: ChargeMatrix, adapter: OptimizerAdapter) -> None:
        self.t = tracked
        self.matrix = matrix
        self.adapter = adapter
        self.snap: dict[int, torch.Tensor] | None = None

    @property
    def snapshot_bytes(self) -> int:
        """Bytes held in copies of the parameters (0 when every update is rebuilt)."""
        return sum(s.numel() * s.element_size() for s in (self.snap or {}).values())

    def take_snapshot(self, rebuild: list[bool]) -> None:
        """Copy q_n of the parameters whose update cannot be rebuilt from optimizer state."""
        idx = [i for i, g in enumerate(self.t.group_of) if not rebuild[g]]
        if self.snap is None:
            self.snap = {}
        for i in idx:
            if i not in self.snap:
                self.snap[i] = torch.empty_like(self.t.params[i])
        torch._foreach_copy_([self.snap[i] for i in idx], [self.t.params[i] for i in idx])

    def read_before(self, plan: StepPlan, closure: bool) -> None:
        """|q_n|^2, sum(q_n) and (without a closure, whose step makes its own gradients)
        <g_n, q_n> into ``plan``, read before the step."""
        t = self.t
        params = t.widen(t.params)  # 16-bit parameters reduce in float64 (tracked.widen)
        plan.qq = sq_norms(params, t.device)
        plan.qs = t.subset(sums, self.matrix.sum_tensors, params)
        if not closure:
            plan.gq_index = t.with_grad(self.matrix.tensors)
            plan.gq = t.subset(dots, plan.gq_index, t.widen(t.grads()), params)

    def __call__(
        self, optimizer: torch.optim.Optimizer, plan: StepPlan, inputs: tuple
    ) -> tuple[torch.Tensor, None]:
        """The (n_tensors, len(STATS)) statistics of the step just taken (no stored rows: the
        caller forms them); the signature of the compiled backend."""
        t = self.t
        active = t.with_grad()
        grads, params = t.widen(t.grads()), t.widen(t.params)
        dq, gdq, inv_metric = self.updates(optimizer, plan.rebuild, active, with_metric=True)
        if plan.qq is None:  # the pre-hook left q_n to the compiled path, which could not run
            q0 = [p if u is None else p - u for p, u in zip(params, dq)]
            plan.qq = sq_norms(q0, t.device)
            plan.qs = t.subset(sums, self.matrix.sum_tensors, q0)

        has_grad = set(active)
        sym = [i for i in self.matrix.tensors if i in has_grad]
        trans = [i for i in self.matrix.sum_tensors if i in has_grad]

        cols = dict.fromkeys(STATS)
        cols["QQ"] = plan.qq
        cols["QS"] = plan.qs
        cols["NUMEL"] = t.numel
        cols["GG"] = t.subset(sq_norms, active, grads)
        cols["DD"] = t.subset(sq_norms, active, dq)
        cols["GDD"] = t.subset(dots, active, gdq, dq)
        dq_q1 = t.subset(dots, sym, dq, params)
        cols["DQ"] = dq_q1 - t.restrict(cols["DD"], sym)
        if plan.gq is not None and plan.gq_index == sym:  # <g_n, q_n>, read before the step
            cols["GQ"] = plan.gq
        else:  # a closure made the gradients inside the step: <g, q_n> = <g, q_{n+1} - dq>
            g_q1 = t.subset(dots, sym, grads, params)
            cols["GQ"] = g_q1 - t.subset(dots, sym, grads, dq)
        gdq_q1 = t.subset(dots, sym, gdq, params)
        cols["GDQ"] = gdq_q1 - t.restrict(cols["GDD"], sym)
        cols["GS"] = t.subset(sums, trans, grads)
        cols["DS"] = t.subset(sums, trans, dq)
        cols["GDS"] = t.subset(sums, trans, gdq)
        cols["IG"] = inv_metric
        return torch.stack([cols[k] for k in STATS], dim=1), None

    def update_sq(
        self, optimizer: torch.optim.Optimizer, rebuild: list[bool], idx: list[int]
    ) -> torch.Tensor:
        """|dq|^2 per tensor at positions ``idx`` ((n_tensors,), zeros elsewhere), from the
        adapter's norms of its state when it has them (no update tensor is formed)."""
        t = self.t
        out = torch.zeros(len(t), dtype=torch.float64, device=t.device)
        rest = []
        for g, group in enumerate(optimizer.param_groups):
            pos = [i for i in idx if t.group_of[i] == g]
            if not pos:
                continue
            norms = None
            if rebuild[g]:
                params = [t.params[i] for i in pos]
                norms = self.adapter.update_sq_norms(optimizer, group, params, t.device)
            if norms is None:
                rest += pos
            else:
                out[t.index_tensor(pos)] = norms
        if rest:
            dq, _, _ = self.updates(optimizer, rebuild, rest, with_metric=False)
            out = out + t.subset(sq_norms, rest, dq)
        return out

    def updates(
        self,
        optimizer: torch.optim.Optimizer,
        rebuild: list[bool],
        idx: list[int],
        with_metric: bool,
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None], torch.Tensor | None]:
        """dq and G dq of the step just taken, at positions ``idx`` (None elsewhere): rebuilt from
        the optimizer's state where the adapter can, else the difference from the snapshot; with
        ``with_metric`` also sum(1/G_ii) per tensor ((n_tensors,), numel/c for G = c I)."""
        t = self.t
        n = len(t)
        dq: list[torch.Tensor | None] = [None] * n
        gdq: list[torch.Tensor | None] = [None] * n
        inv = t.local_numel.clone() if with_metric else None
        for g, group in enumerate(optimizer.param_groups):
            pos = [i for i in idx if t.group_of[i] == g]
            if not pos:
                continue
            params = [t.params[i] for i in pos]
            if rebuild[g]:
                upd, metric = self.adapter.update(optimizer, group, params)
            else:  # q_{n+1} - q_n of 16-bit parameters is exact in float64, not in their dtype
                upd = torch._foreach_sub(t.widen(params), t.widen([self.snap[i] for i in pos]))
                metric = self.adapter.metric(optimizer, group, params) if with_metric else None
            upd = t.widen(upd)
            if isinstance(metric, list):
                metric = t.widen(metric)
            if not with_metric or metric is None:
                prods = upd
            elif isinstance(metric, float):
                prods = torch._foreach_mul(upd, metric)
                inv[t.index_tensor(pos)] /= metric
            else:
                prods = torch._foreach_mul(metric, upd)
                inv[t.index_tensor(pos)] = inverse_sums(metric, t.device)
            for i, u, v in zip(pos, upd, prods):
                dq[i], gdq[i] = u, v
        return dq, gdq, inv
