"""Distributed training on the CPU with gloo, 2 processes: DDP (replicated parameters: rank 0
alone computes and writes) and FSDP2 (``fully_shard``: every rank reduces its shards, rank 0
writes; also with the compiled statistics, ``fused=True``, on the local shards). All must give
the charges of a single-process run on the same global batch.

float64; the processes see the same arithmetic as the single run except the order of the
gradient all-reduce and of the sums over shards, so the runs agree to rounding: relative 1e-10.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import noether_dyn as nd

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"
)

STEPS = 6
SYMS = [
    nd.Symmetry("scale:0", "scale", ("0.weight", "0.bias")),  # Linear -> LayerNorm
    nd.Symmetry("rescale:1", "rescale", ("1.weight", "1.bias", "3.weight"), (1, 1, -1)),
    nd.Symmetry("translation:3", "translation", ("3.weight", "3.bias")),
]


def make_model() -> nn.Module:
    """LayerNorm normalizes each sample, so data parallelism changes nothing in the forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    return model.double()


def global_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 4, (32,), generator=g
    )


def make_opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def train(model, opt, mon, x, y):
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        mon.log_loss(loss)
        opt.step()


def _worker(rank: int, world: int, rendezvous: str, run_dir: str, mode: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = make_model()
        if mode == "ddp":
            net = nn.parallel.DistributedDataParallel(model)
            opt = make_opt(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer)
            fully_shard(model)
            net, opt = model, make_opt(model)
        x, y = global_batch()
        half = slice(rank * 16, (rank + 1) * 16)
        fused = mode == "fsdp-fused"  # the compiled statistics of the local shards
        with nd.watch(model, opt, run_dir, symmetries=SYMS, fused=fused) as mon:
            if mode != "ddp":
                assert mon.sharded
            assert mon.writes == (rank == 0)  # only rank 0 writes the store
            train(net, opt, mon, x[half], y[half])
            assert mon.compiled.compiled_ok == fused
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()
    # Past this point the test's work is done. torch 2.13's FSDP2 on gloo sometimes aborts in
    # its interpreter-exit teardown ("terminate called without an active exception"; 7 of 80
    # runs of plain FSDP2 training, without noether-dyn, on this project's machine): leave
    # without that teardown, so that only the work above can fail the test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "run"
    model = make_model()
    opt = make_opt(model)
    x, y = global_batch()
    with nd.watch(model, opt, path, symmetries=SYMS) as mon:
        train(model, opt, mon, x, y)
    return nd.load_run(path)


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-fused"])
def test_distributed_charges_equal_single_process(mode, tmp_path, single_run):
    if mode != "ddp":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 not in this torch")
    run_dir = tmp_path / "run"
    rendezvous = str(tmp_path / "rendezvous")  # a file, not a port: no clash with other jobs
    mp.spawn(_worker, args=(2, rendezvous, str(run_dir), mode), nprocs=2, join=True)
    run = nd.load_run(run_dir)
    assert run.steps["step"].tolist() == list(range(STEPS))
    cols = ["charge", "predicted", "decay", "ksb", "defect", "nld_charge", "grad_sq"]
    a = run.charges.sort_values(["step", "symmetry"])[cols].to_numpy()
    b = single_run.charges.sort_values(["step", "symmetry"])[cols].to_numpy()
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(run.steps["kinetic"], single_run.steps["kinetic"], rtol=1e-10)
    if mode != "ddp":  # the mean of the two local losses is the global-batch loss
        np.testing.assert_allclose(run.steps["loss"], single_run.steps["loss"], rtol=1e-12)
