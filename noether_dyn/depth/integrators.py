"""Explicit symplectic partitioned Runge-Kutta steps for a separable Hamiltonian H = T(p) + V(q).

docs/theory.md §5. One step of size h is a sequence of stages, each either a *kick*
``p <- p - (d_i h) grad V(q)`` or a *drift* ``q <- q + (c_i h) grad T(p)``. Every stage is the exact
flow of a Hamiltonian (V or T alone), hence symplectic, so the composition is symplectic for any
T and V and any h (Hairer, Lubich, Wanner, "Geometric Numerical Integration", 2nd ed., 2006,
§II.5 and §VI.3).

=======  =========================  =============================================================
order    method                     stages (coefficient times h)
=======  =========================  =============================================================
1        symplectic Euler           kick 1, drift 1
2        Stormer-Verlet             kick 1/2, drift 1, kick 1/2
4        Forest-Ruth / Yoshida      drift t/2, kick t, drift (1-t)/2, kick 1-2t, drift (1-t)/2,
                                    kick t, drift t/2, with t = 1 / (2 - 2^(1/3))
=======  =========================  =============================================================

Forest & Ruth, "Fourth-order symplectic integration", Physica D 43 (1990) 105; Yoshida,
"Construction of higher order symplectic integrators", Phys. Lett. A 150 (1990) 262.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Gradient = Callable[[torch.Tensor], torch.Tensor]
"""A map x -> grad F(x) of a scalar potential, shape-preserving: (..., n) -> (..., n)."""

_THETA = 1.0 / (2.0 - 2.0 ** (1.0 / 3.0))

STAGES: dict[int, tuple[tuple[str, float], ...]] = {
    1: (("kick", 1.0), ("drift", 1.0)),
    2: (("kick", 0.5), ("drift", 1.0), ("kick", 0.5)),
    4: (
        ("drift", _THETA / 2),
        ("kick", _THETA),
        ("drift", (1 - _THETA) / 2),
        ("kick", 1 - 2 * _THETA),
        ("drift", (1 - _THETA) / 2),
        ("kick", _THETA),
        ("drift", _THETA / 2),
    ),
}
"""Stage tables by order: ``(kind, coefficient)`` with kind ``"kick"`` (weight d_i on grad V) or
``"drift"`` (weight c_i on grad T). Kick and drift weights each sum to 1 (consistency)."""

ORDERS = tuple(sorted(STAGES))


def check_order(order: int) -> None:
    """Raise a ValueError naming the supported orders if ``order`` is not one of them."""
    if order not in STAGES:
        raise ValueError(
            f"order={order!r} is not supported; use one of {ORDERS} "
            "(1 symplectic Euler, 2 Stormer-Verlet, 4 Forest-Ruth/Yoshida)"
        )


def symplectic_step(
    q: torch.Tensor,
    p: torch.Tensor,
    grad_t: Gradient,
    grad_v: Gradient,
    h: float | torch.Tensor,
    order: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One explicit symplectic step of size ``h`` for H = T(p) + V(q).

    Args:
        q: positions, shape (..., n).
        p: momenta, shape (..., n).
        grad_t: p -> dT/dp, shape (..., n) -> (..., n).
        grad_v: q -> dV/dq, shape (..., n) -> (..., n).
        h: step size (time units of the Hamiltonian flow); a tensor broadcasting against q
            steps a batch of systems with their own step sizes.
        order: 1, 2 or 4 (see the module table).

    Returns:
        ``(q, p)`` after the step, same shapes. The map is symplectic for any T, V, h.
    """
    check_order(order)
    for kind, coef in STAGES[order]:
        if kind == "kick":
            p = p - (coef * h) * grad_v(q)
        else:
            q = q + (coef * h) * grad_t(p)
    return q, p


def euler_step(
    q: torch.Tensor,
    p: torch.Tensor,
    grad_t: Gradient,
    grad_v: Gradient,
    h: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward-Euler step of the same Hamiltonian flow, the non-symplectic baseline.

    ``q <- q + h grad T(p)``, ``p <- p - h grad V(q)``, both from the old state: a residual layer
    y <- y + h f(y) with f(q, p) = (grad T(p), -grad V(q)). On a linear oscillator of frequency
    omega it multiplies the energy norm by sqrt(1 + h^2 omega^2) per step (Hairer, Lubich, Wanner,
    §I.1), so no h > 0 is stable in the sense |1 + h lambda| <= 1 for lambda = +-i omega.
    Shapes as in :func:`symplectic_step`.
    """
    return q + h * grad_t(p), p - h * grad_v(q)


def integrate(
    q: torch.Tensor,
    p: torch.Tensor,
    grad_t: Gradient,
    grad_v: Gradient,
    h: float,
    steps: int,
    order: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` symplectic steps of size ``h`` (final time ``steps * h``); shapes as in
    :func:`symplectic_step`."""
    for _ in range(steps):
        q, p = symplectic_step(q, p, grad_t, grad_v, h, order)
    return q, p
