"""Shared pieces of the physics examples: a reference integrator for the training data, the plain
MLP map baseline, a full-batch fit and a rollout. Imported by the example scripts that sit next
to this file (``python examples/<name>.py`` puts examples/ on the import path)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

Field = Callable[[torch.Tensor], torch.Tensor]


def rk4_samples(field: Field, y0: torch.Tensor, dt: float, samples: int, substeps: int = 50):
    """States every ``dt`` from classical RK4 with step dt/substeps (reference data, error
    ~ (dt/substeps)^4 per unit time); y0 (..., d) -> (samples + 1, ..., d)."""
    h, ys, y = dt / substeps, [y0], y0
    for _ in range(samples):
        for _ in range(substeps):
            k1 = field(y)
            k2 = field(y + h / 2 * k1)
            k3 = field(y + h / 2 * k2)
            k4 = field(y + h * k3)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        ys.append(y)
    return torch.stack(ys)


class MLPMap(nn.Module):
    """y -> y + MLP(y) (two hidden tanh layers), an unconstrained learned time-dt map."""

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, dim),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        return y + self.net(y)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int = 300) -> float:
    """Full-batch L-BFGS (strong Wolfe) on the mean squared one-step error; returns the RMSE."""
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=iters,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        history_size=50,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean().sqrt())


def rollout(model: nn.Module, y0: torch.Tensor, steps: int) -> torch.Tensor:
    """Iterate the map ``steps`` times; y0 (d,) -> (steps + 1, d). Stops early (rows filled with
    nan) once the state is no longer finite."""
    out = torch.full((steps + 1, y0.shape[-1]), float("nan"), dtype=y0.dtype)
    with torch.no_grad():
        y = y0[None]
        out[0] = y0
        for n in range(steps):
            y = model(y)
            if not bool(torch.isfinite(y).all()):
                break
            out[n + 1] = y[0]
    return out


def max_rel(err: torch.Tensor) -> float:
    """Largest entry, inf if any is nan (a rollout that blew up)."""
    return float("inf") if bool(torch.isnan(err).any()) else float(err.max())


DOCS_PAGE = "docs/depth.md"


def _docs_module():
    """``benchmarks/_docs.py`` of this checkout (imported only when a command line is parsed)."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import _docs  # noqa: PLC0415 (the repo's docs helper, not a dependency)

    return _docs


def parse_args(
    description: str, script: str, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, str | None]:
    """An example's command line (``--write-docs`` only) and, with ``--write-docs``, the command
    of its generated block in docs/depth.md (checked before fitting: the page must hold exactly
    one block of this command line). ``argv`` None means no arguments (the tests call
    ``main()``); the scripts pass ``sys.argv[1:]``."""
    _docs = _docs_module()
    parser = argparse.ArgumentParser(description=description)
    _docs.add_write_docs_argument(parser, DOCS_PAGE)
    argv = [] if argv is None else list(argv)
    args = parser.parse_args(argv)
    return args, _docs.docs_command(DOCS_PAGE, script, argv) if args.write_docs else None


class Printed:
    """Prints each line it is given and keeps it: what an example writes into its docs block."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str) -> None:
        print(text)
        self.lines.append(text)

    def write_docs(self, command: str | None) -> None:
        """Write the kept lines into the block of ``command`` (None: do nothing), stamped with
        the machine, one thread."""
        if command is not None:
            _docs = _docs_module()
            stamp = _docs.machine_stamp(threads=1, load_note=None)
            _docs.write_docs(DOCS_PAGE, command, "\n".join(self.lines), stamp=stamp)
