"""Automatic detection of the continuous symmetries of a model's loss: the list-returning entry
point on top of :func:`noether_dyn.symmetries.engine.detect`, one path for every model.

The symmetry table is that of Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation
Laws in Deep Learning Dynamics", ICLR 2021 (docs/theory.md §3), at layer level: at most one record
per layer and kind, named ``"<kind>:<module path>"``, the union of the layer's per-channel groups
(the per-unit split is :mod:`noether_dyn.symmetries.units`).

- ``scale:<layer>``: the layer's tensors (or ``scale:<layer>:weight``, its weights alone, when its
  bias is not part of the symmetry) whose output only reaches normalizations that divide by
  statistics of their own input (BatchNorm/InstanceNorm in train mode, GroupNorm, LayerNorm and
  its subclasses calling ``F.layer_norm``, RMSNorm); the direction v of a weight-normalized layer;
  the writers of a residual stream read by norms only.
- ``rescale:<layer>``: the layer's output scaled up and every layer reading it scaled down by the
  same factor (through ReLU, pooling, reshapes, attention's value path; a norm feeding several
  layers, ``nn.MultiheadAttention``'s fused ``in_proj_weight``, a layer-scale factor);
  ``rescale:<a>~<b>`` for two outputs meeting in a product (attention's q and k);
  ``rescale:<layer>><reader>`` for one reader of several.
- ``translation:<layer>``: the largest set of a layer's tensors whose shift is verified, when
  the shift reaches only a softmax cross-entropy (the logits head) or mean-centering norms and
  softmaxes: the weight and bias together (a head; a layer or an embedding summed into a
  LayerNorm), else the bias alone (a Linear/Conv bias before a train-mode BatchNorm, whose
  per-channel mean removes b -> b + c but not W -> W + c 1; an attention key's bias; a
  weight-normalized head), else one tensor. Never two records for one layer.

Every candidate is verified numerically before it is returned (see docs/symmetries.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import nn

from noether_dyn.symmetries._calls import Inputs
from noether_dyn.symmetries.engine import detect
from noether_dyn.symmetries.symmetry import Symmetry
from noether_dyn.symmetries.units import check_granularity, split_units


def find_symmetries(
    model: nn.Module,
    inputs: Inputs,
    targets: Any = None,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    *,
    tol: float | None = None,
    n_perturb: int = 1,
    seed: int = 0,
    granularity: str = "layer",
) -> list[Symmetry]:
    """Find the scale, rescale and translation symmetries of ``loss_fn(model(inputs), targets)``.

    Any model that runs goes through :func:`~noether_dyn.symmetries.engine.detect`: one recorded
    forward pass proposes candidates, each checked in float64 by the defect
    |<g, xi>|/(|g_A||xi|) at the real and ``n_perturb`` perturbed parameters (docs/symmetries.md).
    Only verified symmetries are returned, ``verified=True`` with their ``defect`` and
    ``exactness`` (``"exact"``: float rounding; ``"approximate"``: broken only by a
    normalization's eps); the candidates dropped are in ``detect(...).dropped``.

    The loss checked is ``loss_fn(outputs, targets)`` with ``targets``; without them the model's
    own ``loss`` (an HF model given ``labels``), else a fixed random linear function of its
    outputs, whose symmetries are those of every loss. The logits translation is a symmetry of
    the softmax cross-entropy only: without targets it is returned unverified (``verified=None``)
    when ``loss_fn`` states a cross-entropy (``nn.CrossEntropyLoss``, ``F.cross_entropy``), and
    left out otherwise; a head translation along which the logits do not shift by a per-sample
    constant (a weight-normalized head's direction shifted) is never returned.

    Detection depends on the mode the model is in: a BatchNorm/InstanceNorm in train mode
    normalizes with batch statistics and makes the layer feeding it scale symmetric; in eval mode
    it is a fixed affine map. Call it in the mode you train in.

    Args:
        model: any ``nn.Module``; left unchanged (parameters, buffers, RNG state).
        inputs: one batch: a tensor for ``model(x)``, a tuple for ``model(*args)``, a dict (or
            HF ``BatchEncoding``) of keyword arguments.
        targets: targets of ``loss_fn``; needs ``loss_fn``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        tol, n_perturb, seed: as in :func:`~noether_dyn.symmetries.engine.detect`.
        granularity: ``"layer"`` (default): one symmetry per layer. ``"unit"``: each layer-level
            symmetry is followed by its per-unit ones (one per hidden unit, channel or head
            input column, each with ``parent`` set), the split checked numerically
            (:func:`noether_dyn.symmetries.units.split_units`).

    Returns:
        The symmetries, uniquely named; ``[]`` if there are none.

    Raises:
        ValueError: ``inputs`` do not run through the model, ``targets`` come without a
            ``loss_fn``, or ``loss_fn`` fails on the outputs and targets or does not return a
            scalar (it is run once whenever targets are given, candidates or not).

    What detection could not see (a model that runs but not under the recorder, a module whose
    parameters get no gradient on this batch) is warned about, one line per module with the
    reason.
    """
    if check_granularity(granularity) == "unit":
        found = find_symmetries(
            model, inputs, targets, loss_fn, tol=tol, n_perturb=n_perturb, seed=seed
        )
        return split_units(model, found, inputs, targets, loss_fn, seed=seed)
    if targets is not None and loss_fn is None:
        raise ValueError(
            "loss_fn: targets were given without a loss; pass loss_fn=nn.CrossEntropyLoss() "
            "(or your loss) to verify the symmetries, or drop targets for detection only."
        )
    with_loss = targets is not None
    found = detect(
        model,
        inputs,
        targets if with_loss else None,
        loss_fn if with_loss else None,
        tol=tol,
        n_perturb=n_perturb,
        seed=seed,
    )
    if found.notes:
        warnings.warn("find_symmetries: " + "; ".join(found.notes), stacklevel=2)
    states_ce = isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy
    return [s for s in found.symmetries if s.verified or (s.verified is None and states_ce)]
