"""Deep classifiers on two spirals: a plain tanh MLP's gradients vanish, a symplectic net trains.

THEORY.md §5. Each model is embed (Linear 2 -> dim) -> body of ``depth`` layers -> head
(Linear dim -> 2); the bodies are TanhMLP (default nn.Linear init), EulerResNet and SymplecticNet
(default Stormer-Verlet, learned T and V), same width and depth, h = t_final / depth for both
residual nets. Reported per model: the gradient norm reaching the first body layer's parameters
at initialisation (|dL/dtheta_1|, and the same for the last body layer; float64, since the tanh
MLP's underflows float32), sigma_max of the body's input-output Jacobian at init (worst case
over the batch, from :func:`noether_dyn.depth.profile`), and train/test accuracy after
full-batch Adam (float32). The data are generated here with numpy (seeded), no download.

Run: ``python analysis/depth_deep_classifier.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from noether_dyn.depth import EulerResNet, SymplecticNet, TanhMLP, profile  # noqa: E402
from noether_dyn.depth.tables import markdown_table  # noqa: E402

MODELS = ("tanh_mlp", "euler_resnet", "symplectic")


def two_spirals(n: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points (n/2 per class) on two interleaved spirals (1.5 turns), shapes (n, 2), (n,)."""
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.uniform(0.05, 1.0, n // 2)) * 3 * np.pi
    arm = np.stack([t * np.cos(t), t * np.sin(t)], 1) / (3 * np.pi)
    x = np.concatenate([arm, -arm]) + noise * rng.standard_normal((2 * (n // 2), 2))
    y = np.concatenate([np.zeros(n // 2), np.ones(n // 2)])
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


class Classifier(nn.Module):
    """embed -> body -> head; the body is one of the depth nets."""

    def __init__(self, body: nn.Module, dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(2, dim)
        self.body = body
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(x)))


def build(model: str, depth: int, args: argparse.Namespace) -> Classifier:
    h = args.t_final / depth
    if model == "tanh_mlp":
        body: nn.Module = TanhMLP(args.dim, depth)
    elif model == "euler_resnet":
        body = EulerResNet(args.dim, depth, h=h)
    else:
        body = SymplecticNet(args.dim, depth, args.order, h=h, kinetic=args.kinetic)
    return Classifier(body, args.dim)


def layer_grad_norms(clf: Classifier, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """|dL/dtheta| of the first and of the last body layer (all their parameters)."""
    clf.zero_grad()
    nn.functional.cross_entropy(clf(x), y).backward()

    def norm(layer: nn.Module) -> float:
        return float(torch.sqrt(sum((p.grad**2).sum() for p in layer.parameters())))

    out = norm(clf.body.layers[0]), norm(clf.body.layers[-1])
    clf.zero_grad()
    return out


def accuracy(clf: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((clf(x).argmax(-1) == y).float().mean())


def train_one(
    model: str, depth: int, args: argparse.Namespace, data: tuple[torch.Tensor, ...]
) -> tuple[dict[str, float | int | str], list[float]]:
    """Train one model; returns its result row and loss curve."""
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(args.seed)
    clf = build(model, depth, args)
    clf.double()  # init diagnostics in float64: the tanh MLP's gradient underflows float32
    g_first, g_last = layer_grad_norms(clf, x_tr.double(), y_tr)
    with torch.no_grad():
        prof = profile(clf.body, clf.embed(x_tr[:64].double()))
    clf.float()
    opt = torch.optim.Adam(clf.parameters(), lr=args.lr)
    losses = []
    start = time.perf_counter()
    for _ in range(args.steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(clf(x_tr), y_tr)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    row = {
        "model": model,
        "depth": depth,
        "grad_first_layer": g_first,
        "grad_last_layer": g_last,
        "sigma_max_body": float(prof["sigma_max"].iloc[0]),
        "train_acc": accuracy(clf, x_tr, y_tr),
        "test_acc": accuracy(clf, x_te, y_te),
        "final_loss": losses[-1],
        "train_s": time.perf_counter() - start,
    }
    return row, losses


def plot(curves: pd.DataFrame, table: pd.DataFrame, path: Path) -> None:
    """Loss curves per model and depth, and first-layer gradient norms at init."""
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    sns.lineplot(curves, x="step", y="loss", hue="model", style="depth", ax=axes[0])
    axes[0].set_yscale("log")
    axes[0].set_title("training loss (cross entropy)")
    sns.barplot(table, x="model", y="grad_first_layer", hue="depth", ax=axes[1])
    axes[1].set_yscale("log")
    axes[1].set_title("|dL/dtheta| of the first body layer at init")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (seconds)")
    parser.add_argument("--out", type=Path, default=Path("analysis/results/depth_deep_classifier"))
    parser.add_argument("--depths", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None, help="full-batch Adam steps")
    parser.add_argument("--dim", type=int, default=8, help="state size (even)")
    parser.add_argument("--t-final", type=float, default=4.0, help="total time depth * h")
    parser.add_argument("--order", type=int, default=2, help="SymplecticNet order (1, 2, 4)")
    parser.add_argument("--kinetic", default="learned", help="SymplecticNet kinetic energy")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--n", type=int, default=1000, help="training points")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    defaults = {"depths": [64], "steps": 60} if args.quick else {"depths": [64, 256], "steps": 150}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the study, write figure + CSVs under --out, print the markdown table; returns it."""
    args = parse(argv)
    # Tiny per-layer ops: one thread is fastest, and it avoids OpenMP oversubscription (10-50x
    # slowdowns) when the two cores are shared with other jobs.
    torch.set_num_threads(1)
    # A vanishing tanh MLP drives activations into subnormal floats, which are ~100x slower on
    # CPUs; flushing them to zero changes no reported number above 1e-38.
    torch.set_flush_denormal(True)
    start = time.perf_counter()
    x_tr, y_tr = two_spirals(args.n, 0.02, args.seed)
    x_te, y_te = two_spirals(args.n, 0.02, args.seed + 1)
    rows, curves = [], []
    for depth in args.depths:
        for model in MODELS:
            row, losses = train_one(model, depth, args, (x_tr, y_tr, x_te, y_te))
            rows.append(row)
            curves += [
                {"model": model, "depth": depth, "step": i, "loss": v} for i, v in enumerate(losses)
            ]
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    pd.DataFrame(curves).to_csv(args.out / "curves.csv", index=False)
    plot(pd.DataFrame(curves), table, args.out / "deep_classifier.png")
    print(f"## deep classifier on two spirals (dim={args.dim}, steps={args.steps})\n")
    print(markdown_table(table))
    print(f"\nwrote {args.out} in {time.perf_counter() - start:.1f} s")
    return table


if __name__ == "__main__":
    main()
