"""verify(): the symmetry defect |<g_A, xi_A>| / (|g_A| |xi_A|) (docs/theory.md §3), its tolerances,
the approximate (normalization eps) case, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noether_dyn.symmetries import Symmetry, verify
from noether_dyn.symmetries.verify import DEFAULT_TOL, default_tol, shrink_norm_eps

RESCALE = Symmetry("rescale:0", "rescale", ("0.weight", "0.bias", "2.weight"), (1, 1, -1))
TRANSLATION = Symmetry("translation:2", "translation", ("2.weight", "2.bias"))
SCALE = Symmetry("scale:0", "scale", ("0.weight", "0.bias"))


def _mlp(act: type[nn.Module], dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 3)).to(dtype)


def _data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 5, generator=g, dtype=dtype), torch.randint(0, 3, (32,), generator=g)


def test_defect_is_the_cosine_of_gradient_and_generator() -> None:
    """At the real parameters alone (n_perturb=0) the defect is |<g_A, xi_A>|/(|g_A||xi_A|),
    computed here by plain autograd."""
    model, (x, y) = _mlp(nn.Tanh), _data()
    (s,) = verify(model, [RESCALE], x, y, F.cross_entropy, n_perturb=0)
    loss = F.cross_entropy(model(x), y)
    params = dict(model.named_parameters())
    g = torch.autograd.grad(loss, [params[n] for n in RESCALE.params])
    xi = [sign * params[n].detach() for n, sign in zip(RESCALE.params, RESCALE.signs)]
    dot = sum(float((a * b).sum()) for a, b in zip(g, xi))
    norm = math.sqrt(sum(float(a.pow(2).sum()) for a in g) * sum(float(b.pow(2).sum()) for b in xi))
    assert s.defect == pytest.approx(abs(dot) / norm, rel=1e-9)
    assert s.verified is False and s.defect > 1e-3  # tanh is not homogeneous


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_exact_symmetries_verify_at_rounding_level(dtype: torch.dtype, bound: float) -> None:
    """Rescale through ReLU and translation under CE are exact: only rounding remains, far
    below DEFAULT_TOL (1e-8 in float64, 1e-5 in float32)."""
    model, (x, y) = _mlp(nn.ReLU, dtype), _data(dtype)
    for s in verify(model, [RESCALE, TRANSLATION], x, y, nn.CrossEntropyLoss()):
        assert s.verified is True and s.defect < bound <= DEFAULT_TOL[dtype], s.name
        assert "verified: defect" in s.note


def test_declared_false_symmetry_is_returned_unverified_not_dropped() -> None:
    model, (x, _) = _mlp(nn.ReLU), _data()
    declared = [RESCALE, SCALE, TRANSLATION]
    targets = torch.randn(32, 3, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    out = verify(model, declared, x, targets, nn.MSELoss(), n_perturb=2)
    assert [s.name for s in out] == [s.name for s in declared]
    by_name = {s.name: s for s in out}
    assert by_name["rescale:0"].verified is True
    assert by_name["scale:0"].verified is False and by_name["scale:0"].defect > 1e-2
    assert by_name["translation:2"].verified is False  # MSE is not shift invariant
    assert "FAILED" in by_name["scale:0"].note


def _bn_mlp(input_scale: float) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = _data()
    return model, x * input_scale, y


def test_batchnorm_scale_is_approximate_because_of_eps() -> None:
    """BN's eps breaks the scale symmetry by ~eps/(var + eps): in float64 the defect (~1e-5) is
    above the rounding tolerance, and is verified as approximate because it vanishes (below
    tol) when every normalization eps is shrunk by 1e-8."""
    model, x, y = _bn_mlp(1.0)
    (s,) = verify(model, [SCALE], x, y, F.cross_entropy)
    assert DEFAULT_TOL[torch.float64] < s.defect < 1e-3
    assert s.verified is True and "approximate" in s.note
    (strict,) = verify(model, [SCALE], x, y, F.cross_entropy, eps_tol=1e-7)
    assert strict.verified is False


def test_tiny_preactivation_variance_breaks_batchnorm_scale() -> None:
    """With pre-BN variance ~ eps the eps term is no longer small: honestly reported as broken."""
    model, x, y = _bn_mlp(1e-3)
    (s,) = verify(model, [SCALE], x, y, F.cross_entropy)
    assert s.verified is False and s.defect > 1e-2


def test_verify_leaves_model_untouched() -> None:
    model, x, y = _bn_mlp(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    verify(model, [SCALE], x, y, F.cross_entropy)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model[1].eps == 1e-5
    assert shrink_norm_eps(model)[1].eps == pytest.approx(1e-13)
    assert shrink_norm_eps(_mlp(nn.ReLU)) is None


def test_dropout_in_train_mode_keeps_rescale() -> None:
    """Dropout multiplies by a non-negative mask: positively homogeneous for every draw."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    x, y = _data()
    sym = Symmetry("rescale:0", "rescale", ("0.weight", "0.bias", "3.weight"), (1, 1, -1))
    (s,) = verify(model, [sym], x, y, F.cross_entropy)
    assert s.verified is True and s.defect < 1e-12


def test_unused_parameter_gives_verified_none() -> None:
    model, (x, y) = _mlp(nn.ReLU), _data()
    model[0].extra = nn.Parameter(torch.ones(3, dtype=torch.float64))  # never read by forward
    sym = Symmetry("scale:extra", "scale", ("0.extra",))
    (s,) = verify(model, [sym], x, y, F.cross_entropy)
    assert s.verified is None and s.defect is None and "zero gradient" in s.note


def test_bad_input_raises_clear_errors() -> None:
    model, (x, y) = _mlp(nn.ReLU), _data()
    with pytest.raises(ValueError, match="symmetries: 'scale:fc'.*not in model.named_parameters"):
        verify(model, [Symmetry("scale:fc", "scale", ("fc.weight",))], x, y, F.cross_entropy)
    with pytest.raises(ValueError, match="loss_fn: must return a scalar"):
        verify(model, [RESCALE], x, y, nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(ValueError, match="tol"):
        verify(model, [RESCALE], x, y, F.cross_entropy, tol=0.0)


def test_default_tol_follows_parameter_dtype() -> None:
    assert default_tol(_mlp(nn.ReLU, torch.float64)) == DEFAULT_TOL[torch.float64] == 1e-8
    assert default_tol(_mlp(nn.ReLU, torch.float32)) == DEFAULT_TOL[torch.float32] == 1e-5
