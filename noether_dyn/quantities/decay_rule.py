"""Which rule fills a symmetry's stored ``decay`` column, and whether that is weight decay's
whole share of the charge's change (docs/theory.md §3.1; :mod:`noether_dyn.quantities.momentum`).

``"exact"``
    the column is weight decay's true share: the instantaneous term where it is the whole share
    (SGD without momentum, decoupled decay, no decay at all), the share through the momentum
    buffer (translation under SGD with momentum: the scalar recurrence of
    :class:`~noether_dyn.quantities.momentum.TranslationDecayShare`, no extra memory), or, with
    ``watch(..., exact_decay=True)``, the share through the buffer and the preconditioner of every
    rule with coupled L2 (:mod:`noether_dyn.capture.decay`: SGD heavy ball and Nesterov, Adam,
    RMSprop, Adagrad).
``"instantaneous"``
    the column is ``-2 eta lambda Q_n`` (translation: ``-eta lambda x_n``), decay's direct pull
    on this step only. Under momentum or a preconditioner with coupled L2 that is only part of
    its share: the rest goes through the buffer or the preconditioner and is counted in ``rule``
    (decay + rule + ksb still closes exactly).
"""

from __future__ import annotations

from noether_dyn.records import GroupHyper

DECAY_RULES = {
    "exact": "weight decay's true share of the change",
    "instantaneous": (
        "instantaneous -2 eta lambda Q_n (translation: -eta lambda x_n), only part of the share "
        "under momentum or a preconditioner; the rest is in rule"
    ),
}
"""The meaning of each rule, in words (stored in a run's metadata)."""


def decay_rule(family: str, hyper: GroupHyper, linear: bool, exact_decay: bool = False) -> str:
    """The rule of a symmetry's ``decay`` column for the optimizer ``family`` and the constants
    of its lead group; ``linear``: a translation charge; ``exact_decay``: the opt-in exact share
    (:mod:`noether_dyn.capture.decay`) is on."""
    if not hyper.weight_decay or hyper.decoupled or exact_decay:
        return "exact"
    if family == "sgd":
        return "exact" if linear or not hyper.beta else "instantaneous"
    return "instantaneous"  # coupled L2 passes through a preconditioner
