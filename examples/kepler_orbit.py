"""Kepler orbit: the same learned force integrated by a symplectic and a non-symplectic net.

A planet in the field of a unit mass, H(q, p) = |p|^2/2 - 1/|q| (q, p in the plane), on an
eccentric orbit (e = 0.6, semi-major axis 1, period 2 pi, H0 = -0.5), is sampled every dt = 0.1
for one period from a fine RK4 integration. Three time-dt maps are fit to the pairs (full-batch
L-BFGS, float64):

* ``symplectic_verlet``: four Stormer-Verlet layers of h = dt/4 (docs/theory.md §5) sharing a
learned
  central potential V(q) = c1/|q| + c2/|q|^2 (:class:`CentralPotential`).
* ``midpoint_rk2``: the *same* potential family and the same four substeps, integrated by the
  explicit midpoint rule (Runge-Kutta order 2, like Verlet, but not symplectic).
* ``mlp_map``: y -> y + MLP(y), no structure.

Each map runs 100 periods (6300 steps). Printed: the one-step RMSE, the relative energy error
max |H(y_n) - H0| / |H0| over the first period and over 100 periods, and the relative angular
momentum error max |l_n - l_0| / |l_0|, l = q1 p2 - q2 p1. Both structured models fit the data
to the same order; only the symplectic one keeps the energy from drifting (Hairer, Lubich,
Wanner, "Geometric Numerical Integration", §I.2 and §IX.8: a symplectic method conserves a
modified energy over exponentially long times, a non-symplectic one drifts linearly).

Run: ``python examples/kepler_orbit.py`` (about 20 s on one CPU core).
"""

from __future__ import annotations

import math
import sys
import time

import torch
from learned_maps import MLPMap, Printed, fit, max_rel, parse_args, rk4_samples, rollout
from torch import nn

from noether_dyn.depth import SymplecticNet
from noether_dyn.depth.potentials import CentralPotential

DT, LAYERS, PERIODS, ECC = 0.1, 4, 100, 0.6
PERIOD_STEPS = round(2 * math.pi / DT)


def energy(y: torch.Tensor) -> torch.Tensor:
    """H = |p|^2/2 - 1/|q|, y = (q1, q2, p1, p2) of shape (..., 4) -> (...)."""
    return 0.5 * (y[..., 2:] ** 2).sum(-1) - 1 / y[..., :2].norm(dim=-1)


def angular_momentum(y: torch.Tensor) -> torch.Tensor:
    """l = q1 p2 - q2 p1, (..., 4) -> (...)."""
    return y[..., 0] * y[..., 3] - y[..., 1] * y[..., 2]


def field(y: torch.Tensor) -> torch.Tensor:
    """(q', p') = (p, -q/|q|^3), shape-preserving."""
    q, p = y[..., :2], y[..., 2:]
    return torch.cat([p, -q / q.norm(dim=-1, keepdim=True) ** 3], -1)


class MidpointMap(nn.Module):
    """``substeps`` explicit-midpoint steps of size h on H = |p|^2/2 + V(q): non-symplectic.

    y_half = y + (h/2) f(y), y <- y + h f(y_half), f(q, p) = (p, -grad V(q)).
    """

    def __init__(self, potential: nn.Module, h: float, substeps: int) -> None:
        super().__init__()
        self.potential, self.h, self.substeps = potential, h, substeps

    def _f(self, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([y[..., 2:], -self.potential.grad(y[..., :2])], -1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """(..., 4) -> (..., 4)."""
        for _ in range(self.substeps):
            y = y + self.h * self._f(y + 0.5 * self.h * self._f(y))
        return y


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    shared, h = CentralPotential(2), DT / LAYERS
    return {
        "symplectic_verlet": SymplecticNet.from_potentials(4, 2, h, [shared] * LAYERS),
        "midpoint_rk2": MidpointMap(CentralPotential(2), h, LAYERS),
        "mlp_map": MLPMap(4),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Fit, roll out, print the table; returns the measured numbers per model. ``argv``:
    ``--write-docs`` also writes the table into its block of docs/depth.md."""
    _, docs = parse_args(__doc__.split("\n")[0], __file__, argv)
    say = Printed()
    torch.set_default_dtype(torch.float64)  # set here, not at import: importing must not change it
    torch.set_num_threads(1)  # tiny ops: one thread is fastest and safe on shared cores
    start = time.perf_counter()
    y0 = torch.tensor([1 - ECC, 0.0, 0.0, math.sqrt((1 + ECC) / (1 - ECC))])
    orbit = rk4_samples(field, y0, DT, PERIOD_STEPS, substeps=100)
    x, y = orbit[:-1], orbit[1:]
    h0, l0 = float(energy(y0)), float(angular_momentum(y0))
    steps = PERIODS * PERIOD_STEPS
    say(
        f"Kepler orbit e = {ECC}, H0 = {h0:g}: train on one period ({PERIOD_STEPS} steps of "
        f"dt = {DT}), roll out {PERIODS} periods ({steps} steps)\n"
    )
    say(
        "| model | one-step RMSE | energy error, 1 period | energy error, 100 periods "
        "| angular momentum error |"
    )
    say("|---|---|---|---|---|")
    results = {}
    for name, model in models().items():
        rmse = fit(model, x, y)
        roll = rollout(model, y0, steps)
        e_err = (energy(roll) - h0).abs() / abs(h0)
        row = {
            "rmse": rmse,
            "energy_1": max_rel(e_err[: PERIOD_STEPS + 1]),
            "energy_100": max_rel(e_err),
            "angular_momentum": max_rel((angular_momentum(roll) - l0).abs() / abs(l0)),
        }
        results[name] = row
        say(
            f"| {name} | {rmse:.1e} | {row['energy_1']:.1e} | {row['energy_100']:.1e} "
            f"| {row['angular_momentum']:.1e} |"
        )
    say.write_docs(docs)
    print(f"\n({time.perf_counter() - start:.1f} s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
