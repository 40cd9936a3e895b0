"""CFL-type stability study: the smallest stable depth of a net that integrates one vector field
over a fixed horizon, against the field's stiffness and the width.

docs/theory.md §5; Haber & Ruthotto, "Stable architectures for deep neural networks", Inverse
Problems 34 (2018) (a residual layer is stable when |1 + h lambda| <= 1); Hairer, Lubich,
Wanner, "Geometric Numerical Integration" (2006), §I.1 and §I.5 (linear stability of
forward Euler, symplectic Euler and Stormer-Verlet on the harmonic oscillator).

Setup. A net of width w has state y = (q, p) with n = w/2 coordinates each. Every layer steps
*one shared* Hamiltonian vector field H = |p|^2/2 + V(q), V(q) = sum_k log cosh((K q)_k), with
K of size (n, n), entries N(0, 1) (not N(0, 1/n)), so that the stiffness grows with the width.
A net of depth L integrates the horizon T with step h = T / L (more layers refine the
discretization; they do not lengthen the horizon). Three layer types, the integrators of
:mod:`noether_dyn.depth.integrators`: forward Euler (a residual layer y <- y + h f(y)),
symplectic Euler (order 1) and Stormer-Verlet (order 2).

What is measured. The state y = 0 is an equilibrium, so a tangent (signal or gradient
perturbation) dy pushed through the layers there obeys the layers' linearization, the same steps
with the linear force q -> S q, S = Hessian of V at 0 = K^T K (checked against the layer's
jvp in tests/test_depth_studies.py). Its size is the energy norm
|dy|_E = sqrt(dq^T S dq + |dp|^2), which the exact flow conserves. The stiffness is
rho = sqrt(lambda_max(S)) = sigma_max(K), the largest frequency (~ 2 sqrt(n) = sqrt(2 w) for
Gaussian K). A net is *stable* when every layer's tangent stays in the band
|dy_j|_E / |dy_0|_E in [1/c, c] (default c = 10), for a batch of tangents: the stiffest mode and
three random unit-energy tangents in S's positive eigenspace. The *smallest stable depth* L* is
found by bisection over integer depths (stable at L*, unstable at L* - 1; stability is monotone
in L for these methods on a linear field).

Theory (one mode of frequency omega = rho). Forward Euler multiplies the energy norm by
sqrt(1 + h^2 rho^2) per layer, so the band holds iff (L/2) ln(1 + (rho T/L)^2) <= ln c,
L* -> T^2 rho^2 / (2 ln c) for rho T >> 1: quadratic in rho T, linear in the width.
Symplectic Euler and Stormer-Verlet are stable iff h rho <= 2, L* -> rho T / 2: linear in rho T,
square-root in the width (the band adds a little near the threshold, where the eigenvectors of
the step in energy coordinates become ill-conditioned).

Second panel, trained weights. The same potential (K initialised N(0, 1)) is trained with Adam to
match the force of a chain of coupled pendulums, V*(q) = sum (1 - cos q_i) + (k/2) sum
(q_{i+1} - q_i)^2, k = 4; rho is measured on the trained S and the horizon is swept, so rho T
varies through T. Exponents fitted against rho T.

Exponents: per seed, the least-squares slope of log L* against log w (random weights; over all
widths and over widths >= --large-width) or log rho T (both panels); the table gives the mean
over seeds with a 95% Student-t interval, the slope of the exact one-mode theory at the measured
rho (``theory_exponent``), and the slope of rho^2 itself against w. sigma_max(K)^2 / (4n) rises
towards 1 only as n grows (the finite-size edge of the Marchenko-Pastur law), so at finite
widths the width exponents carry that bias; the rho T exponents do not.

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

from noether_dyn.depth.integrators import euler_step, symplectic_step  # noqa: E402
from noether_dyn.depth.potentials import LogCoshPotential  # noqa: E402
from noether_dyn.depth.tables import markdown_table  # noqa: E402

DT = torch.float64
Step = Callable[[torch.Tensor, torch.Tensor, Callable, Callable, torch.Tensor], tuple]
METHODS: dict[str, Step] = {
    "forward_euler": euler_step,
    "symplectic_euler": lambda q, p, gt, gv, h: symplectic_step(q, p, gt, gv, h, 1),
    "stormer_verlet": lambda q, p, gt, gv, h: symplectic_step(q, p, gt, gv, h, 2),
}
EXPECTED_WIDTH = {"forward_euler": 1.0, "symplectic_euler": 0.5, "stormer_verlet": 0.5}
EXPECTED_RHO_T = {"forward_euler": 2.0, "symplectic_euler": 1.0, "stormer_verlet": 1.0}
CHAIN_SPRING = 4.0


def t_quantile(prob: float, df: int) -> float:
    """Student-t quantile by bisection on the numerically integrated density (error < 1e-6)."""
    x = np.linspace(0.0, 60.0, 600_001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
    cdf = 0.5 + np.concatenate([[0.0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x))])
    return float(np.interp(prob, cdf, x))


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the bounds of its Student-t confidence interval (nan bounds below 2 values)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = (
        t_quantile(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    )
    return mean, mean - half, mean + half


def euler_theory(rho_t: float, band: float) -> int:
    """Smallest L with (L/2) ln(1 + (rho T / L)^2) <= ln c (forward Euler, one mode)."""
    lo, hi = 1, 2
    while 0.5 * hi * math.log1p((rho_t / hi) ** 2) > math.log(band):
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if 0.5 * mid * math.log1p((rho_t / mid) ** 2) <= math.log(band):
            hi = mid
        else:
            lo = mid + 1
    return lo


def probe_tangents(s: torch.Tensor, gen: torch.Generator, extra: int = 3) -> torch.Tensor:
    """Initial tangents (1 + extra, 2n) with unit energy norm and dq = 0: dp = the stiffest
    eigenvector of S, then ``extra`` random mixtures of S's eigenvectors with eigenvalue > 0."""
    lam, vec = torch.linalg.eigh(s)
    pos = vec[:, lam > 0]
    mix = torch.randn(pos.shape[1], extra, generator=gen, dtype=s.dtype)
    dp = torch.cat([vec[:, -1:], pos @ mix], 1).T
    dp = dp / dp.norm(dim=-1, keepdim=True)
    return torch.cat([torch.zeros_like(dp), dp], -1)


def energy_norm(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """|dy|_E = sqrt(dq^T S dq + |dp|^2), y of shape (..., 2n), s (..., n, n) -> (...)."""
    n = s.shape[-1]
    q, p = y[..., :n], y[..., n:]
    return torch.sqrt(((q @ s) * q).sum(-1) + (p * p).sum(-1))


def stable(
    method: str,
    s: torch.Tensor,
    y0: torch.Tensor,
    horizon: float,
    depths: torch.Tensor,
    band: float,
) -> torch.Tensor:
    """Whether ``depths[b]`` layers of ``method`` with h = horizon / depths[b] keep every tangent
    of system b in the band at every layer; a batch of B systems at once.

    Args:
        s: Hessians (B, n, n). y0: tangents (B, k, 2n). depths: (B,) int64.

    Returns:
        (B,) bool.
    """
    n = s.shape[-1]
    step, h = METHODS[method], (horizon / depths.to(DT))[:, None, None]
    q, p = y0[..., :n], y0[..., n:]
    e0 = energy_norm(y0, s)
    bad = torch.zeros_like(depths, dtype=torch.bool)
    lo, hi = 1.0 / band, band
    for j in range(int(depths.max())):
        q, p = step(q, p, lambda v: v, lambda v: v @ s, h)
        ratio = energy_norm(torch.cat([q, p], -1), s) / e0
        out = ((ratio > hi) | (ratio < lo) | ~torch.isfinite(ratio)).any(-1)
        bad |= out & (j < depths)
        if bool((bad | (j + 1 >= depths)).all()):
            break
    return ~bad


def smallest_stable_depths(
    method: str, s: torch.Tensor, y0: torch.Tensor, horizon: float, band: float, guess: torch.Tensor
) -> torch.Tensor:
    """Per system, the smallest depth L* that is stable, with L* - 1 unstable (bisection over
    integers; ``guess`` (B,), the theory's L*, only places the first probes). Returns (B,) int64."""
    hi = torch.clamp((1.25 * guess).ceil().long(), min=1)
    while not bool((ok := stable(method, s, y0, horizon, hi, band)).all()):
        hi = torch.where(ok, hi, 2 * hi)
        if int(hi.max()) > 1 << 20:
            raise RuntimeError(f"{method}: no stable depth below {int(hi.max())}; reduce --horizon")
    lo = torch.ones_like(hi)
    mid = torch.minimum(torch.clamp((0.9 * guess).floor().long(), min=1), hi)
    while bool((lo < hi).any()):
        ok = stable(method, s, y0, horizon, mid, band)
        hi = torch.where(ok & (lo < hi), mid, hi)
        lo = torch.where(~ok & (lo < hi), mid + 1, lo)
        mid = (lo + hi) // 2
    return hi


def random_hessian(width: int, gen: torch.Generator) -> torch.Tensor:
    """S = K^T K for K (n, n) with entries N(0, 1): the Hessian at q = 0 of
    V = sum log cosh(K q) (a = 1, b = 0)."""
    n = width // 2
    k = torch.randn(n, n, generator=gen, dtype=DT)
    return k.T @ k


def chain_force(q: torch.Tensor) -> torch.Tensor:
    """grad V* of the coupled-pendulum chain V* = sum (1 - cos q_i) + (k/2) sum (q_{i+1}-q_i)^2."""
    d = q[..., 1:] - q[..., :-1]
    spring = torch.zeros_like(q)
    spring[..., :-1] -= d
    spring[..., 1:] += d
    return torch.sin(q) + CHAIN_SPRING * spring


def trained_hessian(width: int, seed: int, steps: int) -> tuple[torch.Tensor, float]:
    """Train V = sum a_k log cosh((K q + b)_k), K (n, n) initialised N(0, 1), to the chain's force
    on q ~ N(0, 1) (Adam, lr 1e-2); returns its Hessian at q = 0, K^T diag(a sech^2 b) K, and the
    final relative force error."""
    n = width // 2
    torch.manual_seed(seed)
    pot = LogCoshPotential(n, n, init_std=1.0).to(DT)
    opt = torch.optim.Adam(pot.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        q = torch.randn(256, n, generator=gen, dtype=DT)
        target = chain_force(q)
        loss = ((pot.grad(q) - target) ** 2).sum(-1).mean() / (target**2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        curv = pot.a / torch.cosh(pot.b) ** 2
        s = pot.K.T @ (curv[:, None] * pot.K)
    return s.detach(), float(loss.detach().sqrt())


def theory_depth(method: str, rho_t: float, band: float) -> float:
    """L* of one mode of frequency rho over horizon T: :func:`euler_theory` for forward Euler,
    rho T / 2 (h rho <= 2) for the symplectic methods."""
    return float(euler_theory(rho_t, band)) if method == "forward_euler" else rho_t / 2


def measure(
    s: torch.Tensor, horizons: list[float], band: float, gen: torch.Generator
) -> list[dict]:
    """Every method and horizon on a batch of Hessians s (B, n, n); one row per system."""
    rho = torch.linalg.eigvalsh(s)[:, -1].sqrt()
    y0 = torch.stack([probe_tangents(si, gen) for si in s])
    rows = []
    for horizon in horizons:
        for method in METHODS:
            guess = torch.tensor([theory_depth(method, float(r) * horizon, band) for r in rho])
            depths = smallest_stable_depths(method, s, y0, horizon, band, guess)
            for b in range(len(s)):
                rho_t = float(rho[b]) * horizon
                theory = float(guess[b])
                rows.append(
                    {
                        "system": b,
                        "method": method,
                        "rho": float(rho[b]),
                        "horizon": horizon,
                        "rho_T": rho_t,
                        "smallest_stable_depth": int(depths[b]),
                        "theory": theory,
                        "asymptote": (
                            rho_t**2 / (2 * math.log(band))
                            if method == "forward_euler"
                            else rho_t / 2
                        ),
                        "ratio": int(depths[b]) / theory,
                    }
                )
    return rows


def run_random(args: argparse.Namespace) -> pd.DataFrame:
    """All widths; the seeds of one width form one batch (seed = system index)."""
    rows = []
    for width in args.widths:
        gen = torch.Generator().manual_seed(1_000 + width)
        s = torch.stack([random_hessian(width, gen) for _ in range(args.seeds)])
        for row in measure(s, [args.horizon], args.band, gen):
            rows.append({"weights": "random", "width": width, "seed": row.pop("system"), **row})
    return pd.DataFrame(rows)


def run_trained(args: argparse.Namespace) -> pd.DataFrame:
    """Trained potentials of every width (a batch of seeds each), every horizon."""
    rows = []
    for width in args.trained_widths:
        fits = [
            trained_hessian(width, seed, args.train_steps) for seed in range(args.trained_seeds)
        ]
        s = torch.stack([f[0] for f in fits])
        lam_min = torch.linalg.eigvalsh(s)[:, 0]
        gen = torch.Generator().manual_seed(7_919 + width)
        for row in measure(s, args.trained_horizons, args.band, gen):
            seed = row.pop("system")
            rows.append(
                {
                    "weights": "trained",
                    "width": width,
                    "seed": seed,
                    "force_rel_error": fits[seed][1],
                    "lambda_min_S": float(lam_min[seed]),
                    **row,
                }
            )
    return pd.DataFrame(rows)


def _slopes(raw: pd.DataFrame, x: str, group: list[str]) -> pd.DataFrame:
    """Per group, the log-log slopes of the measured L* and of the exact one-mode theory."""
    out = []
    for key, sub in raw.groupby(group):
        logx = np.log(sub[x].to_numpy(float))
        slope = np.polyfit(logx, np.log(sub["smallest_stable_depth"].to_numpy(float)), 1)[0]
        theory = np.polyfit(logx, np.log(sub["theory"].to_numpy(float)), 1)[0]
        out.append({**dict(zip(group, key)), "slope": slope, "theory_slope": theory})
    return pd.DataFrame(out)


def fit_table(random: pd.DataFrame, trained: pd.DataFrame, large_width: int) -> pd.DataFrame:
    """Exponents with 95% intervals: random weights in width (all widths, and widths >=
    ``large_width``, where sigma_max(K)^2 is closer to its asymptote 4n) and in rho T, trained
    weights in rho T; plus the stiffness itself, rho^2 against width (asymptotically 1)."""
    rows = []
    big = random[random["width"] >= large_width] if not random.empty else random
    for weights, raw, x, expected, label in (
        ("random", random, "width", EXPECTED_WIDTH, "width"),
        ("random", big, "width", EXPECTED_WIDTH, f"width >= {large_width}"),
        ("random", random, "rho_T", EXPECTED_RHO_T, "rho_T"),
        ("trained", trained, "rho_T", EXPECTED_RHO_T, "rho_T"),
    ):
        if raw.empty or raw[x].nunique() < 2:
            continue
        # Per seed (random) or per trained potential (trained), one slope across the sweep.
        group = ["method", "seed"] if weights == "random" else ["method", "seed", "width"]
        slopes = _slopes(raw, x, group)
        for method in METHODS:
            mine = slopes[slopes["method"] == method]
            mean, lo, hi = mean_ci(mine["slope"].to_numpy())
            rows.append(
                {
                    "weights": weights,
                    "against": label,
                    "method": method,
                    "exponent": mean,
                    "ci95_low": lo,
                    "ci95_high": hi,
                    "expected": expected[method],
                    "expected_in_ci": bool(lo <= expected[method] <= hi),
                    "theory_exponent": float(mine["theory_slope"].mean()),
                    "fits": len(mine),
                }
            )
        if weights == "random" and x == "width":
            one = raw[raw["method"] == "forward_euler"]
            stiff = [
                np.polyfit(np.log(sub["width"]), 2 * np.log(sub["rho"]), 1)[0]
                for _, sub in one.groupby("seed")
            ]
            mean, lo, hi = mean_ci(np.array(stiff))
            rows.append(
                {
                    "weights": weights,
                    "against": label,
                    "method": "stiffness rho^2",
                    "exponent": mean,
                    "ci95_low": lo,
                    "ci95_high": hi,
                    "expected": 1.0,
                    "expected_in_ci": bool(lo <= 1.0 <= hi),
                    "theory_exponent": float("nan"),
                    "fits": len(stiff),
                }
            )
    return pd.DataFrame(rows)


def summary(random: pd.DataFrame) -> pd.DataFrame:
    """Per method and width: median rho, median L* and its range over seeds, median L*/theory."""
    return (
        random.groupby(["method", "width"], sort=False)
        .agg(
            rho=("rho", "median"),
            depth_median=("smallest_stable_depth", "median"),
            depth_min=("smallest_stable_depth", "min"),
            depth_max=("smallest_stable_depth", "max"),
            ratio_to_theory=("ratio", "median"),
        )
        .reset_index()
    )


def plot(random: pd.DataFrame, trained: pd.DataFrame, band: float, path: Path) -> None:
    """Left: L* against rho T for random weights (points: seeds and widths), theory lines.
    Middle: L* against width. Right: trained weights against rho T."""
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    colors = dict(zip(METHODS, sns.color_palette("deep", len(METHODS)), strict=True))
    markers = {"forward_euler": "o", "symplectic_euler": "s", "stormer_verlet": "^"}

    def theory_lines(ax, frame: pd.DataFrame) -> None:
        x = np.geomspace(frame["rho_T"].min(), frame["rho_T"].max(), 50)
        ax.plot(
            x,
            x**2 / (2 * math.log(band)),
            "--",
            color=colors["forward_euler"],
            label="T^2 rho^2 / (2 ln c)",
        )
        ax.plot(x, x / 2, "--", color=colors["symplectic_euler"], label="T rho / 2")

    for ax, frame, title in (
        (axes[0], random, "random N(0,1) weights"),
        (axes[2], trained, "trained weights"),
    ):
        if frame.empty:
            ax.set_visible(False)
            continue
        for method, sub in frame.groupby("method", sort=False):
            ax.scatter(
                sub["rho_T"],
                sub["smallest_stable_depth"],
                s=14,
                alpha=0.6,
                marker=markers[method],
                color=colors[method],
                label=method,
            )
        theory_lines(ax, frame)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rho T (stiffness x horizon)")
        ax.set_ylabel("smallest stable depth L*")
        ax.set_title(f"{title}, band c = {band:g}", loc="left")
        ax.legend(fontsize=7)
    table = summary(random)
    for method, sub in table.groupby("method", sort=False):
        ax = axes[1]
        w = sub["width"].to_numpy(float)
        med = sub["depth_median"].to_numpy(float)
        ax.errorbar(
            w,
            med,
            yerr=[med - sub["depth_min"], sub["depth_max"] - med],
            fmt=markers[method] + "-",
            color=colors[method],
            capsize=3,
            label=method,
        )
        ax.plot(
            w, med[-1] * (w / w[-1]) ** EXPECTED_WIDTH[method], ":", color=colors[method], alpha=0.6
        )
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("width w (state size)")
    axes[1].set_ylabel("L* (median, range over seeds)")
    axes[1].set_title("random weights; dotted: w^1 and w^1/2", loc="left")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (seconds)")
    parser.add_argument("--out", type=Path, default=Path("analysis/results/depth_stability_map"))
    parser.add_argument("--horizon", type=float, default=4.0, help="T = h L, random weights")
    parser.add_argument("--band", type=float, default=10.0, help="stability band factor c")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--widths", type=int, nargs="+", default=None)
    parser.add_argument("--trained-widths", type=int, nargs="+", default=None)
    parser.add_argument("--trained-seeds", type=int, default=None)
    parser.add_argument("--trained-horizons", type=float, nargs="+", default=None)
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument(
        "--large-width", type=int, default=64, help="second width fit uses widths >= this"
    )
    parser.add_argument(
        "--refit", action="store_true", help="redo tables and figure from --out/seeds.csv"
    )
    args = parser.parse_args(argv)
    if args.quick:
        defaults = {
            "seeds": 3,
            "widths": [16, 32, 64],
            "trained_widths": [16],
            "trained_seeds": 2,
            "trained_horizons": [4.0, 8.0],
            "train_steps": 50,
        }
    else:
        defaults = {
            "seeds": 8,
            "widths": [16, 32, 64, 128, 256, 512],
            "trained_widths": [16, 64, 256],
            "trained_seeds": 3,
            "trained_horizons": [4.0, 8.0, 16.0, 32.0],
            "train_steps": 400,
        }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any(w % 2 for w in [*args.widths, *args.trained_widths]):
        parser.error("widths must be even (state = (q, p) halves)")
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the study, write figure + CSVs + markdown under --out; returns the fit table."""
    args = parse(argv)
    # Tiny sequential ops: one thread is fastest and avoids oversubscribing shared cores.
    torch.set_num_threads(1)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.refit:
        seeds = pd.read_csv(args.out / "seeds.csv")
        random = seeds[seeds["weights"] == "random"].dropna(axis=1, how="all")
        trained = seeds[seeds["weights"] == "trained"]
    else:
        random = run_random(args)
        trained = run_trained(args)
        pd.concat([random, trained]).to_csv(args.out / "seeds.csv", index=False)
    fits = fit_table(random, trained, args.large_width)
    table = summary(random)
    table.to_csv(args.out / "table.csv", index=False)
    fits.to_csv(args.out / "fit.csv", index=False)
    plot(random, trained, args.band, args.out / "stability_map.png")
    trained_summary = (
        trained.groupby(["width", "seed"])
        .agg(
            rho=("rho", "first"),
            lambda_min_S=("lambda_min_S", "first"),
            force_rel_error=("force_rel_error", "first"),
        )
        .reset_index()
        if not trained.empty
        else pd.DataFrame()
    )
    text = "\n\n".join(
        [
            f"## smallest stable depth at fixed horizon (T={args.horizon:g}, band c={args.band:g}, "
            f"{random['seed'].nunique()} seeds)",
            markdown_table(table),
            "### fitted exponents (mean over seeds, 95% t-interval)",
            markdown_table(fits),
            "### trained potentials",
            markdown_table(trained_summary),
        ]
    )
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {args.out} in {time.perf_counter() - start:.1f} s")
    return fits


if __name__ == "__main__":
    main()
