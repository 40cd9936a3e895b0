"""On CUDA the monitor makes no host-device synchronization between flushes: every step runs
under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronizing call
(``.item()``, ``.cpu()``, blocking copies, ``nonzero``). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import noether_dyn as nd
from tests.test_fused import _assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SYMS = [
    nd.Symmetry("scale:0", "scale", ("0.weight", "0.bias")),
    nd.Symmetry("rescale:1", "rescale", ("1.weight", "1.bias", "3.weight"), (1, 1, -1)),
    nd.Symmetry("translation:3", "translation", ("3.weight", "3.bias")),
]

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01),
    "adam-capturable": lambda ps: torch.optim.Adam(ps, lr=1e-3, capturable=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("fused", [False, True])
def test_no_sync_between_flushes(name, every, fused, tmp_path):
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    model = model.to(device)
    opt = OPTIMIZERS[name](model.parameters())
    x = torch.randn(32, 6, device=device)
    y = torch.randint(0, 4, (32,), device=device)
    mon = nd.watch(
        model,
        opt,
        tmp_path / "run",
        every=every,
        symmetries=SYMS,
        flush_every=10_000,
        flush_seconds=3600,
        fused=fused,
    )

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        mon.log_loss(loss)
        opt.step()

    step()  # the first step allocates optimizer state (its own syncs are the optimizer's) and
    # compiles the fused program
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert mon.fused == fused and mon.compiled.compiled_ok == fused
    mon.close()
    run = nd.load_run(tmp_path / "run")
    assert len(run.steps) == len(range(0, 7, every))
    assert torch.isfinite(torch.tensor(run.charges["charge"].to_numpy())).all()


FUSED_CASES = {
    "adam-capturable": lambda ps: torch.optim.Adam(ps, lr=1e-3, capturable=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True),
    "sgd-momentum-foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "rmsprop-centered": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, centered=True),
}


@pytest.mark.parametrize("name", sorted(FUSED_CASES))
def test_fused_equals_eager_on_cuda(name, tmp_path):
    """The compiled (Triton) statistics equal the eager ones on the GPU, float64; capturable and
    fused Adam keep their step counts on the device, so their bias corrections are built there.
    Same bound as test_fused.py (float64 rounding of two summation orders)."""
    device = torch.device("cuda")
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        model = model.to(device=device, dtype=torch.float64)
        opt = FUSED_CASES[name](model.parameters())
        x = torch.randn(32, 6, device=device, dtype=torch.float64)
        y = torch.randint(0, 4, (32,), device=device)
        with nd.watch(model, opt, tmp_path / f"run-{fused}", symmetries=SYMS, fused=fused) as mon:
            for _ in range(5):
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                mon.log_loss(loss)
                opt.step()
        assert mon.compiled.compiled_ok == fused
        runs[fused] = nd.load_run(tmp_path / f"run-{fused}")
    for table in ("steps", "tensors"):
        a, b = getattr(runs[True], table), getattr(runs[False], table)
        cols = [c for c in b.columns if b[c].dtype.kind == "f" and c != "wall_time"]
        _assert_close(a[cols], b[cols], table)
    cols = ["charge", "grad_sq", "effective_lr"]
    _assert_close(runs[True].charges[cols], runs[False].charges[cols], "charges")
