"""Matrix-valued GL charges (noether_dyn.quantities.matrix_charges).

Identities and tolerances (float64):

* The split C_{n+1} - C_n = first order + kinetic is algebra: on random matrices of O(1)
  entries it closes to 1e-13 |C| (a few dozen rounded products).
* The symmetry identity G_L L^T = R G_R^T holds for real gradients of a 2-layer linear net and
  of a hand-written attention head's W_Q, W_K (rounding: 1e-13 relative to |G_L||L|).
* The exact matrix GD prediction matches a real torch.optim.SGD step with coupled decay to
  1e-13 |C|.
* The n(n+1)/2 = 15 upper entries of C (n = 5) are independent functions: their Jacobian has
  rank 15 at a random point.
* Small-step gradient descent: the drift over 100 steps is pure kinetic term, so it scales as
  eta^2 (ratio 100 per decade of eta, within 1%: the next order is eta^3), and is below 1e-10
  relative at eta = 1e-7 (measured 5.6e-12).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import matrix_charges as study  # noqa: E402
from noether_dyn.quantities.matrix_charges import (  # noqa: E402
    attention_head_pairs,
    composed_pair,
    gd_prediction,
    gl_charge,
    gl_split,
    upper_entries,
)


def test_split_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    left, right, dl, dr = r(5, 7), r(5, 4), r(5, 7), r(5, 4)
    first, ksb = gl_split(left, right, dl, dr)
    change = gl_charge(left + dl, right + dr) - gl_charge(left, right)
    assert torch.allclose(
        change, first + ksb, rtol=0, atol=1e-13 * float(gl_charge(left, right).norm())
    )
    assert torch.equal(first, first.T)
    assert torch.allclose(ksb, ksb.T, rtol=0, atol=1e-14 * float(ksb.norm()))


def pair(model: nn.Sequential, grads: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) of the study's net: copies of the values, or the gradients."""
    t = [model[0].weight, model[1].weight, model[0].bias]
    t = [x.grad if grads else x.detach() for x in t]
    return composed_pair(t[0], t[1].clone(), t[2])


def test_linear_net_symmetry_and_prediction() -> None:
    model = study.net()
    x, y = study.data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=0.1)
    left, right = pair(model)
    c = gl_charge(left, right)
    nn.functional.mse_loss(model(x), y).backward()
    gl_, gr_ = pair(model, grads=True)
    ident = gl_ @ left.T - right @ gr_.T
    assert float(ident.norm()) <= 1e-13 * float(gl_.norm() * left.norm())
    opt.step()
    measured = gl_charge(*pair(model))
    predicted = gd_prediction(c, gl_, gr_, 0.05, 0.1)
    assert float((measured - predicted).norm()) <= 1e-13 * float(c.norm())


def test_attention_head_bilinear_identity() -> None:
    """softmax(X W_Q^T W_K X^T / sqrt(d)) V: the GL(d_head) symmetry of (W_Q, W_K)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    wq = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    wk = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    att = torch.softmax((x @ wq.T) @ (x @ wk.T).T / 3**0.5, dim=-1)
    (att @ v).square().sum().backward()
    ident = wq.grad @ wq.detach().T - wk.detach() @ wk.grad.T
    assert float(ident.norm()) <= 1e-13 * float(wq.grad.norm() * wq.detach().norm())


def test_hugging_face_bert_attention_heads() -> None:
    """A tiny BERT built from a config (random weights, no download): per head, both GL
    symmetries' gradient identities hold to rounding (1e-13) for a loss through the whole
    encoder layer (LayerNorm, GELU, residuals: only the head's bilinear forms matter)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).double()
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids).last_hidden_state.square().sum().backward()
    att = model.encoder.layer[0].attention
    lin = (att.self.query, att.self.key, att.self.value)
    values = attention_head_pairs(
        *((m.weight.detach(), m.bias.detach()) for m in lin), att.output.dense.weight.detach(), 2
    )
    grads = attention_head_pairs(
        *((m.weight.grad, m.bias.grad) for m in lin), att.output.dense.weight.grad, 2
    )
    for head, ghead in zip(values, grads):
        for kind in ("qk", "vo"):
            (left, right), (gl_, gr_) = head[kind], ghead[kind]
            ident = gl_ @ left.T - right @ gr_.T
            assert float(ident.norm()) <= 1e-13 * float(gl_.norm() * left.norm()), kind
            assert float(gl_.norm()) > 0


def test_entries_are_independent() -> None:
    model = study.net()
    w1, b1, w2 = (p.detach() for p in (model[0].weight, model[0].bias, model[1].weight))
    shapes = [w1.shape, b1.shape, w2.shape]
    flat = torch.cat([w1.reshape(-1), b1, w2.reshape(-1)])

    def entries(v):
        parts, i = [], 0
        for s in shapes:
            n = s.numel()
            parts.append(v[i : i + n].reshape(s))
            i += n
        return upper_entries(gl_charge(*composed_pair(parts[0], parts[2], parts[1])))

    jac = torch.func.jacrev(entries)(flat)
    assert jac.shape[0] == 5 * 6 // 2
    assert int(torch.linalg.matrix_rank(jac)) == 15


def test_small_step_conservation_scaling() -> None:
    drift = {
        eta: study.train(lambda p, e=eta: torch.optim.SGD(p, lr=e), 100)["rel_drift"]
        for eta in (1e-4, 1e-5, 1e-7)
    }
    assert drift[1e-4] / drift[1e-5] == pytest.approx(100.0, rel=0.01)
    assert drift[1e-7] < 1e-10


def test_errors() -> None:
    with pytest.raises(ValueError, match="shared width"):
        composed_pair(torch.ones(3, 2), torch.ones(4, 5))
    with pytest.raises(ValueError, match="n_heads"):
        attention_head_pairs(
            (torch.ones(6, 4), None),
            (torch.ones(6, 4), None),
            (torch.ones(6, 4), None),
            torch.ones(4, 6),
            4,
        )
    with pytest.raises(ValueError, match="share dim 0"):
        gl_charge(torch.ones(3, 2), torch.ones(4, 2))
