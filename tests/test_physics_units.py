"""Per-unit symmetries (noether_dyn.symmetries.units) on models the tests do not tune to: a
6-8-8-4 ReLU MLP whose layer-level records come from find_symmetries, and the BatchNorm MLP.

Identities: each unit's generator is orthogonal to every minibatch gradient (ReLU and softmax
are exact, so |<g, xi_u>| / (|g| |xi_u|) is rounding: below 1e-13 in float64); the unit
charges of a parent sum to the parent's charge (1e-13 relative, sums of ~100 float64 terms);
the unit masks partition the parent's signed support.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis._common import make_model, mixture  # noqa: E402
from analysis.per_unit_laws import mlp  # noqa: E402
from noether_dyn import Symmetry, find_symmetries  # noqa: E402
from noether_dyn.symmetries.units import UnitCharges, unit_symmetries  # noqa: E402


def _setup():
    model = mlp(1)
    x, y = mixture(64, 6, 4, seed=1, dtype=torch.float64)
    layer = find_symmetries(model, x, y, nn.functional.cross_entropy)
    return model, x, y, layer, unit_symmetries(model, layer)


def test_counts_parents_and_names() -> None:
    model, _, _, layer, units = _setup()
    assert len(layer) == 3
    assert sum(u.kind == "rescale" for u in units) == 16
    assert sum(u.kind == "translation" for u in units) == 9
    assert {u.parent for u in units} == {s.name for s in layer}
    assert len({u.name for u in units}) == len(units)


def test_units_are_symmetries_and_sum_to_parent() -> None:
    model, x, y, layer, units = _setup()
    params = {k: v.detach() for k, v in model.named_parameters()}
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {k: v.grad for k, v in model.named_parameters()}
    for u in units:
        xi = u.generator(params)
        dot = sum((grads[n] * t).sum() for n, t in xi.items())
        norm = torch.sqrt(
            sum(grads[n].square().sum() for n in xi) * sum(t.square().sum() for t in xi.values())
        )
        assert abs(float(dot)) <= 1e-13 * float(norm), u.name
    values = UnitCharges(units, params)(params)
    for sym in layer:
        member = [i for i, u in enumerate(units) if u.parent == sym.name]
        total = float(values[member].sum())
        assert total == pytest.approx(float(sym.charge(params)), rel=1e-13, abs=1e-13)
        for i in member:
            assert float(values[i]) == pytest.approx(float(units[i].charge(params)), rel=1e-13)
        # the unit masks partition the parent's signed support
        masks = [units[i].mask(params) for i in member]
        for name, sign in zip(sym.params, sym.signs):
            summed = sum(m[name] for m in masks if name in m)
            assert torch.equal(summed, torch.full_like(params[name], sign))


def test_per_channel_scale_on_batchnorm() -> None:
    model = make_model(6, 8, 4, bn2=False, seed=0, dtype=torch.float64)
    units = unit_symmetries(model, model.symmetries(("scale",)), per_channel_scale=True)
    assert [u.name for u in units] == [f"scale:fc1.weight[{j}]" for j in range(8)]
    params = {k: v.detach() for k, v in model.named_parameters()}
    assert units[3].mask(params)["fc1.weight"][3].eq(1).all()
    assert units[3].mask(params)["fc1.weight"].sum() == 6
    whole = unit_symmetries(model, model.symmetries(("scale",)))
    assert len(whole) == 1 and whole[0].parent == "scale:fc1"


def test_mismatched_units_raise() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(3, 2))
    bad = Symmetry("rescale:0", "rescale", ("0.weight", "0.bias", "2.weight"), (1, 1, -1))
    with pytest.raises(ValueError, match="number of units"):
        unit_symmetries(model, [bad])
    other = Symmetry("scale:x", "scale", ("nope",))
    with pytest.raises(ValueError, match="not parameters"):
        unit_symmetries(model, [other])


def test_per_unit_exact_momentum_prediction() -> None:
    """The pieces compose: MomentumPredictor vectorized over the 25 unit charges, fed by
    UnitCharges.inner(dq, dq), predicts every unit's charge under real SGD with momentum,
    dampening and weight decay to rounding (1e-11 of the largest unit charge over 60 steps, as
    in test_physics_momentum); the per-unit split closes every step (1e-13)."""
    from analysis._physics import Step, run
    from noether_dyn.quantities.momentum import MomentumPredictor

    model, _, _, _, units = _setup()
    named = dict(model.named_parameters())
    charges = UnitCharges(units, named)
    opt = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, dampening=0.2, weight_decay=1e-2
    )
    pred = MomentumPredictor(charges.linear)
    q0 = charges({k: v.detach() for k, v in named.items()})
    pred.start(q0)
    n = len(units)
    full = lambda v: torch.full((n,), v, dtype=torch.float64)  # noqa: E731
    worst = {"err": 0.0, "scale": float(q0.abs().max()), "split": 0.0}

    def on_step(st: Step) -> None:
        dq = {k: st.dq(k) for k in st.q}
        dsq = charges.inner(dq, dq)
        p = pred.advance(full(0.05), full(0.9), full(1e-2), dsq, dampening=full(0.2))
        measured = charges(st.q1)
        change = measured - charges(st.q)
        split = torch.where(charges.linear, charges.sums(dq), 2 * charges.inner(st.q, dq) + dsq)
        worst["split"] = max(worst["split"], float((change - split).abs().max()))
        worst["scale"] = max(worst["scale"], float(measured.abs().max()))
        worst["err"] = max(worst["err"], float((p - measured).abs().max()))

    run(model, opt, steps=60, on_step=on_step)
    assert worst["err"] <= 1e-11 * worst["scale"]
    assert worst["split"] <= 1e-13 * worst["scale"]
