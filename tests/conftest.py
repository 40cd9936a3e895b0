"""Shared fixtures: small float64 models and a plain training loop."""

from __future__ import annotations

import os

# The tests' tensors are tiny: one intra-op thread avoids the thread pool's synchronization,
# which dominated the suite on a 2-core machine (issue 18: 11 min with the default threads, about
# 6 with one). Worker processes the tests spawn inherit the variable. Set OMP_NUM_THREADS to
# override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def bn_mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Linear -> BatchNorm -> ReLU -> Linear: scale on the first layer, rescale on the BN affine
    through ReLU into the head, translation on the head (cross-entropy)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).to(
        dtype
    )


def relu_mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)).to(dtype)


def batch(seed: int = 1, n: int = 32, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def train(model, optimizer, monitor=None, steps: int = 10, scheduler=None, seed: int = 1):
    """Full-batch training with cross-entropy; logs the loss when a monitor is given."""
    x, y = batch(seed, dtype=next(model.parameters()).dtype)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if monitor is not None:
            monitor.log_loss(loss)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"
