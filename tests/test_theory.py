"""The momentum prediction of docs/theory.md §3.3 against closed-form solutions.

With constant forcing F the solution of Q'' + 2 gamma Q' + omega^2 Q = F, Q(0) = Q0, Q'(0) = 0 is
Q(t) = F/omega^2 + (Q0 - F/omega^2) h(t), h the homogeneous solution with h(0) = 1, h'(0) = 0:
under-damped e^{-gamma t}(cos W t + gamma/W sin W t), critical e^{-gamma t}(1 + gamma t),
over-damped (a+ e^{a- t} - a- e^{a+ t}) / (a+ - a-). Without decay (omega = 0):
Q(t) = Q0 + F/(2 gamma) (t - (1 - e^{-2 gamma t}) / (2 gamma)).
The predictor composes exact one-step propagators, so after n steps it matches to rounding:
float64, relative 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch

from noether_dyn.quantities.theory import ChargePredictor, regime_for


def closed_form(t, q0, force, gamma, omega_sq):
    if omega_sq == 0:
        return q0 + force / (2 * gamma) * (t - (1 - math.exp(-2 * gamma * t)) / (2 * gamma))
    disc = gamma**2 - omega_sq
    if disc < -1e-12:
        w = math.sqrt(-disc)
        h = math.exp(-gamma * t) * (math.cos(w * t) + gamma / w * math.sin(w * t))
    elif disc > 1e-12:
        ap, am = -gamma + math.sqrt(disc), -gamma - math.sqrt(disc)
        h = (ap * math.exp(am * t) - am * math.exp(ap * t)) / (ap - am)
    else:
        h = math.exp(-gamma * t) * (1 + gamma * t)
    qs = force / omega_sq
    return qs + (q0 - qs) * h


@pytest.mark.parametrize(
    "eta,beta,lam",
    [
        (0.1, 0.9, 0.05),  # under-damped: gamma^2 < omega^2
        (0.1, 0.9, 0.0),  # no decay
        (0.5, 0.2, 0.01),  # over-damped
    ],
)
def test_momentum_predictor_matches_closed_form(eta, beta, lam):
    gamma = (1 - beta) / (eta * (1 + beta))
    omega_sq = 4 * lam / (eta * (1 + beta))
    force = 0.7
    pred = ChargePredictor("momentum", [False])
    pred.start(torch.tensor([2.0], dtype=torch.float64))
    update_sq = torch.tensor([force * eta**2 / 2], dtype=torch.float64)  # F = 2 |dq|^2 / eta^2
    for n in range(1, 201):
        pred.advance([eta], [beta], [lam], update_sq=update_sq)
        expected = closed_form(n * eta, 2.0, force, gamma, omega_sq)
        assert float(pred.value[0]) == pytest.approx(expected, rel=1e-10)


def test_critically_damped():
    eta, beta = 0.1, 0.5
    gamma = (1 - beta) / (eta * (1 + beta))
    lam = gamma**2 * eta * (1 + beta) / 4  # omega^2 = gamma^2
    pred = ChargePredictor("momentum", [False])
    pred.start(torch.tensor([1.5], dtype=torch.float64))
    for n in range(1, 101):
        pred.advance([eta], [beta], [lam], update_sq=torch.zeros(1, dtype=torch.float64))
        assert float(pred.value[0]) == pytest.approx(
            closed_form(n * eta, 1.5, 0.0, gamma, gamma**2), rel=1e-8
        )


def test_translation_decays_without_forcing():
    eta, beta, lam = 0.1, 0.9, 0.02
    gamma = (1 - beta) / (eta * (1 + beta))
    omega_sq = 2 * lam / (eta * (1 + beta))
    pred = ChargePredictor("momentum", [True])
    pred.start(torch.tensor([3.0], dtype=torch.float64))
    for n in range(1, 51):
        pred.advance([eta], [beta], [lam], update_sq=torch.ones(1, dtype=torch.float64))
        assert float(pred.value[0]) == pytest.approx(
            closed_form(n * eta, 3.0, 0.0, gamma, omega_sq), rel=1e-10
        )


def test_flow_regime_only_decays():
    pred = ChargePredictor("flow", [False, True])
    pred.start(torch.tensor([4.0, 2.0], dtype=torch.float64))
    pred.advance([0.1, 0.1], [0.9, 0.9], [0.5, 0.5])
    assert pred.value.tolist() == pytest.approx([4.0 * 0.95**2, 2.0 * 0.95])


def test_regimes():
    assert regime_for("sgd", [0.0, 0.0]) == "sgd"
    assert regime_for("sgd", [0.9]) == "momentum"
    assert regime_for("adam", [0.9]) == "flow"
    with pytest.raises(ValueError, match="regime must be one of"):
        ChargePredictor("exact", [])


def test_state_round_trip():
    pred = ChargePredictor("momentum", [False])
    pred.start(torch.tensor([1.0], dtype=torch.float64))
    pred.advance([0.1], [0.9], [0.01], update_sq=torch.ones(1, dtype=torch.float64))
    other = ChargePredictor("momentum", [False])
    other.load_state_dict(pred.state_dict(), torch.device("cpu"))
    assert torch.equal(other.value, pred.value) and torch.equal(other.velocity, pred.velocity)


def test_normalization_theory_is_keyed_by_the_adapters_declared_rule():
    """docs/theory.md §4 through the field the adapter declares: SGD's coupled L2 decay and Adam's
    decoupled decay, each only in its own form; exact in float64 (one rounding per operation)."""
    import math

    from noether_dyn.optimizers import adapter_named
    from noether_dyn.quantities import normalization as sec4

    sgd, adam = adapter_named("sgd").normalization, adapter_named("adam").normalization
    assert (sgd, adam) == ("l2", "decoupled") and adapter_named("rmsprop").normalization is None
    lr, wd, beta = 0.1, 5e-3, 0.9
    assert sec4.equilibrium_angle(sgd, lr, wd, beta, False) == math.sqrt(2 * lr * wd / (1 + beta))
    assert sec4.equilibrium_angle(adam, lr, wd, beta, True) == math.sqrt(
        2 * lr * wd * (1 - beta) / (1 + beta)
    )
    assert sec4.implied_decay(sgd, lr, wd, beta, False) == 1.0 - 4.0 * lr * wd / (1.0 - beta)
    assert sec4.equilibrium_steps(adam, lr, wd, beta, True) == 1.0 / (2.0 * lr * wd)
    assert sec4.time_constant(1.0) == math.inf
    for args in (
        (sgd, lr, wd, beta, True),
        (adam, lr, wd, beta, False),
        (None, lr, wd, beta, False),
    ):
        assert math.isnan(sec4.equilibrium_angle(*args))
    assert sec4.regime(sgd, 0.0, False) == "Adagrad-like sum (no weight decay)"
    assert sec4.regime(None, wd, False) == "not covered by docs/theory.md §4"
