"""Exact discrete theory of SGD with momentum, and weight decay's true share of a charge's change.

Notation (docs/theory.md §1, §3.1): q_n the parameters before step n, dq_n = q_{n+1} - q_n, g_n the
loss
gradient at q_n, eta_n, beta_n, lambda_n, d_n the rate, momentum, weight decay and dampening of
step n. A symmetry with signs s acts through ``<a, b>_S = sum_A s_A <a_A, b_A>``; its quadratic
charge (scale, rescale) is ``Q = <q, q>_S`` and its linear charge (translation) is
``x = <q, 1>_S``. The symmetry makes every gradient orthogonal to the generator:
``<q_n, g_n>_S = 0`` (quadratic) and ``<g_n, 1>_S = 0`` (translation) (Kunin et al., "Neural
Mechanics", ICLR 2021).

Exact prediction for ``torch.optim.SGD`` with momentum
------------------------------------------------------
torch's heavy ball: ``u_n = g_n + lambda_n q_n``; ``b_0 = u_0`` (the buffer starts at the first
gradient, *not* damped); ``b_n = beta_n b_{n-1} + (1 - d_n) u_n`` for n >= 1; the step is
``dq_n = -eta_n b_n``, or ``dq_n = -eta_n (u_n + beta_n b_n)`` with Nesterov (dampening 0). Write
the start-up as ``b_{-1} = 0`` and ``d_0 = 0``: then one formula covers every step.

Let ``R_n = <q_n, b_n>_S`` (quadratic) or ``R_n = <b_n, 1>_S`` (translation) and
``X_n = <dq_n, b_n>_S``. From the buffer's recurrence and the symmetry,

    R_n = beta_n (R_{n-1} + X_{n-1}) + (1 - d_n) lambda_n Q_n            (R_{-1} = X_{-1} = 0)

because ``<q_n, b_{n-1}>_S = <q_{n-1}, b_{n-1}>_S + <dq_{n-1}, b_{n-1}>_S`` and the gradient part
of u_n drops out. The charge's exact change ``Q_{n+1} - Q_n = 2 <q_n, dq_n>_S + |dq_n|^2_S``
(docs/theory.md §3.1) then reads

    heavy ball:  Q_{n+1} = Q_n - 2 eta_n R_n + D_n,                     D_n = |dq_n|^2_S
    Nesterov:    Q_{n+1} = Q_n - 2 eta_n (lambda_n Q_n + beta_n R_n) + D_n

and for translation (no quadratic term, factor 1 instead of 2, ``X = 0`` since
``<b_n, 1>_S`` is itself the state): ``x_{n+1} = x_n - eta_n R_n`` (heavy ball) or
``x_n - eta_n (lambda_n x_n + beta_n R_n)`` (Nesterov). For the heavy ball ``X_n = -D_n / eta_n``
(dq is a multiple of b), so the measured D is all the recurrence needs. Eliminating R gives the
two-step form of docs/theory.md §3.2b, with ``rho_n = beta_n eta_n / eta_{n-1}`` (a changing rate
rescales the carried step; rho_0 = 0) and ``c_n = (1 - d_n) eta_n lambda_n``:

    Q_{n+1} = (1 + rho_n - 2 c_n) Q_n - rho_n Q_{n-1} + D_n + rho_n D_{n-1}
    x_{n+1} = (1 + rho_n - c_n) x_n - rho_n x_{n-1}

(For constant eta, beta, lambda and d = 0 this is docs/theory.md §3.2b's recurrence.) With Nesterov
dq is not a multiple of b, so X_n = <dq_n, b_n>_S is one extra measured per-tensor statistic
(no extra memory); translation needs none.

What holds exactly: every line above is an algebraic identity of torch's update given
``<q_n, g_n>_S = 0``. Rolled forward with the measured D (and X), the predicted Q differs from
the measured one only by the accumulated symmetry defect (BatchNorm's eps, softmax rounding) and
float rounding. Before the first step the buffer must be empty (``start(charge)``);
resuming with a filled buffer needs the measured ``<q_0, b_{-1}>_S`` (``start(..., carried=...)``).

Weight decay's true share (docs/theory.md §3.1)
---------------------------------------
The update is linear in the buffer, and the buffer is linear in its inputs, so dq_n splits
exactly into a gradient part and a decay part ``E_n``. The decay part of ``2 <q_n, dq_n>_S`` is
``2 <q_n, E_n>_S`` and of ``<dq_n, 1>_S`` is ``<E_n, 1>_S``; the rest is the rule's, and
``|dq_n|^2_S`` stays the kinetic (finite-step) term, so decay + rule + ksb closes exactly.

* SGD(M): ``A_n = beta_n A_{n-1} + (1 - d_n) lambda_n q_n`` (A_{-1} = 0, d_0 = 0) and
  ``E_n = -eta_n A_n`` (heavy ball) or ``-eta_n (lambda_n q_n + beta_n A_n)`` (Nesterov), i.e.
  ``-2 eta lambda sum_k beta^(n-k) <q_n, q_k>_S`` for constant hyperparameters. A is one
  parameter-sized accumulator per tracked tensor (+1x parameter memory: opt-in). For
  translation ``<A_n, 1>_S = R_n`` above (the gradient part of the buffer sums to 0), a scalar
  recurrence on the measured x: no memory, and decay's share is the whole change.
* Adam with coupled L2 (``weight_decay > 0``, not decoupled): ``m_n = beta1 m_{n-1} +
  (1 - beta1)(g_n + lambda q_n)`` (m_{-1} = 0), ``dq_n = -eta_n m_n / ((1 - beta1^k) D_n)`` with
  ``D_n = sqrt(v_n / (1 - beta2^k)) + eps`` elementwise (k = n + 1). Decay's part of m is
  ``A_n = beta1 A_{n-1} + (1 - beta1) lambda q_n``; ``E_n = -eta_n A_n / ((1 - beta1^k) D_n)``.
  The preconditioner D_n (which itself saw the decay through v) is taken as the step's metric:
  the share is defined by linearity in m at fixed D. Translation needs A too (D weights each
  coordinate differently).
* RMSprop with coupled L2: ``E_n = -eta_n lambda q_n / D_n`` without momentum (no memory);
  with momentum mu the buffer accumulates ``u / D`` so ``A_n = mu A_{n-1} + lambda q_n / D_n``,
  ``E_n = -eta_n A_n``. Adagrad: ``E_n = -eta_n lambda q_n / D_n`` (eta_n after lr_decay).
* Decoupled decay (AdamW): ``E_n = -eta_n lambda q_n`` (outside the preconditioner and buffer).

All classes work on (n_symmetries,) or per-tensor lists with torch's ``_foreach`` kernels (no
per-tensor Python arithmetic beyond building scalar lists).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FAMILIES = ("sgd", "adam", "adamw", "rmsprop", "adagrad")


class MomentumPredictor:
    """The exact discrete charge prediction for ``torch.optim.SGD`` (momentum, dampening,
    Nesterov, rates changing between steps), vectorized over symmetries.

    Args:
        translation: (n_symmetries,) bool, True for linear (translation) charges.
        nesterov: (n_symmetries,) bool, True where the symmetry's group uses Nesterov.

    State, each (n_symmetries,) float64: ``value`` (predicted Q_n), ``carry`` (R_{n-1}),
    ``cross`` (X_{n-1}). See the module docstring for the recurrence.
    """

    def __init__(self, translation: torch.Tensor, nesterov: torch.Tensor | None = None) -> None:
        self.translation = translation.to(torch.bool)
        self.nesterov = (
            torch.zeros_like(self.translation) if nesterov is None else nesterov.to(torch.bool)
        )
        if self.nesterov.shape != self.translation.shape:
            raise ValueError(
                f"nesterov has shape {tuple(self.nesterov.shape)}, translation "
                f"{tuple(self.translation.shape)}: give one flag per symmetry."
            )
        self.needs_cross = bool((self.nesterov & ~self.translation).any())  # host, once
        self.value: torch.Tensor | None = None
        self.carry: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.fresh = True

    def start(self, charge: torch.Tensor, carried: torch.Tensor | None = None) -> None:
        """Set Q_0 to the measured charge. ``carried``: None when the optimizer's buffers are
        empty (first step next); else, to resume with filled buffers, the measured
        ``<q_0, b_{-1}>_S`` (``<b_{-1}, 1>_S`` for translation), b_{-1} the buffer now held."""
        self.value = charge.to(torch.float64).clone()
        zeros = torch.zeros_like(self.value)
        self.fresh = carried is None
        self.carry = zeros if carried is None else carried.to(torch.float64).clone()
        self.cross = zeros.clone()

    def advance(
        self,
        eta: torch.Tensor,
        beta: torch.Tensor,
        lam: torch.Tensor,
        update_sq: torch.Tensor,
        dampening: torch.Tensor | None = None,
        buffer_cross: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Move the prediction from Q_n to Q_{n+1} and return it.

        Args:
            eta, beta, lam: (n_symmetries,) the step's rate, momentum and weight decay.
            update_sq: (n_symmetries,) measured ``D_n = |dq_n|^2_S`` (ignored for translation).
            dampening: (n_symmetries,) d of the step (None: 0). Not applied on the first step.
            buffer_cross: (n_symmetries,) measured ``X_n = <dq_n, b_n>_S`` with b_n the buffer
                after the step; needed only where Nesterov is on for a quadratic charge.
        """
        if self.value is None:
            raise RuntimeError("MomentumPredictor.advance before start(): call start(Q_0) first.")
        if buffer_cross is None and self.needs_cross:
            raise ValueError(
                "buffer_cross is required for Nesterov quadratic charges: pass the measured "
                "<dq_n, b_n>_S per symmetry."
            )
        self.value, self.carry, self.cross = momentum_step(
            (self.value, self.carry, self.cross),
            (eta, beta, lam, dampening),
            update_sq,
            buffer_cross,
            self.translation,
            self.nesterov,
            self.fresh,
        )
        self.fresh = False
        return self.value


def momentum_step(
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    hyper: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    update_sq: torch.Tensor,
    buffer_cross: torch.Tensor | None,
    translation: torch.Tensor,
    nesterov: torch.Tensor,
    fresh: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of :class:`MomentumPredictor` as a pure function of (n_symmetries,) tensors
    (no host read: it can run inside a compiled per-step program).

    Args:
        state: (Q_n, R_{n-1}, X_{n-1}). hyper: (eta, beta, lambda, dampening or None).
        update_sq: measured D_n. buffer_cross: measured X_n (Nesterov) or None.
        translation, nesterov: bool masks. fresh: True on the optimizer's first step.

    Returns:
        (Q_{n+1}, R_n, X_n).
    """
    q, carry, cross = state
    eta, beta, lam, dampening = hyper
    zeros = torch.zeros_like(q)
    if fresh:
        d, inherited = zeros, zeros
    else:
        d = zeros if dampening is None else dampening.to(torch.float64)
        inherited = beta * (carry + cross)
    r = inherited + (1.0 - d) * lam * q
    first = torch.where(nesterov, lam * q + beta * r, r)
    dsq = torch.where(translation, zeros, update_sq.to(torch.float64))
    nxt = torch.where(translation, q - eta * first, q - 2.0 * eta * first + dsq)
    nest_cross = zeros if buffer_cross is None else buffer_cross.to(torch.float64)
    new_cross = torch.where(translation, zeros, torch.where(nesterov, nest_cross, -dsq / eta))
    return nxt, r, new_cross


def two_step_prediction(
    charge: Sequence[float],
    update_sq: Sequence[float],
    eta: Sequence[float],
    beta: float,
    lam: float,
    translation: bool = False,
) -> list[float]:
    """docs/theory.md §3.2b's two-step recurrence (heavy ball, d = 0), rolled from the measured Q_0
    with
    the measured D_n: ``Q_{n+1} = (1 + rho_n - 2 c_n) Q_n - rho_n Q_{n-1} + D_n + rho_n D_{n-1}``
    (translation: ``(1 + rho_n - c_n) x_n - rho_n x_{n-1}``), rho_0 = 0. A host-side reference
    for tests and studies; returns [Q_0, ..., Q_N] for N = len(update_sq) steps."""
    out = [float(charge[0])]
    prev_q, prev_d, prev_eta = 0.0, 0.0, 1.0
    for n, dsq in enumerate(update_sq):
        rho = 0.0 if n == 0 else beta * eta[n] / prev_eta
        c = eta[n] * lam
        q = out[-1]
        if translation:
            nxt = (1.0 + rho - c) * q - rho * prev_q
        else:
            nxt = (1.0 + rho - 2.0 * c) * q - rho * prev_q + dsq + rho * prev_d
        prev_q, prev_d, prev_eta = q, dsq, eta[n]
        out.append(nxt)
    return out


class DecayShare:
    """Weight decay's part E_n of each tracked tensor's update (module docstring), with the one
    accumulator per tensor that momentum or Adam's first moment needs.

    Args:
        family: ``"sgd"``, ``"adam"`` (coupled L2), ``"adamw"`` (decoupled), ``"rmsprop"`` or
            ``"adagrad"``.
        nesterov: SGD only.

    Call :meth:`step` once per optimizer step, with the parameters *before* the step (q_n).
    State: ``acc`` (list of parameter-sized tensors, or None while no memory is needed).
    """

    def __init__(self, family: str, nesterov: bool = False) -> None:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
        self.family = family
        self.nesterov = nesterov
        self.acc: list[torch.Tensor] | None = None

    def step(
        self,
        params: list[torch.Tensor],
        lr: float,
        weight_decay: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        metric: list[torch.Tensor] | None = None,
        step: int = 1,
    ) -> list[torch.Tensor]:
        """E_n per tensor (same shapes as ``params``), and advance the accumulator.

        Args:
            params: q_n, the parameters before the step.
            lr: eta_n (Adagrad: after lr_decay). weight_decay: lambda_n.
            momentum: SGD's beta, Adam's beta1, RMSprop's momentum.
            dampening: SGD's d (ignored on the first step, as torch does).
            metric: the elementwise preconditioner D_n of this step (Adam: sqrt(v_hat) + eps;
                RMSprop: sqrt(v [- gbar^2]) + eps; Adagrad: sqrt(sum) + eps).
            step: Adam's step count k (1 on the first step), for 1 - beta1^k.
        """
        fam = self.family
        if fam == "adamw":
            return torch._foreach_mul(params, -lr * weight_decay)
        if fam in ("adam", "rmsprop", "adagrad") and metric is None:
            raise ValueError(f"family {fam!r}: pass metric=D_n, the step's preconditioner.")
        if fam == "adagrad" or (fam == "rmsprop" and not momentum):
            out = torch._foreach_div(params, metric)
            torch._foreach_mul_(out, -lr * weight_decay)
            return out
        if fam == "sgd" and not momentum:
            return torch._foreach_mul(params, -lr * weight_decay)
        if fam == "sgd":
            w = weight_decay if self.acc is None else (1.0 - dampening) * weight_decay
        elif fam == "adam":
            w = (1.0 - momentum) * weight_decay
        else:  # rmsprop with momentum: the buffer accumulates u / D
            w = weight_decay
        # A <- mu A + w q (rmsprop: + w q / D), in place after the first step
        if self.acc is None:
            self.acc = (
                torch._foreach_div(params, metric)
                if fam == "rmsprop"
                else list(map(torch.clone, params))
            )
            torch._foreach_mul_(self.acc, w)
        else:
            torch._foreach_mul_(self.acc, momentum)
            if fam == "rmsprop":
                torch._foreach_addcdiv_(self.acc, params, metric, w)
            else:
                torch._foreach_add_(self.acc, params, alpha=w)
        if fam == "adam":
            out = torch._foreach_div(self.acc, metric)
            torch._foreach_mul_(out, -lr / (1.0 - momentum**step))
            return out
        if fam == "sgd" and self.nesterov:
            out = torch._foreach_mul(self.acc, momentum)
            torch._foreach_add_(out, params, alpha=weight_decay)
            torch._foreach_mul_(out, -lr)
            return out
        return torch._foreach_mul(self.acc, -lr)


class TranslationDecayShare:
    """Weight decay's share of translation charges under SGD(M), from the measured charges
    alone: ``R_n = beta_n R_{n-1} + (1 - d_n) lambda_n x_n`` (R_{-1} = 0, d_0 = 0) and
    ``share_n = -eta_n R_n`` (Nesterov: ``-eta_n (lambda_n x_n + beta_n R_n)``). Because
    ``<g, 1>_S = 0`` this is the whole change x_{n+1} - x_n. State: R, (n_symmetries,)."""

    def __init__(self) -> None:
        self.carry: torch.Tensor | None = None

    def step(
        self,
        charge: torch.Tensor,
        eta: torch.Tensor,
        beta: torch.Tensor,
        lam: torch.Tensor,
        dampening: torch.Tensor | None = None,
        nesterov: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decay's share of step n per symmetry, from the measured x_n, all (n_symmetries,)."""
        x = charge.to(torch.float64)
        if self.carry is None:
            r = lam * x
        else:
            d = torch.zeros_like(x) if dampening is None else dampening
            r = beta * self.carry + (1.0 - d) * lam * x
        self.carry = r
        share = -eta * r
        if nesterov is not None:
            share = torch.where(nesterov, -eta * (lam * x + beta * r), share)
        return share


def share_stats(
    params: list[torch.Tensor], share: list[torch.Tensor], device: torch.device
) -> torch.Tensor:
    """(n_tensors, 2) float64: per tensor ``<q_n, E_n>`` and ``sum(E_n)``. A ChargeMatrix's sign
    matrix S turns them into the decay column: ``2 S @ col0`` (quadratic) or ``S @ col1``
    (translation)."""
    if not params:
        return torch.zeros(0, 2, dtype=torch.float64, device=device)
    dots = torch.stack(
        [torch.dot(q.reshape(-1), e.reshape(-1)).to(torch.float64) for q, e in zip(params, share)]
    )
    sums = torch.stack([e.sum().to(torch.float64) for e in share])
    return torch.stack([dots, sums], dim=1).to(device)
