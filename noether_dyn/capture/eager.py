"""The eager statistics backend: per-tensor statistics from foreach reductions over the update.

dq and G are rebuilt by running the adapter's elementwise rule (:meth:`fused_step`, the same rule
the compiled program compiles) tensor by tensor, or dq is taken as the difference from a snapshot
of q_n; both are then reduced to the (n_tensors, len(STATS)) float64 statistics of
:mod:`noether_dyn.quantities.charges` in a few stacked reductions. An isotropic G = c I (a 0-d G
from the rule) is applied to the reduced columns (dq^T G dq = c |dq|^2): no pass forms G dq.
q_n's own reductions are read in the pre-hook (:meth:`EagerStats.read_before`) when the step's
gradients are already there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from noether_dyn.capture.tracked import Tracked
from noether_dyn.optimizers import OptimizerAdapter
from noether_dyn.optimizers.base import EagerRows, FusedStep
from noether_dyn.quantities.charges import ChargeMatrix, slice_statistics, slices_before
from noether_dyn.quantities.reductions import (
    dots,
    inverse_sums,
    local,
    sq_norm_lists,
    sq_norms,
    stacked,
    sums,
)
from noether_dyn.records import STATS, StepPlan


@dataclass
class Updates:
    """dq and G of a step, per tracked tensor (None where not formed).

    dq: the update (local shards under FSDP2). gdq: G dq for a diagonal G, None for an isotropic
    one. iso: (n_tensors,) float64, c at the tensors whose G = c I, 0 elsewhere. inv:
    (n_tensors,) float64 sum(1/G_ii) over each tensor's local entries (None unless asked for).
    """

    dq: list[torch.Tensor | None]
    gdq: list[torch.Tensor | None]
    iso: torch.Tensor
    inv: torch.Tensor | None


def run_rule(
    step: FusedStep, params: list[torch.Tensor], grads: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """The adapter's elementwise rule run eagerly on each tensor: ``(dq, G, 1/G or None)`` per
    parameter, on the local shards of DTensors (FSDP2) as the compiled program runs it."""
    states = [tuple(local(list(st))) for st in step.states]
    rows = EagerRows(step.coef).rows
    return [
        step.rule(q, g, st, c) for q, g, st, c in zip(local(params), local(grads), states, rows)
    ]


class EagerStats:
    """Eager statistics of the tracked tensors; also owns the snapshots of q_n (only for groups
    whose update the adapter cannot rebuild, or with ``snapshot=True``)."""

    def __init__(self, tracked: Tracked, matrix: ChargeMatrix, adapter: OptimizerAdapter) -> None:
        self.t = tracked
        self.matrix = matrix
        self.adapter = adapter
        self.snap: dict[int, torch.Tensor] | None = None
        self.zeros = torch.zeros(len(tracked), dtype=torch.float64, device=tracked.device)
        """(n_tensors,) zeros, shared by the columns no symmetry needs: never written to."""
        self._coef: dict[int, EagerRows] = {}
        """Per param group (its first position): its last coefficients, converted (reused while
        ``fused_step`` returns the same coefficient tensor)."""
        self._iso_last: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}
        """Per param group: the 0-d metrics of G = c I last seen, and their float64 vector."""

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
        plan.qs = self._sums(params)
        if not closure and self.matrix.tensors:
            plan.gq_index = t.with_grad(self.matrix.tensors)
            plan.gq = t.subset(dots, plan.gq_index, t.widen(t.grads()), params)
        if self.matrix.sliced:  # per-unit symmetries: the same reads per slice
            plan.slices = slices_before(self.matrix, params, None if closure else t.grads())

    def _sums(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """sum(q) of the tensors a translation symmetry touches (the shared zeros without any)."""
        if not self.matrix.sum_tensors:
            return self.zeros
        return self.t.subset(sums, self.matrix.sum_tensors, tensors)

    def __call__(
        self, optimizer: torch.optim.Optimizer, plan: StepPlan, inputs: tuple
    ) -> tuple[torch.Tensor, None]:
        """The (n_tensors, len(STATS)) statistics of the step just taken (no stored rows: the
        caller forms them); the signature of the compiled backend."""
        t = self.t
        active = t.with_grad()
        grads, params = t.widen(t.grads()), t.widen(t.params)
        upd = self.updates(optimizer, plan.rebuild, active, with_metric=True)
        dq, gdq, iso = upd.dq, upd.gdq, upd.iso
        if plan.qq is None:  # the pre-hook left q_n to the compiled path, which could not run
            q0 = [p if u is None else p - u for p, u in zip(local(params), dq)]
            plan.qq = sq_norms(q0, t.device)
            plan.qs = self._sums(q0)

        has_grad = set(active)
        sym = [i for i in self.matrix.tensors if i in has_grad]
        trans = [i for i in self.matrix.sum_tensors if i in has_grad]
        diag = [i for i in active if gdq[i] is not None]  # G dq formed: a diagonal G
        diag_set = set(diag)
        sym_diag = [i for i in sym if i in diag_set]
        trans_diag = [i for i in trans if i in diag_set]

        cols = dict.fromkeys(STATS, self.zeros)  # columns of no tracked symmetry stay 0
        cols["QQ"] = plan.qq
        cols["QS"] = plan.qs
        cols["NUMEL"] = t.numel
        cols["GG"], cols["DD"] = self._sq_norms(active, grads, dq)
        cols["GDD"] = iso * cols["DD"]
        if diag:
            cols["GDD"] = t.subset(dots, diag, gdq, dq) + cols["GDD"]
        if sym:
            dq_q1 = t.subset(dots, sym, dq, params)
            cols["DQ"] = dq_q1 - t.restrict(cols["DD"], sym)
            if plan.gq is not None and plan.gq_index == sym:  # <g_n, q_n>, read before the step
                cols["GQ"] = plan.gq
            else:  # a closure made the gradients inside the step: <g, q_n> = <g, q_{n+1} - dq>
                g_q1 = t.subset(dots, sym, grads, params)
                cols["GQ"] = g_q1 - t.subset(dots, sym, grads, dq)
            cols["GDQ"] = iso * cols["DQ"]  # an isotropic G's share; a diagonal G's below
            if sym_diag:
                gdq_q1 = t.subset(dots, sym_diag, gdq, params)
                cols["GDQ"] = gdq_q1 - t.restrict(cols["GDD"], sym_diag) + cols["GDQ"]
        if trans:
            cols["GS"] = t.subset(sums, trans, grads)
            cols["DS"] = t.subset(sums, trans, dq)
            cols["GDS"] = iso * cols["DS"]
            if trans_diag:
                cols["GDS"] = t.subset(sums, trans_diag, gdq) + cols["GDS"]
        cols["IG"] = upd.inv
        stats = torch.stack([cols[k] for k in STATS], dim=1)
        if self.matrix.sliced:  # per-unit symmetries: the slices' rows after the tensors'
            extra = slice_statistics(self.matrix, plan.slices, params, grads, dq, gdq, iso)
            stats = torch.cat([stats, extra])
        return stats, None

    def _iso_vector(self, key: int, metrics: list[torch.Tensor]) -> torch.Tensor:
        """The 0-d metrics c of G = c I as one float64 vector; reused while the rule returns the
        same 0-d tensors (coefficients of a cached :class:`EagerRows`: constant hyperparameters).
        ``key``: the param group's first position."""
        last = self._iso_last.get(key)
        if last is not None and len(last[0]) == len(metrics):
            if all(a is b for a, b in zip(last[0], metrics)):
                return last[1]
        c = torch.stack(metrics).to(device=self.t.device, dtype=torch.float64)
        self._iso_last[key] = (metrics, c)
        return c

    def _sq_norms(self, idx: list[int], *lists: list) -> list[torch.Tensor]:
        """|x|^2 at positions ``idx`` of each list ((n_tensors,) float64 each, zeros elsewhere),
        all in one foreach reduction (:func:`sq_norm_lists`)."""
        t = self.t
        if len(idx) == len(t):
            return sq_norm_lists(list(lists), t.device)
        picked = sq_norm_lists([[lst[i] for i in idx] for lst in lists], t.device)
        out = []
        for values in picked:
            col = torch.zeros(len(t), dtype=torch.float64, device=t.device)
            if idx:
                col[t.index_tensor(idx)] = values
            out.append(col)
        return out

    def update_sq(
        self, optimizer: torch.optim.Optimizer, rebuild: list[bool], idx: list[int]
    ) -> torch.Tensor:
        """|dq|^2 per tensor at positions ``idx`` ((n_tensors,), zeros elsewhere), followed by
        its slices' (``ChargeMatrix.with_slices``) when units are tracked."""
        dq = self.updates(optimizer, rebuild, idx, with_metric=False).dq
        return self.matrix.with_slices(self.t.subset(sq_norms, idx, dq), "sq", dq)

    def updates(
        self,
        optimizer: torch.optim.Optimizer,
        rebuild: list[bool],
        idx: list[int],
        with_metric: bool,
    ) -> Updates:
        """dq and G of the step just taken, at positions ``idx``: rebuilt by the adapter's rule
        where it can, else the difference from the snapshot; with ``with_metric`` also
        sum(1/G_ii) per tensor (numel/c for G = c I)."""
        t = self.t
        n = len(t)
        dq: list[torch.Tensor | None] = [None] * n
        gdq: list[torch.Tensor | None] = [None] * n
        iso = torch.zeros(n, dtype=torch.float64, device=t.device)
        inv = t.local_numel.clone() if with_metric else None
        for g, group in enumerate(optimizer.param_groups):
            pos = [i for i in idx if t.group_of[i] == g]
            if not pos:
                continue
            params = [t.params[i] for i in pos]
            if rebuild[g]:
                self._rebuilt(optimizer, group, pos, params, with_metric, dq, gdq, iso, inv)
                continue
            # q_{n+1} - q_n of 16-bit parameters is exact in float64, not in their dtype
            upd = torch._foreach_sub(t.widen(params), t.widen([self.snap[i] for i in pos]))
            metric = self.adapter.metric(optimizer, group, params) if with_metric else None
            if isinstance(metric, list):
                metric = t.widen(metric)
            sel = t.index_tensor(pos)
            for i, u in zip(pos, upd):
                dq[i] = u
            if not with_metric or metric is None or isinstance(metric, float):
                c = 1.0 if metric is None else metric
                iso[sel] = c
                if inv is not None:
                    inv[sel] /= c
                continue
            for i, m, u in zip(pos, metric, upd):
                gdq[i] = m * u
            inv[sel] = inverse_sums(metric, t.device)
        return Updates(dq, gdq, iso, inv)

    def _rebuilt(self, optimizer, group, pos, params, with_metric, dq, gdq, iso, inv) -> None:
        """Fill dq, gdq, iso and inv at ``pos`` (one param group) from the adapter's rule."""
        t = self.t
        step = self.adapter.fused_step(optimizer, group, params, t.device, eager=True)
        if step is None:
            raise RuntimeError(
                f"noether-dyn: {type(self.adapter).__name__}.fused_step returned None for a "
                "param group whose update it said it can rebuild (can_reconstruct); make "
                "can_reconstruct false for that group so that the monitor takes a snapshot."
            )
        # tensor by tensor, keeping only dq (and G dq): the rule's other temporaries (G, 1/G and
        # its intermediates) are freed before the next tensor's are made, so that the peak of
        # held temporaries is one tensor's, not the group's (big freed blocks go back to the OS
        # and fault back in on the next step otherwise)
        states = [tuple(local(list(st))) for st in step.states]
        rows = self._coef.get(pos[0])
        if rows is None or rows.coef is not step.coef:
            rows = self._coef[pos[0]] = EagerRows(step.coef)
        grads = [p.grad for p in params]
        iso_pos, iso_c, diag_pos, diag_inv = [], [], [], []
        for i, q, g, st, c in zip(pos, local(params), local(grads), states, rows.rows):
            u, metric, inverse = step.rule(q, g, st, c)
            dq[i] = u
            if metric.dim() == 0:
                iso_pos.append(i)
                iso_c.append(metric)
            elif with_metric:
                diag_pos.append(i)
                gdq[i] = metric * u  # per tensor: faster than foreach on a CPU
                # sum(1/G_ii) in G's dtype, as inverse_sums forms it
                diag_inv.append((metric.reciprocal() if inverse is None else inverse).sum())
        if iso_pos:
            c = self._iso_vector(pos[0], iso_c)
            if len(iso_pos) == len(t):  # every tensor: no index (numel / c as below)
                iso.copy_(c)
                if inv is not None:
                    inv.div_(c)
            else:
                sel = t.index_tensor(iso_pos)
                iso[sel] = c
                if inv is not None:
                    inv[sel] = inv[sel] / c
        if diag_pos:
            inv[t.index_tensor(diag_pos)] = stacked(diag_inv, t.device)
