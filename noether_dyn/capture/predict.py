"""The charge prediction of a monitor: the theory's Q_n rolled forward every step
(noether_dyn.quantities.theory), started from the first measured charge."""

from __future__ import annotations

import torch

from noether_dyn.capture.eager import EagerStats
from noether_dyn.capture.tracked import Tracked
from noether_dyn.quantities.charges import ChargeMatrix
from noether_dyn.quantities.reductions import sq_norms
from noether_dyn.quantities.theory import ChargePredictor
from noether_dyn.records import COL, S_, GroupHyper, StepPlan


class Prediction:
    """Owns the :class:`ChargePredictor` and what it reads from each step."""

    def __init__(
        self,
        tracked: Tracked,
        matrix: ChargeMatrix,
        eager: EagerStats,
        predictor: ChargePredictor,
        reduce,
    ) -> None:
        self.t = tracked
        self.matrix = matrix
        self.eager = eager
        self.predictor = predictor
        self._reduce = reduce
        # the predictor's stand-in before it starts: two tensors, not one view twice (under the
        # torch.compile fallback, aliased inputs recompile once the predictor's own replace them)
        self._zero = torch.zeros(
            2, len(matrix), dtype=torch.float64, device=tracked.device
        ).unbind()

    @property
    def waiting(self) -> bool:
        """Whether symmetries are tracked but no charge has been measured yet."""
        return len(self.matrix) > 0 and self.predictor.value is None

    def lead_rates(self, hypers: list[GroupHyper]) -> tuple[list[float], ...]:
        """Per symmetry, eta, beta and lambda of the group of its first parameter."""
        lead = [hypers[self.t.group_of[i]] for i in self.matrix.lead]
        return [h.lr for h in lead], [h.beta for h in lead], [h.weight_decay for h in lead]

    def inputs(self, hypers: list[GroupHyper]) -> tuple | None:
        """(value, velocity, constants) before the step for the stored rows, or None without
        symmetries (a zero stand-in before the predictor starts: its output is then unused)."""
        if not len(self.matrix):
            return None
        pred = self.predictor
        started = pred.value is not None
        value = pred.value if started else self._zero[0]
        velocity = pred.velocity if started else self._zero[1]
        return value, velocity, pred.constants(*self.lead_rates(hypers), self.t.device)

    def logged(
        self,
        plan: StepPlan,
        stats: torch.Tensor,
        charges: torch.Tensor | None,
        advanced: tuple | None,
    ) -> None:
        """Take the rows' rolled prediction, or start the predictor from this step's measured
        charge (writing it into the ``predicted`` column)."""
        pred = self.predictor
        if advanced is not None and pred.value is not None:
            pred.value, pred.velocity = advanced
            plan.advanced = True
            return
        plan.grad_sq = stats[:, S_["GG"]]
        plan.update_sq = stats[:, S_["DD"]]
        if charges is not None:
            pred.start(self.matrix.charges(stats[:, S_["QQ"]], stats[:, S_["QS"]]))
            charges[:, COL["predicted"]] = pred.value

    def advance(self, optimizer: torch.optim.Optimizer, plan: StepPlan) -> None:
        """Roll the prediction to the next step; on a logged step, from the norms it computed
        (``plan.grad_sq``, ``plan.update_sq``: per tensor, already reduced over ranks)."""
        pred = self.predictor
        if pred.value is None or not len(self.matrix) or plan.advanced:
            return
        t = self.t
        hypers = plan.hypers
        grad_sq = update_sq = None
        active = t.with_grad(self.matrix.tensors)
        if pred.needs_grad_sq:
            per_tensor = plan.grad_sq
            if per_tensor is None:
                per_tensor = self._reduce(t.subset(sq_norms, active, t.grads()))
            lr_sq = t.per_tensor([h.lr**2 for h in hypers])
            grad_sq = self.matrix.signs @ (lr_sq * per_tensor)
        if pred.needs_update_sq:
            per_tensor = plan.update_sq
            if per_tensor is None:
                per_tensor = self._reduce(self.eager.update_sq(optimizer, plan.rebuild, active))
            update_sq = self.matrix.signs @ per_tensor
        pred.advance(*self.lead_rates(hypers), grad_sq=grad_sq, update_sq=update_sq)
