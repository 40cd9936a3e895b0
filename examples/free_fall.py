"""Learn free fall from trajectories; roll out far beyond the training heights.

A ball in uniform gravity, H(q, p) = p^2/2 + g q (unit mass, g = 9.81 m/s^2, q height in m,
p velocity in m/s), is observed every dt = 0.05 s for 2 s on 8 throws (launch height 0-2 m,
speed 5-15 m/s up), so the training heights lie in about [-4, 8] m. Three time-dt maps are fit
to the observed pairs (full-batch L-BFGS, float64):

* ``symplectic_poly``: one Stormer-Verlet layer (docs/theory.md §5) with T = p^2/2 and a learned
  potential V(q) = c1 q + c2 q^2 (:class:`PolynomialPotential`). The family holds the truth
  (c1 = g, c2 = 0), and Verlet is exact for a constant force, so what it learns holds at every
  height: the structure is what extrapolates.
* ``symplectic_logcosh``: the same layer with a log-cosh potential of 4 units (the default
  learned potential). It is symplectic too and conserves its own learned energy, but log-cosh
  bends away from a straight line outside the data: symplecticity alone does not extrapolate.
* ``mlp_map``: y -> y + MLP(y), no structure.

Each map is iterated for 10 s (200 steps) from a test throw (q0 = 1 m, p0 = 10 m/s), which
falls to q = -389 m. Printed per model: the one-step training RMSE, the energy error
max |H(y_n) - H(y_0)| relative to the launch kinetic energy p0^2/2 = 50 J/kg, within the first
2 s (in range) and over 10 s (mostly out of range), and the final height error.

Run: ``python examples/free_fall.py`` (a few seconds on one CPU core).
"""

from __future__ import annotations

import sys
import time

import torch
from learned_maps import MLPMap, Printed, fit, max_rel, parse_args, rollout

from noether_dyn.depth import SymplecticNet
from noether_dyn.depth.potentials import LogCoshPotential, PolynomialPotential

G, DT, SAMPLES, ROLLOUT = 9.81, 0.05, 40, 200


def energy(y: torch.Tensor) -> torch.Tensor:
    """H = p^2/2 + g q, y = (q, p) of shape (..., 2) -> (...), J/kg."""
    return 0.5 * y[..., 1] ** 2 + G * y[..., 0]


def exact(y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact free-fall states at times t; y0 (..., 2), t (T,) -> (T, ..., 2)."""
    t = t.reshape(-1, *([1] * (y0.dim() - 1)))
    q = y0[..., 0] + y0[..., 1] * t - 0.5 * G * t**2
    p = y0[..., 1] - G * t
    return torch.stack([q, p], -1)


def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "symplectic_poly": SymplecticNet.from_potentials(2, 2, DT, [PolynomialPotential(1, 2)]),
        "symplectic_logcosh": SymplecticNet.from_potentials(2, 2, DT, [LogCoshPotential(1, 4)]),
        "mlp_map": MLPMap(2),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Fit, roll out, print the table; returns the measured numbers per model. ``argv``:
    ``--write-docs`` also writes the table into its block of docs/depth.md."""
    _, docs = parse_args(__doc__.split("\n")[0], __file__, argv)
    say = Printed()
    torch.set_default_dtype(torch.float64)  # set here, not at import: importing must not change it
    torch.set_num_threads(1)  # tiny ops: one thread is fastest and safe on shared cores
    start = time.perf_counter()
    torch.manual_seed(0)
    y0s = torch.stack([torch.rand(8) * 2.0, 5.0 + torch.rand(8) * 10.0], -1)
    traj = exact(y0s, torch.arange(SAMPLES + 1) * DT)  # (SAMPLES + 1, 8, 2)
    x, y = traj[:-1].reshape(-1, 2), traj[1:].reshape(-1, 2)
    test = torch.tensor([1.0, 10.0])
    truth = exact(test, torch.arange(ROLLOUT + 1) * DT)
    scale = 0.5 * float(test[1]) ** 2
    say(
        f"free fall H = p^2/2 + g q: {SAMPLES} steps of {DT} s x 8 throws, heights in "
        f"[{float(x[:, 0].min()):.1f}, {float(x[:, 0].max()):.1f}] m"
    )
    say(
        f"test throw q0 = 1 m, p0 = 10 m/s, rolled out {ROLLOUT} steps to "
        f"q = {float(truth[-1, 0]):.0f} m; energy errors relative to p0^2/2 = {scale:g} J/kg\n"
    )
    say(
        "| model | one-step RMSE | energy error t <= 2 s | energy error t <= 10 s "
        "| final height error (m) |"
    )
    say("|---|---|---|---|---|")
    results = {}
    for name, model in models().items():
        rmse = fit(model, x, y)
        roll = rollout(model, test, ROLLOUT)
        err = (energy(roll) - energy(test)).abs() / scale
        row = {
            "rmse": rmse,
            "energy_in_range": max_rel(err[: round(2.0 / DT) + 1]),
            "energy_rollout": max_rel(err),
            "height_error": float((roll[-1, 0] - truth[-1, 0]).abs()),
        }
        results[name] = row
        say(
            f"| {name} | {rmse:.1e} | {row['energy_in_range']:.1e} | "
            f"{row['energy_rollout']:.1e} | {row['height_error']:.1e} |"
        )
    say.write_docs(docs)
    print(f"\n({time.perf_counter() - start:.1f} s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
