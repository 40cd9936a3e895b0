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
found by a galloping search over integer depths from the one-mode theory's L* (stable at L*,
unstable at L* - 1; stability is monotone in L for these methods on a linear field).

How it is computed. S is symmetric, S = V diag(omega^2) V^T, so the linearized layers act on
each eigenmode alone; in energy coordinates (omega_i dq_i, dp_i) they are the same integrator
steps with frequency omega_i, and |dy|_E^2 is the plain sum of squares. The study therefore needs
only the eigenvalues of S (one eigvalsh per matrix, shared with the stiffness study below) and
steps the modes: O(n) per layer instead of O(n^2), vectorized over seeds and probes. A random
probe V z / |V z| has modal coefficients z / |z|, so the probes are drawn in the eigenbasis.
tests/test_depth_studies.py confirms each L* (stable) and L* - 1 (unstable) by dense stepping.
Arithmetic is float64 throughout, and float32 would not do: forward Euler's squared energy at
layer L* differs from that at L* - 1 (same probe, h = T/L) by a relative ~ 2 ln c / L* (1.6e-4
at width 4096, L* ~ 28000), while float32 rounding accumulated over L* steps reaches up to
L* 2^-24 ~ 1.7e-3, enough to flip the verdict (it does: in float32, one of the 8 width-4096
systems is unstable at its float64 L*); float64's L* 2^-53 ~ 3e-12 cannot.

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

Stiffness study (eigenvalues only, more seeds and widths than the CFL runs): rho^2 / (2 w) =
lambda_max(K^T K) / (4n) against width, beside Johnstone's (2001) finite-n prediction
mu + sigma E[TW1]. The edge of the Marchenko-Pastur law is reached only as n grows, with a
relative deficit ~ 0.76 n^{-2/3}, so rho^2 grows faster than w at finite width. By Johnstone's
formula the exponent of rho^2 over one doubling of w is 1.097 (32 -> 64), 1.019 (256 -> 512),
1.012 (512 -> 1024), 1.007 (1024 -> 2048) and 1.004 (2048 -> 4096): below 1.01 from w = 1024
on, which sets --large-width = 1024 (chosen from the formula, before the CFL runs at large width).

Exponents: per seed, the least-squares slope of log L* against log w (random weights; over all
widths, over last round's widths 64-512 and over widths >= --large-width) or log rho T (both
panels); the table gives the mean over seeds with a 95% Student-t interval, the slope of the
exact one-mode theory at the measured rho (``theory_exponent``), and the slope of rho^2 over the
same systems (``rho2_exponent``, plus its own row with an interval): forward Euler's L* tracks
rho^2, the symplectic L* half of it, so the width exponents carry rho^2's finite-width bias;
the rho T exponents do not.

Run: ``python analysis/depth_stability_map.py [--quick] [--out DIR]`` (full run: CFL widths
16-4096 x 8 seeds, stiffness widths 16-8192 x 16 seeds, trained panel; see docs/depth.md for
the time it takes). ``--refit`` redoes tables and figure from the CSVs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

from noether_dyn.depth.integrators import euler_step, symplectic_step  # noqa: E402
from noether_dyn.depth.potentials import LogCoshPotential  # noqa: E402
from noether_dyn.depth.tables import markdown_table  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run as ``python analysis/depth_stability_map.py``
    sys.path.insert(0, str(_ROOT))
from benchmarks import _docs  # noqa: E402

DOCS_PAGE = "docs/depth.md"

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


def modal_probes(lam: torch.Tensor, gen: torch.Generator, extra: int = 3) -> torch.Tensor:
    """Initial probe tangents in the eigenbasis of S, as momenta in energy coordinates.

    Args:
        lam: eigenvalues of S, ascending, (B, n).
        gen: the generator that draws the random probes.
        extra: random probes besides the stiffest mode.

    Returns:
        (B, 1 + extra, n): per system, the coefficients of dp on S's eigenvectors (dq = 0), each
        of unit energy norm: first the stiffest mode, then ``extra`` Gaussian mixtures of the modes
        with lambda > 0. A dense probe V z / |V z| (V the eigenvectors, z Gaussian on the positive
        modes) has exactly these coefficients, z / |z|, so no eigenvector is needed.
    """
    top = torch.zeros_like(lam)[:, None, :].expand(-1, 1, -1).clone()
    top[:, 0, -1] = 1.0
    mix = torch.randn(lam.shape[0], extra, lam.shape[1], generator=gen, dtype=lam.dtype)
    v = torch.cat([top, mix * (lam > 0)[:, None, :]], 1)
    return v / v.norm(dim=-1, keepdim=True)


def stable(
    method: str,
    omega: torch.Tensor,
    v0: torch.Tensor,
    horizon: float,
    depths: torch.Tensor,
    band: float,
) -> torch.Tensor:
    """Whether ``depths[b]`` layers of ``method`` with h = horizon / depths[b] keep every probe
    tangent of system b in the band at every layer; a batch of B systems at once.

    The layers are stepped in S's eigenbasis: with S = V diag(omega^2) V^T, the linearized
    layers act on each mode (q_i, p_i) alone, and in energy coordinates u_i = omega_i q_i they are
    the same integrator with grad T(p) = omega p, grad V(u) = omega u (kick p -= c h omega^2 q,
    drift u += c h omega p), while |dy|_E^2 = sum_i u_i^2 + p_i^2. O(n) per layer instead of the
    dense O(n^2); tests/test_depth_studies.py checks the verdicts against dense stepping.

    Args:
        omega: mode frequencies sqrt(max(lambda_i, 0)), (B, n); 1/time.
        v0: probe momenta from :func:`modal_probes`, (B, k, n), unit energy.
        depths: (B,) int64, >= 1.

    Returns:
        (B,) bool.
    """
    a = (horizon / depths.to(omega.dtype))[:, None, None] * omega[:, None, :]  # h omega
    step = METHODS[method]

    def grad(x: torch.Tensor) -> torch.Tensor:
        return a * x

    u, v = torch.zeros_like(v0), v0
    bad = torch.zeros_like(depths, dtype=torch.bool)
    lo, hi = band**-2, band**2
    for j in range(int(depths.max())):
        u, v = step(u, v, grad, grad, 1.0)
        energy = (u * u + v * v).sum(-1)  # |dy_j|_E^2 / |dy_0|_E^2, (B, k)
        inside = ((energy >= lo) & (energy <= hi)).all(-1)  # NaN counts as outside
        bad |= ~inside & (j < depths)
        if bool((bad | (j + 1 >= depths)).all()):
            break
    return ~bad


def smallest_stable_depths(
    method: str,
    omega: torch.Tensor,
    v0: torch.Tensor,
    horizon: float,
    band: float,
    guess: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """Per system, the smallest depth L* that is stable, with L* - 1 unstable (L* = 1 needs no
    second probe).

    Galloping search from ``guess`` (B,), the one-mode theory's L*: probe the guess, then step
    away from it by 1, 2, 4, ... until the verdict flips, then bisect the bracket. The guess only
    places the probes; every L* is confirmed by its two verdicts. With the exact forward-Euler
    theory as guess this takes two evaluations (L* and L* - 1).

    Returns:
        (L* (B,) int64, number of batched evaluations of :func:`stable`).
    """
    never = 1 << 40
    probe = torch.clamp(guess.round().long(), min=1)
    ok = stable(method, omega, v0, horizon, probe, band)
    good = torch.where(ok, probe, never)  # smallest depth known stable
    bad = torch.where(ok, probe.new_zeros(()), probe)  # largest depth known unstable (0: none)
    known_bad = ~ok | (good == 1)
    stride, evaluations = torch.ones_like(probe), 1
    while bool((good > bad + 1).any()):
        todo = good > bad + 1
        probe = torch.where(
            good == never,
            bad + stride,
            torch.where(known_bad, (good + bad) // 2, torch.clamp(good - stride, min=1)),
        )
        probe = torch.where(todo, probe, 1)
        ok = stable(method, omega, v0, horizon, probe, band)
        evaluations += 1
        if int(probe.max()) > 1 << 22:
            raise RuntimeError(f"{method}: no stable depth below {int(probe.max())}")
        good = torch.where(todo & ok, torch.minimum(good, probe), good)
        bad = torch.where(todo & ~ok, torch.maximum(bad, probe), bad)
        known_bad |= todo & (~ok | (good == 1))
        stride = torch.where(todo, 2 * stride, stride)
    return good, evaluations


def stiffness_spectra(width: int, seeds: int) -> torch.Tensor:
    """Eigenvalues (ascending) of S = K^T K for K (n, n), n = width/2, entries N(0, 1): the
    Hessian at q = 0 of V = sum log cosh(K q). Seed s of a width draws K from its own generator,
    so a run with more seeds or widths repeats the smaller one. Returns (seeds, n), float64."""
    n = width // 2
    out = []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(1_000_003 * width + seed)
        k = torch.randn(n, n, generator=gen, dtype=DT)
        out.append(torch.linalg.eigvalsh(k.T @ k))
    return torch.stack(out)


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
    lam: torch.Tensor, horizons: list[float], band: float, gen: torch.Generator
) -> list[dict]:
    """Every method and horizon on a batch of spectra lam (B, n) of S; one row per system."""
    omega = lam.clamp(min=0).sqrt()
    rho = omega[:, -1]
    v0 = modal_probes(lam, gen)
    rows = []
    for horizon in horizons:
        for method in METHODS:
            guess = torch.tensor([theory_depth(method, float(r) * horizon, band) for r in rho])
            start = time.perf_counter()
            depths, evaluations = smallest_stable_depths(method, omega, v0, horizon, band, guess)
            seconds = time.perf_counter() - start
            for b in range(len(lam)):
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
                        "evaluations": evaluations,
                        "search_seconds": seconds,
                    }
                )
    return rows


def run_random(args: argparse.Namespace, spectra: dict[int, torch.Tensor]) -> pd.DataFrame:
    """All CFL widths; the seeds of one width form one batch (seed = system index). ``spectra``
    holds each width's eigenvalues (from the stiffness study; the first ``args.seeds`` are
    used)."""
    rows = []
    for width in args.widths:
        gen = torch.Generator().manual_seed(1_000 + width)
        lam = spectra[width][: args.seeds]
        for row in measure(lam, [args.horizon], args.band, gen):
            rows.append({"weights": "random", "width": width, "seed": row.pop("system"), **row})
        print(f"width {width}: done", flush=True)
    return pd.DataFrame(rows)


def run_trained(args: argparse.Namespace) -> pd.DataFrame:
    """Trained potentials of every width (a batch of seeds each), every horizon."""
    rows = []
    for width in args.trained_widths:
        fits = [
            trained_hessian(width, seed, args.train_steps) for seed in range(args.trained_seeds)
        ]
        lam = torch.linalg.eigvalsh(torch.stack([f[0] for f in fits]))
        gen = torch.Generator().manual_seed(7_919 + width)
        for row in measure(lam, args.trained_horizons, args.band, gen):
            seed = row.pop("system")
            rows.append(
                {
                    "weights": "trained",
                    "width": width,
                    "seed": seed,
                    "force_rel_error": fits[seed][1],
                    "lambda_min_S": float(lam[seed, 0]),
                    **row,
                }
            )
    return pd.DataFrame(rows)


TW1_MEAN = -1.2065335745820
"""Mean of the Tracy-Widom GOE law TW1 (Tracy & Widom, Commun. Math. Phys. 177 (1996) 727)."""


def johnstone_top(n: int) -> float:
    """E lambda_max(K^T K) for K (n, n) with entries N(0, 1), to leading order in n^{-2/3}:
    mu + sigma E[TW1] with mu = (sqrt(n - 1) + sqrt(n))^2, sigma = (sqrt(n - 1) + sqrt(n))
    (1/sqrt(n - 1) + 1/sqrt(n))^{1/3} (Johnstone, Ann. Statist. 29 (2001) 295, Thm 1.1).
    -> 4n, with a relative deficit ~ 0.76 n^{-2/3} that sets the finite-width bias."""
    root = math.sqrt(n - 1) + math.sqrt(n)
    return root**2 + TW1_MEAN * root * (1 / math.sqrt(n - 1) + 1 / math.sqrt(n)) ** (1 / 3)


def stiffness_table(spectra: dict[int, torch.Tensor]) -> pd.DataFrame:
    """Per width: rho^2 / (2 w) = lambda_max(S) / (4n) (-> 1 as n grows), mean over seeds with
    its 95% interval, Johnstone's prediction, and the local width exponent of rho^2 from the
    previous width (per seed pair log(rho_w^2 / rho_prev^2) / log(w / prev), mean and 95%
    interval; the matrices of different widths are independent) beside Johnstone's."""
    rows, prev = [], None
    for width in sorted(spectra):
        n, top = width // 2, spectra[width][:, -1].numpy()
        mean, lo, hi = mean_ci(top / (4 * n))
        row = {
            "width": width,
            "seeds": len(top),
            "rho2_over_2w": mean,
            "ci95_low": lo,
            "ci95_high": hi,
            "johnstone": johnstone_top(n) / (4 * n),
            "local_exponent": float("nan"),
            "local_ci95_low": float("nan"),
            "local_ci95_high": float("nan"),
            "johnstone_exponent": float("nan"),
        }
        if prev is not None:
            m = min(len(top), len(prev[1]))
            local = np.log(top[:m] / prev[1][:m]) / math.log(width / prev[0])
            row["local_exponent"], row["local_ci95_low"], row["local_ci95_high"] = mean_ci(local)
            row["johnstone_exponent"] = math.log(
                johnstone_top(n) / johnstone_top(prev[0] // 2)
            ) / math.log(width / prev[0])
        rows.append(row)
        prev = (width, top)
    return pd.DataFrame(rows)


def _slopes(raw: pd.DataFrame, x: str, group: list[str]) -> pd.DataFrame:
    """Per group, the log-log slopes of the measured L*, of the exact one-mode theory and of
    rho^2 (the stiffness itself, the same systems)."""
    out = []
    for key, sub in raw.groupby(group):
        logx = np.log(sub[x].to_numpy(float))
        slope = np.polyfit(logx, np.log(sub["smallest_stable_depth"].to_numpy(float)), 1)[0]
        theory = np.polyfit(logx, np.log(sub["theory"].to_numpy(float)), 1)[0]
        rho2 = np.polyfit(logx, 2 * np.log(sub["rho"].to_numpy(float)), 1)[0]
        out.append(
            {**dict(zip(group, key)), "slope": slope, "theory_slope": theory, "rho2_slope": rho2}
        )
    return pd.DataFrame(out)


def width_ranges(widths: list[int], large_width: int) -> list[tuple[int, int]]:
    """The width fits: all widths, last round's 64-512, and widths >= ``large_width`` (where
    the finite-width bias of rho^2 is small; see :func:`johnstone_top`), each only if it holds
    at least two of ``widths``."""
    top = max(widths)
    ranges = [(min(widths), top), (64, 512), (large_width, top)]
    out = []
    for lo, hi in ranges:
        if (lo, hi) not in out and sum(lo <= w <= hi for w in widths) >= 2:
            out.append((lo, hi))
    return out


def fit_table(random: pd.DataFrame, trained: pd.DataFrame, large_width: int) -> pd.DataFrame:
    """Exponents with 95% intervals: random weights in width and in rho T (over each of
    :func:`width_ranges`; at fixed T, the rho T fit is the fit against rho, so forward Euler's 2
    and the symplectic 1 say that L* tracks rho^2 and rho), trained weights in rho T. Each
    width row also gives, over the same systems, the exponent of rho^2 (``rho2_exponent``):
    forward Euler's L* should track it, the symplectic L* half of it. One more row per width
    range fits rho^2 itself (asymptotically 1) with its interval."""
    fits: list[tuple[str, pd.DataFrame, str, dict[str, float], str]] = []
    ranges = width_ranges(sorted(random["width"].unique()), large_width) if len(random) else []
    for x, expected in (("width", EXPECTED_WIDTH), ("rho_T", EXPECTED_RHO_T)):
        for lo, hi in ranges:
            sub = random[random["width"].between(lo, hi)]
            label = f"width {lo}-{hi}" if x == "width" else f"rho_T, width {lo}-{hi}"
            fits.append(("random", sub, x, expected, label))
    fits.append(("trained", trained, "rho_T", EXPECTED_RHO_T, "rho_T"))
    rows = []
    for weights, raw, x, expected, label in fits:
        if raw.empty or raw[x].nunique() < 2:
            continue
        # Per seed (random) or per trained potential (trained), one slope across the sweep.
        group = ["method", "seed"] if weights == "random" else ["method", "seed", "width"]
        slopes = _slopes(raw, x, group)
        entries = [
            (method, slopes[slopes["method"] == method], "slope", expected[method])
            for method in METHODS
        ]
        if x == "width":
            one = slopes[slopes["method"] == "forward_euler"]
            entries.append(("stiffness rho^2", one, "rho2_slope", 1.0))
        for method, mine, column, want in entries:
            mean, lo, hi = mean_ci(mine[column].to_numpy())
            rows.append(
                {
                    "weights": weights,
                    "against": label,
                    "method": method,
                    "exponent": mean,
                    "ci95_low": lo,
                    "ci95_high": hi,
                    "expected": want,
                    "expected_in_ci": bool(lo <= want <= hi),
                    "theory_exponent": (
                        float(mine["theory_slope"].mean()) if column == "slope" else float("nan")
                    ),
                    "rho2_exponent": (
                        float(mine["rho2_slope"].mean()) if x == "width" else float("nan")
                    ),
                    "fits": len(mine),
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


def plot(
    random: pd.DataFrame,
    trained: pd.DataFrame,
    stiffness: pd.DataFrame,
    band: float,
    path: Path,
) -> None:
    """Panels: L* against rho T for random weights (points: seeds and widths), theory lines;
    L* against width; trained weights against rho T; rho^2 / (2 w) against width with
    Johnstone's finite-n prediction (the source of the finite-width bias)."""
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
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
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
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
    ax = axes[3]
    w = stiffness["width"].to_numpy(float)
    mean = stiffness["rho2_over_2w"].to_numpy(float)
    ax.errorbar(
        w,
        mean,
        yerr=[mean - stiffness["ci95_low"], stiffness["ci95_high"] - mean],
        fmt="o-",
        capsize=3,
        label="measured (mean, 95% CI)",
    )
    ax.plot(w, stiffness["johnstone"], "--", label="Johnstone 2001, mu + sigma E[TW1]")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width w")
    ax.set_ylabel("rho^2 / (2 w) = sigma_max(K)^2 / (4 n)")
    ax.set_title("stiffness: finite-width deficit", loc="left")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (seconds)")
    parser.add_argument("--out", type=Path, default=Path("analysis/results/depth_stability_map"))
    parser.add_argument("--horizon", type=float, default=4.0, help="T = h L, random weights")
    parser.add_argument("--band", type=float, default=10.0, help="stability band factor c")
    parser.add_argument("--seeds", type=int, default=None, help="CFL seeds per width")
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="CFL widths")
    parser.add_argument("--stiffness-seeds", type=int, default=None)
    parser.add_argument("--stiffness-widths", type=int, nargs="+", default=None)
    parser.add_argument("--trained-widths", type=int, nargs="+", default=None)
    parser.add_argument("--trained-seeds", type=int, default=None)
    parser.add_argument("--trained-horizons", type=float, nargs="+", default=None)
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument(
        "--large-width",
        type=int,
        default=1024,
        help="asymptotic width fit uses widths >= this (Johnstone: rho^2 local exponent < 1.01)",
    )
    parser.add_argument(
        "--refit", action="store_true", help="redo tables and figure from --out/*.csv"
    )
    _docs.add_write_docs_argument(parser, DOCS_PAGE)
    args = parser.parse_args(argv)
    if args.quick:
        defaults = {
            "seeds": 3,
            "widths": [16, 32, 64],
            "stiffness_seeds": 4,
            "stiffness_widths": [16, 32, 64, 128],
            "trained_widths": [16],
            "trained_seeds": 2,
            "trained_horizons": [4.0, 8.0],
            "train_steps": 50,
        }
    else:
        defaults = {
            "seeds": 8,
            "widths": [16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
            "stiffness_seeds": 16,
            "stiffness_widths": [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192],
            "trained_widths": [16, 64, 256],
            "trained_seeds": 3,
            "trained_horizons": [4.0, 8.0, 16.0, 32.0],
            "train_steps": 400,
        }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any(w % 2 for w in [*args.widths, *args.trained_widths, *args.stiffness_widths]):
        parser.error("widths must be even (state = (q, p) halves)")
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the study, write figure + CSVs + markdown under --out; returns the fit table."""
    args = parse(argv)
    # with --write-docs: the page must hold this command's block, checked before measuring
    docs = _docs.docs_command(DOCS_PAGE, __file__, argv) if args.write_docs else None
    # Elementwise ops on small batches and one eigvalsh per matrix: one thread is fastest per
    # core and does not oversubscribe shared machines.
    torch.set_num_threads(1)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.refit:
        seeds = pd.read_csv(args.out / "seeds.csv")
        random = seeds[seeds["weights"] == "random"].dropna(axis=1, how="all")
        trained = seeds[seeds["weights"] == "trained"]
        stiffness = pd.read_csv(args.out / "stiffness.csv")
    else:
        # One eigendecomposition per matrix, shared by the stiffness study and the CFL runs
        # (which use the first --seeds spectra of each width).
        spectra = {
            w: stiffness_spectra(
                w, max(args.stiffness_seeds, args.seeds if w in args.widths else 0)
            )
            for w in sorted({*args.stiffness_widths, *args.widths})
        }
        print(f"spectra: {time.perf_counter() - start:.1f} s", flush=True)
        stiffness = stiffness_table(
            {w: spectra[w][: args.stiffness_seeds] for w in args.stiffness_widths}
        )
        stiffness.to_csv(args.out / "stiffness.csv", index=False)
        random = run_random(args, spectra)
        trained = run_trained(args)
        pd.concat([random, trained]).to_csv(args.out / "seeds.csv", index=False)
    fits = fit_table(random, trained, args.large_width)
    table = summary(random)
    table.to_csv(args.out / "table.csv", index=False)
    fits.to_csv(args.out / "fit.csv", index=False)
    plot(random, trained, stiffness, args.band, args.out / "stability_map.png")
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
    seconds = time.perf_counter() - start
    text = "\n\n".join(
        [
            f"## smallest stable depth at fixed horizon (T={args.horizon:g}, band c={args.band:g}, "
            f"{random['seed'].nunique()} seeds)",
            markdown_table(table),
            "### fitted exponents (mean over seeds, 95% t-interval)",
            markdown_table(fits),
            "### stiffness rho^2 / (2 w) against width (eigenvalues only)",
            markdown_table(stiffness),
            "### trained potentials",
            markdown_table(trained_summary),
        ]
    )
    (args.out / "table.md").write_text(text + "\n")
    if docs is not None:
        _docs.write_docs(DOCS_PAGE, docs, docs_body(text), stamp=_docs.machine_stamp(threads=1))
    print(text)
    print(f"\nwrote {args.out} in {seconds:.1f} s")
    return fits


def docs_body(text: str) -> str:
    """``table.md``'s markdown for a docs block: its ``## `` title as a plain line and its
    ``### `` table headings in bold (the page's own headings stay the page's)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("### "):
            line = f"**{line[4:]}**"
        elif line.startswith("## "):
            line = line[3:]
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
