"""Shared pieces of the charge studies: synthetic data, a small BatchNorm MLP, a watched training
loop, and writing a study's table and figure.

The studies (``analysis/charges_sgd.py``, ``translation_adam.py``, ``filter_norm_ablation.py``,
``angular_equilibrium.py``) hold noether-dyn's measurements to Kunin et al., "Neural Mechanics"
(ICLR 2021), Tanaka & Kunin, "Noether's Learning Dynamics" (NeurIPS 2021), Wan et al., "Spherical
Motion Dynamics" (NeurIPS 2021) and Kosson et al., "Rotational Equilibrium" (ICML 2024). Each
trains through :func:`noether_dyn.watch` and reads its numbers back with
:func:`noether_dyn.load_run`, so the studies exercise the toolkit end to end.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import noether_dyn as nd  # noqa: E402
from noether_dyn.depth.tables import markdown_table  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # the scripts run as ``python analysis/<study>.py``
    sys.path.insert(0, str(_ROOT))
from benchmarks import _docs  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def mixture(
    n: int,
    dim: int,
    classes: int,
    *,
    seed: int,
    sample: int = 0,
    separation: float = 2.0,
    label_noise: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` seeded draws of a Gaussian mixture: ``classes`` means N(0, separation^2/dim I)
    (|mean| ~ separation) fixed by ``seed``, unit isotropic noise, and a fraction
    ``label_noise`` of labels replaced by uniform random ones (keeps minibatch gradients noisy
    late in training). Different ``sample`` values give independent sets (train, test) of the
    same mixture."""
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed))
    means *= separation / math.sqrt(dim)
    gen = torch.Generator().manual_seed(10_007 * seed + 101 * sample + 1)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = means[y] + torch.randn(n, dim, generator=gen)
    flip = torch.rand(n, generator=gen) < label_noise
    y = torch.where(flip, torch.randint(0, classes, (n,), generator=gen), y)
    return x.to(dtype), y


class BNMLP(nn.Module):
    """``x -> fc1 -> bn1 -> relu -> fc2 -> [bn2] -> relu -> head`` (softmax cross-entropy).

    Symmetries (docs/theory.md §3): ``fc1.weight`` (and ``fc2.weight`` with ``bn2``) are
    scale-invariant (they feed BatchNorm, and have no bias); without ``bn2`` each hidden unit of
    ``fc2`` is rescale-invariant between ``(fc2.weight, fc2.bias)`` and ``head.weight`` (ReLU is
    positively homogeneous); ``(head.weight, head.bias)`` is translation-invariant per input column
    (softmax). :meth:`symmetries` declares them by hand.
    """

    def __init__(self, dim: int, width: int, classes: int, bn2: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, width, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, width, bias=not bn2)
        self.bn2 = nn.BatchNorm1d(width) if bn2 else nn.Identity()
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.fc1(x)))
        return self.head(torch.relu(self.bn2(self.fc2(h))))

    @property
    def has_bn2(self) -> bool:
        return isinstance(self.bn2, nn.BatchNorm1d)

    def symmetries(self, kinds: Sequence[str] = ("scale", "rescale", "translation")) -> list:
        """The model's symmetries as ``noether_dyn.Symmetry`` records, restricted to ``kinds``."""
        out = []
        if "scale" in kinds:
            out.append(nd.Symmetry("scale:fc1", "scale", ("fc1.weight",)))
            if self.has_bn2:
                out.append(nd.Symmetry("scale:fc2", "scale", ("fc2.weight",)))
        if "rescale" in kinds and not self.has_bn2:
            out.append(
                nd.Symmetry(
                    "rescale:fc2", "rescale", ("fc2.weight", "fc2.bias", "head.weight"), (1, 1, -1)
                )
            )
        if "translation" in kinds:
            out.append(nd.Symmetry("translation:head", "translation", ("head.weight", "head.bias")))
        return out


def make_model(
    dim: int, width: int, classes: int, *, bn2: bool, seed: int, dtype: torch.dtype
) -> BNMLP:
    """A :class:`BNMLP` with a seeded PyTorch default init, cast to ``dtype``."""
    torch.manual_seed(seed)
    return BNMLP(dim, width, classes, bn2=bn2).to(dtype)


@dataclass
class Trained:
    """What :func:`train` returns: the run read back, its wall time, and per-step records that
    the ``after_step`` callback returned (empty when none)."""

    run: nd.Run
    seconds: float
    records: list[dict] = field(default_factory=list)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    run_dir: Path,
    *,
    steps: int,
    batch: int,
    seed: int,
    symmetries: Sequence[nd.Symmetry],
    after_step: Callable[[int], dict | None] | None = None,
    snapshot: bool = True,
) -> Trained:
    """Train ``model`` on random minibatches (sampled with replacement, seeded) of ``(x, y)``
    under ``noether_dyn.watch`` (every step logged), and read the run back.

    ``after_step(n)``, if given, runs after ``optimizer.step()`` of step n (outside the
    optimizer, so outside the monitor's view); a dict it returns is kept in ``records``.
    ``snapshot`` is passed to ``watch``: True (the default here) takes dq_n = q_{n+1} - q_n from
    a copy of the parameters, so the exact identities of docs/theory.md §3.1-3.2 hold to the
    rounding of
    the reductions; False rebuilds dq_n from the optimizer's state (the toolkit's default), which
    misses the rounding of q_{n+1} = q_n + dq_n.
    """
    gen = torch.Generator().manual_seed(seed)
    records: list[dict] = []
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread beats two contending ones
    start = time.perf_counter()
    try:
        _loop(
            model,
            optimizer,
            x,
            y,
            run_dir,
            steps,
            batch,
            gen,
            symmetries,
            after_step,
            snapshot,
            records,
        )
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    return Trained(nd.load_run(run_dir), seconds, records)


def _loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    run_dir: Path,
    steps: int,
    batch: int,
    gen: torch.Generator,
    symmetries: Sequence[nd.Symmetry],
    after_step: Callable[[int], dict | None] | None,
    snapshot: bool,
    records: list[dict],
) -> None:
    """The watched training loop of :func:`train`."""
    loss_fn = nn.CrossEntropyLoss()
    with nd.watch(
        model,
        optimizer,
        run_dir,
        symmetries=symmetries,
        overwrite=True,
        flush_every=1000,
        snapshot=snapshot,
    ) as monitor:
        for n in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            loss = loss_fn(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            monitor.log_loss(loss)
            optimizer.step()
            if after_step is not None:
                record = after_step(n)
                if record is not None:
                    records.append(record)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy loss, accuracy) of ``model`` in eval mode (BatchNorm running statistics)."""
    was_training = model.training
    model.eval()
    logits = model(x)
    loss = float(nn.functional.cross_entropy(logits, y))
    acc = float((logits.argmax(1) == y).double().mean())
    model.train(was_training)
    return loss, acc


def parser(description: str, study: str, docs_page: str | None = None) -> argparse.ArgumentParser:
    """The options every study shares: ``--quick``, ``--out``, ``--runs``, ``--seed``; with
    ``docs_page`` also ``--write-docs`` (see :func:`docs_command` and :func:`write_results`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="CI-sized run (a few seconds)")
    p.add_argument("--out", type=Path, default=Path("analysis/results") / study)
    p.add_argument(
        "--runs",
        type=Path,
        default=None,
        help="keep the noether-dyn run stores here (default: a temporary directory)",
    )
    p.add_argument("--seed", type=int, default=0)
    if docs_page is not None:
        _docs.add_write_docs_argument(p, docs_page)
        p.set_defaults(docs_page=docs_page)
    return p


def docs_command(
    args: argparse.Namespace, script: str, argv: Sequence[str] | None
) -> tuple[str, str] | None:
    """``(page, command)`` of this run's generated block when ``--write-docs`` was given (checked
    before training: the page must hold a block of exactly this command line), else None. Pass
    it to :func:`write_results` as ``docs``."""
    if not getattr(args, "write_docs", False):
        return None
    return args.docs_page, _docs.docs_command(args.docs_page, script, argv)


class RunDirs:
    """Run directories under ``--runs``, or under a temporary directory removed on close."""

    def __init__(self, root: Path | None) -> None:
        self._tmp = None if root is not None else tempfile.TemporaryDirectory(prefix="nd-study-")
        self.root = Path(root) if root is not None else Path(self._tmp.name)

    def __call__(self, name: str) -> Path:
        return self.root / name

    def __enter__(self) -> RunDirs:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def write_results(
    out: Path,
    title: str,
    tables: dict[str, pd.DataFrame],
    fig: plt.Figure,
    figure_name: str,
    notes: Sequence[str] = (),
    docs: tuple[str, str] | None = None,
) -> str:
    """Write each table as ``<name>.csv``, all of them as ``table.md`` (under ``title``, with
    ``notes``), and the figure as ``figure_name``; print and return the markdown. ``docs``
    (from :func:`docs_command`) also rewrites that block of the docs page with the same tables
    and notes, stamped with the machine and date (``benchmarks/_docs.py``)."""
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
        parts += [f"**{name}**", "", markdown_table(table), ""]
    parts += list(notes)
    body = "\n".join(parts).rstrip() + "\n"
    if docs is not None:
        _docs.write_docs(docs[0], docs[1], body, stamp=_docs.machine_stamp(threads=1))
    text = f"## {title}\n\n{body}"
    (out / "table.md").write_text(text)
    fig.savefig(out / figure_name, dpi=120)
    plt.close(fig)
    print(text)
    return text
