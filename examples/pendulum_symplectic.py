"""Learn a pendulum's time-dt map with a symplectic net and with an MLP; compare long rollouts.

The pendulum H(q, p) = p^2/2 - cos q (unit mass, length, gravity) is sampled every dt = 0.1 along
one large-amplitude orbit (q0 = 1.5 rad, p0 = 0) for 30 time units, from an accurate RK4
integration. Two maps y_n -> y_{n+1} are fit to the pairs:

* SymplecticNet(dim=2, depth=4, order=2, h=dt/4): four Stormer-Verlet steps with T = p^2/2 and a
  learned log-cosh potential per layer; a symplectic map for any weights (THEORY.md §5).
* an MLP map y -> y + MLP(y) (two hidden tanh layers of 64 units), same loss and optimizer.

Both are then iterated 20x longer than the training window; the script prints the energy error
|H(y_n) - H(y_0)| (max over the rollout and at its end). A symplectic map conserves a nearby
modified energy, so its error should stay bounded; the MLP map has no such structure.

Run: ``python examples/pendulum_symplectic.py`` (~10 s on a laptop CPU).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from noether_dyn.depth import SymplecticNet

torch.set_default_dtype(torch.float64)
DT, SAMPLES, ROLLOUT = 0.1, 300, 6000


def energy(y: torch.Tensor) -> torch.Tensor:
    """H = p^2/2 - cos q, y of shape (..., 2) -> (...)."""
    return 0.5 * y[..., 1] ** 2 - torch.cos(y[..., 0])


def exact_orbit(y0: torch.Tensor, samples: int, substeps: int = 50) -> torch.Tensor:
    """Samples every DT from RK4 with DT/substeps steps (error ~1e-10); shape (samples+1, 2)."""

    def f(y: torch.Tensor) -> torch.Tensor:
        return torch.stack([y[1], -torch.sin(y[0])])

    h, ys, y = DT / substeps, [y0], y0
    for _ in range(samples):
        for _ in range(substeps):
            k1 = f(y)
            k2 = f(y + h / 2 * k1)
            k3 = f(y + h / 2 * k2)
            k4 = f(y + h * k3)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        ys.append(y)
    return torch.stack(ys)


class MLPMap(nn.Module):
    """y -> y + MLP(y), an unconstrained learned map."""

    def __init__(self, dim: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.out = nn.Linear(hidden, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.out(self.net(y))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 2000) -> float:
    """Full-batch Adam on the mean squared one-step error; returns the final RMSE."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach().sqrt())


def rollout_energy_error(model: nn.Module, y0: torch.Tensor, steps: int) -> tuple[float, float]:
    """(max, final) |H(y_n) - H(y_0)| over ``steps`` iterations of the learned map."""
    with torch.no_grad():
        y, h0, worst = y0[None], energy(y0), 0.0
        for _ in range(steps):
            y = model(y)
            err = float((energy(y[0]) - h0).abs())
            worst = max(worst, err) if err == err else float("inf")
        return worst, err


def main() -> None:
    torch.set_num_threads(1)  # tiny ops: one thread is fastest and safe on shared cores
    start = time.perf_counter()
    torch.manual_seed(0)
    y0 = torch.tensor([1.5, 0.0])
    orbit = exact_orbit(y0, SAMPLES)
    x, y = orbit[:-1], orbit[1:]
    models = {
        "symplectic": SymplecticNet(2, 4, 2, h=DT / 4, width=16),
        "mlp_map": MLPMap(),
    }
    print(f"pendulum H = p^2/2 - cos q, orbit q0=1.5, H0={float(energy(y0)):.4f}, dt={DT}")
    print(f"train on {SAMPLES} steps (t <= {SAMPLES * DT:g}), roll out {ROLLOUT} steps\n")
    print("| model | one-step RMSE | max abs(H - H0) | final abs(H - H0) |")
    print("|---|---|---|---|")
    for name, model in models.items():
        rmse = fit(model, x, y)
        worst, final = rollout_energy_error(model, y0, ROLLOUT)
        print(f"| {name} | {rmse:.2e} | {worst:.2e} | {final:.2e} |")
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
