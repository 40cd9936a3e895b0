"""The charge prediction of a monitor: the theory's Q_n rolled forward every step
(noether_dyn.quantities.theory), started from the first measured charge.

Under SGD with momentum two predictions roll side by side: the exact discrete recurrence
(:class:`~noether_dyn.quantities.momentum.MomentumPredictor`, stored as ``predicted``) and the
continuous ODE of Neural Mechanics (stored as ``predicted_ode``). Both read the measured
``|dq_n|^2_S`` of every step; the exact one also reads each group's dampening and, under Nesterov,
``<dq_n, b_n>_S`` with the momentum buffer b_n after the step.
"""

from __future__ import annotations

import torch

from noether_dyn.capture.decay import ExactDecay, check_exact_decay
from noether_dyn.capture.eager import EagerStats
from noether_dyn.capture.tracked import Tracked
from noether_dyn.quantities.charges import ChargeMatrix
from noether_dyn.quantities.momentum import MomentumPredictor, TranslationDecayShare
from noether_dyn.quantities.reductions import dots, sq_norms, sums
from noether_dyn.quantities.theory import ChargePredictor
from noether_dyn.records import COL, S_, GroupHyper, StepPlan


class Prediction:
    """Owns the :class:`ChargePredictor` (and its exact momentum predictor) and what they read
    from each step. ``optimizer``: read once for the Nesterov flags and whether its momentum
    buffers are still empty (then the first step is torch's undamped start-up step)."""

    def __init__(
        self,
        tracked: Tracked,
        matrix: ChargeMatrix,
        eager: EagerStats,
        predictor: ChargePredictor,
        reduce,
        optimizer: torch.optim.Optimizer | None = None,
        exact_decay: bool = False,
        snapshot: bool = False,
    ) -> None:
        self.t = tracked
        self.matrix = matrix
        self.eager = eager
        self.predictor = predictor
        self._reduce = reduce
        # the predictor's stand-in before it starts: distinct tensors, not one view twice (under
        # the torch.compile fallback, aliased inputs recompile once the predictor's replace them)
        self._zero = torch.zeros(
            3, len(matrix), dtype=torch.float64, device=tracked.device
        ).unbind()
        self._fresh = False
        self._param_groups: list[dict] = [] if optimizer is None else optimizer.param_groups
        self._exact_key: tuple | None = None
        if predictor.regime == "momentum" and len(matrix) and optimizer is not None:
            groups = optimizer.param_groups
            nesterov = [
                bool(groups[tracked.group_of[i]].get("nesterov", False)) for i in matrix.lead
            ]
            predictor.exact = MomentumPredictor(
                matrix.linear, torch.tensor(nesterov, dtype=torch.bool, device=tracked.device)
            )
            self._fresh = all(
                optimizer.state.get(p, {}).get("momentum_buffer") is None for p in tracked.params
            )
            if any(matrix.linear_flags):  # decay's true share of translation (no memory)
                predictor.translation_share = TranslationDecayShare()
        self._share_done = False
        self._x_next: torch.Tensor | None = None
        self.exact_decay: ExactDecay | None = None
        if exact_decay:
            adapter = eager.adapter
            rebuild = [  # as the planner decides it (capture/plan.py)
                adapter.can_reconstruct(g) and not snapshot and not widened
                for g, widened in zip(optimizer.param_groups, tracked.widened_groups)
            ]
            check_exact_decay(optimizer, adapter.family, adapter.fallback, rebuild)
            self.exact_decay = ExactDecay(tracked, matrix, optimizer, reduce, adapter)

    @property
    def waiting(self) -> bool:
        """Whether symmetries are tracked but no charge has been measured yet."""
        return len(self.matrix) > 0 and self.predictor.value is None

    def lead_rates(self, hypers: list[GroupHyper]) -> tuple[list[float], ...]:
        """Per symmetry, eta, beta and lambda of the group of its first parameter."""
        lead = [hypers[self.t.group_of[i]] for i in self.matrix.lead]
        return [h.lr for h in lead], [h.beta for h in lead], [h.weight_decay for h in lead]

    def inputs(self, hypers: list[GroupHyper]) -> tuple | None:
        """(value, velocity, constants, exact value or None) before the step for the stored rows,
        or None without symmetries (zero stand-ins before the predictor starts: unused then)."""
        if not len(self.matrix):
            return None
        pred = self.predictor
        started = pred.value is not None
        value = pred.value if started else self._zero[0]
        velocity = pred.velocity if started else self._zero[1]
        exact = None
        if pred.exact is not None:
            exact = pred.exact.value if pred.exact.value is not None else self._zero[2]
        return value, velocity, pred.constants(*self.lead_rates(hypers), self.t.device), exact

    def logged(
        self,
        plan: StepPlan,
        stats: torch.Tensor,
        charges: torch.Tensor | None,
        advanced: tuple | None,
    ) -> None:
        """Take the rows' rolled prediction, or start the predictors from this step's measured
        charge (writing it into the ``predicted`` and ``predicted_ode`` columns)."""
        pred, ex = self.predictor, self.predictor.exact
        plan.grad_sq = stats[:, S_["GG"]]
        plan.update_sq = stats[:, S_["DD"]]
        share = pred.translation_share
        if ex is not None and ex.value is None and charges is not None:
            charge = self.matrix.charges(stats[:, S_["QQ"]], stats[:, S_["QS"]])
            carried = None if self._fresh else self._carried(plan, stats)
            ex.start(charge, carried)
            charges[:, COL["predicted"]] = ex.value
            if share is not None and share.carry is None and carried is not None:
                share.carry = carried  # <b_{n-1}, 1>_S is all decay's: <g, 1>_S = 0
        self._fresh = False
        if share is not None and charges is not None:
            x = self.matrix.charges(stats[:, S_["QQ"]], stats[:, S_["QS"]])
            self._write_share(charges, self._share_step(plan, x))
        if self.exact_decay is not None:
            per_tensor = self.exact_decay.step(plan.hypers, plan.rebuild)
            if charges is not None:
                self.exact_decay.write(charges, per_tensor)
        if advanced is not None and pred.value is not None:
            pred.value, pred.velocity = advanced
            plan.advanced = True
            return
        if charges is not None and pred.value is None:
            pred.start(self.matrix.charges(stats[:, S_["QQ"]], stats[:, S_["QS"]]))
            charges[:, COL["predicted" if ex is None else "predicted_ode"]] = pred.value

    def advance(self, optimizer: torch.optim.Optimizer, plan: StepPlan) -> None:
        """Roll the predictions to the next step; on a logged step, from the norms it computed
        (``plan.grad_sq``, ``plan.update_sq``: per tensor, already reduced over ranks)."""
        pred = self.predictor
        ex = pred.exact
        exact_on = ex is not None and ex.value is not None
        self._advance_share(plan)
        if self.exact_decay is not None:
            if not self.exact_decay.done:
                self.exact_decay.step(plan.hypers, plan.rebuild)
            self.exact_decay.done = False
        if pred.value is None or not len(self.matrix) or (plan.advanced and not exact_on):
            return
        t = self.t
        hypers = plan.hypers
        grad_sq = update_sq = None
        active = t.with_grad(self.matrix.tensors)
        if pred.needs_grad_sq and not plan.advanced:
            per_tensor = plan.grad_sq
            if per_tensor is None:
                grads = t.grads()
                per_tensor = self._reduce(
                    self.matrix.with_slices(t.subset(sq_norms, active, grads), "sq", grads)
                )
            lr_sq = self.matrix.expand(t.per_tensor([h.lr**2 for h in hypers]))
            grad_sq = self.matrix.signs @ (lr_sq * per_tensor)
        if pred.needs_update_sq or exact_on:
            per_tensor = plan.update_sq
            if per_tensor is None:
                per_tensor = self._reduce(self.eager.update_sq(optimizer, plan.rebuild, active))
            update_sq = self.matrix.signs @ per_tensor
        if not plan.advanced:
            pred.advance(*self.lead_rates(hypers), grad_sq=grad_sq, update_sq=update_sq)
        if exact_on:
            cross = self._buffer_cross(optimizer, plan, active) if ex.needs_cross else None
            eta, beta, lam, damp = self._exact_rates(hypers)
            ex.advance(eta, beta, lam, update_sq, dampening=damp, buffer_cross=cross)

    def _share_step(self, plan: StepPlan, x: torch.Tensor) -> torch.Tensor:
        """Decay's share of step n for every symmetry (used on translation rows), from the
        measured x_n; advances the share's recurrence once per step."""
        share, ex = self.predictor.translation_share, self.predictor.exact
        eta, beta, lam, damp = self._exact_rates(plan.hypers)
        self._share_done = True
        return share.step(x, eta, beta, lam, damp, ex.nesterov if ex is not None else None)

    def _write_share(self, charges: torch.Tensor, share: torch.Tensor) -> None:
        """Replace translation rows' instantaneous decay by the true share (rule keeps the
        rest: decay + rule still equals the measured change)."""
        trans = self.matrix.linear
        old = charges[:, COL["decay"]]
        new = torch.where(trans, share, old)
        charges[:, COL["rule"]] = charges[:, COL["rule"]] + old - new
        charges[:, COL["decay"]] = new

    def _advance_share(self, plan: StepPlan) -> None:
        """On a step that stored no row, advance the share from x_n read after the last step;
        then read x_{n+1} (sums of the translation tensors now) for the next step."""
        share = self.predictor.translation_share
        if share is None:
            return
        if not self._share_done and self._x_next is not None and share.carry is not None:
            self._share_step(plan, self._x_next)
        self._share_done = False
        if plan.next_logged:  # that step's statistics carry x_{n+1}: no read here
            self._x_next = None
            return
        t = self.t
        qs = self.matrix.with_slices(
            t.subset(sums, self.matrix.sum_tensors, t.params), "sum", t.params
        )
        qs = self._reduce(qs)
        self._x_next = self.matrix.charges(torch.zeros_like(qs), qs)

    def _exact_rates(self, hypers: list[GroupHyper]):
        """Per symmetry (device tensors, rebuilt when a constant changes): eta, beta, lambda and
        dampening of its lead tensor's group."""
        damp = [float(g.get("dampening", 0.0)) for g in self._param_groups]
        lead = [self.t.group_of[i] for i in self.matrix.lead]
        key = (tuple(hypers), tuple(damp))
        if self._exact_key is None or self._exact_key[0] != key:
            rows = [[hypers[g].lr, hypers[g].beta, hypers[g].weight_decay, damp[g]] for g in lead]
            values = self.t.to_device(rows, torch.float64).reshape(-1, 4).unbind(1)
            self._exact_key = (key, values)
        return self._exact_key[1]

    def _carried(self, plan: StepPlan, stats: torch.Tensor) -> torch.Tensor:
        """``<q_n, b_{n-1}>_S`` (translation: ``<b_{n-1}, 1>_S``) for a start on a step n whose
        buffer b_{n-1} was already filled, from the step's statistics: torch's
        ``b_n = beta b_{n-1} + (1 - d) u_n`` with ``u_n = g_n + lambda q_n`` and
        ``dq_n = -eta b_n`` (Nesterov: ``-eta (u_n + beta b_n)``)."""
        t, x = self.t, {k: stats[:, i] for k, i in S_.items()}
        h = plan.hypers
        per_slot = lambda v: self.matrix.expand(t.per_tensor(v))  # noqa: E731
        eta = per_slot([g.lr for g in h])
        beta = per_slot([g.beta for g in h])
        lam = per_slot([g.weight_decay for g in h])
        damp = per_slot([float(g.get("dampening", 0.0)) for g in self._param_groups])
        nest = per_slot([float(g.get("nesterov", False)) for g in self._param_groups]) > 0
        eta_safe = torch.where(eta > 0, eta, torch.ones_like(eta))
        beta_safe = torch.where(beta > 0, beta, torch.ones_like(beta))

        def previous(q_u: torch.Tensor, q_dq: torch.Tensor) -> torch.Tensor:
            q_b = -q_dq / eta_safe
            q_b = torch.where(nest, (q_b - q_u) / beta_safe, q_b)
            prev = (q_b - (1.0 - damp) * q_u) / beta_safe
            return torch.where(beta > 0, prev, torch.zeros_like(prev))

        quad = previous(x["GQ"] + lam * x["QQ"], x["DQ"])
        lin = previous(x["GS"] + lam * x["QS"], x["DS"])
        signs = self.matrix.signs
        return torch.where(self.matrix.linear, signs @ lin, signs @ quad)

    def _buffer_cross(
        self, optimizer: torch.optim.Optimizer, plan: StepPlan, active: list[int]
    ) -> torch.Tensor:
        """``<dq_n, b_n>_S`` per symmetry, b_n the momentum buffer after the step (Nesterov)."""
        t = self.t
        dq = self.eager.updates(optimizer, plan.rebuild, active, with_metric=False).dq
        bufs: list[torch.Tensor | None] = [None] * len(t)
        for g, group in enumerate(optimizer.param_groups):
            pos = [i for i in active if t.group_of[i] == g]
            found = self.eager.adapter.momentum_buffers(
                optimizer, group, [t.params[i] for i in pos]
            )
            for i, b in zip(pos, found or []):
                bufs[i] = b
        have = [i for i in active if bufs[i] is not None]
        cross = self.matrix.with_slices(t.subset(dots, have, dq, bufs), "dot", dq, bufs)
        return self.matrix.signs @ self._reduce(cross)
