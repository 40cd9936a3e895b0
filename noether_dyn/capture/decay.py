"""Opt-in exact weight-decay share of quadratic charges under SGD with heavy-ball momentum
(``watch(..., exact_decay=True)``; docs/theory.md §3.1, :mod:`noether_dyn.quantities.momentum`).

Weight decay reaches the update through the buffer: ``A_n = beta A_{n-1} + (1 - d_n) lambda q_n``
(``A_0 = lambda q_0``, torch's undamped first step) is decay's part of ``b_n``, and its share of
``2 <q_n, dq_n>_S`` is ``-2 eta_n <q_n, A_n>_S``. The monitor runs after the step, so q_n is
``q_{n+1} + eta_n b_n`` (``dq_n = -eta_n b_n``): A advances in place from the parameters and the
buffers, with no copy of q_n. Memory: one parameter-sized accumulator per tensor of a quadratic
symmetry (+1x those tensors' memory); time: two fused multiply-adds per step and, on a logged
step, two dots per tensor (benchmarks/decay_share.py measured +19% on a 26 ms SGD step).
"""

from __future__ import annotations

import torch

from noether_dyn.capture.tracked import Tracked
from noether_dyn.quantities.charges import ChargeMatrix
from noether_dyn.quantities.reductions import dots
from noether_dyn.records import COL


def check_exact_decay(optimizer: torch.optim.Optimizer, family: str) -> None:
    """Raise unless ``exact_decay=True`` is supported: torch.optim.SGD, no Nesterov, buffers
    still empty (the decay part of a filled buffer is not known)."""
    if family != "sgd" or not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(
            f"exact_decay=True supports torch.optim.SGD only, got {type(optimizer).__name__}; "
            "leave exact_decay=False (the decay column is then the instantaneous term)."
        )
    if any(g.get("nesterov", False) for g in optimizer.param_groups):
        raise ValueError("exact_decay=True does not support nesterov=True; pass exact_decay=False.")
    if any(optimizer.state.get(p, {}).get("momentum_buffer") is not None
           for g in optimizer.param_groups for p in g["params"]):  # fmt: skip
        raise ValueError(
            "exact_decay=True needs an optimizer that has not stepped yet (its momentum buffers "
            "already hold weight decay of unseen steps); attach the monitor before training."
        )


class ExactDecay:
    """The accumulators A of the tensors of quadratic symmetries, and their decay column."""

    def __init__(
        self, tracked: Tracked, matrix: ChargeMatrix, optimizer: torch.optim.Optimizer, reduce
    ) -> None:
        self.t, self.matrix, self.optimizer, self._reduce = tracked, matrix, optimizer, reduce
        quad = ~matrix.linear
        touched = matrix.signs[quad].abs().sum(0) > 0 if bool(quad.any()) else None
        self.tensors = (
            [] if touched is None else [int(i) for i in torch.nonzero(touched).flatten().tolist()]
        )
        self.acc: dict[int, torch.Tensor] = {}
        self.done = False

    @property
    def nbytes(self) -> int:
        """Bytes held in accumulators."""
        return sum(a.numel() * a.element_size() for a in self.acc.values())

    def step(self, hypers) -> torch.Tensor | None:
        """Advance A over the step just taken; return the (n_tensors,) ``-2 eta <q_n, A_n>``
        (zeros off the quadratic tensors and for groups without momentum or decay)."""
        t, opt = self.t, self.optimizer
        self.done = True
        out = torch.zeros(len(t), dtype=torch.float64, device=t.device)
        for g, group in enumerate(opt.param_groups):
            h = hypers[g]
            pos = [i for i in self.tensors if t.group_of[i] == g and t.params[i].grad is not None]
            if not pos or not h.beta or not h.weight_decay:
                continue
            params = [t.params[i] for i in pos]
            bufs = [opt.state[p]["momentum_buffer"] for p in params]
            fresh = [i for i in pos if i not in self.acc]
            d = float(group.get("dampening", 0.0))
            w = h.weight_decay * (1.0 if fresh else 1.0 - d)  # torch's first buffer is undamped
            if fresh:
                for i in fresh:
                    self.acc[i] = torch.zeros_like(t.params[i])
            acc = [self.acc[i] for i in pos]
            if not fresh:
                torch._foreach_mul_(acc, h.beta)
            torch._foreach_add_(acc, params, alpha=w)  # q_n = q_{n+1} + eta b_n
            torch._foreach_add_(acc, bufs, alpha=w * h.lr)
            q1_a = dots(params, acc, t.device)
            b_a = dots(bufs, acc, t.device)
            out[t.index_tensor(pos)] = -2.0 * h.lr * (q1_a + h.lr * b_a)
        return out

    def write(self, charges: torch.Tensor, per_tensor: torch.Tensor) -> None:
        """Put the exact share into the quadratic rows' decay column (rule keeps the rest)."""
        share = self.matrix.signs @ self._reduce(per_tensor)
        old = charges[:, COL["decay"]]
        new = torch.where(self.matrix.linear, old, share)
        charges[:, COL["rule"]] = charges[:, COL["rule"]] + old - new
        charges[:, COL["decay"]] = new
