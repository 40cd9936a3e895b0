"""Per-unit charges end to end: ``find_symmetries(..., granularity="unit")``, ``watch(...,
granularity="unit")`` and the stored unit rows, on models the tests do not tune to.

Tolerances. Models are float64 (unit roundoff u = 1.1e-16). A directional derivative of an exact
symmetry is a sum of ~1e3 rounded products: |<g, xi_u>| / (|g_u| |xi_u|) <= 1e-12 leaves a wide
margin over the 1e-16..1e-15 measured; a broken direction is 1e-4..1 (shown by the negative
controls). Unit charges are sums of a parent's squares split into slices, so the sum over units
equals the parent's charge to ~n_terms u relative: 1e-12. The per-step split decay + rule + ksb
is the exact algebraic identity Q_{n+1} - Q_n = 2<q_n, dq_n>_S + |dq_n|^2_S evaluated in float64
on q_{n+1} = q_n + dq_n: its residual is rounding of |q|^2 (~1e-15 relative to the charge); 1e-11.
"""

from __future__ import annotations

import collections
import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import noether_dyn as nd  # noqa: E402
from analysis._common import mixture  # noqa: E402
from analysis.per_unit_laws import mlp  # noqa: E402
from noether_dyn import Symmetry, find_symmetries  # noqa: E402
from noether_dyn.symmetries.units import choose_units  # noqa: E402

DIRECTIONAL = 1e-12
SUM_REL = 1e-12
SPLIT_REL = 1e-11


def _mlp_units(seed: int = 1) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[Symmetry]]:
    model = mlp(seed)
    x, y = mixture(64, 6, 4, seed=seed, dtype=torch.float64)
    found = find_symmetries(model, x, y, nn.functional.cross_entropy, granularity="unit")
    return model, x, y, found


def _loss_fn(model: nn.Module, inputs, targets=None, loss_fn=None):
    """The loss as a function of the named parameters (the model's own ``loss`` without
    ``loss_fn``)."""

    def loss(params):
        args = (inputs,) if isinstance(inputs, torch.Tensor) else ()
        kwargs = inputs if isinstance(inputs, dict) else {}
        buffers = {k: b.clone() for k, b in model.named_buffers()}  # BN updates copies
        out = torch.func.functional_call(model, ({**params}, buffers), args, kwargs)
        return loss_fn(out, targets) if loss_fn is not None else out.loss

    return loss


def _directional(loss, params: dict, sym: Symmetry) -> float:
    """|d/ds L(psi_s(q))| at s = 0 = |<g, xi(q)>| (reverse-mode AD: forward mode has no rule
    for the CPU flash attention), relative to |g_u| |xi_u|, g_u being g on the unit's slices;
    xi is built here from the slices, independently of ``Symmetry.generator``."""
    g = torch.func.grad(loss)(params)
    slices = sym.slices or (None,) * len(sym.params)
    dot = gg = xx = 0.0
    for name, sign, where in zip(sym.params, sym.signs, slices):
        q = params[name] if where is None else params[name].select(*where)
        gs = g[name] if where is None else g[name].select(*where)
        xi = torch.full_like(q, sign) if sym.kind == "translation" else sign * q
        dot += float((gs * xi).sum())
        gg += float(gs.square().sum())
        xx += float(xi.square().sum())
    return abs(dot) / float(np.sqrt(gg * xx))


def _apply(params: dict, sym: Symmetry, s: float) -> dict:
    """psi_s of one unit: q -> q * e^(s sign) on its slices (scale, rescale), q + s sign
    (translation)."""
    out = dict(params)
    slices = sym.slices or (None,) * len(sym.params)
    for name, sign, where in zip(sym.params, sym.signs, slices):
        q = params[name].clone()
        part = q if where is None else q.select(*where)
        if sym.kind == "translation":
            part.add_(s * sign)
        else:
            part.mul_(float(np.exp(s * sign)))
        out[name] = q
    return out


def test_invalid_granularity_names_the_argument_and_choices() -> None:
    model, x, y, _ = _mlp_units()
    with pytest.raises(ValueError, match=r"granularity.*'layer', 'unit'.*'neuron'"):
        find_symmetries(model, x, y, nn.functional.cross_entropy, granularity="neuron")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="granularity"):
        nd.watch(model, opt, None, symmetries=[], granularity="units")


def test_mlp_has_16_rescale_and_9_translation_units(tmp_path: Path) -> None:
    """Marcotte, Gribonval & Peyre (NeurIPS 2023): one rescale law per hidden ReLU unit (8 + 8);
    softmax adds one translation law per head input column (8) and one for its bias."""
    model, x, y, found = _mlp_units()
    layer = [s for s in found if not s.parent]
    units = [s for s in found if s.parent]
    assert [s.name for s in layer] == [s.name for s in find_symmetries(
        model, x, y, nn.functional.cross_entropy)]  # fmt: skip
    assert collections.Counter(u.kind for u in units) == {"rescale": 16, "translation": 9}
    assert {u.parent for u in units} == {s.name for s in layer}
    assert all(u.verified for u in units)
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = _loss_fn(model, x, y, nn.functional.cross_entropy)
    base = float(loss(params))
    for u in units:
        assert _directional(loss, params, u) <= DIRECTIONAL, u.name
        # the finite transformation leaves the loss unchanged (to rounding)
        assert float(loss(_apply(params, u, 0.3))) == pytest.approx(base, rel=1e-13), u.name
        # and the parent's charge is the sum of its units'
    for p in layer:
        total = sum(float(u.charge(params)) for u in units if u.parent == p.name)
        assert total == pytest.approx(float(p.charge(params)), rel=SUM_REL)


def test_wrong_axis_is_refused_numerically() -> None:
    """A hidden layer of 8 x 8: its outgoing weights could be cut along either axis; only the
    input axis (dim 1) is a symmetry, and its rows (dim 0) break it: the split is measured."""
    model, x, y, found = _mlp_units()
    unit = next(s for s in found if s.parent == "rescale:0")
    assert unit.slices[2][0] == 1  # 2.weight cut along its input axis
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = _loss_fn(model, x, y, nn.functional.cross_entropy)
    wrong = Symmetry("wrong", "rescale", unit.params, unit.signs,
                     slices=(unit.slices[0], unit.slices[1], (0, unit.slices[2][1])))  # fmt: skip
    assert _directional(loss, params, wrong) > 1e-4


def _train(model, x, y, opt, run_dir, symmetries, steps=8, batch=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with nd.watch(model, opt, run_dir, symmetries=symmetries) as mon:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            mon.log_loss(loss)
            loss.backward()
            opt.step()
    return nd.load_run(run_dir)


@pytest.mark.parametrize("name", ["sgdm", "adamw"])
def test_watched_units_sum_to_parent_and_split_exactly(tmp_path: Path, name: str) -> None:
    model, x, y, found = _mlp_units()
    if name == "sgdm":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    run = _train(model, x, y, opt, tmp_path / name, found)
    table = run.symmetries.set_index("symmetry")
    units = [s for s in found if s.parent]
    assert (table.loc[[u.name for u in units], "parent"] == [u.parent for u in units]).all()
    assert (table.loc[[s.name for s in found if not s.parent], "parent"] == "").all()
    c = run.charges
    assert set(c["symmetry"]) == {s.name for s in found}
    for column in ("charge", "decay", "rule", "ksb", "predicted", "grad_sq"):
        wide = c.pivot(index="step", columns="symmetry", values=column)
        for p in {u.parent for u in units}:
            kids = [u.name for u in units if u.parent == p]
            scale = float(c.loc[c.symmetry == p, "charge"].abs().max())
            err = (wide[kids].sum(axis=1) - wide[p]).abs().max()
            assert err <= SUM_REL * scale, (column, p, err)
    for sym in found:
        rows = run.charge(sym.name).sort_index()
        change = np.diff(rows["charge"].to_numpy())
        split = (rows["decay"] + rows["rule"] + rows["ksb"]).to_numpy()[:-1]
        scale = max(float(rows["charge"].abs().max()), 1e-300)
        assert np.abs(change - split).max() <= SPLIT_REL * scale, sym.name
        if sym.kind == "translation":
            assert (rows["ksb"] == 0).all()


def test_plain_gd_conserves_each_unit_to_order_eta_squared(tmp_path: Path) -> None:
    """Without decay or momentum a unit's change per step is its kinetic term |dq_n|^2_S =
    eta^2 |g_n|^2_S: halving eta over the same steps quarters the drift (to O(eta^3))."""
    drifts = []
    for lr in (2e-3, 1e-3):
        model, x, y, found = _mlp_units()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        run = _train(model, x, y, opt, tmp_path / f"lr{lr}", found, steps=10)
        units = [s.name for s in found if s.parent and s.kind == "rescale"]
        wide = run.charges.pivot(index="step", columns="symmetry", values="charge")[units]
        drift = (wide.iloc[-1] - wide.iloc[0]).abs()
        ksb = run.charges.pivot(index="step", columns="symmetry", values="ksb")[units]
        # the drift is the sum of the kinetic terms (the rule's share is 0 for an exact law)
        assert np.allclose(
            (wide.iloc[-1] - wide.iloc[0]).to_numpy(), ksb.iloc[:-1].sum().to_numpy(),
            rtol=1e-6, atol=1e-12 * float(wide.abs().max().max()),
        )  # fmt: skip
        drifts.append(drift.to_numpy())
        translation = [s.name for s in found if s.parent and s.kind == "translation"]
        t_wide = run.charges.pivot(index="step", columns="symmetry", values="charge")[translation]
        assert float((t_wide.iloc[-1] - t_wide.iloc[0]).abs().max()) <= 1e-13
    ratio = drifts[0].sum() / drifts[1].sum()
    assert 3.6 < ratio < 4.4, ratio


class _BNConvNet(nn.Module):
    """conv -> BatchNorm2d -> ReLU -> mean pool -> linear head, float64."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.bn = nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_batchnorm_cnn_has_per_channel_scale_units(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _BNConvNet().double()
    x = torch.randn(16, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    found = find_symmetries(model, x, y, nn.functional.cross_entropy, granularity="unit")
    scale = [s for s in found if s.parent == "scale:conv"]
    assert [s.name for s in scale] == [f"scale:conv[{j}]" for j in range(5)]
    assert all(s.slices == ((0, j), (0, j)) for j, s in enumerate(scale))
    # each channel is scale invariant up to BN's eps: with eps shrunk 1e8-fold, to rounding
    exact = copy.deepcopy(model)
    exact.bn.eps = 1e-13
    params = {k: v.detach() for k, v in exact.named_parameters()}
    loss = _loss_fn(exact, x, y, nn.functional.cross_entropy)
    for s in scale:
        assert _directional(loss, params, s) <= 1e-9, s.name
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    run = _train(model, x, y, opt, tmp_path / "bn", found, steps=4, batch=16)
    wide = run.charges.pivot(index="step", columns="symmetry", values="charge")
    assert np.allclose(wide[[s.name for s in scale]].sum(axis=1), wide["scale:conv"], rtol=1e-12)
    rate = run.charges.pivot(index="step", columns="symmetry", values="effective_lr")
    assert rate[[s.name for s in scale]].notna().all().all()


def test_layernorm_scale_is_not_split() -> None:
    """A LayerNorm makes the whole layer scale invariant, not each row: the per-row split is
    measured broken and the parent keeps no units (its note says so)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(32, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    found = find_symmetries(model, x, y, nn.functional.cross_entropy, granularity="unit")
    parent = next(s for s in found if s.kind == "scale" and not s.parent)
    assert not [s for s in found if s.parent == parent.name]
    assert "no per-unit split" in parent.note
    params = {k: v.detach() for k, v in model.named_parameters()}
    row = Symmetry("row", "scale", parent.params, slices=tuple((0, 0) for _ in parent.params))
    assert _directional(_loss_fn(model, x, y, nn.functional.cross_entropy), params, row) > 1e-4


transformers = pytest.importorskip("transformers")


def _hf(build):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import test_symmetries_hf as hf

    torch.manual_seed(0)
    model, inputs = getattr(hf, build[0])(*build[1:])
    return model.train(), inputs


def test_bert_has_per_dim_query_key_units() -> None:
    """Per attention dim i, (W_q[i], b_q[i]) -> a (W_q[i], b_q[i]) and (W_k[i], b_k[i]) / a
    leaves every score, hence the loss, unchanged: 32 q/k laws per layer (both cut along dim 0),
    and per dim of v / column of the output dense."""
    model, inputs = _hf(("bert",))
    found = find_symmetries(model, inputs, granularity="unit")
    a = "bert.encoder.layer.0.attention.self"
    qk = [s for s in found if s.parent.endswith(f"{a}.query~{a}.key")]
    assert len(qk) == 32 and all(all(w[0] == 0 for w in s.slices) for s in qk)
    vo = [s for s in found if s.parent == f"rescale:{a}.value"]  # its one reader: the output dense
    assert len(vo) == 32 and [w[0] for w in vo[0].slices] == [0, 0, 1]
    checked = copy.deepcopy(model).double()
    checked.eval()  # no dropout: a deterministic loss for the derivative
    params = {k: v.detach() for k, v in checked.named_parameters()}
    loss = _loss_fn(checked, inputs)
    base = float(loss(params))
    for s in qk[::7] + vo[::11]:
        assert _directional(loss, params, s) <= DIRECTIONAL, s.name
        assert float(loss(_apply(params, s, 0.3))) == pytest.approx(base, rel=1e-12), s.name


def test_llama_rope_couples_query_key_dims() -> None:
    """Under RoPE the dims i and i + d/2 of a head rotate together, so a single-dim q/k rescale
    is no symmetry (measured: the derivative is far from 0) and the q/k parent keeps no units;
    the rescales through the RMSNorm gains and the MLP split per dim."""
    model, inputs = _hf(("llama", False))
    found = find_symmetries(model, inputs, granularity="unit")
    parents = {s.name: s for s in found if not s.parent}
    counts = collections.Counter(s.parent for s in found if s.parent)
    qk = next(n for n in parents if "q_proj~" in n and "layers.0" in n)
    assert counts[qk] == 0 and "no per-unit split" in parents[qk].note
    assert counts["rescale:model.layers.0.mlp.up_proj"] == 48  # its one reader: down_proj
    checked = copy.deepcopy(model).double().eval()
    params = {k: v.detach() for k, v in checked.named_parameters()}
    loss = _loss_fn(checked, inputs)
    one_dim = Symmetry("q0", "rescale", parents[qk].params, parents[qk].signs,
                       slices=tuple((0, 0) for _ in parents[qk].params))  # fmt: skip
    assert _directional(loss, params, one_dim) > 1e-6
    mlp_unit = next(s for s in found if s.parent == "rescale:model.layers.0.mlp.up_proj")
    assert _directional(loss, params, mlp_unit) <= DIRECTIONAL


def test_declared_symmetries_split_without_a_batch() -> None:
    model = mlp(0)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    parent = Symmetry("rescale:h1", "rescale", ("0.weight", "0.bias", "2.weight"), (1, 1, -1))
    out = choose_units([parent], shapes, [])
    assert [s.parent for s in out] == [""] + ["rescale:h1"] * 8
    assert all(s.verified is None for s in out[1:])
    assert out[3].slices == ((0, 2), (0, 2), (1, 2))


def test_old_store_without_unit_columns_reads(tmp_path: Path) -> None:
    """A store whose symmetries table lacks parent/slices reads them as empty."""
    import sqlite3

    model, x, y, _ = _mlp_units()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    layer = find_symmetries(model, x, y, nn.functional.cross_entropy)
    _train(model, x, y, opt, tmp_path / "old", layer, steps=2)
    path = tmp_path / "old" / "run.sqlite"
    con = sqlite3.connect(path)
    con.execute("ALTER TABLE symmetries DROP COLUMN parent")
    con.execute("ALTER TABLE symmetries DROP COLUMN slices")
    con.commit()
    con.close()
    run = nd.load_run(tmp_path / "old")
    assert (run.symmetries["parent"] == "").all()
    assert all(s == () for s in run.symmetries["slices"])
    assert len(run.charge(layer[0].name)) == 2


def test_zero_config_watch_splits_on_the_first_step(tmp_path: Path) -> None:
    """No inputs, no symmetries: detection at the first optimizer step, then the per-unit split
    on that step's real gradients; a resumed run rebuilds the units (parent, slices) from the
    store."""
    model = mlp(2)
    x, y = mixture(64, 6, 4, seed=2, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

    def steps(mon, n):
        for _ in range(n):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            mon.log_loss(loss)
            loss.backward()
            opt.step()

    with nd.watch(model, opt, tmp_path / "zc", granularity="unit") as mon:
        steps(mon, 3)
        tracked = mon.symmetries
    units = [s for s in tracked if s.parent]
    assert sum(u.kind == "rescale" for u in units) == 16
    assert {u.parent for u in units} <= {s.name for s in tracked if not s.parent}
    run = nd.load_run(tmp_path / "zc")
    wide = run.charges.pivot(index="step", columns="symmetry", values="charge")
    for p in {u.parent for u in units}:
        kids = [u.name for u in units if u.parent == p]
        assert np.allclose(wide[kids].sum(axis=1), wide[p], rtol=SUM_REL, atol=0)
    with nd.watch(model, opt, tmp_path / "zc", resume=True, granularity="unit") as mon:
        assert mon.symmetries == tracked
        steps(mon, 1)


def test_fused_request_with_units_warns_and_runs_eager(tmp_path: Path) -> None:
    model, x, y, found = _mlp_units()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(RuntimeWarning, match="fused=True is ignored"):
        mon = nd.watch(model, opt, tmp_path / "f", symmetries=found, fused=True)
    with mon:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert len(nd.load_run(tmp_path / "f").charges) == len(found)


def test_watch_detects_units_on_the_given_batch(tmp_path: Path) -> None:
    model, x, y, found = _mlp_units()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kw = dict(inputs=x, targets=y, loss_fn=nn.functional.cross_entropy, granularity="unit")
    with nd.watch(model, opt, tmp_path / "w", **kw) as mon:
        assert mon.symmetries == found
    declared = [s for s in found if not s.parent]
    with nd.watch(model, opt, tmp_path / "d", symmetries=declared, **kw) as mon:
        assert [s.name for s in mon.symmetries] == [s.name for s in found]
    with pytest.raises(ValueError, match="exact_decay"):
        nd.watch(model, opt, tmp_path / "e", symmetries=found, exact_decay=True)
