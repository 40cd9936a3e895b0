"""The theory's charge Q_n, rolled forward every step on the device (docs/theory.md §3.2, §3.3).

Three regimes, chosen per run from the learning rule:

``"sgd"`` (SGD without momentum, exact given the symmetry; docs/theory.md §3.2)
    scale, rescale: ``Q_{n+1} = (1 - eta lambda)^2 Q_n + sum_A s_A eta_A^2 |g_A|^2``;
    translation: ``Q_{n+1} = (1 - eta lambda) Q_n``. The residual against the measured charge
    is the accumulated symmetry defect (BatchNorm's eps, rounding).
``"momentum"`` (SGD with momentum) stores two predictions. ``predicted``: the exact discrete
    recurrence of :class:`~noether_dyn.quantities.momentum.MomentumPredictor` (torch's start-up
    step, dampening, Nesterov and changing rates included; its residual is the accumulated
    symmetry defect), held in :attr:`ChargePredictor.exact`. ``predicted_ode``: the continuous
    theory (Kunin et al., "Neural Mechanics", 2021), first order in eta:
    ``Q'' + 2 gamma Q' + omega^2 Q = F(t)`` with ``gamma = (1 - beta)/(eta (1 + beta))``,
    ``omega^2 = 4 lambda / (eta (1 + beta))`` and ``F = 2 |q'_A|^2`` (signed for rescale);
    translation: ``omega^2 = 2 lambda / (eta (1 + beta))``, ``F = 0``. Q(0) is the measured
    charge, Q'(0) = 0. Each step advances time by eta with F held at the step's measured
    ``|dq|^2 / eta^2``, integrated exactly (matrix exponential of the augmented 3x3 system): this
    equals the Green's-function solution of §3.3 for piecewise-constant forcing, in all three
    damping regimes at once.
``"flow"`` (adaptive rules: RMSprop, Adam, AdamW, Adagrad, and the Euclidean fallback)
    gradient flow conserves Q up to weight decay: ``Q_{n+1} = (1 - eta lambda)^2 Q_n`` (scale,
    rescale) or ``(1 - eta lambda) Q_n`` (translation). The residual measured - predicted is then
    the whole breaking by the metric and the finite step, which the decomposition columns split.

eta, beta and lambda of a symmetry are those of the param group of its first parameter.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from noether_dyn.quantities.momentum import MomentumPredictor, TranslationDecayShare

REGIMES = ("sgd", "momentum", "flow")


@lru_cache(maxsize=256)
def _propagator(eta: float, beta: float, lam: float, translation: bool) -> tuple[float, ...]:
    """(Phi00, Phi01, Phi10, Phi11, Psi0, Psi1) advancing (Q, Q') over dt = eta with constant F."""
    gamma = (1.0 - beta) / (eta * (1.0 + beta))
    omega_sq = (2.0 if translation else 4.0) * lam / (eta * (1.0 + beta))
    a = torch.tensor(
        [[0.0, 1.0, 0.0], [-omega_sq, -2.0 * gamma, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    e = torch.linalg.matrix_exp(a * eta)
    return tuple(float(v) for v in (e[0, 0], e[0, 1], e[1, 0], e[1, 1], e[0, 2], e[1, 2]))


def advance_charge(
    regime: str,
    is_trans: torch.Tensor,
    value: torch.Tensor,
    velocity: torch.Tensor,
    constants: tuple[torch.Tensor, ...],
    grad_sq: torch.Tensor | None,
    update_sq: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q_{n+1}, Q'_{n+1}) from (Q_n, Q'_n), all (n_symmetries,) float64: the arithmetic of
    :meth:`ChargePredictor.advance`, a pure function so that it can also run inside the compiled
    statistics program. ``is_trans`` marks translation symmetries; ``constants`` come from
    :meth:`ChargePredictor.constants`; ``grad_sq`` ("sgd") and ``update_sq`` ("momentum") as in
    :meth:`ChargePredictor.advance`."""
    if regime == "momentum":
        coef, eta = constants
        force = torch.where(is_trans, torch.zeros_like(update_sq), 2.0 * update_sq / eta**2)
        return (
            coef[:, 0] * value + coef[:, 1] * velocity + coef[:, 4] * force,
            coef[:, 2] * value + coef[:, 3] * velocity + coef[:, 5] * force,
        )
    (factor,) = constants
    value = factor * value
    if regime == "sgd":
        value = value + torch.where(is_trans, torch.zeros_like(grad_sq), grad_sq)
    return value, velocity


class ChargePredictor:
    """Per-symmetry predicted charge (and its time derivative in the momentum regime).

    State (device tensors of shape (n_symmetries,)): ``value`` (predicted Q_n) and ``velocity``
    (dQ/dt, momentum regime only). ``value`` is None until :meth:`start` sets Q_0.
    """

    def __init__(self, regime: str, translation: list[bool]) -> None:
        if regime not in REGIMES:
            raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}.")
        self.regime = regime
        self.translation = translation
        self.value: torch.Tensor | None = None
        self.velocity: torch.Tensor | None = None
        self._is_trans: torch.Tensor | None = None
        self._constants: tuple[tuple, tuple[torch.Tensor, ...]] | None = None
        self.exact: MomentumPredictor | None = None
        """The exact discrete prediction ("momentum" regime; set by the monitor, which knows each
        symmetry's Nesterov flag): then ``value`` is the ODE's and ``exact.value`` is stored as
        ``predicted``."""
        self.translation_share: TranslationDecayShare | None = None
        """Weight decay's share of translation charges through the momentum buffer (set by the
        monitor under SGD with momentum); checkpointed with the predictions."""

    @property
    def needs_grad_sq(self) -> bool:
        return self.regime == "sgd"

    @property
    def needs_update_sq(self) -> bool:
        return self.regime == "momentum"

    def start(self, charge: torch.Tensor) -> None:
        self.value = charge.clone()
        self.velocity = torch.zeros_like(charge)

    def advance(
        self,
        eta: list[float],
        beta: list[float],
        lam: list[float],
        grad_sq: torch.Tensor | None = None,
        update_sq: torch.Tensor | None = None,
    ) -> None:
        """Move from Q_n to Q_{n+1}.

        Args:
            eta, beta, lam: per symmetry, the step's rate, momentum and weight decay (host).
            grad_sq: (n_symmetries,) ``sum_A s_A eta_A^2 |g_A|^2`` ("sgd" regime).
            update_sq: (n_symmetries,) ``sum_A s_A |dq_A|^2`` ("momentum" regime).
        """
        if self.value is None or not len(eta):
            return
        device = self.value.device
        self.value, self.velocity = advance_charge(
            self.regime,
            self._translation_mask(device),
            self.value,
            self.velocity,
            self.constants(eta, beta, lam, device),
            grad_sq,
            update_sq,
        )

    def constants(
        self, eta: list[float], beta: list[float], lam: list[float], device: torch.device
    ) -> tuple[torch.Tensor, ...]:
        """The step's constants for :func:`advance_charge`, as device tensors, rebuilt only when
        eta, beta or lambda change (a schedule): the momentum propagator is a matrix
        exponential per symmetry, host work. "momentum": (propagator rows (n, 6), eta (n,));
        the other regimes: (decay factor (n,),)."""
        key = (tuple(eta), tuple(beta), tuple(lam), device)
        if self._constants is None or self._constants[0] != key:
            if self.regime == "momentum":
                rows = [
                    _propagator(e, b, l, t) for e, b, l, t in zip(eta, beta, lam, self.translation)
                ]
                values: tuple[torch.Tensor, ...] = (
                    torch.tensor(rows, dtype=torch.float64).to(device, non_blocking=True),
                    torch.tensor(eta, dtype=torch.float64).to(device, non_blocking=True),
                )
            else:
                factor = [
                    (1.0 - e * l) ** (1 if t else 2) for e, l, t in zip(eta, lam, self.translation)
                ]
                values = (torch.tensor(factor, dtype=torch.float64).to(device, non_blocking=True),)
            self._constants = (key, values)
        return self._constants[1]

    def _translation_mask(self, device: torch.device) -> torch.Tensor:
        """The (n_symmetries,) bool mask of translation symmetries, built once on the device."""
        if self._is_trans is None or self._is_trans.device != device:
            self._is_trans = torch.tensor(self.translation, dtype=torch.bool).to(device)
        return self._is_trans

    def state_dict(self) -> dict:
        """Host copy (lists of floats) for the store and checkpoints; syncs: call at flush only."""
        out = {
            "regime": self.regime,
            "value": None if self.value is None else self.value.tolist(),
            "velocity": None if self.velocity is None else self.velocity.tolist(),
        }
        ex = self.exact
        if ex is not None and ex.value is not None:
            out["exact"] = {
                "value": ex.value.tolist(),
                "carry": ex.carry.tolist(),
                "cross": ex.cross.tolist(),
                "fresh": ex.fresh,
            }
        share = self.translation_share
        if share is not None and share.carry is not None:
            out["decay_carry"] = share.carry.tolist()
        return out

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        share = self.translation_share
        if share is not None:
            carry = state.get("decay_carry")
            share.carry = (
                None if carry is None else torch.tensor(carry, dtype=torch.float64, device=device)
            )
        ex, saved = self.exact, state.get("exact")
        if ex is not None:  # without a saved state it restarts at the next logged step
            ex.value = ex.carry = ex.cross = None
            if saved is not None:
                ex.value, ex.carry, ex.cross = (
                    torch.tensor(saved[k], dtype=torch.float64, device=device)
                    for k in ("value", "carry", "cross")
                )
                ex.fresh = bool(saved["fresh"])
        if state.get("value") is None:
            self.value = self.velocity = None
            return
        self.value = torch.tensor(state["value"], dtype=torch.float64, device=device)
        self.velocity = torch.tensor(state["velocity"], dtype=torch.float64, device=device)


def regime_for(adapter_name: str, betas: list[float]) -> str:
    """The prediction regime of a learning rule (see the module docstring)."""
    if adapter_name != "sgd":
        return "flow"
    return "sgd" if all(b == 0.0 for b in betas) else "momentum"
