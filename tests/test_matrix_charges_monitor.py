"""Matrix-valued GL charges end to end: found (symmetries/matrix.py), monitored
(``watch(matrix_charges=...)``, capture/matrix.py), stored (table ``matrix_charges``) and read
(``run.matrix_charges``, ``run.matrix_charge``).

Tolerances (float64 throughout unless said):

* Closure of the stored split: C_{n+1} - C_n = first_order + kinetic is algebra on the stored
  q_n and q_{n+1}; each entry is a sum of dot products of length <= 7 with O(1) factors, so its
  rounding is a few u (|L|^2 + |R|^2), u = 1.1e-16: we allow 1e-14 (|L|^2 + |R|^2).
* Conservation: per step the charge moves by the kinetic term eta^2 (G_L G_L^T - G_R G_R^T),
  whose Frobenius norm is at most eta^2 (|G_L|^2 + |G_R|^2) <= eta^2 |g|^2, so the drift over N
  steps is at most eta^2 sum_n |g_n|^2 (the run's own grad_norm column) plus rounding. At
  eta = 3e-7 and N = 40 on the net below, |g_n|^2 = 6.1 gives a bound 40 * 9e-14 * 6.1 = 2.2e-11,
  against |C_0|_F = 0.89: 2.5e-11 relative, under the 1e-10 asserted (the bound is asserted on
  the run's own numbers; the largest entry's measured drift is 2.2e-12 relative).
* Decay: with the symmetry G_L L^T = R G_R^T the SGD step gives exactly
  C_{n+1} = (1 - eta lambda)^2 C_n + eta^2 (G_L G_L^T - G_R G_R^T); the gradient identity holds
  to rounding (1e-16 relative), so the residual is 1e-13 |C| at most.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import noether_dyn as nd
from noether_dyn.export import export_run
from noether_dyn.quantities.matrix_charges import composed_pair, gd_prediction
from noether_dyn.store import load_run
from noether_dyn.symmetries.matrix import (
    Block,
    MatrixSymmetry,
    check_matrix_symmetries,
    find_matrix_symmetries,
)

NAME = "gl:0>1"


def linear_net(seed: int = 0, act: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(seed)
    mid = [act] if act is not None else []
    return nn.Sequential(nn.Linear(6, 5), *mid, nn.Linear(5, 4)).double()


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    return x, x @ torch.randn(6, 4, generator=g, dtype=torch.float64)


def run_linear(tmp_path, make_opt, steps: int, on_grads=None, name: str = "run"):
    model = linear_net()
    x, y = data()
    opt = make_opt(model.parameters())
    mon = nd.watch(model, opt, tmp_path / name, inputs=x, targets=y, loss_fn=nn.MSELoss(),
                   matrix_charges=True)  # fmt: skip
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.log_loss(loss)
        if on_grads is not None:
            on_grads(model)
        opt.step()
    mon.close()
    return load_run(tmp_path / name), model


def scale_of(model: nn.Sequential) -> float:
    """|L|_F^2 + |R|_F^2 of the pair: the size of every product in C and its split."""
    w1, w2, b1 = (t.detach() for t in (model[0].weight, model[1].weight, model[0].bias))
    left, right = composed_pair(w1, w2, b1)
    return float(left.double().square().sum() + right.double().square().sum())


def test_linear_net_gets_one_record_with_all_entries(tmp_path) -> None:
    run, _ = run_linear(tmp_path, lambda p: torch.optim.SGD(p, lr=1e-3), steps=5)
    (record,) = run.meta["matrix_symmetries"]
    assert record["name"] == NAME and record["n"] == 5 and record["verified"]
    m = run.matrix_charges
    assert len(m) == 5 * 15  # n(n+1)/2 = 15 entries per logged step
    assert (m["i"] <= m["j"]).all()
    assert run.matrix_charge(NAME).shape == (5, 5, 5)
    assert list(run.matrix_charge_steps(NAME)) == [0, 1, 2, 3, 4]


def test_small_step_gd_conserves_every_entry(tmp_path) -> None:
    eta, steps = 3e-7, 40
    run, _ = run_linear(tmp_path, lambda p: torch.optim.SGD(p, lr=eta), steps)
    c = run.matrix_charge(NAME)
    kin = run.matrix_charge(NAME, "kinetic")
    c0 = np.linalg.norm(c[0])
    # the stored rows end at C_{N-1}; C_N = C_{N-1} + its split
    c_end = c[-1] + run.matrix_charge(NAME, "first_order")[-1] + kin[-1]
    drift = np.abs(c_end - c[0]).max() / c0
    bound = eta**2 * float((run.steps["grad_norm"] ** 2).sum()) / c0
    assert bound < 1e-10  # the arithmetic of the module docstring, measured on this run
    assert drift < 1e-10
    assert drift <= bound * 1.01 + 1e-14  # eta^2 bound plus rounding
    # not vacuous: at eta = 1e-2 the same net drifts far beyond 1e-10
    run2, _ = run_linear(tmp_path, lambda p: torch.optim.SGD(p, lr=1e-2), steps, name="big")
    c2 = run2.matrix_charge(NAME)
    assert np.abs(c2[-1] - c2[0]).max() / np.linalg.norm(c2[0]) > 1e-6


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=1e-2),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.Adam(p, lr=1e-2),
    ],
    ids=["sgd", "sgd-momentum-decay", "adam"],
)
def test_stored_split_closes_to_rounding(tmp_path, make_opt) -> None:
    run, model = run_linear(tmp_path, make_opt, steps=25)
    c = run.matrix_charge(NAME)
    split = run.matrix_charge(NAME, "first_order") + run.matrix_charge(NAME, "kinetic")
    err = np.abs(c[1:] - c[:-1] - split[:-1]).max()
    assert err <= 1e-14 * scale_of(model)
    assert np.abs(split[:-1]).max() > 1e4 * err  # the change itself is far above rounding


@pytest.mark.parametrize("exact_decay", [False, True])
def test_decay_column_is_instantaneous_under_momentum_and_nan_under_adam_l2(
    tmp_path, exact_decay
) -> None:
    """SGD with momentum: ``decay`` is -2 eta lambda C_n whatever ``exact_decay`` (which acts on
    the scalar charges only); Adam with coupled L2: NaN, and ``meta["matrix_decay"]`` says so."""
    eta, lam = 1e-2, 1e-2
    model = linear_net()
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=eta, momentum=0.9, weight_decay=lam)
    sym = nd.Symmetry("r", "rescale", ("0.weight", "0.bias", "1.weight"), (1.0, 1.0, -1.0))
    gl = find_matrix_symmetries(model, x, y, nn.MSELoss(), rescales=[sym])
    with nd.watch(model, opt, tmp_path / "m", symmetries=[sym], matrix_charges=gl,
                  exact_decay=exact_decay):  # fmt: skip
        for _ in range(5):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    run = load_run(tmp_path / "m")
    assert run.meta["matrix_decay"] == ["instantaneous"]
    c, decay = run.matrix_charge(NAME), run.matrix_charge(NAME, "decay")
    # one float64 product (-2 eta lambda) * C_n: equal to 1 ulp
    assert np.allclose(decay, -2 * eta * lam * c, rtol=2.3e-16, atol=0)
    run_adam, _ = run_linear(
        tmp_path, lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=lam), steps=3, name="adam"
    )
    assert run_adam.meta["matrix_decay"] == ["nan"]
    m = run_adam.matrix_charges
    assert m["decay"].isna().all() and m["rule"].isna().all() and m["first_order"].notna().all()


def test_weight_decay_follows_the_exact_matrix_recurrence(tmp_path) -> None:
    eta, lam = 1e-2, 1e-2
    grads = []

    def keep(model):
        left, right = composed_pair(model[0].weight.grad, model[1].weight.grad, model[0].bias.grad)
        grads.append((left.clone(), right.clone()))

    opt = lambda p: torch.optim.SGD(p, lr=eta, weight_decay=lam)  # noqa: E731
    run, _ = run_linear(tmp_path, opt, steps=30, on_grads=keep)
    c = run.matrix_charge(NAME)
    pred = np.stack(
        [gd_prediction(torch.from_numpy(c[k]), *grads[k], eta, lam).numpy() for k in range(29)]
    )
    scale = np.abs(c).max()
    assert np.abs(pred - c[1:]).max() <= 1e-13 * scale
    decay = run.matrix_charge(NAME, "decay")
    assert np.allclose(decay, -2 * eta * lam * c, rtol=1e-15, atol=0)
    # the learning rule's first-order part vanishes by the symmetry: decay is all of it
    rule = run.matrix_charge(NAME, "rule")
    assert np.abs(rule).max() <= 1e-14 * scale
    assert np.abs(decay).max() > 1e6 * np.abs(rule).max()  # decay is far above rounding
    assert run.meta["matrix_decay"] == ["exact"]


def test_adamw_breaks_the_charge_at_first_order(tmp_path) -> None:
    eta, lam, steps = 1e-3, 1e-2, 30
    run, model = run_linear(tmp_path, lambda p: torch.optim.AdamW(p, lr=eta, weight_decay=lam),
                            steps)  # fmt: skip
    rule = run.matrix_charge(NAME, "rule")  # first order minus decay's exact share
    kinetic = run.matrix_charge(NAME, "kinetic")
    # eta^2 bound of any second-order effect: sum_n |dq_n|^2 over all parameters
    eta2_bound = float((run.steps["update_norm"] ** 2).sum())
    assert np.abs(kinetic.sum(0)).max() <= eta2_bound
    broken = np.abs(rule.sum(0)).max()
    assert broken > 10 * eta2_bound  # first order in eta: the preconditioner breaks it
    assert run.meta["matrix_decay"] == ["exact"]  # decoupled decay: -2 eta lambda C exactly
    # under plain GD at the same eta the rule part is rounding
    gd, _ = run_linear(tmp_path, lambda p: torch.optim.SGD(p, lr=eta), steps, name="gd")
    assert np.abs(gd.matrix_charge(NAME, "rule").sum(0)).max() < 1e-6 * broken


def test_relu_between_the_layers_gives_no_gl_record() -> None:
    x, y = data()
    linear = find_matrix_symmetries(linear_net(), x, y, nn.MSELoss(), keep_failed=True)
    relu = find_matrix_symmetries(linear_net(act=nn.ReLU()), x, y, nn.MSELoss(), keep_failed=True)
    assert [(s.name, s.verified) for s in linear] == [(NAME, True)]
    assert linear[0].defect < 1e-14
    (cand,) = relu  # detection's rescale through ReLU is a candidate, and fails
    assert cand.name == "gl:0>2" and cand.verified is False and cand.defect > 1e-3
    assert find_matrix_symmetries(linear_net(act=nn.ReLU()), x, y, nn.MSELoss()) == []
    # a plain ReLU MLP (two hidden layers): detection returns rescales, GL promotes none
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    assert find_matrix_symmetries(mlp.double(), x, y, nn.MSELoss()) == []


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    return GPT2LMHeadModel(config), {"input_ids": ids, "labels": ids}


def test_gpt2_heads_give_qk_and_vo_records(tmp_path) -> None:
    pytest.importorskip("transformers")
    model, batch = _gpt2()
    found = find_matrix_symmetries(model, batch)
    names = {s.name for s in found}
    expect = {f"gl:transformer.h.{i}.attn.{k}[{h}]" for i in range(2) for k in ("qk", "vo")
              for h in range(4)}  # fmt: skip
    assert names == expect
    assert all(s.verified and s.n == 8 and s.defect < 1e-12 for s in found)
    # monitored: float32 model, two logged steps, 16 records x 36 entries each
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = nd.watch(model, opt, tmp_path / "gpt2", symmetries=[], matrix_charges=found)
    for _ in range(3):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    mon.close()
    run = load_run(tmp_path / "gpt2")
    assert len(run.matrix_charges) == 3 * 16 * 36
    c = run.matrix_charge("gl:transformer.h.1.attn.qk[2]")
    assert c.shape == (3, 8, 8) and np.isfinite(c).all()


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(1, 64, (8, 8), generator=torch.Generator().manual_seed(1))
    ids[:, -2:] = config.pad_token_id
    labels = torch.tensor([0, 2, 1, 0, 1, 2, 2, 0])
    return BertForSequenceClassification(config), {"input_ids": ids, "labels": labels}


def test_bert_vo_takes_its_output_projection_from_the_parent(tmp_path) -> None:
    """BERT's W_O (``attention.output.dense``) sits outside ``BertSelfAttention``: it is traced
    as the linear layer reading the module's output; every head's qk and vo pass the float64
    check (train mode: dropout 0.1, one mask per point) and a wrong pairing fails it."""
    pytest.importorskip("transformers")
    model, batch = _bert()
    found = find_matrix_symmetries(model, batch, keep_failed=True)
    attn = "bert.encoder.layer.{}.attention"
    expect = {f"gl:{attn.format(i)}.self.{k}[{h}]" for i in range(2) for k in ("qk", "vo")
              for h in range(4)}  # fmt: skip
    assert {s.name for s in found} == expect
    assert all(s.verified and s.n == 8 and s.defect < 1e-12 for s in found)
    vo = {s.name: s for s in found}[f"gl:{attn.format(1)}.self.vo[2]"]
    assert [b.as_list() for b in vo.right] == [[f"{attn.format(1)}.output.dense.weight", 1, 16, 24]]
    # negative control: head 2's values against head 3's columns of W_O
    wrong = dataclasses.replace(
        vo, name="gl:wrong", right=(Block(vo.right[0].param, 1, 24, 32),), verified=None
    )
    (checked,) = check_matrix_symmetries(model, [wrong], batch)
    assert checked.verified is False and checked.defect > 1e-3
    # monitored: float32 model, two logged steps, 16 records x 36 entries each
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with nd.watch(model, opt, tmp_path / "bert", symmetries=[], matrix_charges=found) as mon:
        for _ in range(2):
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        assert mon.matrix_snapshot_bytes > 0
    run = load_run(tmp_path / "bert")
    assert len(run.matrix_charges) == 2 * 16 * 36


class _Heads(nn.Module):
    """Two-head self-attention with ``query``/``key``/``value`` and no output projection."""

    def __init__(self, width: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.num_attention_heads = heads

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        b, t, w = x.shape
        q, k, v = (f(x).view(b, t, self.num_attention_heads, -1).transpose(1, 2)
                   for f in (self.query, self.key, self.value))  # fmt: skip
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        return a.transpose(1, 2).reshape(b, t, w), None


class _Block(nn.Module):
    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.attn, self.mix, self.act = _Heads(), nn.Linear(8, 8), act or nn.Identity()
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(x)
        return self.head(x + self.mix(self.act(a))).squeeze(-1)


def test_output_projection_is_found_by_dataflow_not_by_name() -> None:
    """The reader of the attention output is whatever linear layer takes it (here ``mix``); a
    ReLU in between leaves no reader, hence no vo candidate (qk stays)."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    y = torch.randn(3, 5, dtype=torch.float64)
    found = find_matrix_symmetries(_Block().double(), x, y, nn.MSELoss(), rescales=())
    assert {s.name for s in found} == {f"gl:attn.{k}[{h}]" for k in ("qk", "vo") for h in (0, 1)}
    assert {b.param for s in found if s.kind == "vo" for b in s.right} == {"mix.weight"}
    relu = find_matrix_symmetries(_Block(nn.ReLU()).double(), x, y, nn.MSELoss(), rescales=())
    assert {s.name for s in relu} == {"gl:attn.qk[0]", "gl:attn.qk[1]"}


def test_llama_rope_breaks_qk_but_not_vo() -> None:
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    found = find_matrix_symmetries(
        LlamaForCausalLM(config), {"input_ids": ids, "labels": ids}, keep_failed=True
    )
    verdict = {s.name: s.verified for s in found}
    attn = "gl:model.layers.0.self_attn"
    # grouped-query heads: one record per key/value head (two query heads each)
    assert verdict[f"{attn}.vo[0]"] and verdict[f"{attn}.vo[1]"]
    assert verdict[f"{attn}.qk[0]"] is False and verdict[f"{attn}.qk[1]"] is False
    # SwiGLU: up -> (* silu(gate)) -> down is no linear composition
    assert verdict["gl:model.layers.0.mlp.up_proj>model.layers.0.mlp.down_proj"] is False


def test_store_without_matrix_charges_and_export(tmp_path) -> None:
    model = linear_net()
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with nd.watch(model, opt, tmp_path / "plain", symmetries=[]) as mon:
        for _ in range(2):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        assert mon.matrix_snapshot_bytes == 0
    plain = load_run(tmp_path / "plain")
    assert plain.matrix_charges.empty and "matrix_symmetries" not in plain.meta
    with pytest.raises(KeyError):
        plain.matrix_charge(NAME)
    run, _ = run_linear(tmp_path, lambda p: torch.optim.SGD(p, lr=1e-3), steps=3)
    written = export_run(run, tmp_path / "out")
    table = [p for p in written if p.name == "matrix_charges.csv"]
    assert table and len(table[0].read_text().splitlines()) == 1 + 3 * 15
    plain_files = {p.name for p in export_run(plain, tmp_path / "out_plain")}
    assert "matrix_charges.csv" not in plain_files and "charges.csv" in plain_files


def test_declared_records_and_errors(tmp_path) -> None:
    model = linear_net()
    x, _ = data()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="inputs="):
        nd.watch(model, opt, tmp_path / "a", symmetries=[], matrix_charges=True)
    bad = MatrixSymmetry.from_dict(
        {
            "name": "gl:x",
            "kind": "composed",
            "n": 5,
            "left": [["nope.weight", 0, 0, 5]],
            "right": [["1.weight", 1, 0, 5]],
        }  # fmt: skip
    )
    with pytest.raises(ValueError, match="does not track"):
        nd.watch(model, opt, tmp_path / "b", symmetries=[], matrix_charges=[bad])
    rec = find_matrix_symmetries(model, x, rescales=None, targets=data()[1], loss_fn=nn.MSELoss())
    assert MatrixSymmetry.from_dict(rec[0].to_dict()) == rec[0]


def test_truncate_drops_matrix_rows_from_the_resumed_step(tmp_path) -> None:
    from noether_dyn.store.writer import RunWriter

    run, _ = run_linear(tmp_path, lambda p: torch.optim.SGD(p, lr=1e-3), steps=5)
    with RunWriter(tmp_path / "run", "resume") as writer:
        writer.truncate(3)
    after = load_run(tmp_path / "run")
    assert sorted(set(after.matrix_charges["step"])) == [0, 1, 2]
    assert np.array_equal(after.matrix_charge(NAME), run.matrix_charge(NAME)[:3])


# --- crash safety: a flush's matrix rows land with its steps or not at all -------------------


def test_a_failed_flush_stores_neither_its_steps_nor_its_matrix_rows(tmp_path, monkeypatch) -> None:
    """The matrix rows are written last in the flush's transaction; a failure there (injected:
    the third flush's matrix insert raises) rolls back the flush's steps and charges too."""
    from noether_dyn.capture.storage import MonitorFailure
    from noether_dyn.store.writer import RunWriter

    calls = []
    insert = RunWriter._insert_matrix

    def failing(self, values):
        calls.append(len(values))
        if len(calls) == 3:
            raise sqlite3.OperationalError("disk I/O error (injected)")
        insert(self, values)

    monkeypatch.setattr(RunWriter, "_insert_matrix", failing)
    model = linear_net()
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    sym = nd.Symmetry("r", "rescale", ("0.weight", "0.bias", "1.weight"), (1.0, 1.0, -1.0))
    gl = find_matrix_symmetries(model, x, y, nn.MSELoss(), rescales=[sym])
    with pytest.warns(MonitorFailure):
        mon = nd.watch(model, opt, tmp_path / "run", symmetries=[sym], matrix_charges=gl,
                       flush_every=2)  # fmt: skip
        for _ in range(8):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        mon.close()
    assert calls == [30, 30, 30]  # 2 steps x 15 entries per flush; monitoring stopped at the 3rd
    run = load_run(tmp_path / "run")
    charge_steps, _ = run.charge_array()
    assert run.steps["step"].tolist() == [0, 1, 2, 3]
    assert charge_steps.tolist() == [0, 1, 2, 3]
    assert sorted(set(run.matrix_charges["step"])) == [0, 1, 2, 3]


def test_a_kill_anywhere_inside_a_flush_keeps_steps_and_matrix_rows_together(tmp_path) -> None:
    """SIGKILL at ~40 points of one flush (noether_dyn lines and SQLite VM steps,
    tests/_matrix_kill_worker.py): every store holds the same steps in ``steps``, the charge
    block and ``matrix_charges``, either without the flush (0-3) or with it (0-5)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests._matrix_kill_worker", str(tmp_path), "40"],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)["results"]
    killed = [r for r in results if r["killed"]]
    assert len(killed) >= 40
    for r in results:
        assert r["charge_steps"] == r["steps"] == r["matrix_steps"], r
    assert {tuple(r["steps"]) for r in killed} == {(0, 1, 2, 3), (0, 1, 2, 3, 4, 5)}
