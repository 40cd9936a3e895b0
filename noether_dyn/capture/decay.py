"""Opt-in exact weight-decay share (``watch(..., exact_decay=True)``; docs/theory.md §3.1,
:mod:`noether_dyn.quantities.momentum`): the ``decay`` column becomes weight decay's true share of
each charge's change, for every rule with coupled L2.

The update is linear in the rule's buffer (SGD's momentum buffer, Adam's first moment, RMSprop's
momentum buffer) at the step's own preconditioner P_n, and the buffer is linear in its inputs, so
``dq_n = (gradient part) + E_n`` with E_n the part that the ``lambda q`` terms put there:

================  ==========================================  ==================================
rule              decay's part of the buffer A_n              E_n
================  ==========================================  ==================================
SGD, heavy ball   ``beta A_{n-1} + (1 - d) lambda q_n``       ``-eta A_n``
SGD, Nesterov     same                                        ``-eta (lambda q_n + beta A_n)``
Adam, coupled L2  ``beta1 A_{n-1} + (1 - beta1) lambda q_n``  ``-eta A_n / ((1 - beta1^k) P_n)``
RMSprop, mom. mu  ``mu A_{n-1} + lambda q_n / P_n``           ``-eta A_n``
RMSprop, Adagrad  none                                        ``-eta lambda q_n / P_n``
AdamW, plain SGD  none                                        ``-eta lambda q_n``
================  ==========================================  ==================================

(A_{-1} = 0; torch's first SGD buffer is undamped: d_0 = 0.) The share is ``2 <q_n, E_n>_S``
(quadratic) or ``<E_n, 1>_S`` (translation); ``rule`` keeps the rest of ``2 <q_n, dq_n>_S``, so
decay + rule + ksb still closes exactly. P_n is taken as it is (it saw the decay through v): the
share is the first-moment attribution at the step's metric, defined because the step is linear in
the buffer at fixed P_n (docs/theory.md §3.1 says why that, and not a derivative through v).

Translation under SGD(M) needs none of this (the scalar recurrence of
:class:`~noether_dyn.quantities.momentum.TranslationDecayShare`); under a preconditioner P weighs
each coordinate differently, so translation rows are written here too.

The monitor runs after the step: q_n = q_{n+1} - dq_n with dq_n and G_n rebuilt by the adapter's
elementwise rule (:func:`~noether_dyn.capture.eager.run_rule`; P_n = (1 - d) G_n by the metric
convention), so every param group must be rebuildable (no snapshot). Memory: one
parameter-sized accumulator per tracked tensor of a rule with a buffer (+1x those tensors), none
without one; time: one rebuild of dq, one pass over A and two reductions per tensor and step
(benchmarks/decay_share.py).
"""

from __future__ import annotations

import torch

from noether_dyn.capture.eager import run_rule
from noether_dyn.capture.tracked import Tracked
from noether_dyn.optimizers.base import OptimizerAdapter, scalar, step_count
from noether_dyn.quantities.charges import ChargeMatrix
from noether_dyn.quantities.reductions import dots, sums
from noether_dyn.records import COL, GroupHyper

FAMILIES = ("sgd", "adam", "rmsprop", "adagrad")
_BUFFER_KEY = {"sgd": "momentum_buffer", "adam": "exp_avg", "rmsprop": "momentum_buffer"}


def check_exact_decay(
    optimizer: torch.optim.Optimizer, family: str, fallback: bool, rebuild: list[bool]
) -> None:
    """Raise unless ``exact_decay=True`` is supported: a known family (not the Euclidean
    fallback), every group's update rebuilt from optimizer state (``rebuild``), and the rule's
    buffers still empty (the decay part of a filled buffer is not known)."""
    if fallback or family not in FAMILIES:
        raise ValueError(
            f"exact_decay=True supports torch's SGD, Adam/AdamW, RMSprop and Adagrad, got "
            f"{type(optimizer).__name__}; leave exact_decay=False (the decay column is then the "
            "instantaneous term)."
        )
    if not all(rebuild):
        raise ValueError(
            "exact_decay=True reads q_n = q_{n+1} - dq_n from the rebuilt update, and some param "
            "group's update is not rebuilt (snapshot=True, 16-bit parameters, or Adagrad with "
            "lr_decay); pass exact_decay=False."
        )
    key = _BUFFER_KEY.get(family)
    if key is not None and any(
        optimizer.state.get(p, {}).get(key) is not None
        for g in optimizer.param_groups
        for p in g["params"]
    ):
        raise ValueError(
            f"exact_decay=True needs an optimizer that has not stepped yet (its {key} buffers "
            "already hold weight decay of unseen steps); attach the monitor before training."
        )


class ExactDecay:
    """Decay's part A of each rule's buffer, per tracked tensor, and the decay column it gives.

    Args:
        tracked, matrix: the monitor's tensors and sign matrix.
        optimizer: the optimizer whose steps are read (after each step).
        reduce: per-tensor sums over ranks.
        adapter: the optimizer's adapter, whose elementwise rule rebuilds dq_n and G_n.

    Attributes:
        rows: (n_symmetries,) bool, the rows whose decay column this writes (all but translation
            under SGD, whose share needs no memory).
        acc: position -> A (parameter-sized, the parameter's dtype widened as for statistics).
    """

    def __init__(
        self,
        tracked: Tracked,
        matrix: ChargeMatrix,
        optimizer: torch.optim.Optimizer,
        reduce,
        adapter: OptimizerAdapter,
    ) -> None:
        self.t, self.matrix, self.optimizer, self._reduce = tracked, matrix, optimizer, reduce
        self.adapter = adapter
        family = self.adapter.family
        self.rows = ~matrix.linear if family == "sgd" else torch.ones_like(matrix.linear)
        touched = matrix.signs[self.rows].abs().sum(0) > 0
        self.tensors = [int(i) for i in torch.nonzero(touched).flatten().tolist()]
        self.acc: dict[int, torch.Tensor] = {}
        self.done = False

    @property
    def nbytes(self) -> int:
        """Bytes held in accumulators."""
        return sum(a.numel() * a.element_size() for a in self.acc.values())

    def step(self, hypers: list[GroupHyper], rebuild: list[bool]) -> torch.Tensor:
        """Advance A over the step just taken; return (n_tensors, 2) float64: per tensor
        ``<q_n, E_n>`` and ``sum(E_n)`` (zeros off the written tensors, without decay, and for
        tensors without a gradient, which the step did not move)."""
        t, opt = self.t, self.optimizer
        self.done = True
        out = torch.zeros(len(t), 2, dtype=torch.float64, device=t.device)
        for g, group in enumerate(opt.param_groups):
            h = hypers[g]
            pos = [i for i in self.tensors if t.group_of[i] == g and t.params[i].grad is not None]
            if not pos or not h.weight_decay:
                continue
            params = [t.params[i] for i in pos]
            rebuilt = self.adapter.fused_step(opt, group, params, t.device, eager=True)
            dq, metric, _ = zip(*run_rule(rebuilt, params, [p.grad for p in params]))
            q_n = torch._foreach_sub(t.widen(params), list(dq))
            precond = None
            if self.adapter.family != "sgd":  # P = (1 - d) G (docs/conventions.md)
                d = h.beta if self.adapter.family == "adam" else 0.0
                precond = torch._foreach_mul(list(metric), 1.0 - d) if d else list(metric)
            share = self._share(group, h, pos, params, q_n, precond)
            sel = t.index_tensor(pos)
            out[sel, 0] = dots(q_n, share, t.device)
            out[sel, 1] = sums(share, t.device)
        return out

    def _share(
        self,
        group: dict,
        h: GroupHyper,
        pos: list[int],
        params: list[torch.Tensor],
        q_n: list[torch.Tensor],
        precond: list[torch.Tensor] | None,
    ) -> list[torch.Tensor]:
        """E_n per tensor at ``pos`` (one param group), advancing the accumulators; ``precond``:
        P_n per tensor (None for SGD)."""
        family, lr, lam = self.adapter.family, h.lr, h.weight_decay
        if h.decoupled or (family == "sgd" and not h.beta):  # torch's own lr (AdamW)
            return torch._foreach_mul(q_n, -lr / h.bias_correction * lam)
        if not h.beta:  # a preconditioner without a buffer (Adam with beta1 = 0 included)
            out = torch._foreach_div(q_n, precond)
            torch._foreach_mul_(out, -lr * lam)
            return out
        damp = scalar(group.get("dampening", 0.0)) if family == "sgd" else 0.0
        acc = []
        for j, i in enumerate(pos):
            x = q_n[j] if family != "rmsprop" else q_n[j] / precond[j]
            if family == "adam":
                w = (1.0 - h.beta) * lam
            elif family == "sgd" and i in self.acc:
                w = (1.0 - damp) * lam
            else:  # torch's first SGD buffer is undamped; RMSprop's buffer takes u / P whole
                w = lam
            a = self.acc.get(i)
            if a is None:
                a = self.acc[i] = x * w
            else:
                a.mul_(h.beta).add_(x, alpha=w)
            acc.append(a)
        if family == "sgd" and group.get("nesterov", False):
            out = torch._foreach_mul(acc, h.beta)
            torch._foreach_add_(out, q_n, alpha=lam)
            torch._foreach_mul_(out, -lr)
            return out
        if family == "adam":
            out = torch._foreach_div(acc, precond)
            own = lr / h.bias_correction  # torch's lr; the bias correction from each count
            for j, p in enumerate(params):  # 1 - beta1^k with k the step count after the step
                k = step_count(self.optimizer.state[p])
                out[j].mul_(-own / (1.0 - h.beta**k))
            return out
        return torch._foreach_mul(acc, -lr)

    def write(self, charges: torch.Tensor, per_tensor: torch.Tensor) -> None:
        """Put the exact share into the written rows' decay column (rule keeps the rest)."""
        stats = self._reduce(per_tensor)
        signs = self.matrix.signs
        share = torch.where(self.matrix.linear, signs @ stats[:, 1], 2.0 * (signs @ stats[:, 0]))
        old = charges[:, COL["decay"]]
        new = torch.where(self.rows, share, old)
        charges[:, COL["rule"]] = charges[:, COL["rule"]] + old - new
        charges[:, COL["decay"]] = new
