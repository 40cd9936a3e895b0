"""Report render time at scale: a synthetic run of 100k steps x 100 symmetries.

Run: ``python benchmarks/report_scale.py [--steps N] [--symmetries K] [--out DIR]``. Prints the
time to write the store, to load it, and to render the HTML report (target: under 30 s for the
report on 2 CPU cores). :func:`write_synthetic_run` is also used by ``tests/test_report.py`` on a
small run.

The synthetic charges obey the store's exact identity Q_(n+1) - Q_n = decay + rule + ksb
(docs/theory.md §3.1), scale groups carry effective_lr = eta/((1-beta) Q) and an angular update near
sqrt(2 eta lambda/(1+beta)) (Wan et al. 2021 SMD), so every section has data to draw.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from noether_dyn.store import CHARGE_COLUMNS, RunWriter
from noether_dyn.store.schema import GROUP_COLUMNS, SCHEMA_VERSION, STEP_COLUMNS
from noether_dyn.symmetries.symmetry import Symmetry

LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


def _symmetries(n: int) -> list[Symmetry]:
    syms = []
    for i in range(n):
        kind = ("scale", "rescale", "translation")[i % 3]
        if kind == "scale":
            syms.append(Symmetry(f"scale:l{i}", kind, (f"l{i}.weight", f"l{i}.bias")))
        elif kind == "rescale":
            syms.append(
                Symmetry(
                    f"rescale:l{i}",
                    kind,
                    (f"l{i}.weight", f"l{i}.bias", f"l{i + 1}.weight"),
                    (1, 1, -1),
                )
            )
        else:
            syms.append(Symmetry(f"translation:l{i}", kind, (f"l{i}.weight", f"l{i}.bias")))
    return [Symmetry(s.name, s.kind, s.params, s.signs, True, 1e-7, "synthetic") for s in syms]


def write_synthetic_run(
    run_dir: str | Path,
    n_steps: int = 100_000,
    n_symmetries: int = 100,
    block: int = 5000,
    seed: int = 0,
    log_loss: bool = True,
) -> Path:
    """Write a synthetic run store of ``n_steps`` x ``n_symmetries`` with :class:`RunWriter`."""
    rng = np.random.default_rng(seed)
    syms = _symmetries(n_symmetries)
    writer = RunWriter(run_dir, mode="overwrite")
    n_layers = n_symmetries + 1
    params = []
    for i in range(n_layers):
        params += [
            {"name": f"l{i}.weight", "shape": [64, 64], "group": 0, "dtype": "torch.float32"},
            {"name": f"l{i}.bias", "shape": [64], "group": 0, "dtype": "torch.float32"},
        ]
    n_params = n_layers * (64 * 64 + 64)
    writer.set_meta(
        {
            "schema_version": SCHEMA_VERSION,
            "noether_dyn_version": "synthetic",
            "torch_version": "n/a",
            "started": "1970-01-01T00:00:00+00:00",
            "command": "benchmarks/report_scale.py",
            "model": {
                "class": "Synthetic",
                "summary": f"{n_layers} synthetic 64x64 layers",
                "n_parameters": n_params,
                "n_trainable": n_params,
            },
            "parameters": params,
            "optimizer": {
                "class": "SGD",
                "adapter": "sgd",
                "metric": "G = I",
                "metric_fallback": False,
                "prediction": "momentum",
                "param_groups": [
                    {
                        "lr": LR,
                        "momentum": MOMENTUM,
                        "weight_decay": WD,
                        "n_params": len(params),
                        "beta": MOMENTUM,
                        "decoupled_weight_decay": False,
                    }
                ],
            },
            "every": 1,
            "symmetry_note": f"{n_symmetries} synthetic symmetries",
        }
    )
    writer.set_symmetries(syms)
    kinds = np.array([s.kind for s in syms])
    scale = kinds == "scale"
    q = np.where(
        kinds == "translation", rng.normal(0, 1, n_symmetries), rng.uniform(10, 40, n_symmetries)
    )
    tau_q = rng.uniform(2_000, 30_000, n_symmetries)
    target = q * rng.uniform(0.5, 3.0, n_symmetries)
    angle = np.sqrt(2 * LR * WD / (1 + MOMENTUM))
    tau = (1 - MOMENTUM) / (1 + MOMENTUM) * 2
    for start in range(0, n_steps, block):
        steps = np.arange(start, min(n_steps, start + block))
        n = len(steps)
        # charges: relax toward a target, with noise; each step's change is split exactly
        path = target + (q - target) * np.exp(-(steps[:, None] - start + 1) / tau_q)
        path = path + rng.normal(0, 1e-3, (n, n_symmetries)) * np.abs(target)
        charge = np.vstack([q[None, :], path[:-1]])
        nxt = path
        delta = nxt - charge
        decay = np.where(kinds == "translation", -LR * WD, -2 * LR * WD) * charge
        ksb = np.where(kinds == "translation", 0.0, np.abs(rng.normal(0, 1e-4, (n, n_symmetries))))
        rule = delta - decay - ksb
        data = np.full((n, n_symmetries, len(CHARGE_COLUMNS)), np.nan)
        col = {c: i for i, c in enumerate(CHARGE_COLUMNS)}
        data[..., col["charge"]] = charge
        data[..., col["predicted"]] = charge * (1 + rng.normal(0, 1e-3, (n, n_symmetries)))
        data[..., col["decay"]] = decay
        data[..., col["rule"]] = rule
        data[..., col["ksb"]] = ksb
        data[..., col["defect"]] = np.abs(rng.normal(0, 1e-7, (n, n_symmetries)))
        data[..., col["nld_charge"]] = rule / LR
        data[..., col["nld_ksb"]] = ksb / LR
        data[..., col["grad_sq"]] = np.abs(rng.normal(1, 0.1, (n, n_symmetries)))
        eff = np.where(scale, LR / ((1 - MOMENTUM) * np.abs(charge)), np.nan)
        data[..., col["effective_lr"]] = eff
        data[..., col["angular_update"]] = np.where(
            scale, angle * (1 + rng.normal(0, 0.1, (n, n_symmetries))), np.nan
        )
        q = nxt[-1]
        loss = (
            2.3 * np.exp(-steps / 20_000) + rng.normal(0, 0.05, n)
            if log_loss
            else np.full(n, np.nan)
        )
        kinetic = np.abs(rng.normal(0.05, 0.01, n))
        l2 = np.full(n, 0.5 * WD * 1e3)
        step_rows = np.column_stack(
            [
                steps,
                steps * LR,
                np.full(n, LR),
                loss,
                l2,
                loss + l2,
                kinetic,
                steps * tau,
                np.full(n, 30.0),
                np.abs(rng.normal(1, 0.1, n)),
                np.abs(rng.normal(0.1, 0.01, n)),
                steps * 1e-3,
            ]
        )
        assert step_rows.shape[1] == len(STEP_COLUMNS)
        group_rows = np.column_stack(
            [
                steps,
                np.zeros(n),
                np.full(n, LR),
                np.full(n, MOMENTUM),
                np.full(n, WD),
                np.full(n, LR * (1 + MOMENTUM) / 2),
                kinetic,
                l2,
                steps * tau,
            ]
        )
        assert group_rows.shape[1] == len(GROUP_COLUMNS)
        writer.append(step_rows, group_rows, steps, data, [], {})
    writer.close()
    return Path(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--symmetries", type=int, default=100)
    parser.add_argument("--out", help="directory for the run and report (default: a temp dir)")
    args = parser.parse_args()

    import noether_dyn as nd
    from noether_dyn.report import report

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        t0 = time.perf_counter()
        run_dir = write_synthetic_run(root / "synthetic", args.steps, args.symmetries)
        t1 = time.perf_counter()
        run = nd.load_run(run_dir)
        _ = run.charges
        t2 = time.perf_counter()
        path = report(run, root / "report.html")
        t3 = time.perf_counter()
        size = path.stat().st_size / 1e6
        print(f"{args.steps} steps x {args.symmetries} symmetries")
        print(f"write store  {t1 - t0:6.1f} s")
        print(f"load_run     {t2 - t1:6.1f} s  (including run.charges, {len(run.charges):,} rows)")
        print(f"report html  {t3 - t2:6.1f} s  ({size:.1f} MB)")
        print(f"load+report  {t3 - t1:6.1f} s")


if __name__ == "__main__":
    main()
