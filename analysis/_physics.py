"""Shared pieces of the physics studies (momentum theory, decay shares, per-unit and matrix
charges, NLD's equation of motion, BatchNorm's eps): a float64 training loop that hands every
step's (q_n, g_n, q_{n+1}) to a callback, signed inner products over a symmetry's tensors, and
writing a table. These studies read the optimizer's real steps directly (no monitor), so that
they check the theory modules of :mod:`noether_dyn.quantities` against torch's own updates.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from analysis._common import mixture
from benchmarks import _docs
from noether_dyn.depth.tables import markdown_table
from noether_dyn.symmetries.symmetry import Symmetry

Tensors = dict[str, torch.Tensor]
DOCS_PAGE = "docs/physics.md"


def signed_dot(
    sym: Symmetry, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]
) -> float:
    """``<a, b>_S = sum_A s_A <a_A, b_A>`` over the symmetry's tensors (float64 host float)."""
    return float(
        sum(
            s * torch.dot(a[n].reshape(-1), b[n].reshape(-1)) for n, s in zip(sym.params, sym.signs)
        )
    )


def signed_sum(sym: Symmetry, a: Mapping[str, torch.Tensor]) -> float:
    """``<a, 1>_S`` over the symmetry's tensors."""
    return float(sum(s * a[n].sum() for n, s in zip(sym.params, sym.signs)))


def charge(sym: Symmetry, q: Mapping[str, torch.Tensor]) -> float:
    """Q = <q, q>_S (scale, rescale) or <q, 1>_S (translation)."""
    return signed_sum(sym, q) if sym.kind == "translation" else signed_dot(sym, q, q)


@dataclass
class Step:
    """One optimizer step: index n, parameters before (q) and after (q1), the loss gradient g
    (without weight decay) at q, and the optimizer itself (its state after the step)."""

    n: int
    q: Tensors
    q1: Tensors
    g: Tensors
    optimizer: torch.optim.Optimizer

    def dq(self, name: str) -> torch.Tensor:
        return self.q1[name] - self.q[name]


def run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    batch: int = 32,
    seed: int = 0,
    dim: int = 6,
    classes: int = 4,
    schedule: Callable[[int], float] | None = None,
    on_step: Callable[[Step], None] | None = None,
    full_batch: bool = False,
    n_data: int = 256,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Train on seeded minibatches of a Gaussian mixture (float64 when the model is), calling
    ``on_step`` after every step. ``schedule(n)`` sets every group's lr before step n."""
    dtype = next(model.parameters()).dtype
    x, y = mixture(n_data, dim, classes, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    loss_fn = loss_fn or nn.functional.cross_entropy
    named = dict(model.named_parameters())
    for n in range(steps):
        if schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = schedule(n)
        idx = (
            torch.arange(n_data)
            if full_batch
            else torch.randint(0, n_data, (batch,), generator=gen)
        )
        optimizer.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        q = {k: p.detach().clone() for k, p in named.items()}
        g = {k: p.grad.detach().clone() for k, p in named.items() if p.grad is not None}
        optimizer.step()
        if on_step is not None:
            q1 = {k: p.detach().clone() for k, p in named.items()}
            on_step(Step(n, q, q1, g, optimizer))


class DocsBlock:
    """A study's tables for its generated block in docs/physics.md (``benchmarks/_docs.py``).

    Made right after parsing: with ``--write-docs`` the page must hold exactly one block of this
    command line (else :class:`benchmarks._docs.DocsError`, before anything is measured); without
    it :meth:`write` does nothing. :func:`write_table` adds each table under its title."""

    def __init__(self, args: argparse.Namespace, script: str, argv: list[str] | None) -> None:
        write = getattr(args, "write_docs", False)
        self.command = _docs.docs_command(DOCS_PAGE, script, argv) if write else None
        self.tables: list[tuple[str, pd.DataFrame]] = []

    def write(self) -> None:
        """Rewrite the block: each table under its title in bold, stamped with the machine."""
        if self.command is None:
            return
        body = "\n\n".join(f"**{title}**\n\n{markdown_table(df)}" for title, df in self.tables)
        stamp = _docs.machine_stamp(threads=torch.get_num_threads(), load_note=None)
        _docs.write_docs(DOCS_PAGE, self.command, body, stamp=stamp)


def write_table(
    df: pd.DataFrame, out: Path, title: str, command: str, docs: DocsBlock | None = None
) -> None:
    """``table.csv`` and ``table.md`` (a titled markdown table with the command that made it);
    ``docs`` also keeps the table for the study's docs block (:class:`DocsBlock`)."""
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "table.csv", index=False)
    if docs is not None:
        docs.tables.append((title, df))
    text = f"## {title}\n\nRegenerate: `{command}`\n\n{markdown_table(df)}\n"
    (out / "table.md").write_text(text)


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The studies' shared command line: ``--quick`` (CI size), ``--out`` and ``--write-docs``
    (see :class:`DocsBlock`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="CI-sized run (seconds)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / default_out))
    _docs.add_write_docs_argument(p, DOCS_PAGE)
    return p
