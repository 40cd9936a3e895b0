"""Deep classifiers on two spirals: what a plain tanh MLP, a forward-Euler ResNet and a symplectic
net each tolerate, read through gradient transmission and sigma_min / sigma_max per layer.

docs/theory.md §5; Haber & Ruthotto, "Stable architectures for deep neural networks" (2018).
Each model is embed (Linear 2 -> dim) -> body of ``depth`` layers -> head (Linear dim -> 2):

* ``tanh_mlp``: TanhMLP (y <- tanh(W y + b), default nn.Linear init); no step size.
* ``euler_resnet``: EulerResNet, y <- y + h tanh(W y + b), W ~ N(0, 1/dim).
* ``symplectic``: SymplecticNet of order 1 (symplectic Euler, the same cost and order as the
  Euler layer), T = |p|^2/2 and a learned log-cosh potential per layer.

The step h is the same for both residual nets and is *not* tied to the depth: the sweep crosses
depth (16 to 256) with h (0.1 to 1), so the horizon T = h L grows with both. Every run trains
with full-batch Adam (float32) on the same data; diagnostics are taken in float64 on 32 training
points at initialisation, halfway and at the end (:func:`noether_dyn.depth.profile` and, for the
Euler ResNet, :func:`noether_dyn.depth.stability_profile`):

* ``transmission_0``: |dL/dy_0| / |dL/dy_L|, the cross-entropy gradient reaching the body's
  input relative to its output (1 = lossless);
* ``sigma_max_0``, ``sigma_min_0``: extreme singular values of M_0 = dy_L/dy_0 (worst case over
  the 32 points). A symplectic body certifies sigma_max >= 1, and its singular values come in
  pairs (s, 1/s), so sigma_min = 1/sigma_max: gradients cannot vanish in *every* direction, but
  they do vanish along contracting ones when sigma_max is large;
* ``stability_max``, ``h_max_min`` (Euler only): the largest factor max|1 + h lambda| over the
  layers and the smallest largest-stable-step over the layers.

The ``tolerated`` table gives, per model and depth, the largest h of the sweep at which the
test accuracy stays >= 0.9. Data: two interleaved spirals generated here with numpy (seeded).

Run: ``python analysis/depth_deep_classifier.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
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

from noether_dyn.depth import (  # noqa: E402
    EulerResNet,
    SymplecticNet,
    TanhMLP,
    profile,
    stability_profile,
)
from noether_dyn.depth.tables import markdown_table  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run as ``python analysis/depth_deep_classifier.py``
    sys.path.insert(0, str(_ROOT))
from benchmarks import _docs  # noqa: E402

DOCS_PAGE = "docs/depth.md"

MODELS = ("tanh_mlp", "euler_resnet", "symplectic")
PASS_ACC = 0.9


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
        """(batch, 2) -> logits (batch, 2)."""
        return self.head(self.body(self.embed(x)))


def build(model: str, depth: int, h: float, dim: int) -> Classifier:
    """The classifier for ``model`` with a body of ``depth`` layers (step h for residual nets)."""
    if model == "tanh_mlp":
        body: nn.Module = TanhMLP(dim, depth)
    elif model == "euler_resnet":
        body = EulerResNet(dim, depth, h=h)
    else:
        body = SymplecticNet(dim, depth, 1, h=h)
    return Classifier(body, dim)


def diagnose(clf: Classifier, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, pd.DataFrame]:
    """Float64 per-layer profile of the body on (x, y) under the cross-entropy loss; returns the
    layer-0 summary and the per-layer table."""
    c64 = copy.deepcopy(clf).double()
    with torch.no_grad():
        y0 = c64.embed(x.double())

    def loss(out: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(c64.head(out), y)

    with torch.no_grad():
        prof = profile(c64.body, y0, loss)
    summary = {
        "transmission_0": float(prof["transmission"].iloc[0]),
        "sigma_max_0": float(prof["sigma_max"].iloc[0]),
        "sigma_min_0": float(prof["sigma_min"].iloc[0]),
        "stability_max": float("nan"),
        "h_max_min": float("nan"),
    }
    if isinstance(c64.body, EulerResNet):
        stab = stability_profile(c64.body, y0)
        summary["stability_max"] = float(stab["stability"].max())
        summary["h_max_min"] = float(stab["h_max"].min())
    return summary, prof


def accuracy(clf: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        out = clf(x)
        return float((out.argmax(-1) == y).float().mean()) if torch.isfinite(out).all() else 0.5


def train_one(
    model: str, depth: int, h: float, args: argparse.Namespace, data: tuple[torch.Tensor, ...]
) -> tuple[list[dict], list[dict]]:
    """Train one configuration; rows at each diagnosed step, and per-layer profile rows."""
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(args.seed)
    clf = build(model, depth, h, args.dim)
    opt = torch.optim.Adam(clf.parameters(), lr=args.lr)
    probe = (x_tr[:32], y_tr[:32])
    checks = {0, args.steps // 2, args.steps}
    rows, layers = [], []
    key = {"model": model, "depth": depth, "h": h if model != "tanh_mlp" else float("nan")}
    loss = torch.tensor(float("nan"))
    for step in range(args.steps + 1):
        if step in checks:
            summary, prof = diagnose(clf, *probe)
            rows.append(
                {
                    **key,
                    "step": step,
                    "loss": float(loss.detach()),
                    **summary,
                    "train_acc": accuracy(clf, x_tr, y_tr),
                    "test_acc": accuracy(clf, x_te, y_te),
                }
            )
            layers += [{**key, "step": step, **r} for r in prof.to_dict("records")]
        if step == args.steps:
            break
        opt.zero_grad()
        loss = nn.functional.cross_entropy(clf(x_tr), y_tr)
        if not torch.isfinite(loss):
            rows.append(
                {
                    **key,
                    "step": step,
                    "loss": float(loss.detach()),
                    "train_acc": 0.5,
                    "test_acc": 0.5,
                }
            )
            break
        loss.backward()
        opt.step()
    return rows, layers


def tolerated(final: pd.DataFrame) -> pd.DataFrame:
    """Per model and depth: the largest h of the sweep with test accuracy >= PASS_ACC (0 when
    none passes; nan for the tanh MLP, which has no step)."""
    out = []
    for (model, depth), sub in final.groupby(["model", "depth"], sort=False):
        if model == "tanh_mlp":
            ok = bool((sub["test_acc"] >= PASS_ACC).any())
            out.append({"model": model, "depth": depth, "tolerated_h": float("nan"), "trains": ok})
            continue
        passing = sub[sub["test_acc"] >= PASS_ACC]["h"]
        out.append(
            {
                "model": model,
                "depth": depth,
                "tolerated_h": float(passing.max()) if len(passing) else 0.0,
                "trains": bool(len(passing)),
            }
        )
    return pd.DataFrame(out)


def plot(final: pd.DataFrame, layers: pd.DataFrame, path: Path) -> None:
    """Left: test accuracy over the (depth, h) sweep. Middle and right: per-layer sigma_max and
    sigma_min of M_j at the end of training for the deepest body at the largest h."""
    sns.set_theme(style="whitegrid")
    colors = dict(zip(MODELS, ["gray", *sns.color_palette("deep", 2)], strict=True))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    res = final[final["model"] != "tanh_mlp"]
    sns.lineplot(
        res,
        x="h",
        y="test_acc",
        hue="model",
        style="depth",
        markers=True,
        palette=colors,
        ax=axes[0],
    )
    for depth, sub in final[final["model"] == "tanh_mlp"].groupby("depth"):
        axes[0].axhline(float(sub["test_acc"].iloc[0]), color="gray", ls=":", lw=1)
        axes[0].text(
            res["h"].min(),
            float(sub["test_acc"].iloc[0]),
            f"tanh MLP, L={depth}",
            fontsize=7,
            va="bottom",
        )
    axes[0].set_xscale("log")
    axes[0].set_title("test accuracy after training", loc="left")
    deepest, h_big = layers["depth"].max(), layers["h"].max()
    last = layers[(layers["depth"] == deepest) & (layers["step"] == layers["step"].max())]
    last = last[(last["h"] == h_big) | last["h"].isna()]
    for ax, col in ((axes[1], "sigma_max"), (axes[2], "sigma_min")):
        for model, sub in last.groupby("model", sort=False):
            vals = sub[col].to_numpy(float)
            ax.plot(sub["layer"], np.clip(vals, 1e-300, None), color=colors[model], label=model)
        ax.set_yscale("log")
        ax.set_xlabel("layer j")
        ax.set_title(f"{col} of dy_L/dy_j, L={deepest}, h={h_big:g}, end", loc="left")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (seconds)")
    parser.add_argument("--out", type=Path, default=Path("analysis/results/depth_deep_classifier"))
    parser.add_argument("--depths", type=int, nargs="+", default=None)
    parser.add_argument("--hs", type=float, nargs="+", default=None, help="step sizes h")
    parser.add_argument("--steps", type=int, default=None, help="full-batch Adam steps")
    parser.add_argument("--dim", type=int, default=8, help="state size (even)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--n", type=int, default=500, help="training points")
    parser.add_argument("--seed", type=int, default=0)
    _docs.add_write_docs_argument(parser, DOCS_PAGE)
    args = parser.parse_args(argv)
    if args.quick:
        defaults = {"depths": [32], "hs": [0.1, 1.0], "steps": 40}
    else:
        defaults = {"depths": [16, 64, 256], "hs": [0.1, 0.3, 1.0], "steps": 120}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dim % 2:
        parser.error("--dim must be even (symplectic state = (q, p) halves)")
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the sweep, write figure + CSVs + markdown under --out; returns the final-step table."""
    args = parse(argv)
    # with --write-docs: the page must hold this command's block, checked before training
    docs = _docs.docs_command(DOCS_PAGE, __file__, argv) if args.write_docs else None
    # Tiny per-layer ops: one thread is fastest and avoids oversubscribing shared cores.
    torch.set_num_threads(1)
    # A vanishing tanh MLP drives activations into subnormal floats, ~100x slower on CPUs;
    # flushing them to zero changes no reported number above 1e-38.
    torch.set_flush_denormal(True)
    start = time.perf_counter()
    x_tr, y_tr = two_spirals(args.n, 0.02, args.seed)
    x_te, y_te = two_spirals(args.n, 0.02, args.seed + 1)
    data = (x_tr, y_tr, x_te, y_te)
    rows, layers = [], []
    for depth in args.depths:
        for model in MODELS:
            for h in args.hs if model != "tanh_mlp" else [math.nan]:
                r, lay = train_one(model, depth, h, args, data)
                rows += r
                layers += lay
    curves = pd.DataFrame(rows)
    layer_table = pd.DataFrame(layers)
    final = curves.groupby(["model", "depth", "h"], dropna=False, sort=False).tail(1)
    final = final.reset_index(drop=True)
    tol = tolerated(final)
    args.out.mkdir(parents=True, exist_ok=True)
    final.to_csv(args.out / "table.csv", index=False)
    curves.to_csv(args.out / "curves.csv", index=False)
    layer_table.to_csv(args.out / "layers.csv", index=False, float_format="%.6g")
    tol.to_csv(args.out / "tolerated.csv", index=False)
    plot(final, layer_table, args.out / "deep_classifier.png")
    init = curves[curves["step"] == 0][
        ["model", "depth", "h", "transmission_0", "sigma_max_0", "sigma_min_0"]
    ]
    text = "\n\n".join(
        [
            f"## deep classifiers on two spirals (dim={args.dim}, {args.steps} Adam steps)",
            "### end of training",
            markdown_table(final.drop(columns=["step"])),
            "### at initialisation",
            markdown_table(init),
            f"### largest h of the sweep with test accuracy >= {PASS_ACC}",
            markdown_table(tol),
        ]
    )
    (args.out / "table.md").write_text(text + "\n")
    if docs is not None:
        _docs.write_docs(DOCS_PAGE, docs, docs_body(text), stamp=_docs.machine_stamp(threads=1))
    print(text)
    print(f"\nwrote {args.out} in {time.perf_counter() - start:.1f} s")
    return final


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
