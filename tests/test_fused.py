"""The compiled statistics (``fused=True``) agree with the eager path on every optimizer rule.

Both paths run the same float64 model from the same start, so every stored number (steps,
groups, charges, per-tensor table) must agree to float64 rounding: the two paths sum in different
orders, and q_n is read before the step on one and solved as q_{n+1} - dq on the other (one
rounding of q_{n+1}). Over tensors of at most a few hundred entries that is a few hundred ulps of
each column's scale, so the bound is 1e-12 x the column's largest magnitude plus 1e-9 relative.
Each case compiles one small program (a few seconds on two CPU cores).
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

import noether_dyn as nd
from noether_dyn.quantities.charges import S_, STATS
from tests.conftest import bn_mlp, train

SYMS = [
    nd.Symmetry("scale:0", "scale", ("0.weight", "0.bias")),
    nd.Symmetry("rescale:1", "rescale", ("1.weight", "1.bias", "3.weight"), (1, 1, -1)),
    nd.Symmetry("translation:3", "translation", ("3.weight", "3.bias")),
]


def _two_groups(model, **kw):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [{"params": decay, **kw}, {"params": rest, "weight_decay": 0.0}]


OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "sgd-momentum-wd": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2
    ),
    "sgd-nesterov-wd": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    "sgd-dampening": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, dampening=0.3),
    "sgd-plain-wd-maximize": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.05, weight_decay=1e-2, maximize=True
    ),
    "adam-l2": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-2),
    "adamw-two-groups": lambda m: torch.optim.AdamW(_two_groups(m, weight_decay=0.1), lr=1e-2),
    "adam-amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, amsgrad=True),
    "rmsprop-wd": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3, weight_decay=1e-2),
    "rmsprop-momentum-centered": lambda m: torch.optim.RMSprop(
        m.parameters(), lr=1e-3, momentum=0.5, centered=True
    ),
    "adagrad-wd": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, weight_decay=1e-2),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1),
    "rmsprop-maximize": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3, maximize=True),
}


def _run(tmp_path, name, fused, steps=5, every=1):
    """Train ``steps`` steps; returns the run and the (n_tensors, len(STATS)) statistics of each
    logged step as the monitor computed them."""
    model = bn_mlp()
    opt = OPTIMIZERS[name](model)
    run_dir = tmp_path / f"{name}-{fused}"
    with nd.watch(model, opt, run_dir, every=every, symmetries=SYMS, fused=fused) as mon:
        _record_stats(mon)
        train(model, opt, mon, steps=steps)
    return nd.load_run(run_dir), mon


def _record_stats(mon) -> None:
    mon.recorded = []
    mon.on_stats = lambda stats: mon.recorded.append(stats.clone())


def _stat_scales(stats: np.ndarray) -> np.ndarray:
    """Cauchy-Schwarz magnitude of each statistic (|<x, y>| <= |x| |y|): the scale its rounding
    error is relative to. q_n counts as |q_n| + |dq|, since the fused path solves it as
    q_{n+1} - dq (one rounding of each)."""
    c = {k: np.abs(stats[:, i]) for k, i in S_.items()}
    n = c["NUMEL"]
    g, d = np.sqrt(c["GG"]), np.sqrt(c["DD"])
    q = np.sqrt(c["QQ"]) + d
    gd = c["GDD"] / np.maximum(d, 1e-300)  # |G dq| for an isotropic G, its order otherwise
    scales = {
        "QQ": q * q, "QS": q * np.sqrt(n), "GG": g * g, "GQ": g * q, "GS": g * np.sqrt(n),
        "NUMEL": n, "DD": d * d, "DQ": d * q, "DS": d * np.sqrt(n), "GDD": c["GDD"],
        "GDQ": gd * q, "GDS": gd * np.sqrt(n), "IG": c["IG"],
    }  # fmt: skip
    return np.stack([scales[k] for k in STATS], axis=1)


def _assert_close(a, b, what: str, scale=None) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, what
    if scale is None:
        scale = np.nanmax(np.abs(b), axis=0, keepdims=True) if b.size else 0.0
    diff = np.abs(a - b)
    bound = 1e-12 * scale + 1e-9 * np.abs(b)
    bad = ~((diff <= bound) | (np.isnan(a) & np.isnan(b)))
    assert not bad.any(), f"{what}: max excess {np.nanmax(diff - bound)} at {np.argwhere(bad)[:3]}"


def _compare(fused, eager):
    (fused_run, fused_mon), (eager_run, eager_mon) = fused, eager
    assert len(fused_mon.recorded) == len(eager_mon.recorded) > 0
    for k, (a, b) in enumerate(zip(fused_mon.recorded, eager_mon.recorded)):
        b = b.numpy()
        _assert_close(a.numpy(), b, f"statistics of logged step {k}", scale=_stat_scales(b))
    for col in [c for c in eager_run.steps.columns if c != "wall_time"]:
        _assert_close(fused_run.steps[col], eager_run.steps[col], f"steps.{col}")
    # the split columns (decay, rule, ksb, defect, NLD) are linear in the statistics compared
    # above; several vanish by symmetry, so only their statistics have a meaningful scale
    cols = ["charge", "predicted", "predicted_ode", "grad_sq", "effective_lr", "angular_update"]
    _assert_close(fused_run.charges[cols], eager_run.charges[cols], "charges")
    numeric = [c for c in eager_run.tensors.columns if eager_run.tensors[c].dtype.kind == "f"]
    _assert_close(fused_run.tensors[numeric], eager_run.tensors[numeric], "tensors")
    numeric = [c for c in eager_run.groups.columns if eager_run.groups[c].dtype.kind == "f"]
    _assert_close(fused_run.groups[numeric], eager_run.groups[numeric], "groups")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_equals_eager(tmp_path, name):
    fused = _run(tmp_path, name, fused=True)
    assert fused[1].compiled.compiled_ok, "the fused program did not run"
    _compare(fused, _run(tmp_path, name, fused=False))


def test_fused_compiles_once_while_rates_and_bias_corrections_change(tmp_path):
    """A scheduler's lr and Adam's step count reach the program as tensor data: no recompile."""
    model = bn_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    with nd.watch(model, opt, tmp_path / "run", symmetries=SYMS, fused=True) as mon:
        train(model, opt, mon, steps=1, scheduler=sched)
        assert mon.compiled.compiled_ok
        train(model, opt, mon, steps=6, scheduler=sched)
    assert mon.fused and [p.variants for p in mon.compiled.programs.values()] == [1]
    assert len(nd.load_run(tmp_path / "run").steps) == 7


def test_fused_default_compiles_small_models_only_after_their_eager_rent(tmp_path):
    from noether_dyn.capture import plan as plan_module

    small = bn_mlp()
    mon = nd.watch(small, torch.optim.SGD(small.parameters(), lr=0.1), tmp_path / "a")
    assert mon.fused is True, "the compiled path is chosen; when it starts is the planner's"
    assert mon._planner.rent_seconds == plan_module.COMPILE_RENT_SECONDS > 0
    mon.close()
    big = torch.nn.Linear(1000, 1000)
    mon = nd.watch(big, torch.optim.SGD(big.parameters(), lr=0.1), tmp_path / "b")
    assert mon.fused is True and mon._planner.rent_seconds == 0.0
    mon.close()
    mon = nd.watch(big, torch.optim.SGD(big.parameters(), lr=0.1), tmp_path / "c", snapshot=True)
    assert mon.fused is False, "snapshots take the eager path"
    mon.close()
    with pytest.raises(ValueError, match="fused must be"):
        nd.watch(small, torch.optim.SGD(small.parameters(), lr=0.1), tmp_path / "d", fused=1)


@pytest.mark.parametrize("compiler", ["standalone", "torch.compile"])
def test_failed_compile_warns_once_and_falls_back_to_eager(tmp_path, monkeypatch, compiler):
    """Inductor's standalone compile fails (or, on a torch without it, torch.compile does): the
    monitor warns once and goes on with the eager path, with the same numbers."""

    def broken_compile(fn, *args, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found")

        if compiler == "standalone":
            run()
        return run

    if compiler == "standalone":
        monkeypatch.setattr(torch._inductor, "standalone_compile", broken_compile)
    else:
        monkeypatch.delattr(torch._inductor, "standalone_compile")
        monkeypatch.setattr(torch, "compile", broken_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = _run(tmp_path, "adamw-two-groups", fused=True)
    messages = [str(w.message) for w in caught if "fused statistics" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler found" in messages[0]
    assert fused[1].fused is False and not fused[1].compiled.compiled_ok
    _compare(fused, _run(tmp_path, "adamw-two-groups", fused=False))


def test_torch_compile_fallback_equals_eager(tmp_path, monkeypatch):
    """On a torch without ``torch._inductor.standalone_compile`` the program goes through
    ``torch.compile`` and gives the same numbers."""
    monkeypatch.delattr(torch._inductor, "standalone_compile")
    fused = _run(tmp_path, "sgd-momentum-wd", fused=True)
    assert fused[1].compiled.compiled_ok
    programs = fused[1].compiled.programs.values()
    assert [p.variants for p in programs] == [0]  # no standalone variants
    _compare(fused, _run(tmp_path, "sgd-momentum-wd", fused=False))


def test_program_compiles_a_variant_per_input_signature():
    """A call whose inputs differ from every compiled variant in dtype, shape or strides compiles
    a new variant (as torch.compile's guards would) and agrees with the eager program; a call
    that matches one reuses it."""
    from noether_dyn.optimizers.sgd import heavy_ball_rule
    from noether_dyn.quantities.fused import StatsProgram

    gen = torch.Generator().manual_seed(0)

    def inputs(dtype, transposed=False, rows=5):
        q = torch.randn(3, rows, dtype=dtype, generator=gen)
        q = q.t().contiguous().t() if transposed else q
        tensors = [q, torch.randn(4, dtype=dtype, generator=gen)]
        grads = [torch.randn_like(t) for t in tensors]
        states = [(torch.randn_like(t),) for t in tensors]
        coef = torch.zeros(2, 6, dtype=torch.float64)
        coef[:, 0], coef[:, 1] = -0.1, 10.0  # dq = -lr b, G = 10 I
        return tensors, grads, states, coef

    args = dict(rules=[heavy_ball_rule] * 2, translation=[False, True], symmetric=[True, True])
    compiled, eager = StatsProgram(**args), StatsProgram(**args, compile=False)
    cases = [
        (torch.float64, False, 5, 1),
        (torch.float64, False, 5, 1),  # the same signature: no new variant
        (torch.float32, False, 5, 2),
        (torch.float64, True, 5, 3),  # same shape and dtype, other strides
        (torch.float64, False, 7, 4),
    ]
    for dtype, transposed, rows, variants in cases:
        call = inputs(dtype, transposed, rows)
        stats, rows_out = compiled(*call)
        assert compiled.variants == variants and rows_out is None
        expected, _ = eager(*call)
        # the same float64 sums of at most 21 terms of order 1, in two orders: a few ulps
        torch.testing.assert_close(stats, expected, rtol=1e-12, atol=1e-12)


def test_fused_with_a_closure_and_a_tensor_without_gradient(tmp_path):
    """A closure makes the gradients inside the step; a frozen tensor has none: the step goes
    to the eager path (q_n solved from the rebuilt update) and agrees with a plain eager run."""
    runs = {}
    for fused in (True, False):
        model = bn_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(32, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(4))
        run_dir = tmp_path / f"closure-{fused}"
        with nd.watch(model, opt, run_dir, symmetries=SYMS, fused=fused) as mon:
            _record_stats(mon)
            for k in range(4):
                model[3].bias.requires_grad_(k < 2)  # no gradient from step 2 on

                def closure(model=model, opt=opt, x=x, y=y):
                    opt.zero_grad()
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                opt.step(closure)
        runs[fused] = (nd.load_run(run_dir), mon)
    assert runs[True][1].compiled.compiled_ok
    _compare(runs[True], runs[False])


def test_fused_adam_step_counts_on_the_device(tmp_path, monkeypatch):
    """``fused=True`` (and capturable) Adam keep their step counts as tensors on the device; the
    fused kernels form the bias corrections in double. Simulated on the CPU by reading the count
    as a tensor: both paths must then rebuild the update the optimizer took, so that q_n solved as
    q_{n+1} - dq (fused path) equals q_n read before the step (eager path)."""
    import noether_dyn.optimizers.adam as adam

    monkeypatch.setattr(adam, "step_count", lambda state: state["step"])
    monkeypatch.setattr(adam, "_counts_in_program", lambda group, counts, device: False)
    OPTIMIZERS_DEVICE = {
        "adamw-fused-kernel": lambda m: torch.optim.AdamW(
            m.parameters(), lr=1e-2, weight_decay=0.1, fused=True
        )
    }
    monkeypatch.setattr(sys.modules[__name__], "OPTIMIZERS", OPTIMIZERS_DEVICE)
    fused = _run(tmp_path, "adamw-fused-kernel", fused=True)
    assert fused[1].compiled.compiled_ok
    assert isinstance(fused[1].optimizer.state[fused[1].params[0]]["step"], torch.Tensor)
    _compare(fused, _run(tmp_path, "adamw-fused-kernel", fused=False))


def test_fused_adam_on_the_cpu_reads_no_step_count_on_the_host(tmp_path, monkeypatch):
    """Plain Adam's step counts are CPU tensors: they enter the compiled program as they are (its
    rule forms the bias corrections), so a logged step reads none of them on the host."""
    import noether_dyn.optimizers.adam as adam

    eager = _run(tmp_path, "adamw-two-groups", fused=False)

    def host_read(group, state):
        raise AssertionError("the fused path read a step count on the host")

    monkeypatch.setattr(adam, "_step", host_read)
    fused = _run(tmp_path, "adamw-two-groups", fused=True)
    assert fused[1].compiled.compiled_ok and fused[1].fused
    _compare(fused, eager)
