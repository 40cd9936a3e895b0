"""Cost of zero-config ``watch`` at the first optimizer step, against the training steps around
it, on tiny Hugging Face models built from configs (random weights, nothing downloaded).

For each model, in one process: the median time of a plain training step (forward, backward,
AdamW step; no monitor), the time of the first monitored step (it runs the detection of
``noether_dyn.symmetries.engine.detect`` on the first batch and the real-gradient check) and the
median of the later monitored steps, with their ratios to the plain step. A second run on a
fresh model of the same structure shows the cached detection. Run:
``python benchmarks/zero_config.py [--steps 6]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import noether_dyn as nd  # noqa: E402
from noether_dyn.symmetries.engine import clear_cache  # noqa: E402
from tests.test_symmetries_hf import bert, gpt2, llama, resnet  # noqa: E402

MODELS = {"llama": lambda: llama(False), "gpt2": lambda: gpt2(True), "bert": bert, "resnet": resnet}


def _steps(model, inputs, steps: int, run_dir: Path | None) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = nd.watch(model, opt, run_dir) if run_dir is not None else None
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        if mon is not None:
            mon.log_loss(out.loss)
        opt.step()
        times.append(time.perf_counter() - t0)
    if mon is not None:
        mon.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    print("model   plain_ms  first_ms  first/plain  later/plain  cached_first/plain  tracked")
    for name, build in MODELS.items():
        torch.manual_seed(0)
        model, inputs = build()
        plain = statistics.median(_steps(model, inputs, args.steps, None)[1:])
        clear_cache()
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            model, inputs = build()
            watched = _steps(model, inputs, args.steps, Path(tmp) / "a")
            tracked = len(nd.load_run(Path(tmp) / "a").symmetries)
            torch.manual_seed(0)
            model, inputs = build()
            cached = _steps(model, inputs, 2, Path(tmp) / "b")
        later = statistics.median(watched[1:])
        print(
            f"{name:7s} {plain * 1e3:8.1f}  {watched[0] * 1e3:8.1f}  {watched[0] / plain:11.1f}  "
            f"{later / plain:11.2f}  {cached[0] / plain:18.1f}  {tracked:7d}"
        )


if __name__ == "__main__":
    main()
