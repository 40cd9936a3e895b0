"""Depth-width stability map of forward-Euler residual nets against symplectic-Euler nets.

THEORY.md §5; Haber & Ruthotto, "Stable architectures for deep neural networks" (2018).

Definition (what "stable" means here). A net of width w (the state size) has independent random
layers: EulerResNet layers y <- y + h tanh(W y) with W_ij ~ N(0, 1/w); SymplecticNet order-1 layers
(kick p <- p - h K^T tanh(K q), drift q <- q + h p, i.e. V(q) = sum log cosh(K q), T = |p|^2/2)
with K_ij ~ N(0, 1/w), K of size (w/2, w/2); biases 0. The input y_0 has entries N(0, 1/w)
(|y_0| ~ 1) and a unit tangent dy_0 is pushed forward with the layer Jacobians (dy_L = M dy_0;
its norm grows at the same Lyapunov rate as backward gradients). A run is *stable up to depth L*
while both |y_L|/|y_0| and |dy_L|/|dy_0| stay within [1/c, c] (default c = 10). Its *unstable
depth* is the first L where either leaves the band; per width the table reports the median over
seeds (runs still stable at --max-depth are censored at max-depth + 1). The scaling exponent is
the least-squares slope of log(median unstable depth) against log(width) over uncensored widths.

Theoretical twin (Euler, wide limit, linear regime): E|(I + h D W) v|^2 = (1 + h^2 E[tanh'^2]) |v|^2
for W_ij ~ N(0, 1/w), independent of w, and |y| grows by the same factor; with tanh' ~ 1 the
band is left at L_inf = 2 ln c / ln(1 + h^2), reported as ``theory_wide`` (no width dependence
at leading order; O(1/w) fluctuations are what the finite-width points add).
The issue's expectation was an unstable depth growing like w (Euler) and sqrt(w) (symplectic);
the measured exponents are printed as they come out.

Run: ``python analysis/depth_stability_map.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, jvp, vmap  # noqa: E402

from noether_dyn.depth.nets import EulerLayer, SymplecticLayer  # noqa: E402
from noether_dyn.depth.potentials import LogCoshPotential, QuadraticKinetic  # noqa: E402
from noether_dyn.depth.tables import markdown_table  # noqa: E402

MODELS = ("euler", "symplectic_euler")
EXPECTED = {"euler": 1.0, "symplectic_euler": 0.5}


def _layer_and_sampler(
    model: str, width: int, h: float
) -> tuple[nn.Module, Callable[[int, torch.Generator], dict[str, torch.Tensor]]]:
    """The library layer for ``model`` and a function drawing stacked random parameters."""
    std = 1.0 / math.sqrt(width)
    if model == "euler":
        layer = EulerLayer(width, h)

        def sample(seeds: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
            return {
                "weight": torch.randn(seeds, width, width, generator=gen) * std,
                "bias": torch.zeros(seeds, width),
            }

    else:
        n = width // 2
        layer = SymplecticLayer(width, 1, h, LogCoshPotential(n, n), QuadraticKinetic())

        def sample(seeds: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
            return {
                "potential.K": torch.randn(seeds, n, n, generator=gen) * std,
                "potential.b": torch.zeros(seeds, n),
                "potential.a": torch.ones(seeds, n),
            }

    return layer.double().requires_grad_(False), sample


def unstable_depths(
    model: str, width: int, h: float, seeds: int, max_depth: int, band: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """First depth at which each seed leaves the band, and which criterion fired.

    Returns:
        depths: shape (seeds,), int, max_depth + 1 where the run stayed stable (censored).
        cause: shape (seeds,), str: "signal", "tangent" or "stable".
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + width)
    layer, sample = _layer_and_sampler(model, width, h)
    y = torch.randn(seeds, width, generator=gen, dtype=torch.float64) / math.sqrt(width)
    v = torch.randn(seeds, width, generator=gen, dtype=torch.float64)
    v = v / v.norm(dim=-1, keepdim=True)
    y0 = y.norm(dim=-1)

    def one(params: dict[str, torch.Tensor], y1: torch.Tensor, v1: torch.Tensor):
        return jvp(lambda z: functional_call(layer, params, (z,)), (y1,), (v1,))

    step = vmap(one)
    depths = np.full(seeds, max_depth + 1)
    cause = np.array(["stable"] * seeds, dtype=object)
    alive = np.ones(seeds, dtype=bool)
    lo, hi = math.log(1.0 / band), math.log(band)
    for depth in range(1, max_depth + 1):
        params = {k: t.double() for k, t in sample(seeds, gen).items()}
        y, v = step(params, y, v)
        sig = torch.log(y.norm(dim=-1) / y0).numpy()
        tan = torch.log(v.norm(dim=-1)).numpy()
        bad_sig = (sig < lo) | (sig > hi)
        bad_tan = (tan < lo) | (tan > hi)
        new = alive & (bad_sig | bad_tan)
        depths[new] = depth
        cause[new & bad_sig] = "signal"
        cause[new & ~bad_sig] = "tangent"
        alive &= ~new
        if not alive.any():
            break
    return depths, cause


def fit_exponent(widths: np.ndarray, depths: np.ndarray) -> tuple[float, float]:
    """Slope of log(depth) on log(width) and its standard error; nan below 3 points."""
    if len(widths) < 3:
        return float("nan"), float("nan")
    coef, cov = np.polyfit(np.log(widths), np.log(depths), 1, cov=True)
    return float(coef[0]), float(np.sqrt(cov[0, 0]))


def run(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """All widths and both models; returns (per-seed rows, per-width table, fit table)."""
    rows = []
    for model in MODELS:
        for width in args.widths:
            depths, cause = unstable_depths(
                model, width, args.h, args.seeds, args.max_depth, args.band
            )
            rows += [
                {"model": model, "width": width, "seed": s, "unstable_depth": d, "cause": c}
                for s, (d, c) in enumerate(zip(depths, cause, strict=True))
            ]
    raw = pd.DataFrame(rows)
    table = (
        raw.groupby(["model", "width"])
        .agg(
            median_depth=("unstable_depth", "median"),
            q25=("unstable_depth", lambda d: np.percentile(d, 25)),
            q75=("unstable_depth", lambda d: np.percentile(d, 75)),
            censored=("cause", lambda c: float(np.mean(c == "stable"))),
            tangent_first=("cause", lambda c: float(np.mean(c == "tangent"))),
        )
        .reset_index()
    )
    fits = []
    for model, sub in table.groupby("model", sort=False):
        ok = sub[sub["median_depth"] <= args.max_depth]
        slope, err = fit_exponent(ok["width"].to_numpy(float), ok["median_depth"].to_numpy(float))
        fits.append(
            {
                "model": model,
                "exponent": slope,
                "stderr": err,
                "expected": EXPECTED[model],
                "widths_fitted": len(ok),
                "theory_wide": (
                    2 * math.log(args.band) / math.log1p(args.h**2)
                    if model == "euler"
                    else float("nan")
                ),
            }
        )
    return raw, table, pd.DataFrame(fits)


def plot(table: pd.DataFrame, fits: pd.DataFrame, path: Path) -> None:
    """Median unstable depth against width (log-log) with IQR, fits, and expected slopes."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = dict(zip(MODELS, sns.color_palette("deep", 2), strict=True))
    for model, sub in table.groupby("model", sort=False):
        w = sub["width"].to_numpy(float)
        med = sub["median_depth"].to_numpy(float)
        yerr = [med - sub["q25"].to_numpy(float), sub["q75"].to_numpy(float) - med]
        ax.errorbar(w, med, yerr=yerr, fmt="o-", color=colors[model], capsize=3, label=model)
        fit = fits[fits["model"] == model].iloc[0]
        if np.isfinite(fit["exponent"]):
            ax.plot(
                w,
                med[0] * (w / w[0]) ** fit["exponent"],
                ":",
                color=colors[model],
                label=f"fit w^{fit['exponent']:.2f}",
            )
            ax.plot(
                w,
                med[0] * (w / w[0]) ** fit["expected"],
                "--",
                color=colors[model],
                alpha=0.4,
                label=f"expected w^{fit['expected']:g}",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width w (state size)")
    ax.set_ylabel("unstable depth (median over seeds)")
    ax.set_title("stable below the curve: |y_L|/|y_0|, |dy_L|/|dy_0| in [1/c, c]")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (seconds)")
    parser.add_argument("--out", type=Path, default=Path("analysis/results/depth_stability_map"))
    parser.add_argument("--h", type=float, default=None, help="step size per layer")
    parser.add_argument("--band", type=float, default=10.0, help="stability band factor c")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--max-depth", type=int, default=None)
    parser.add_argument("--widths", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        defaults = {"h": 0.2, "seeds": 8, "max_depth": 2000, "widths": [8, 16, 32, 64]}
    else:
        defaults = {"h": 0.1, "seeds": 16, "max_depth": 4000, "widths": [8, 16, 32, 64, 128, 256]}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any(w % 2 for w in args.widths):
        parser.error("--widths must be even (symplectic state = (q, p) halves)")
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the study, write figure + CSVs under --out, print markdown tables; returns the
    per-width table."""
    args = parse(argv)
    # Tiny per-layer ops: one thread is fastest, and it avoids OpenMP oversubscription (10-50x
    # slowdowns) when the two cores are shared with other jobs.
    torch.set_num_threads(1)
    start = time.perf_counter()
    raw, table, fits = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    raw.to_csv(args.out / "seeds.csv", index=False)
    table.to_csv(args.out / "table.csv", index=False)
    fits.to_csv(args.out / "fit.csv", index=False)
    plot(table, fits, args.out / "stability_map.png")
    print(f"## depth-width stability map (h={args.h}, band c={args.band}, seeds={args.seeds})\n")
    print(markdown_table(table))
    print()
    print(markdown_table(fits))
    print(f"\nwrote {args.out} in {time.perf_counter() - start:.1f} s")
    return table


if __name__ == "__main__":
    main()
