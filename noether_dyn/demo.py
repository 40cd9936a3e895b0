"""The demo: a normalized network under SGD + momentum + weight decay against its un-normalized
twin under RMSprop, trained on data generated here (no download), then compared (docs/theory.md §4).

* ``normalized``: MLP fc1-bn1-relu-fc2-bn2-relu-fc3-bn3-relu-head, SGD(lr 0.1, momentum 0.9).
  fc1 sits in a param group without weight decay, the rest use weight decay 5e-3: the report then
  shows both regimes of docs/theory.md §4, r^4 accumulating like Adagrad's sum (fc1) and like
  RMSprop's
  moving average with rho_eff = 1 - 4 eta lambda/(1-beta) = 0.98 (fc2, fc3).
* ``rmsprop``: the same layers without BatchNorm, RMSprop(lr 1e-3, alpha 0.99).

The data: 4096 points in 32 dimensions labelled into 10 classes by a fixed random tanh teacher.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from noether_dyn.capture import watch
from noether_dyn.symmetries.symmetry import Symmetry

N_SAMPLES, N_FEATURES, N_CLASSES, HIDDEN, BATCH = 4096, 32, 10, 64, 128


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (N_SAMPLES, N_FEATURES) and labels from a random two-layer tanh teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, N_FEATURES, generator=g)
    w1 = torch.randn(N_FEATURES, 64, generator=g) / N_FEATURES**0.5
    w2 = torch.randn(64, N_CLASSES, generator=g) / 8.0
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    return x, y


def mlp(normalized: bool, seed: int = 0) -> nn.Sequential:
    """The demo MLP; ``normalized`` adds BatchNorm after each hidden linear layer. Parameter
    names (fc1, bn1, ..., head) match between the twins."""
    torch.manual_seed(seed)
    layers: list[tuple[str, nn.Module]] = []
    width = N_FEATURES
    for i in (1, 2, 3):
        layers.append((f"fc{i}", nn.Linear(width, HIDDEN)))
        if normalized:
            layers.append((f"bn{i}", nn.BatchNorm1d(HIDDEN)))
        layers.append((f"act{i}", nn.ReLU()))
        width = HIDDEN
    layers.append(("head", nn.Linear(HIDDEN, N_CLASSES)))
    return nn.Sequential(OrderedDict(layers))


def declared_symmetries(normalized: bool) -> list[Symmetry]:
    """The demo models' symmetries written out, used only if automatic detection fails."""
    syms = []
    for i in (1, 2, 3):
        nxt = f"fc{i + 1}.weight" if i < 3 else "head.weight"
        if normalized:
            syms.append(Symmetry(f"scale:fc{i}", "scale", (f"fc{i}.weight", f"fc{i}.bias")))
            src = f"bn{i}"
        else:
            src = f"fc{i}"
        syms.append(
            Symmetry(f"rescale:{src}", "rescale", (f"{src}.weight", f"{src}.bias", nxt), (1, 1, -1))
        )
    syms.append(Symmetry("translation:head", "translation", ("head.weight", "head.bias")))
    return syms


class ProgressBar:
    """A plain text progress bar on a stream (stderr by default), no dependency."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, width: int = 30):
        self.total, self.label, self.width = max(1, total), label, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = -1.0
        self._start = time.monotonic()

    def update(self, done: int, loss: float | None = None) -> None:
        """Show ``done`` of ``total`` (redrawn at most 10 times a second on a terminal, every
        10% otherwise)."""
        now = time.monotonic()
        final = done >= self.total
        if self.tty and not final and now - self._last < 0.1:
            return
        if not self.tty and not final and done % max(1, self.total // 10):
            return
        self._last = now
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        extra = f" loss {loss:.3f}" if loss is not None else ""
        line = f"{self.label:<11} [{bar}] {done}/{self.total}{extra} {now - self._start:5.1f}s"
        self.stream.write(
            ("\r" if self.tty else "") + line + ("" if self.tty and not final else "\n")
        )
        self.stream.flush()


def train_run(
    run_dir: Path,
    normalized: bool,
    steps: int,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    label: str,
    stream: TextIO | None = None,
) -> Path:
    """Train one demo model for ``steps`` minibatch steps under ``watch``; returns the run dir.

    Symmetries are detected from the model (``watch(..., inputs=, targets=, loss_fn=)``); if
    detection raises, the declared ones of :func:`declared_symmetries` are verified and used.
    """
    x, y = make_data()
    model = mlp(normalized)
    optimizer = make_optimizer(model)
    loss_fn = nn.CrossEntropyLoss()
    sample = dict(inputs=x[:256], targets=y[:256], loss_fn=loss_fn)
    try:
        monitor = watch(model, optimizer, run_dir, overwrite=True, **sample)
    except Exception as exc:  # detection is optional: fall back to the written-out symmetries
        print(
            f"noether-dyn demo: symmetry detection failed ({type(exc).__name__}: {exc}); "
            "using the demo's declared symmetries",
            file=stream or sys.stderr,
        )
        monitor = watch(
            model,
            optimizer,
            run_dir,
            overwrite=True,
            symmetries=declared_symmetries(normalized),
            **sample,
        )
    bar = ProgressBar(steps, label, stream)
    g = torch.Generator().manual_seed(1)
    with monitor:
        for step in range(steps):
            idx = torch.randint(0, N_SAMPLES, (BATCH,), generator=g)
            loss = loss_fn(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            monitor.log_loss(loss)
            optimizer.step()
            bar.update(step + 1, loss.item() if (step + 1) % 10 == 0 or step + 1 == steps else None)
    return run_dir


def sgd_normalized(model: nn.Module) -> torch.optim.Optimizer:
    """SGD + momentum; fc1 without weight decay, every other parameter with 5e-3."""
    first = [p for n, p in model.named_parameters() if n.startswith("fc1.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("fc1.")]
    return torch.optim.SGD(
        [{"params": first, "weight_decay": 0.0}, {"params": rest}],
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-3,
    )


def rmsprop_twin(model: nn.Module) -> torch.optim.Optimizer:
    """RMSprop without momentum or weight decay."""
    return torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.99)


def run_demo(
    out: str | Path = "noether-demo", steps: int = 1000, stream: TextIO | None = None
) -> dict[str, Path]:
    """Train both demo runs under ``out`` and write the comparison report (HTML and Markdown).

    Returns the paths: ``normalized``, ``rmsprop`` (run directories), ``html``, ``md``.
    """
    from noether_dyn.report.compare import compare_document
    from noether_dyn.report.render import write_document
    from noether_dyn.store import load_run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 128 x 64: more threads only spin on a busy machine
    try:
        a = train_run(out / "normalized", True, steps, sgd_normalized, "normalized", stream)
        b = train_run(out / "rmsprop", False, steps, rmsprop_twin, "rmsprop", stream)
    finally:
        torch.set_num_threads(threads)
    doc = compare_document(load_run(a), load_run(b))  # figures rendered once, written twice
    html = write_document(doc, out / "report.html")
    md = write_document(doc, out / "report.md")
    return {"normalized": a, "rmsprop": b, "html": html, "md": md}
