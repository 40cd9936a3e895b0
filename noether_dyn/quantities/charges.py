"""Charges of layer-level symmetries from per-tensor statistics, with the exact decomposition of
their change (docs/theory.md §3 and §3.1; Kunin et al., "Neural Mechanics", ICLR 2021; Tanaka &
Kunin,
"Noether's Learning Dynamics", NeurIPS 2021).

Every layer-level charge is a signed sum over the parameter tensors of the symmetry, so one
(n_symmetries x n_tensors) sign matrix S turns a (n_tensors,) vector of per-tensor reductions
into the (n_symmetries,) vector of charges. With q_n the parameters before update n, dq_n the
update, g_n the gradient and G the metric of the update, the per-tensor statistics are the
columns of :data:`STATS`:

====== =====================  ====== =====================
QQ     |q_n|^2                DD     |dq_n|^2
QS     sum(q_n)               DQ     <q_n, dq_n>
GG     |g_n|^2                DS     sum(dq_n)
GQ     <g_n, q_n>             GDD    <G dq_n, dq_n>
GS     sum(g_n)               GDQ    <G dq_n, q_n>
NUMEL  number of entries      GDS    sum(G dq_n)
IG     sum(1 / G_ii)
====== =====================  ====== =====================

For scale and rescale (Q = <q, xi(q)>), exactly:
``Q_{n+1} - Q_n = 2 <q_n, dq_n>_xi + |dq_n|^2_xi = decay + rule + ksb`` with
``decay = -2 sum_A eta lambda |q_A|^2``, ``rule = 2<q_n, dq_n>_xi - decay`` and
``ksb = |dq_n|^2_xi`` (the finite-step kinetic symmetry breaking). For translation (Q = <q, 1>):
``Q_{n+1} - Q_n = <dq_n, 1> = decay + rule`` with ``decay = -sum_A eta lambda <q_A, 1>`` and
``ksb = 0``. The NLD charge is ``C = m <G q', xi> = ((1 + beta)/2) <G dq, xi>`` and its kinetic
breaking term ``d_s T = m |q'|^2_{G, xi}`` (0 for translation).

Per-unit symmetries (``Symmetry.slices``, ``granularity="unit"``) act on slices of tensors. The
statistics then come per *slot*: the first n_tensors slots are the tensors whole (the rows above,
unchanged), followed by one slot per entry of every (tensor, unit axis) some unit cuts along,
holding the same statistics reduced over every other axis (:func:`slice_statistics`). A tensor's
whole-tensor statistic is the sum of its slots along any one axis, so a parent's charge is the sum
of its units' to rounding, and the exact split ``decay + rule + ksb`` holds slot by slot. The
sign matrix is then (n_symmetries x n_slots) and everything downstream reads it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from noether_dyn.quantities.effective_rate import FAMILIES, effective_rate
from noether_dyn.records import CHARGE_COLUMNS, COL, S_, STATS
from noether_dyn.symmetries.kinds import kind_of
from noether_dyn.symmetries.symmetry import Symmetry

__all__ = ["COL", "STATS", "S_", "ChargeMatrix", "slice_statistics", "slices_before"]


class ChargeMatrix:
    """The sign matrix of a list of symmetries over the monitor's parameter tensors, and the
    charge rows of each symmetry by its kind (:mod:`noether_dyn.symmetries.kinds`).

    Args:
        symmetries: the symmetries, each naming parameters in ``index``.
        index: parameter name -> position in the monitor's tensor list.
        device: where the per-tensor statistics live.
        family: the optimizer family (``OptimizerAdapter.family``) whose effective rate
            (:func:`~noether_dyn.quantities.effective_rate.effective_rate`) fills the
            ``effective_lr`` column of normalized kinds: eta/((1 - beta) r^2) for SGD(M),
            eta/r for Adam, eta/((1 - beta) r) for RMSprop, eta/r for Adagrad.
        shapes: parameter name -> shape; needed when a symmetry acts on slices.

    Attributes:
        signs: (n_symmetries, n_tensors) float64, the generator's sign on each tensor (0 off it).
        kinds: per symmetry, its :class:`~noether_dyn.symmetries.kinds.Kind`.
        linear: (n_symmetries,) bool, True for kinds whose charge is linear in q (translation).
        lead: per symmetry, the position of its first tensor (whose param group gives the
            symmetry's eta, beta, lambda for predictions and effective rates).
        tensors: sorted positions of every tensor some symmetry touches.
        sum_tensors: sorted positions of tensors of symmetries whose kind reads plain sums
            (QS, GS, DS, GDS: translation).
    """

    def __init__(
        self,
        symmetries: Sequence[Symmetry],
        index: dict[str, int],
        device: torch.device,
        family: str = "sgd",
        shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
        self.family = family
        n_t = len(set(index.values()))
        self.symmetries = list(symmetries)
        self.kinds = [kind_of(s.kind) for s in self.symmetries]
        self.n_tensors = n_t
        # the slots beyond the tensors: one block per (tensor, unit axis) that a unit cuts along
        self.axes: list[tuple[int, int, int, int]] = []  # (tensor, dim, first slot, size)
        offset: dict[tuple[int, int], int] = {}
        n_slots = n_t
        for sym in self.symmetries:
            for name, where in zip(sym.params, sym.slices):
                if where is not None and (index[name], where[0]) not in offset:
                    if shapes is None:
                        raise ValueError(
                            f"ChargeMatrix: symmetry {sym.name!r} acts on slices; pass shapes."
                        )
                    size = int(shapes[name][where[0]])
                    offset[(index[name], where[0])] = n_slots
                    self.axes.append((index[name], where[0], n_slots, size))
                    n_slots += size
        self.n_slots = n_slots
        slot_tensor = list(range(n_t)) + [t for t, _, _, size in self.axes for _ in range(size)]
        self.slot_tensor = torch.tensor(slot_tensor, dtype=torch.long).to(device)
        entries: list[tuple[int, int, float]] = []  # (symmetry, slot, sign)
        self.lead: list[int] = []
        for i, sym in enumerate(self.symmetries):
            slices = sym.slices or (None,) * len(sym.params)
            for name, sign, where in zip(sym.params, sym.signs, slices):
                at = index[name] if where is None else offset[(index[name], where[0])] + where[1]
                entries.append((i, at, sign))
            self.lead.append(index[sym.params[0]])
        if self.sliced:  # per-unit rows have a few nonzeros each: stored by rows, not densely
            self.signs: torch.Tensor | SignRows = SignRows(
                entries, len(self.symmetries), n_slots
            ).to(device)
        else:
            signs = torch.zeros(len(self.symmetries), max(n_slots, 1), dtype=torch.float64)
            for i, at, sign in entries:
                signs[i, at] = sign
            self.signs = signs[:, :n_slots].to(device)
        self.lead_index = torch.tensor(self.lead, dtype=torch.long).to(device)
        self.linear_flags = [k.linear for k in self.kinds]
        self.linear = torch.tensor(self.linear_flags, dtype=torch.bool, device=device)

        def tensors_of(rows: set[int]) -> list[int]:
            return sorted({slot_tensor[at] for i, at, _ in entries if i in rows})

        self.tensors = tensors_of(set(range(len(self.symmetries))))
        self.sum_tensors = tensors_of({i for i, k in enumerate(self.kinds) if k.stats & _SUMS})
        self._blocks = []  # per kind: (kind, its rows, its rows of the sign matrix, its leads,
        # their absolute values: formed once here, not per logged step)
        for kind in dict.fromkeys(self.kinds):
            rows = [i for i, k in enumerate(self.kinds) if k is kind]
            at = torch.tensor(rows, dtype=torch.long).to(device)
            signs = self.signs[at]
            self._blocks.append((kind, at, signs, self.lead_index[at], signs.abs()))

    def __len__(self) -> int:
        return len(self.symmetries)

    @property
    def sliced(self) -> bool:
        """Whether some symmetry acts on slices (the statistics have slots beyond the tensors)."""
        return self.n_slots > self.n_tensors

    def expand(self, per_tensor: torch.Tensor) -> torch.Tensor:
        """A (n_tensors,) vector of per-tensor constants (eta, lambda, beta) as a (n_slots,) one
        (each slot takes its tensor's value); ``per_tensor`` itself without slices."""
        if not self.sliced or per_tensor.shape[0] == self.n_slots:
            return per_tensor
        return per_tensor[self.slot_tensor.to(per_tensor.device)]

    def with_slices(self, per_tensor: torch.Tensor, op: str, *lists: list) -> torch.Tensor:
        """A (n_tensors,) per-tensor reduction extended to (n_slots,) by the same reduction per
        slice: ``op`` is ``"sq"`` (|x|^2), ``"dot"`` (<x, y>) or ``"sum"`` (sum x) of the
        tensors in ``lists`` (one entry per tracked position; None counts as zero)."""
        if not self.sliced:
            return per_tensor
        parts = [per_tensor.to(torch.float64)]
        for t, dim, _, size in self.axes:
            xs = [lst[t] for lst in lists]
            if any(x is None for x in xs):
                parts.append(torch.zeros(size, dtype=torch.float64, device=per_tensor.device))
                continue
            parts.append(_slice_reduce(op, xs, dim).to(per_tensor.device))
        return torch.cat(parts)

    def charges(self, qq: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
        """Q per symmetry from per-tensor |q|^2 and sum(q), each (n_tensors,)."""
        x = {"QQ": qq, "QS": qs}
        out = torch.zeros(len(self), dtype=torch.float64, device=self.signs.device)
        for kind, at, signs, _, _ in self._blocks:
            out = out.index_copy(0, at, kind.charge(signs, x))
        return out

    def rows(
        self,
        stats: torch.Tensor,
        eta: torch.Tensor,
        lam: torch.Tensor,
        beta: torch.Tensor,
    ) -> torch.Tensor:
        """The (n_symmetries, len(CHARGE_COLUMNS)) float64 rows of one logged step, the
        ``predicted`` column 0.

        Args:
            stats: (n_slots, len(STATS)) per-slot statistics of the step (n_slots = n_tensors
                without per-unit symmetries).
            eta, lam, beta: (n_tensors,) or (n_slots,) rate, weight decay and momentum of each
                tensor's group.
        """
        x = dict(zip(STATS, stats.unbind(1)))  # one unbind, not a select per column
        eta, lam, beta = self.expand(eta), self.expand(lam), self.expand(beta)
        half_m = (1.0 + beta) / 2.0  # m / eta
        out = torch.zeros(len(self), len(CHARGE_COLUMNS), dtype=torch.float64, device=stats.device)
        for kind, at, signs, lead, abs_signs in self._blocks:
            cols = kind.columns(signs, x, eta, lam, half_m, (eta[lead], beta[lead]))
            g_xi, xi_sq = cols.pop("g_xi"), cols.pop("xi_sq")
            cols["defect"] = g_xi.abs() / torch.sqrt((abs_signs @ x["GG"]) * xi_sq)
            cols["grad_sq"] = signs @ x["GG"]
            # docs/theory.md §4 by family: the direction's rate from r^2 = |q_A|^2
            if kind.normalized:
                cols["effective_lr"] = effective_rate(
                    self.family, eta[lead], abs_signs @ x["QQ"], beta[lead]
                )
            zero = torch.zeros_like(g_xi)
            nan = torch.full_like(g_xi, float("nan"))
            block = torch.stack(
                [cols.get(c, nan if c in _OPTIONAL else zero) for c in CHARGE_COLUMNS], dim=1
            )
            out = out.index_copy(0, at, block)
        return out


class SignRows:
    """A sign matrix stored row by row as its few nonzeros (a per-unit symmetry touches 1-3
    slots of thousands): ``idx`` (n_rows, k) slot positions and ``val`` (n_rows, k) signs, 0 in
    the padding. Supports what the charge code does with a dense one: ``rows @ vector``
    ((n_slots,) -> (n_rows,), O(n_rows k) instead of O(n_rows n_slots)), ``abs()``, row
    selection ``rows[index]``, ``to(device)``, ``shape``, ``dtype``, ``device``."""

    def __init__(
        self,
        entries: Sequence[tuple[int, int, float]],
        n_rows: int,
        n_cols: int,
        *,
        idx: torch.Tensor | None = None,
        val: torch.Tensor | None = None,
    ) -> None:
        self.shape = (n_rows, n_cols)
        if idx is None or val is None:
            per_row: list[list[tuple[int, float]]] = [[] for _ in range(n_rows)]
            for i, at, sign in entries:
                per_row[i].append((at, sign))
            k = max((len(r) for r in per_row), default=0) or 1
            idx = torch.zeros(n_rows, k, dtype=torch.long)
            val = torch.zeros(n_rows, k, dtype=torch.float64)
            for i, row in enumerate(per_row):
                for j, (at, sign) in enumerate(row):
                    idx[i, j], val[i, j] = at, sign
        self.idx, self.val = idx, val

    dtype = property(lambda self: self.val.dtype)
    device = property(lambda self: self.val.device)

    def _like(self, idx: torch.Tensor, val: torch.Tensor) -> SignRows:
        return SignRows((), idx.shape[0], self.shape[1], idx=idx, val=val)

    def __matmul__(self, vector: torch.Tensor) -> torch.Tensor:
        return (self.val * vector[self.idx]).sum(1)

    def abs(self) -> SignRows:
        return self._like(self.idx, self.val.abs())

    def __getitem__(self, rows: torch.Tensor) -> SignRows:
        return self._like(self.idx[rows], self.val[rows])

    def to(self, device: torch.device) -> SignRows:
        return self._like(self.idx.to(device), self.val.to(device))


def _slice_reduce(op: str, xs: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Per-entry-of-``dim`` sums of x^2 (``"sq"``), x y (``"dot"``) or x (``"sum"``), shape
    (x.shape[dim],), returned in float64 and accumulated in the tensors' own dtype, as the
    per-tensor reductions are (16-bit tensors arrive widened: ``Tracked.widen``)."""
    a = xs[0]
    t = a * a if op == "sq" else a * xs[1] if op == "dot" else a
    other = [d for d in range(t.dim()) if d != dim]
    return (t.sum(other) if other else t).to(torch.float64)


def slices_before(
    matrix: ChargeMatrix, params: list[torch.Tensor], grads: list[torch.Tensor | None] | None
) -> torch.Tensor:
    """(n_slots - n_tensors, 3) float64 ``|q_n|^2``, ``sum(q_n)``, ``<g_n, q_n>`` per slice, read
    before the step from ``params`` (q_n) and ``grads`` (None: not there yet, the last column is
    NaN and :func:`slice_statistics` forms it after the step)."""
    out = []
    for t, dim, _, size in matrix.axes:
        q = params[t]
        g = None if grads is None else grads[t]
        gq = (
            torch.full((size,), float("nan"), dtype=torch.float64, device=q.device)
            if grads is None
            else torch.zeros(size, dtype=torch.float64, device=q.device)
            if g is None
            else _slice_reduce("dot", [g, q], dim)
        )
        out.append(
            torch.stack([_slice_reduce("sq", [q], dim), _slice_reduce("sum", [q], dim), gq], 1)
        )
    return torch.cat(out).to(torch.float64)


def slice_statistics(
    matrix: ChargeMatrix,
    before: torch.Tensor | None,
    params: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    dq: list[torch.Tensor | None],
    gdq: list[torch.Tensor | None],
    iso: torch.Tensor,
) -> torch.Tensor:
    """The (n_slots - n_tensors, len(STATS)) float64 statistics of the slices, in slot order, by
    the formulas of the per-tensor ones (noether_dyn.capture.eager): ``DQ = <dq, q_{n+1}> -
    |dq|^2``, ``GDQ = <G dq, q_{n+1}> - <G dq, dq>``, an isotropic G = c I applied as ``c``
    times the plain reduction. ``IG`` is not formed per slice (0: it feeds only the per-tensor
    table).

    Args:
        before: :func:`slices_before` of this step, or None (then q_n = q_{n+1} - dq).
        params: q_{n+1} per tracked position; grads, dq, gdq: per position (None: none formed;
            gdq None is an isotropic G whose ``c`` is ``iso[position]``).
    """
    blocks = []
    dev = iso.device
    for t, dim, first, size in matrix.axes:
        q1 = params[t]
        d = dq[t] if dq[t] is not None else torch.zeros_like(q1)
        g = grads[t] if grads[t] is not None else torch.zeros_like(q1)
        gd = gdq[t]

        def red(op: str, *xs: torch.Tensor, dim: int = dim) -> torch.Tensor:
            return _slice_reduce(op, list(xs), dim).to(dev)

        dd, ds = red("sq", d), red("sum", d)
        dq_ = red("dot", d, q1) - dd
        if gd is None:
            gdd, gdq_, gds = iso[t] * dd, iso[t] * dq_, iso[t] * red("sum", d)
        else:
            gdd = red("dot", gd, d)
            gdq_ = red("dot", gd, q1) - gdd
            gds = red("sum", gd)
        g_q1 = None
        if before is not None:
            at = first - matrix.n_tensors
            qq, qs, gq = before[at : at + size].to(dev).unbind(1)
        else:
            q0 = q1 - d
            qq, qs, gq = red("sq", q0), red("sum", q0), torch.full_like(dd, float("nan"))
        if bool(torch.isnan(gq).any()):
            g_q1 = red("dot", g, q1) - red("dot", g, d)
            gq = g_q1
        numel = torch.full_like(dd, float(q1.numel() // max(q1.shape[dim], 1)))
        col = {
            "QQ": qq, "QS": qs, "GG": red("sq", g), "GQ": gq, "GS": red("sum", g),
            "NUMEL": numel, "IG": torch.zeros_like(dd), "DD": dd, "DQ": dq_, "DS": ds,
            "GDD": gdd, "GDQ": gdq_, "GDS": gds,
        }  # fmt: skip
        blocks.append(torch.stack([col[k] for k in STATS], dim=1))
    return torch.cat(blocks)


_SUMS = frozenset({"QS", "GS", "DS", "GDS"})
_OPTIONAL = ("predicted_ode", "effective_lr", "angular_update")
"""Columns a kind may leave out (NaN for it); the others it leaves out are 0 (``predicted``)."""
