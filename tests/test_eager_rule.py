"""The eager backend runs each optimizer's one elementwise rule (``fused_step``): the update it
rebuilds equals the parameters' real change, and an isotropic G = c I is a 0-d G that the
statistics apply to reduced columns.

float64 parameters and state: the rebuilt dq differs from q_{n+1} - q_n by the rounding of
q_{n+1} (and of q_n solved from it where decay couples them), a few ulps of |q| per entry, so
a relative 1e-10 of max|q| bounds it with margin; G is compared at 1e-12 (a few operations).
"""

from __future__ import annotations

import pytest
import torch

from noether_dyn.capture.eager import run_rule
from noether_dyn.optimizers import ADAPTERS, adapter_for
from noether_dyn.optimizers.base import EagerRows, OptimizerAdapter

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd-dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5, dampening=0.3),
    "sgd-nesterov-wd-maximize": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True
    ),
    "adam-l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "rmsprop-wd": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, weight_decay=1e-2),
    "rmsprop-momentum-centered": lambda ps: torch.optim.RMSprop(
        ps, lr=1e-2, momentum=0.7, centered=True
    ),
    "adagrad-wd": lambda ps: torch.optim.Adagrad(ps, lr=0.1, weight_decay=1e-2),
}


def test_every_adapter_states_its_update_once():
    """No adapter carries a second (foreach) form of its update beside the elementwise rule."""
    for adapter in ADAPTERS:
        assert adapter.fused_step is not OptimizerAdapter.fused_step, adapter.name
        for name in ("update", "update_sq_norms"):
            assert not hasattr(adapter, name), f"{adapter.name}.{name}: a second statement"


@pytest.mark.parametrize("case", sorted(OPTIMIZERS))
@pytest.mark.parametrize("eager", [True, False])
def test_rule_run_eagerly_rebuilds_the_real_update(case, eager):
    """``run_rule`` on the packed step (host coefficients with ``eager=True``, the compiled
    program's packing without) gives dq = q_{n+1} - q_n; G is 0-d exactly when isotropic."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model = model.double()
    params = list(model.parameters())
    opt = OPTIMIZERS[case](params)
    adapter = adapter_for(opt)
    x = torch.randn(16, 5, dtype=torch.float64)
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    group = opt.param_groups[0]
    step = adapter.fused_step(opt, group, params, params[0].device, eager=eager)
    assert step is not None
    out = run_rule(step, params, [p.grad for p in params])
    for p, q0, (dq, metric, inverse) in zip(params, before, out):
        scale = float(q0.abs().max())
        torch.testing.assert_close(dq, p.detach() - q0, rtol=0.0, atol=1e-10 * scale)
        if case.startswith("sgd"):
            assert metric.dim() == 0, "SGD's G = c I is a 0-d tensor, not a full pass"
            c = 1.0 / (1.0 - 0.3) if case == "sgd-dampening" else 1.0
            assert float(metric) == pytest.approx(c, rel=1e-12)
        else:
            assert metric.shape == p.shape
        if inverse is not None:
            torch.testing.assert_close(inverse, metric.reciprocal(), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("case", sorted(OPTIMIZERS))
def test_converted_coefficients_give_the_same_bits(case):
    """The eager backend's rows (``EagerRows``: each group's coefficients converted once to the
    parameters' dtype) give every rule bit for bit what the float64 row converted per call
    (``c[i].to(dtype)``, as the compiled program reads it) gives: float32 parameters, where
    the conversion rounds. An isotropic G stays the float64 coefficient, not its float32
    rounding."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    params = list(model.parameters())
    opt = OPTIMIZERS[case](params)
    x = torch.randn(16, 5)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    step = adapter_for(opt).fused_step(opt, opt.param_groups[0], params, x.device, eager=True)
    assert step is not None
    eager_rows = EagerRows(step.coef).rows
    for i, p in enumerate(params):
        ref = step.rule(p.detach(), p.grad, step.states[i], step.coef[i])
        got = step.rule(p.detach(), p.grad, step.states[i], eager_rows[i])
        for a, b in zip(ref, got):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b), case
