"""Learn a pendulum's time-dt map from one orbit; roll out 20x longer and at an unseen energy.

The pendulum H(q, p) = p^2/2 - cos q (unit mass, length and gravity) is sampled every dt = 0.1
along one orbit (q0 = 1.5 rad, p0 = 0) for 30 time units, from a fine RK4 integration. Three
maps y_n -> y_{n+1} are fit to the pairs (full-batch L-BFGS, float64):

* ``symplectic_fourier``: four Stormer-Verlet layers of h = dt/4 (docs/theory.md §5) sharing one
  learned Hamiltonian H~ = p^2/2 + V~(q), V~ a 3-mode Fourier series (the family of an angle,
  :class:`FourierPotential`, which holds -cos q). Symplectic for any V~.
* ``symplectic_logcosh``: the same four layers with the default learned potential (log-cosh,
  16 units, a separate one per layer): symplectic, but its potential is not periodic.
* ``mlp_map``: y -> y + MLP(y), no structure.

Both rollouts run 6000 steps (600 time units, 20x the training window): from the training orbit,
and from q0 = 2.5 rad (an energy never seen: the training orbit stays below |q| = 1.5). Printed:
the one-step RMSE and the energy error max |H(y_n) - H(y_0)| relative to the energy above the
well's bottom, H(y_0) + 1 (0.93 and 1.80).

Run: ``python examples/pendulum_symplectic.py`` (about 20 s on one CPU core).
"""

from __future__ import annotations

import sys
import time

import torch
from learned_maps import MLPMap, Printed, fit, max_rel, parse_args, rk4_samples, rollout

from noether_dyn.depth import SymplecticNet
from noether_dyn.depth.potentials import FourierPotential, LogCoshPotential

DT, SAMPLES, ROLLOUT, LAYERS = 0.1, 300, 6000, 4


def energy(y: torch.Tensor) -> torch.Tensor:
    """H = p^2/2 - cos q, y of shape (..., 2) -> (...)."""
    return 0.5 * y[..., 1] ** 2 - torch.cos(y[..., 0])


def field(y: torch.Tensor) -> torch.Tensor:
    """(q', p') = (p, -sin q), shape-preserving."""
    return torch.stack([y[..., 1], -torch.sin(y[..., 0])], -1)


def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    shared = FourierPotential(1, 3)
    h = DT / LAYERS
    return {
        "symplectic_fourier": SymplecticNet.from_potentials(2, 2, h, [shared] * LAYERS),
        "symplectic_logcosh": SymplecticNet.from_potentials(
            2, 2, h, [LogCoshPotential(1, 16) for _ in range(LAYERS)]
        ),
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
    y0 = torch.tensor([1.5, 0.0])
    orbit = rk4_samples(field, y0, DT, SAMPLES)
    x, y = orbit[:-1], orbit[1:]
    starts = {"train_orbit": y0, "unseen_q0_2.5": torch.tensor([2.5, 0.0])}
    say(
        f"pendulum H = p^2/2 - cos q: train on {SAMPLES} steps of dt = {DT} (q0 = 1.5), "
        f"roll out {ROLLOUT} steps; energy error relative to H(y_0) + 1\n"
    )
    say("| model | one-step RMSE | energy error, training orbit | energy error, q0 = 2.5 |")
    say("|---|---|---|---|")
    results = {}
    for name, model in models().items():
        rmse = fit(model, x, y)
        row = {"rmse": rmse}
        for label, start_state in starts.items():
            roll = rollout(model, start_state, ROLLOUT)
            h0 = energy(start_state)
            row[label] = max_rel((energy(roll) - h0).abs() / (h0 + 1))
        results[name] = row
        say(f"| {name} | {rmse:.1e} | {row['train_orbit']:.1e} | {row['unseen_q0_2.5']:.1e} |")
    say.write_docs(docs)
    print(f"\n({time.perf_counter() - start:.1f} s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
