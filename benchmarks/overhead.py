"""Overhead of a noether-dyn Monitor on three workloads x three optimizers x every in {1, 10}.

For each case, in one process, one model and optimizer take training steps (forward, backward,
optimizer step) in four interleaved arms, in rotating order so that drift cancels: the
monitor's hooks on, the hooks off (the same tensors in the same memory for both), and hooks off
followed by the floor pass, or by the state floor pass. The script prints
- ``ratio``: median monitored step time / median unmonitored step time;
- ``added/floor``: the monitor's added time per step (the median of the paired differences of
  whole steps, monitored minus unmonitored, taken next to each other) against the floor, one
  ``torch._foreach_norm`` pass over the parameters and one over the gradients (the least a
  per-step monitor must read), timed warm: repeated back to back, the data in cache;
- ``added/floor in step``: the same against the floor pass timed where a monitor runs, right
  after a training step's ``opt.step()`` (the third arm: the data and the code no longer in
  cache). The targets use this floor;
- ``added/state floor``: the same against a pass over the parameters, the gradients and the
  optimizer's parameter-sized state (momentum buffers, moments), timed in step in a fourth arm:
  the least that statistics rebuilt from the optimizer's state must read;
- ``added/step``: the added time as a fraction of the unmonitored step, and ``+-`` its standard
  error (1.2533 x 1.4826 x MAD / sqrt(n), the normal approximation for a median);
- ``hook/step``: the same difference for the ``optimizer.step()`` call alone (where the hooks
  run): less noisy, but blind to what the hooks cost the next forward pass (evicted caches);
- ``mem/params``: bytes the monitor holds beyond the run (snapshots, caches) over parameter bytes;
- ``peak+/params`` (CUDA only): how much higher the peak allocation of a monitored step is than
  that of an unmonitored one, over parameter bytes (transient temporaries);
- ``fused``: whether the monitor computed its statistics with the compiled program (with the
  default ``fused=None`` each row times the path a long run settles on: the background compile
  is started at the first step instead of after 200 steps or the eager rent, and waited for);
- ``steps``: timed steps per arm (by default about ``--seconds`` of them, 20 to 400).
Targets (issue 18, target 1), judged on every row by ``time ok`` (:func:`time_target`): at
every=1, added <= max(2 x floor in step, 2% of the step) for SGD(M) and RMSprop, and <= max(1.5 x
state floor, 2% of the step) for AdamW; at every > 1, added <= 1% of the step. Memory <= 1x
parameter bytes, <= 0.1x for SGD, Adam, AdamW and RMSprop.

Run: ``python benchmarks/overhead.py [--steps N | --seconds S] [--quick]
[--only mlp|cnn|transformer] [--every 1|10] [--device cpu|cuda] [--write-docs]``. On CUDA every
timed region starts and ends with a device synchronize. ``--write-docs`` rewrites the table of this
exact command line in docs/performance.md (``benchmarks/_docs.py``).

Sweep over model size (issue "Performance on every model"): ``--sweep`` times MLPs and CNNs of
about 50k, 250k, 1M, 5M and 50M parameters (``--sizes`` picks some), each with its detected
symmetries and with none tracked (``symmetries=[]``), on the eager path, the compiled one or
both (``--path eager|compiled|both``, i.e. ``fused=False``/``True``), with ``--optimizer``
choosing among the optimizers; ``--sweep --quick`` is the wiring test (the two smallest sizes,
SGD, every=1, 6 steps). The columns are those above plus ``params`` and ``path``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import noether_dyn as nd
from noether_dyn.capture.plan import COMPILE_AFTER_STEPS
from noether_dyn.symmetries.detect import find_symmetries

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._docs import add_write_docs_argument, docs_command, machine_stamp, write_docs  # noqa: E402

DOCS_PAGE = "docs/performance.md"


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.BatchNorm1d(1024), nn.ReLU(),
        nn.Linear(1024, 1024), nn.BatchNorm1d(1024), nn.ReLU(),
        nn.Linear(1024, 10),
    )  # fmt: skip
    return model, torch.randn(128, 784), torch.randint(0, 10, (128,))


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A ResNet-style CNN with BatchNorm, about 5M parameters."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    for c_in, c_out, stride in [
        (64, 64, 1),
        (64, 128, 2),
        (128, 256, 2),
        (256, 256, 1),
        (256, 320, 2),
    ]:
        layers.append(Block(c_in, c_out, stride))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(320, 10)]
    return nn.Sequential(*layers), torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))


class PreLNBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 256, layers: int = 4, seq: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.Sequential(*[PreLNBlock(d, 4) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.embed(tokens) + self.pos)
        return self.head(self.ln(h)).flatten(0, 1)


def transformer() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 1000, (16, 128))
    return Transformer(), tokens, torch.randint(0, 1000, (16 * 128,))


SWEEP_SIZES = {"50k": 0, "250k": 1, "1M": 2, "5M": 3, "50M": 4}
_MLP_WIDTH = (150, 400, 900, 2100, 7000)  # 256 -> w -> w -> 10: 0.06M, 0.27M, 1.0M, 5.0M, 51M
_CNN_WIDTH = (24, 52, 106, 236, 745)  # 3 -> c -> 2c -> 4c (3x3 convs) -> 10: ~90 c^2 entries


def sweep_mlp(size: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 3-layer MLP with BatchNorm of size index ``size`` (0..4: 50k to 50M parameters)."""
    w = _MLP_WIDTH[size]
    model = nn.Sequential(
        nn.Linear(256, w), nn.BatchNorm1d(w), nn.ReLU(),
        nn.Linear(w, w), nn.BatchNorm1d(w), nn.ReLU(),
        nn.Linear(w, 10),
    )  # fmt: skip
    return model, torch.randn(64, 256), torch.randint(0, 10, (64,))


def sweep_cnn(size: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 3-conv CNN with BatchNorm of size index ``size`` (0..4: 50k to 50M parameters); the
    input shrinks with the width so that the largest step stays a few seconds on a CPU."""
    c = _CNN_WIDTH[size]
    hw, batch = ((32, 16), (32, 16), (16, 16), (16, 8), (8, 4))[size]
    model = nn.Sequential(
        nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.Conv2d(2 * c, 4 * c, 3, 2, 1, bias=False), nn.BatchNorm2d(4 * c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 10),
    )  # fmt: skip
    return model, torch.randn(batch, 3, hw, hw), torch.randint(0, 10, (batch,))


WORKLOADS = {"mlp": mlp, "cnn": cnn, "transformer": transformer}
for _label, _size in SWEEP_SIZES.items():
    WORKLOADS[f"mlp-{_label}"] = lambda s=_size: sweep_mlp(s)
    WORKLOADS[f"cnn-{_label}"] = lambda s=_size: sweep_cnn(s)
OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=5e-4),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: nn.Module, opt: torch.optim.Optimizer, x, y, monitor=None) -> tuple[float, float]:
    """One training step; returns its time and the time of its ``opt.step()`` (s)."""
    device = x.device
    _sync(device)
    t0 = time.perf_counter()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if monitor is not None:
        monitor.log_loss(loss)
    _sync(device)
    t1 = time.perf_counter()
    opt.step()
    _sync(device)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def _floor_pass(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> float:
    """One ``torch._foreach_norm`` pass over the parameters and one over the gradients (s); with
    ``opt``, also one over its parameter-sized state (momentum buffers, moments): what the
    statistics of a step rebuilt from that state must read at the least."""
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    state = []
    if opt is not None:
        for p in params:
            state += [
                t
                for t in opt.state.get(p, {}).values()
                if isinstance(t, torch.Tensor) and t.shape == p.shape
            ]
    device = params[0].device
    _sync(device)
    t0 = time.perf_counter()
    torch._foreach_norm(params)
    torch._foreach_norm(grads)
    if state:
        torch._foreach_norm(state)
    _sync(device)
    return time.perf_counter() - t0


def _floor(model: nn.Module) -> float:
    """The floor timed warm: the pass repeated back to back (the data stay in cache)."""
    return statistics.median(_floor_pass(model) for _ in range(7))


def _monitor_bytes(monitor: nd.Monitor) -> int:
    """Bytes of the parameter-sized tensors the monitor keeps between steps (its snapshots)."""
    return monitor.snapshot_bytes


def _peak_bytes(fn) -> tuple[float, int]:
    """Run ``fn`` (a timed step); on CUDA also the peak memory it allocated above its start."""
    if not torch.cuda.is_available() or torch.cuda.memory_allocated() == 0:
        return fn(), 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    elapsed = fn()
    return elapsed, torch.cuda.max_memory_allocated() - start


def time_target(
    opt_name: str, every: int, step: float, floor_in_step: float, state_floor: float
) -> float:
    """Issue 18's allowance for the added time per step (seconds): every=1, max(2x the in-step
    floor, 2% of the step), or max(1.5x the in-step state floor, 2% of the step) for Adam/AdamW
    (their statistics need q, g and both moments); every > 1, 1% of the step."""
    if every > 1:
        return 0.01 * step
    if opt_name.startswith("adam"):
        return max(1.5 * state_floor, 0.02 * step)
    return max(2.0 * floor_in_step, 0.02 * step)


def run_case(
    workload: str,
    opt_name: str,
    every: int,
    steps: int | None,
    tmp: Path,
    device: str = "cpu",
    seconds: float = 3.0,
    fused: bool | None = None,
    track: bool = True,
) -> dict:
    """One row of the table; ``steps`` timed steps per arm (None: about ``seconds`` of them).
    ``fused``: the monitor's path (None: its default); ``track``: the detected symmetries, else
    none at all."""
    torch.manual_seed(0)
    model, x, y = WORKLOADS[workload]()
    model, x, y = model.to(device), x.to(device), y.to(device)
    opt = OPTIMIZERS[opt_name](model.parameters())
    symmetries = find_symmetries(model, x[:4]) if track else []
    path = {None: "default", True: "compiled", False: "eager"}[fused]
    monitor = nd.watch(
        model,
        opt,
        tmp / f"{workload}-{opt_name}-{every}-{path}-{len(symmetries)}",
        every=every,
        symmetries=symmetries,
        flush_every=50,
        fused=fused,
    )
    if fused is None:  # time the path a long run settles on: let the background compile start
        # at the first logged step, as it does after COMPILE_AFTER_STEPS steps (and, below 1M
        # entries, the eager rent) of a long run; the steps wait for it below
        planner = monitor._planner
        planner.steps_seen = max(planner.steps_seen, COMPILE_AFTER_STEPS)
        planner.eager_seconds = max(planner.eager_seconds, planner.rent_seconds)
    warm = [_step(model, opt, x, y, monitor)[0] for _ in range(3)]  # + the fused compile
    for _ in range(3):  # fused=None compiles in the background: time the path it settles on
        if (job := monitor._planner.background) is None:
            break
        job.wait()
        warm += [_step(model, opt, x, y, monitor)[0] for _ in range(3)]
    if steps is None:  # about `seconds` of timed steps per arm, at least 20
        steps = max(20, min(400, int(seconds / min(warm))))
    with_monitor, without, peak_with, peak_without = [], [], [], []
    floor_in_step: dict[str, list[float]] = {"floor": [], "state floor": []}

    def arm(kind: str) -> None:
        # one model, one optimizer: the unmonitored arm is the same training with the monitor's
        # hooks switched off, so that both arms share every tensor's memory; the floor arm is an
        # unmonitored step followed by the floor pass, timed where the monitor's hook runs (the
        # state floor adds the optimizer's state to the pass)
        monitor._active = kind == "on"
        elapsed, peak = _peak_bytes(lambda: _step(model, opt, x, y, monitor))
        if kind in floor_in_step:
            floor_in_step[kind].append(_floor_pass(model, opt if kind == "state floor" else None))
            return
        (with_monitor if kind == "on" else without).append(elapsed)
        (peak_with if kind == "on" else peak_without).append(peak)

    kinds = ("off", "on", "floor", "state floor")
    for k in range(steps):  # the arms in rotating order, so that drift cancels
        for j in range(len(kinds)):
            arm(kinds[(k + j) % len(kinds)])
    floor = _floor(model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    mem = _monitor_bytes(monitor) / param_bytes
    fused = monitor.fused and monitor.compiled.compiled_ok  # the program ran, not only chosen
    monitor.close()
    t_with = statistics.median(t for t, _ in with_monitor)
    t_without = statistics.median(t for t, _ in without)
    diffs = [a[0] - b[0] for a, b in zip(with_monitor, without)]
    added = statistics.median(diffs)
    mad = statistics.median(abs(d - added) for d in diffs)
    stderr = 1.2533 * 1.4826 * mad / len(diffs) ** 0.5
    hook = statistics.median(a[1] - b[1] for a, b in zip(with_monitor, without))
    floor_step = statistics.median(floor_in_step["floor"])
    state_floor = statistics.median(floor_in_step["state floor"])
    target = time_target(opt_name, every, t_without, floor_step, state_floor)
    mem_target = 0.1 if opt_name in ("sgd-momentum", "adamw", "rmsprop") else 1.0
    return {
        "workload": workload,
        "params": sum(p.numel() for p in model.parameters()),
        "path": path,
        "optimizer": opt_name,
        "every": every,
        "symmetries": len(symmetries),
        "ratio": t_with / t_without,
        "added/floor": added / floor,
        "added/floor in step": added / floor_step,
        "added/state floor": added / state_floor,
        "added/step": added / t_without,
        "+-": stderr / t_without,
        "hook/step": hook / t_without,
        "mem/params": mem,
        "peak+/params": (max(peak_with) - max(peak_without)) / param_bytes
        if device.startswith("cuda")
        else float("nan"),
        "fused": "yes" if fused else "no",
        "steps": steps,
        "time ok": "yes" if added <= target else "NO",
        "mem ok": "yes" if mem <= mem_target else "NO",
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per arm (default: about --seconds)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=3.0,
        help="timed seconds per arm when --steps is not given (20 to 400 steps)",
    )
    parser.add_argument("--quick", action="store_true", help="mlp only, 6 steps")
    parser.add_argument("--only", choices=sorted(WORKLOADS), action="append")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--every", type=int, action="append", help="only this logging interval (1 or 10)"
    )
    parser.add_argument("--sweep", action="store_true", help="the model-size sweep (see above)")
    parser.add_argument("--sizes", choices=sorted(SWEEP_SIZES), action="append")
    parser.add_argument("--path", choices=("eager", "compiled", "both"), default="both")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), action="append")
    add_write_docs_argument(parser, DOCS_PAGE)
    args = parser.parse_args(argv)
    command = docs_command(DOCS_PAGE, __file__, argv) if args.write_docs else None
    if args.sweep:
        return sweep(args, command)
    # the arms switch the monitor's hooks, which would also hide a monitor that stopped itself
    warnings.simplefilter("error", nd.MonitorFailure)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    workloads = args.only or (["mlp"] if args.quick else list(WORKLOADS))
    steps = 6 if args.quick else args.steps
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    header = (
        "| workload | optimizer | every | symmetries | ratio | added/floor | added/floor in step "
        "| added/state floor | added/step | +- "
        "| hook/step | mem/params | peak+/params | fused | steps | time ok | mem ok |"
    )
    where = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"torch {torch.__version__}, {where}", file=sys.stderr)
    lines = [header, "|" + "---|" * 17]
    print(*lines, sep="\n")
    with tempfile.TemporaryDirectory() as tmp:
        for workload in workloads:
            for opt_name in OPTIMIZERS:
                for every in args.every or (1, 10):
                    row = run_case(
                        workload, opt_name, every, steps, Path(tmp), args.device, args.seconds
                    )
                    rows.append(row)
                    lines.append(
                        f"| {row['workload']} | {row['optimizer']} | {row['every']} "
                        f"| {row['symmetries']} | {row['ratio']:.3f} | {row['added/floor']:.2f} "
                        f"| {row['added/floor in step']:.2f} | {row['added/state floor']:.2f} "
                        f"| {row['added/step']:.2%} | {row['+-']:.2%} "
                        f"| {row['hook/step']:.2%} | {row['mem/params']:.2f} "
                        f"| {row['peak+/params']:.2f} | {row['fused']} | {row['steps']} "
                        f"| {row['time ok']} "
                        f"| {row['mem ok']} |"
                    )
                    print(lines[-1], flush=True)
    if command is not None:
        stamp = machine_stamp(threads=torch.get_num_threads(), device=where)
        write_docs(DOCS_PAGE, command, "\n".join(lines), stamp=stamp)
    return rows


SWEEP_HEADER = (
    "| workload | params | path | optimizer | every | symmetries | ratio | added/floor in step "
    "| added/state floor | added/step | +- | hook/step | mem/params | fused | steps | time ok |"
)


def sweep(args: argparse.Namespace, command: str | None = None) -> list[dict]:
    """The model-size sweep: MLP and CNN x sizes x (detected symmetries, none) x paths."""
    warnings.simplefilter("error", nd.MonitorFailure)
    sizes = args.sizes or (["50k", "250k"] if args.quick else list(SWEEP_SIZES))
    sizes = sorted(sizes, key=SWEEP_SIZES.__getitem__)
    paths = {"eager": [False], "compiled": [True], "both": [False, True]}[args.path]
    optimizers = args.optimizer or (["sgd-momentum"] if args.quick else list(OPTIMIZERS))
    everies = args.every or ([1] if args.quick else [1, 10])
    steps = 6 if args.quick else args.steps
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads", file=sys.stderr)
    lines = [SWEEP_HEADER, "|" + "---|" * 16]
    print(*lines, sep="\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("mlp", "cnn"):
            for size in sizes:
                for fused in paths:
                    for track in (True, False):
                        for opt_name in optimizers:
                            for every in everies:
                                row = run_case(
                                    f"{family}-{size}", opt_name, every, steps, Path(tmp),
                                    args.device, args.seconds, fused, track,
                                )  # fmt: skip
                                rows.append(row)
                                lines.append(
                                    f"| {row['workload']} | {row['params']} | {row['path']} "
                                    f"| {row['optimizer']} | {row['every']} "
                                    f"| {row['symmetries']} | {row['ratio']:.3f} "
                                    f"| {row['added/floor in step']:.2f} "
                                    f"| {row['added/state floor']:.2f} "
                                    f"| {row['added/step']:.2%} | {row['+-']:.2%} "
                                    f"| {row['hook/step']:.2%} | {row['mem/params']:.2f} "
                                    f"| {row['fused']} | {row['steps']} | {row['time ok']} |"
                                )
                                print(lines[-1], flush=True)
    if command is not None:
        stamp = machine_stamp(threads=torch.get_num_threads())
        write_docs(DOCS_PAGE, command, "\n".join(lines), stamp=stamp)
    return rows


if __name__ == "__main__":
    main()
