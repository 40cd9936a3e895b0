"""noether-dyn against Cockpit's economy preset: the time each adds to a training step.

Issue 18 asks the benchmark to compare against Cockpit (``cockpit-for-pytorch``, on BackPACK)
with its ``configuration("economy")`` quantities (Alpha, Distance, GradHist1d, GradNorm,
InnerTest, Loss, NormTest, OrthoTest, UpdateSize) tracked at every step, measured on the same
model in the same process. In one process, per model and optimizer, one model and one optimizer
take training steps (zero_grad, forward, loss, backward, ``opt.step()``) in rotating order,
one step per arm per round:

- ``plain``: no monitor;
- ``noether-dyn``: ``noether_dyn.watch(model, opt, run_dir)`` at every=1 with its default
  ``fused=None``, timed on the path a long run settles on (as ``overhead.run_case`` does: the
  planner is told it has seen ``COMPILE_AFTER_STEPS`` steps and paid the eager rent, so the
  background compile starts at the first step; the warm-up waits for it), with the symmetries
  ``find_symmetries`` detects on the model;
- ``noether-dyn eager``: the same with ``fused=False`` (no compile at all);
- ``cockpit``: ``Cockpit(model.parameters(), quantities=configuration("economy"))`` (schedule:
  every step), used as its documentation prescribes: BackPACK's ``extend`` on the model and on a
  ``CrossEntropyLoss`` module, the individual losses from ``CrossEntropyLoss(reduction="none")``,
  and ``with cockpit(step, info={"batch_size", "individual_losses", "loss", "optimizer"}):``
  around ``loss.backward(create_graph=cockpit.create_graph(step))``. Its own step counter runs
  over its own steps, so that every Cockpit step is tracked and its two-step quantities (Alpha,
  UpdateSize) pair consecutive Cockpit steps. ``extend`` registers forward and full backward
  hooks that would also slow the other arms (the forward hooks store every layer's input and
  output), so they are registered before each Cockpit step and removed after it, outside the
  timed region; the timed Cockpit step is that of a model extended for good.

The noether-dyn monitors share the optimizer the way ``benchmarks/small_models.py``'s do: their
hooks are attached for their own arm only. The default arm's background compile is waited for
before any other arm steps, so that the timed path does not depend on what ran beside the
compile. (This script found a race: with AdamW on the 1.86M MLP, a background compile whose
trace ran while the ``fused=False`` monitor of the same optimizer took its steps failed in 4 of
11 runs, "'NoneType' object has no attribute 'to'" in ``adam_count_rule``. FX tracing patches
process-wide state; the trace now runs in the training thread and only the compile in the
background, docs/performance.md.)

Cockpit's step costs seconds on the larger model (BackPACK's per-sample gradients, 128 x 1.86M
floats, and the statistics over them), so it takes part in every ``--cockpit-every``-th round
only (default 4; every round with ``--quick``), still in the rotated order, paired with that
round's plain step.

Each step's time is its thread CPU time (``time.thread_time``; on a CPU, autograd's backward runs
in the calling thread; with OMP_NUM_THREADS=1 the step runs in this thread only, and a shared
machine's descheduling is not counted). Printed per model and optimizer: the plain step (median,
ms), each monitor's added time per step (the median of the paired differences, monitor step
minus the same round's plain step, in ms and as a share of the plain step) and the ratio of
noether-dyn's added time to Cockpit's (default and eager path). ``fused``: whether the default
arm's compiled program ran.

The models: the overhead benchmark's MLP (784-1024-1024-10, batch 128) has BatchNorm. BackPACK
runs on it in train mode, but warns at every step that "results like individual gradients may not
be meaningful, as BatchNorm mixes samples" (checked with backpack-for-pytorch 1.7.1): the
per-sample quantities of the economy preset (GradHist1d, the gradient tests, Alpha's
projections) are then not what they claim. So every arm runs on the same MLP without BatchNorm
(784-1024-1024-10, ReLU, batch 128, 1.86M parameters) and on the 0.27M sweep MLP without
BatchNorm (256-400-400-10, batch 64); SGD with momentum 0.9 and AdamW (``overhead.OPTIMIZERS``;
Cockpit's economy quantities run with both: Alpha falls back from its BackPACK projection, which
covers plain SGD only, to its generic path).

Where Cockpit is not importable the script prints one line saying so (and how to install it next
to an existing torch) and times the noether-dyn arms only, the Cockpit columns left ``-``
(exit status 0); ``--write-docs`` then refuses, so that a docs block always holds both.

Run: ``OMP_NUM_THREADS=1 python benchmarks/cockpit_compare.py [--rounds N] [--cockpit-every K]
[--quick] [--write-docs]``; ``--quick`` is the wiring test (the 0.06M sweep MLP without
BatchNorm, SGD with momentum, 3 rounds, the eager arm only: no Inductor compile).
``--write-docs`` rewrites the table of this exact command line in docs/performance.md
(``benchmarks/_docs.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import noether_dyn as nd  # noqa: E402
from benchmarks._docs import (  # noqa: E402
    add_write_docs_argument,
    docs_command,
    machine_stamp,
    write_docs,
)
from benchmarks.overhead import OPTIMIZERS  # noqa: E402
from noether_dyn.capture.plan import COMPILE_AFTER_STEPS  # noqa: E402
from noether_dyn.symmetries.detect import find_symmetries  # noqa: E402

DOCS_PAGE = "docs/performance.md"
INSTALL = (
    "pip install --no-deps cockpit-for-pytorch backpack-for-pytorch einops json-tricks "
    "unfoldNd scipy"
)
SKIP_MESSAGE = (
    "cockpit_compare: Cockpit is not importable here ({reason}); timing the noether-dyn arms "
    f"only. To compare, install it into an environment that already has torch: {INSTALL}"
)
MONITORS = ("noether-dyn", "noether-dyn eager", "cockpit")
HEADER = (
    "| model | params | optimizer | step ms | noether-dyn | noether-dyn eager | cockpit economy "
    "| noether-dyn / cockpit | eager / cockpit | fused | rounds |"
)


def mlp(width: int, d_in: int, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A BatchNorm-free MLP d_in-width-width-10 with ReLU, a random batch ``(batch, d_in)`` and
    class labels ``(batch,)``."""
    model = nn.Sequential(
        nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )  # fmt: skip
    return model, torch.randn(batch, d_in), torch.randint(0, 10, (batch,))


MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]] = {
    "mlp": lambda: mlp(1024, 784, 128),  # overhead.mlp without BatchNorm: 1.86M parameters
    "mlp-250k": lambda: mlp(400, 256, 64),  # overhead.sweep_mlp(1) without BatchNorm: 0.27M
    "mlp-50k": lambda: mlp(150, 256, 64),  # overhead.sweep_mlp(0) without BatchNorm: 0.06M
}


def load_cockpit() -> tuple[Any, str]:
    """``(api, "")`` with ``api`` a namespace of ``Cockpit``, ``configuration``, ``extend`` and
    BackPACK's hook context ``CTX``; ``(None, reason)`` where Cockpit or BackPACK cannot be
    imported."""
    try:
        with warnings.catch_warnings():  # cockpit imports pkg_resources, which warns
            warnings.simplefilter("ignore")
            from backpack import extend
            from backpack.context import CTX
            from cockpit import Cockpit
            from cockpit.utils.configuration import configuration
    except Exception as exc:  # an ImportError, or a broken install's own error
        return None, f"{type(exc).__name__}: {exc}"
    api = argparse.Namespace(Cockpit=Cockpit, configuration=configuration, extend=extend, CTX=CTX)
    return api, ""


class CockpitArm:
    """Cockpit's economy preset on ``model``, every step tracked; BackPACK's hooks live only for
    the duration of :meth:`attach` ... :meth:`detach` (outside the timed region)."""

    def __init__(self, api: Any, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.api, self.model, self.opt = api, model, opt
        self.loss_fn = nn.CrossEntropyLoss()
        self.individual_loss_fn = nn.CrossEntropyLoss(reduction="none")
        self.cockpit = api.Cockpit(model.parameters(), quantities=api.configuration("economy"))
        self.global_step = 0

    def attach(self) -> None:
        """BackPACK's ``extend`` on the model and the loss module (forward and backward hooks)."""
        self.api.extend(self.model)
        self.api.extend(self.loss_fn)

    def detach(self) -> None:
        """Remove every hook ``extend`` registered and its marks, so that the model is plain."""
        self.api.CTX.remove_hooks()
        for module in [*self.model.modules(), self.loss_fn]:
            if hasattr(module, "_backpack_extend"):
                del module._backpack_extend

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One training step as Cockpit's documentation writes it."""
        self.opt.zero_grad()
        out = self.model(x)
        loss = self.loss_fn(out, y)
        losses = self.individual_loss_fn(out, y)
        info = {
            "batch_size": x.shape[0],
            "individual_losses": losses,
            "loss": loss,
            "optimizer": self.opt,
        }
        with self.cockpit(self.global_step, info=info):
            loss.backward(create_graph=self.cockpit.create_graph(self.global_step))
        self.opt.step()
        self.global_step += 1

    def tracked(self) -> tuple[int, list[str]]:
        """The steps for which Cockpit holds an output, and the names of the quantities in it."""
        output = self.cockpit.get_output()
        return len(output), sorted({name for step in output.values() for name in step})


def measure(
    model_name: str,
    opt_name: str,
    rounds: int,
    cockpit_every: int,
    default_arm: bool,
    api: Any,
    tmp: Path,
) -> dict[str, Any]:
    """One row: the plain step's median thread time and each monitor's median added time (ms),
    the default arm's path (``fused``) and what each monitor recorded (steps, quantities)."""
    torch.manual_seed(0)
    model, x, y = MODELS[model_name]()
    opt = OPTIMIZERS[opt_name](model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    symmetries = find_symmetries(model, x[:4])
    monitors: dict[str, nd.Monitor] = {}
    for kind, fused in (("noether-dyn", None), ("noether-dyn eager", False)):
        if kind == "noether-dyn" and not default_arm:
            continue
        monitors[kind] = mon = nd.watch(
            model, opt, tmp / f"{model_name}-{opt_name}-{kind}", symmetries=symmetries, fused=fused
        )
        mon._planner.progress = None
        for handle in mon._handles:  # hooks are attached per arm below
            handle.remove()
        del opt._noether_dyn_monitor  # several monitors on one optimizer, one at a time
    if "noether-dyn" in monitors:  # the settled path: the background compile starts at once
        planner = monitors["noether-dyn"]._planner
        planner.steps_seen = max(planner.steps_seen, COMPILE_AFTER_STEPS)
        planner.eager_seconds = max(planner.eager_seconds, planner.rent_seconds)
    cockpit = CockpitArm(api, model, opt) if api is not None else None

    def step(kind: str) -> float:
        if kind == "cockpit":
            cockpit.attach()
            start = time.thread_time()
            cockpit.step(x, y)
            elapsed = time.thread_time() - start
            cockpit.detach()
            return elapsed
        handles = []
        if kind in monitors:
            mon = monitors[kind]
            handles = [opt.register_step_pre_hook(mon._pre_hook),
                       opt.register_step_post_hook(mon._post_hook)]  # fmt: skip
        start = time.thread_time()
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if kind in monitors:
            monitors[kind].log_loss(loss)
        opt.step()
        elapsed = time.thread_time() - start
        for handle in handles:
            handle.remove()
        return elapsed

    kinds = ["plain", *monitors, *(["cockpit"] if cockpit is not None else [])]
    warm_steps = 2  # per arm (Cockpit's first steps allocate its caches)
    if "noether-dyn" in monitors:  # its first step starts the background compile; no other arm
        # steps until it is done (see the docstring), then the arm steps onto its program
        step("plain")
        for _ in range(3):
            step("noether-dyn")
            if (job := monitors["noether-dyn"]._planner.background) is None:
                break
            job.wait()
    for kind in kinds * warm_steps:
        step(kind)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    pairs: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        shown = [k for k in kinds if k != "cockpit" or r % cockpit_every == 0]
        rotation = r % len(shown)
        got = {kind: step(kind) for kind in shown[rotation:] + shown[:rotation]}
        for kind, elapsed in got.items():
            times[kind].append(elapsed)
            pairs[kind].append(elapsed - got["plain"])
    logged = {kind: mon.step for kind, mon in monitors.items()}
    if any(n < warm_steps + rounds for n in logged.values()):  # the hooks ran in their arm
        raise RuntimeError(f"a monitor saw fewer steps than its arm took: {logged}")
    fused = "-"
    if "noether-dyn" in monitors:
        mon = monitors["noether-dyn"]
        fused = "yes" if mon.fused and mon.compiled.compiled_ok else "no"
    for mon in monitors.values():
        mon.close()
    tracked, quantities = cockpit.tracked() if cockpit is not None else (0, [])
    if cockpit is not None and tracked < warm_steps + len(times["cockpit"]):
        raise RuntimeError(f"Cockpit tracked {tracked} steps of {cockpit.global_step}")
    row: dict[str, Any] = {
        "model": model_name,
        "params": sum(p.numel() for p in model.parameters()),
        "optimizer": opt_name,
        "step ms": statistics.median(times["plain"]) * 1e3,
        "fused": fused,
        "rounds": rounds,
        "cockpit steps": len(times["cockpit"]) if cockpit is not None else 0,
        "monitor steps": logged,
        "cockpit tracked": tracked,
        "cockpit quantities": quantities,
    }
    for kind in MONITORS:  # ms; NaN where the arm did not run
        row[f"{kind} ms"] = statistics.median(pairs[kind]) * 1e3 if kind in pairs else float("nan")
    return row


def _added(ms: float, step_ms: float) -> str:
    """An added time in ms, with its share of the plain step (a multiple of it from 1x on)."""
    if ms != ms:  # NaN: not measured
        return "-"
    share = ms / step_ms
    return f"{ms:.2f} ms ({share:.1%})" if share < 1 else f"{ms:.0f} ms ({share:.0f}x the step)"


def _ratio(a: float, b: float) -> str:
    """a / b written as 1/n (the ratios of interest are far below 1), or as a number."""
    if a != a or b != b:
        return "-"
    return f"1/{b / a:.0f}" if 0 < a < b else f"{a / b:.2f}"


def format_row(row: dict) -> str:
    """One markdown table row of :data:`HEADER`."""
    step, nd_ms, eager_ms, cp_ms = (
        row["step ms"], row["noether-dyn ms"], row["noether-dyn eager ms"], row["cockpit ms"]
    )  # fmt: skip
    return (
        f"| {row['model']} | {row['params'] / 1e6:.2f}M | {row['optimizer']} | {step:.2f} "
        f"| {_added(nd_ms, step)} | {_added(eager_ms, step)} | {_added(cp_ms, step)} "
        f"| {_ratio(nd_ms, cp_ms)} | {_ratio(eager_ms, cp_ms)} | {row['fused']} "
        f"| {row['rounds']} ({row['cockpit steps']}) |"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the comparison; returns the rows (dicts) it printed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds (one step per arm)")
    parser.add_argument(
        "--cockpit-every",
        type=int,
        default=4,
        help="Cockpit's arm joins every K-th round (its steps take seconds on the larger MLP)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="wiring test: mlp-50k, SGD with momentum, 3 rounds, eager arm only (no compile)",
    )
    add_write_docs_argument(parser, DOCS_PAGE)
    args = parser.parse_args(argv)
    command = docs_command(DOCS_PAGE, __file__, argv) if args.write_docs else None
    api, reason = load_cockpit()
    if api is None:
        if command is not None:
            parser.error("--write-docs needs Cockpit: " + reason)
        print(SKIP_MESSAGE.format(reason=reason), flush=True)
    warnings.simplefilter("error", nd.MonitorFailure)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # BackPACK's
    # Cockpit's Alpha, once the MLP fits the one batch it trains on: the losses' variance is 0
    warnings.filterwarnings("ignore", message="The variance of f is 0")
    if args.quick:
        cases = [("mlp-50k", "sgd-momentum")]
        rounds, cockpit_every = 3, 1
    else:
        cases = [(m, o) for m in ("mlp", "mlp-250k") for o in ("sgd-momentum", "adamw")]
        rounds, cockpit_every = args.rounds, args.cockpit_every
    lines = [HEADER, "|" + "---|" * 11]
    print(*lines, sep="\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, opt_name in cases:
            row = measure(
                model_name, opt_name, rounds, cockpit_every, not args.quick, api, Path(tmp)
            )
            rows.append(row)
            lines.append(format_row(row))
            print(lines[-1], flush=True)
    if command is not None:
        stamp = machine_stamp(threads=torch.get_num_threads())
        write_docs(DOCS_PAGE, command, "\n".join(lines), stamp=stamp)
    return rows


if __name__ == "__main__":
    main()
