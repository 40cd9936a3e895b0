"""Automatic detection of the continuous symmetries of a model's loss.

The symmetry table is that of Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation
Laws in Deep Learning Dynamics", ICLR 2021 (docs/theory.md §3), at layer level: one symmetry per
layer,
the union of its per-channel groups.

- ``scale``: the weights and bias of a layer whose output, through positively homogeneous ops only,
  feeds normalizations that divide by statistics of their own input (BatchNorm/InstanceNorm in train
  mode, GroupNorm, LayerNorm, RMSNorm, ``F.normalize``), and nothing else; a norm layer's affine
  (gamma, beta) feeding another such normalization; the direction v of a weight-normalized layer
  (``parametrizations.weight.original1`` or the legacy ``weight_v``).
- ``rescale``: a layer (Linear, Conv, ConvTranspose, an affine normalization, an embedding) whose
  output reaches exactly one linear layer through positively homogeneous ops only (ReLU, LeakyReLU,
  PReLU, identity, dropout, max/avg pooling, flatten/reshape, multiplication by a number): incoming
  weight and bias +1, the next layer's weight -1.
- ``translation``: an ``nn.Linear``/``F.linear`` whose output is the model's output, under softmax
  cross-entropy: adding c to every entry of W and b shifts each logit by c (1 + sum(h)), which
  softmax ignores.

Anything else on the path (a residual add, a tanh/GELU/sigmoid, a norm in eval mode, a second
consumer, attention) breaks a candidate, and a parameter used twice (tied weights, a module called
twice) is never part of one.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from noether_dyn.symmetries._calls import Inputs, probe
from noether_dyn.symmetries._graph import (
    LayerRef,
    Region,
    module_layer_ref,
    reach,
    source_ref,
    trace_regions,
)
from noether_dyn.symmetries.engine import detect, evaluate_loss
from noether_dyn.symmetries.symmetry import Symmetry
from noether_dyn.symmetries.units import check_granularity, split_units
from noether_dyn.symmetries.verify import verify


def find_symmetries(
    model: nn.Module,
    inputs: Inputs,
    targets: Any = None,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    *,
    tol: float | None = None,
    n_perturb: int = 3,
    seed: int = 0,
    granularity: str = "layer",
) -> list[Symmetry]:
    """Find the scale, rescale and translation symmetries of ``loss_fn(model(inputs), targets)``.

    A model that returns anything but a tensor (a tuple, a dict, an HF ``ModelOutput``, whose
    ``loss`` is then used when no ``loss_fn`` is given) goes to :func:`~noether_dyn.symmetries.
    engine.detect` (one recorded forward pass, candidates checked in float64; see
    docs/symmetries.md), and its verified symmetries are returned (without ``targets``, also
    the logits translations it leaves unverified). For a model returning a tensor, detection
    reads the model's dataflow with a torch.fx symbolic trace (see
    :mod:`noether_dyn.symmetries._graph` for why fx and what each op counts as). It depends on
    the mode the model is in: a BatchNorm/InstanceNorm in train mode normalizes with batch
    statistics and makes the layer feeding it scale symmetric; in eval mode with running
    statistics it is a fixed affine map and gives no scale symmetry (and breaks rescale). Call
    it in the mode you train in.

    With ``targets`` and ``loss_fn`` each candidate is checked by :func:`verify` (the defect
    |<g, xi>|/(|g_A||xi|) at the real and at ``n_perturb`` perturbed parameters) and only those
    within ``tol`` are returned, with ``verified=True`` and their ``defect``. Scale symmetries
    through a normalization are approximate: its eps makes the defect small but not zero.
    Without them the candidates come back with ``verified=None`` (structure only).

    Args:
        model: any ``nn.Module``; left unchanged (buffers, RNG state).
        inputs: one batch: a tensor for ``model(x)``, a tuple for ``model(*args)``, a dict of
            keyword arguments. Runs through the model once (module call counts).
        targets: targets of ``loss_fn``; needs ``loss_fn``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``. Translation candidates need it:
            ``nn.CrossEntropyLoss``/``F.cross_entropy`` state it; another loss has them checked
            numerically, so it needs ``targets``.
        tol, n_perturb, seed: passed to :func:`verify`.
        granularity: ``"layer"`` (default): one symmetry per layer. ``"unit"``: each layer-level
            symmetry is followed by its per-unit ones (one per hidden unit, channel or head
            input column, each with ``parent`` set), the split checked numerically
            (:func:`noether_dyn.symmetries.units.split_units`).

    Returns:
        The symmetries, uniquely named ``"<kind>:<module path>"``; ``[]`` if there are none.

    Raises:
        ValueError: ``inputs`` do not run through the model, ``targets`` come without a
            ``loss_fn``, or ``loss_fn`` fails on the outputs and targets or does not return a
            scalar (it is run once whenever targets are given, candidates or not).

    Modules that fx cannot trace (control flow on tensor values) have their own forward code
    skipped: a warning names them, their children are analysed alone, and the ``note`` of each
    symmetry found says so.
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
    calls, out = probe(model, inputs)
    if not isinstance(out, torch.Tensor):
        found = detect(model, inputs, targets, loss_fn, tol=tol, n_perturb=n_perturb, seed=seed)
        if found.notes:
            warnings.warn("find_symmetries: " + "; ".join(found.notes), stacklevel=2)
        return [s for s in found.symmetries if s.verified or targets is None]
    if targets is not None:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            evaluate_loss(model, inputs, targets, loss_fn, out)
    regions, skipped = trace_regions(model)
    found = _Finder(model, calls, skipped, numeric=targets is not None)
    for region in regions:
        found.scan(region)
    found.weight_norm_directions(regions)
    candidates = found.result(translation=_translation_wanted(loss_fn, targets))
    if skipped:
        names = ", ".join(f"{p or '<model>'} ({why})" for p, why in skipped.items())
        warnings.warn(
            f"find_symmetries: torch.fx could not trace {names}; their own forward code was "
            "skipped, so no symmetry is reported across it; their children were analysed alone.",
            stacklevel=2,
        )
    if targets is None or not candidates:
        return candidates
    checked = verify(
        model, candidates, inputs, targets, loss_fn, tol=tol, n_perturb=n_perturb, seed=seed
    )
    return [s for s in checked if s.verified]


_RESHAPES = {"flatten", "reshape", "view", "contiguous"}


def _reshapes_into_output(node: fx.Node, output: fx.Node) -> bool:
    """``node`` reaches the model's output through reshapes alone (e.g. logits (B, T, C)
    flattened to (B*T, C) for the loss). Whether the class axis survives depends on shapes, so
    such a translation candidate is only taken when it will be verified numerically."""
    while len(node.users) == 1:
        (user,) = node.users
        if user is output:
            return output.args[0] is node
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        if user.op not in ("call_method", "call_function") or name not in _RESHAPES:
            return False
        node = user
    return False


def _translation_wanted(loss_fn: Any, targets: Any) -> bool:
    """Translation candidates are stated by a cross-entropy loss or tested numerically."""
    if loss_fn is None:
        return False
    if isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy:
        return True
    return targets is not None


class _Finder:
    """Collects candidates region by region, with the checks shared by all kinds."""

    def __init__(
        self, model: nn.Module, calls: Counter[str], skipped: dict[str, str], numeric: bool
    ) -> None:
        self.model = model
        self.numeric = numeric  # candidates will be verified numerically (targets given)
        self.calls = calls
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.trainable = {id(p) for p in model.parameters() if p.requires_grad}
        self.skip_note = ""
        if skipped:
            self.skip_note = "torch.fx skipped the forward code of " + ", ".join(
                p or "<model>" for p in skipped
            )
        self.found: list[tuple[Symmetry, bool]] = []

    def _add(self, name: str, kind: str, params: list, signs: list, note: str, prefix: str):
        if any(id(p) not in self.trainable for p in params) or len(set(map(id, params))) < len(
            params
        ):
            return
        if prefix:
            note += f"; found in {prefix!r} traced alone"
        if self.skip_note:
            note += f"; {self.skip_note}"
        symmetry = Symmetry(
            name, kind, tuple(self.names[id(p)] for p in params), tuple(signs), note=note
        )
        self.found.append((symmetry, kind == "translation"))

    def _calls_match(self, region: Region, region_calls: Counter[str], refs: list[LayerRef]):
        """Every module of the candidate ran as often in the real forward as its graph shows
        (catches calls made by skipped code); an island must have run exactly once."""
        if region.prefix and self.calls[region.prefix] != 1:
            return False
        return all(
            self.calls[r.path] == region_calls[r.path] for r in refs if r.path in region_calls
        )

    def scan(self, region: Region) -> None:
        uses, _ = region.param_uses()
        region_calls = region.module_calls()
        output = next(n for n in region.graph.nodes if n.op == "output")
        is_model = region.prefix == "" and region.root is self.model

        def single(params: list) -> bool:
            return all(uses[id(p)] == 1 for p in params)

        for node in region.graph.nodes:
            ref = source_ref(region, node)
            if ref is None or ref.gain is None:
                continue
            own = list(ref.gain) + ([ref.bias] if ref.bias is not None else [])
            if not single(own):
                continue
            flow = reach(region, node)
            if flow.breaks:
                continue
            if flow.norms and not flow.layers and not flow.outputs:
                if self._calls_match(region, region_calls, [ref]):
                    name = f"scale:{ref.path}" + (":gain" if ref.direction is not None else "")
                    norms = ", ".join(_node_path(region, n) for n in flow.norms)
                    note = f"output of {ref.path} only feeds normalization ({norms})"
                    self._add(name, "scale", own, [1.0] * len(own), note, region.prefix)
            elif len(flow.layers) == 1 and not flow.norms and not flow.outputs:
                _, nxt = flow.layers[0]
                if nxt is None or nxt.gain is None or not single(list(nxt.gain)):
                    continue
                if not self._calls_match(region, region_calls, [ref, nxt]):
                    continue
                params = own + list(nxt.gain)
                signs = [1.0] * len(own) + [-1.0] * len(nxt.gain)
                note = (
                    f"units of {ref.path} reach {nxt.path} only through positively homogeneous ops"
                )
                self._add(f"rescale:{ref.path}", "rescale", params, signs, note, region.prefix)
            elif (
                is_model
                and flow.outputs == 1
                and not flow.layers
                and not flow.norms
                and (
                    output.args[0] is node or (self.numeric and _reshapes_into_output(node, output))
                )
                and ref.linear_module
                and ref.direction is None
                and self._calls_match(region, region_calls, [ref])
            ):
                note = f"{ref.path} gives the model's output (logits of a softmax cross-entropy)"
                self._add(
                    f"translation:{ref.path}",
                    "translation",
                    own,
                    [1.0] * len(own),
                    note,
                    region.prefix,
                )

    def weight_norm_directions(self, regions: list[Region]) -> None:
        """The direction v of every weight-normalized layer that ran and whose v is read only
        through its parametrization (not directly by the forward code)."""
        reads: Counter[int] = Counter()
        for region in regions:
            reads.update(region.param_uses()[1])
        for path, module in self.model.named_modules():
            ref = module_layer_ref(module, path)
            if ref is None or ref.direction is None or self.calls[path] == 0:
                continue
            if reads[id(ref.direction)]:
                continue
            note = f"direction v of the weight-normalized {path}: W = g v/|v| ignores |v|"
            self._add(f"scale:{path}", "scale", [ref.direction], [1.0], note, "")

    def result(self, translation: bool) -> list[Symmetry]:
        out: list[Symmetry] = []
        seen: set[str] = set()
        for symmetry, is_translation in self.found:
            if (is_translation and not translation) or symmetry.name in seen:
                continue
            seen.add(symmetry.name)
            out.append(symmetry)
        return out


def _node_path(region: Region, node: fx.Node) -> str:
    if node.op == "call_module":
        return region.full_path(node.target)
    return getattr(node.target, "__name__", str(node.target))
