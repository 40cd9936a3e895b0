"""The dataflow of a model, read with torch.fx, and the op table symmetry detection needs.

Why torch.fx: a symbolic trace records the program of ``forward`` (every Python branch must be
static), so what it shows holds for every input, and it names each op the way the source wrote it
(``F.relu``, ``torch.relu``, ``x.relu()``, ``operator.add``). A forward pass recorded with hooks or
the autograd graph only shows the path one batch took. Where fx cannot trace a module (control
flow on tensor values, untraceable Python), that module's own ``forward`` is skipped: it becomes an
opaque node of its parent's graph and each of its children is traced alone as an *island*
(:func:`trace_regions`). What an island shows holds for the island itself; the calls the skipped
code makes are checked against one real forward pass by the caller (module call counts).

This module classifies the consumers of a value (:func:`classify_use`): a positively homogeneous
pass-through (ReLU, LeakyReLU, PReLU, identity, dropout, pooling, reshapes, multiplication by a
number: f(a x) = a f(x) for a > 0), a linear layer reading it as its input, a normalization that
computes its own statistics (invariant to a positive rescaling of its whole input), the graph
output, a neutral read (``x.shape``), or anything else, which breaks a candidate.
"""

from __future__ import annotations

import builtins
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm

LAYER_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""Modules whose output is linear in their input and in (weight, bias) jointly: y = W*x + b."""

LAYER_FUNCTIONS = frozenset(
    {
        F.linear,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.conv_transpose1d,
        F.conv_transpose2d,
        F.conv_transpose3d,
    }
)

HOMOGENEOUS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
)
"""Positively homogeneous of degree 1 in their input: f(a x) = a f(x) for every a > 0. Dropout in
train mode multiplies by a non-negative mask, which is homogeneous for every draw of the mask."""

HOMOGENEOUS_FUNCTIONS = frozenset(
    {
        F.relu,
        F.relu_,
        torch.relu,
        torch.relu_,
        F.leaky_relu,
        F.leaky_relu_,
        F.prelu,
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        torch.dropout,
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
        F.adaptive_max_pool3d,
        torch.flatten,
        torch.reshape,
        torch.permute,
        torch.transpose,
        torch.squeeze,
        torch.unsqueeze,
        torch.mean,
        torch.sum,
        torch.neg,
        operator.neg,
        operator.getitem,
    }
)

HOMOGENEOUS_METHODS = frozenset(
    {
        "relu",
        "relu_",
        "view",
        "reshape",
        "flatten",
        "permute",
        "transpose",
        "contiguous",
        "squeeze",
        "unsqueeze",
        "expand",
        "mean",
        "sum",
        "neg",
        "clone",
    }
)

SCALAR_PRODUCTS = frozenset({operator.mul, torch.mul, operator.truediv, torch.div})
SCALAR_PRODUCT_METHODS = frozenset({"mul", "div", "__mul__", "__truediv__", "__rmul__"})
NEUTRAL_METHODS = frozenset({"size", "dim", "numel", "ndimension", "get_device"})
NEUTRAL_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda"})

NORM_FUNCTIONS = frozenset({F.layer_norm, F.group_norm, F.rms_norm, F.normalize})
"""Functional normalizations that always use statistics of their input (scale invariant)."""


def norm_uses_own_statistics(module: nn.Module) -> bool | None:
    """Whether a normalization module divides by statistics of its current input.

    None if ``module`` is not a normalization. BatchNorm uses batch statistics in train mode (or
    when it keeps no running statistics); in eval mode with running statistics it is a fixed affine
    map per channel, which is not scale invariant. InstanceNorm likewise. GroupNorm, LayerNorm and
    RMSNorm always use the statistics of their input.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.training or (module.running_mean is None and module.running_var is None)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return module.training or not module.track_running_stats
    if isinstance(module, nn.GroupNorm | nn.LayerNorm | nn.RMSNorm):
        return True
    return None


@dataclass(frozen=True)
class LayerRef:
    """The parameters of one call of a layer whose output is linear in them.

    Args:
        path: module path of the layer (full path in the model), or for a functional layer the
            weight's name without ``.weight``.
        gain: parameters that scale the layer's output without its bias (``weight``; ``original0``,
            the magnitude g, for a weight-normalized layer); None when that cannot be stated (an
            unknown parametrization, a bias that is not a plain parameter).
        bias: the bias parameter, None if the layer has none.
        direction: the direction v of a weight-normalized layer (scale symmetric by construction).
        kind: "layer" (linear map of its input), "norm" (affine of the normalized input) or
            "embedding".
        linear_module: True for ``nn.Linear`` / ``F.linear`` (candidates for translation).
    """

    path: str
    gain: tuple[nn.Parameter, ...] | None
    bias: nn.Parameter | None
    direction: nn.Parameter | None = None
    kind: str = "layer"
    linear_module: bool = False


def _bias_of(module: nn.Module) -> tuple[bool, nn.Parameter | None]:
    """(ok, bias): ok is False when the bias exists but is not a plain parameter."""
    bias = getattr(module, "bias", None)
    if bias is None:
        return True, None
    if parametrize.is_parametrized(module, "bias") or not isinstance(bias, nn.Parameter):
        return False, None
    return True, bias


def module_layer_ref(module: nn.Module, path: str) -> LayerRef | None:
    """A :class:`LayerRef` for a linear layer, an embedding or an affine normalization module."""
    if isinstance(module, LAYER_MODULES):
        kind = "layer"
    elif isinstance(module, nn.Embedding):
        kind = "embedding"
    elif norm_uses_own_statistics(module) is not None:
        kind = "norm"
    else:
        return None
    bias_ok, bias = _bias_of(module)
    direction = None
    gain: tuple[nn.Parameter, ...] | None
    if parametrize.is_parametrized(module, "weight"):
        chain = module.parametrizations.weight
        if len(chain) == 1 and isinstance(chain[0], _WeightNorm):
            gain, direction = (chain.original0,), chain.original1
        else:
            gain = None
    elif isinstance(getattr(module, "weight_g", None), nn.Parameter) and isinstance(
        getattr(module, "weight_v", None), nn.Parameter
    ):
        gain, direction = (module.weight_g,), module.weight_v
    else:
        weight = getattr(module, "weight", None)
        gain = (weight,) if isinstance(weight, nn.Parameter) else None
    if not bias_ok or (gain is None and kind != "layer"):
        gain = None
    return LayerRef(
        path=path,
        gain=gain,
        bias=bias,
        direction=direction,
        kind=kind,
        linear_module=isinstance(module, nn.Linear),
    )


@dataclass
class Region:
    """One traced graph: the whole model, or an island (a child of a module fx could not trace).

    Args:
        root: the traced module.
        prefix: its path in the model ("" for the model itself).
        graph: the fx graph of ``root.forward``.
        opaque: paths (relative to ``root``) of submodules left untraced inside this graph.
    """

    root: nn.Module
    prefix: str
    graph: fx.Graph
    opaque: set[str] = field(default_factory=set)

    def full_path(self, target: str) -> str:
        return join_path(self.prefix, target)

    def attr(self, target: str) -> Any:
        obj: Any = self.root
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def module_calls(self) -> Counter[str]:
        """How many times this graph calls each module (full paths)."""
        return Counter(self.full_path(n.target) for n in self.graph.nodes if n.op == "call_module")

    def param_uses(self) -> tuple[Counter[int], Counter[int]]:
        """(all uses, direct attribute reads) of each parameter in this graph, keyed by id.

        A module call uses each of its parameters once; a ``get_attr`` of a parameter is used once
        per consumer. A parameter shared by two modules, or a module called twice, counts twice.
        """
        uses: Counter[int] = Counter()
        reads: Counter[int] = Counter()
        for node in self.graph.nodes:
            if node.op == "call_module":
                for p in self.root.get_submodule(node.target).parameters():
                    uses[id(p)] += 1
            elif node.op == "get_attr":
                obj = self.attr(node.target)
                if isinstance(obj, nn.Parameter):
                    uses[id(obj)] += len(node.users)
                    reads[id(obj)] += len(node.users)
        return uses, reads


def join_path(*parts: str) -> str:
    return ".".join(p for p in parts if p)


class _Tracer(fx.Tracer):
    """The default fx tracer, plus a set of modules kept opaque, and the innermost module whose
    ``forward`` raised (the one to make opaque on the next attempt)."""

    def __init__(self, opaque: set[str]) -> None:
        super().__init__()
        self.opaque = opaque
        self.culprit: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.opaque or super().is_leaf_module(
            m, module_qualified_name
        )

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.culprit is None:
                self.culprit = self.path_of_module(m)
            raise


def trace_regions(model: nn.Module) -> tuple[list[Region], dict[str, str]]:
    """Trace ``model`` with fx, skipping the forward of modules that cannot be traced.

    Returns the traced regions and ``{module path: reason}`` for every module whose own forward
    code was skipped ("" names the model itself).
    """
    regions: list[Region] = []
    skipped: dict[str, str] = {}
    default_tracer = fx.Tracer()

    def visit(module: nn.Module, prefix: str) -> None:
        if prefix and default_tracer.is_leaf_module(module, prefix):
            return
        opaque: dict[str, str] = {}
        while True:
            tracer = _Tracer(set(opaque))
            try:
                graph = tracer.trace(module)
            except Exception as err:
                culprit = tracer.culprit or ""
                reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
                if culprit == "" or culprit in opaque:
                    skipped[prefix] = reason
                    for name, child in module.named_children():
                        visit(child, join_path(prefix, name))
                    return
                opaque[culprit] = reason
                continue
            break
        regions.append(Region(module, prefix, graph, set(opaque)))
        for path, reason in sorted(opaque.items()):
            full = join_path(prefix, path)
            skipped[full] = reason
            for name, child in module.get_submodule(path).named_children():
                visit(child, join_path(full, name))

    visit(model, "")
    return regions, skipped


@dataclass(frozen=True)
class Use:
    """How one node consumes a tracked value: ``kind`` is "pass", "neutral", "layer", "norm",
    "output" or "break"; ``layer`` is set for "layer"; ``reason`` says why for "break"."""

    kind: str
    layer: LayerRef | None = None
    reason: str = ""


def _count_occurrences(value: Any, node: fx.Node) -> int:
    if value is node:
        return 1
    if isinstance(value, tuple | list):
        return sum(_count_occurrences(v, node) for v in value)
    if isinstance(value, dict):
        return sum(_count_occurrences(v, node) for v in value.values())
    return 0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _name(target: Any) -> str:
    return getattr(target, "__name__", str(target))


def functional_layer_ref(region: Region, node: fx.Node) -> LayerRef | None:
    """A :class:`LayerRef` for ``F.linear``/``F.conv*``/``F.embedding`` whose weight (and bias)
    are parameters read directly; None otherwise."""
    args = list(node.args) + [None] * 3
    if node.target is F.embedding:
        weight_node, bias_node = node.kwargs.get("weight", args[1]), None
    else:
        weight_node = node.kwargs.get("weight", args[1])
        bias_node = node.kwargs.get("bias", args[2])

    def param_of(arg: Any) -> nn.Parameter | None:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            obj = region.attr(arg.target)
            if isinstance(obj, nn.Parameter):
                return obj
        return None

    weight = param_of(weight_node)
    if weight is None:
        return None
    bias = param_of(bias_node)
    if bias_node is not None and bias is None:
        return None
    path = region.full_path(weight_node.target)
    path = path[: -len(".weight")] if path.endswith(".weight") else path
    return LayerRef(
        path=path,
        gain=(weight,),
        bias=bias,
        kind="embedding" if node.target is F.embedding else "layer",
        linear_module=node.target is F.linear,
    )


def source_ref(region: Region, node: fx.Node) -> LayerRef | None:
    """The layer a node is a call of, if its output is linear in that layer's parameters."""
    if node.op == "call_module" and node.target not in region.opaque:
        module = region.root.get_submodule(node.target)
        return module_layer_ref(module, region.full_path(node.target))
    if node.op == "call_function" and (
        node.target in LAYER_FUNCTIONS or node.target is F.embedding
    ):
        return functional_layer_ref(region, node)
    return None


def classify_use(region: Region, user: fx.Node, value: fx.Node) -> Use:
    """How ``user`` consumes ``value`` (see the module docstring)."""
    if user.op == "output":
        return Use("output")
    occurrences = _count_occurrences(user.args, value) + _count_occurrences(user.kwargs, value)
    if occurrences > 1:
        return Use("break", reason=f"{user.name} uses the value {occurrences} times")
    first = user.args[0] if user.args else None
    if user.op == "call_module":
        path = region.full_path(user.target)
        if user.target in region.opaque:
            return Use("break", reason=f"goes into {path!r}, which could not be traced")
        if first is not value:
            return Use("break", reason=f"is a non-input argument of {path!r}")
        module = region.root.get_submodule(user.target)
        if isinstance(module, LAYER_MODULES):
            return Use("layer", layer=module_layer_ref(module, path))
        if isinstance(module, HOMOGENEOUS_MODULES):
            return Use("pass")
        own_stats = norm_uses_own_statistics(module)
        if own_stats:
            return Use("norm")
        if own_stats is False:
            return Use("break", reason=f"{path!r} normalizes with running statistics (eval mode)")
        return Use("break", reason=f"goes into {type(module).__name__} {path!r}")
    if user.op == "call_function":
        target = user.target
        if target is builtins.getattr and user.args[1] in NEUTRAL_ATTRIBUTES:
            return Use("neutral")
        if target is builtins.len:
            return Use("neutral")
        if target in SCALAR_PRODUCTS:
            other = user.args[1] if first is value else first
            divisor_ok = target not in (operator.truediv, torch.div) or first is value
            if _is_number(other) and divisor_ok and not user.kwargs:
                return Use("pass")
            return Use("break", reason=f"{_name(target)} by a tensor")
        if first is not value:
            return Use("break", reason=f"is a non-input argument of {_name(target)}")
        if target in HOMOGENEOUS_FUNCTIONS:
            return Use("pass")
        if target in LAYER_FUNCTIONS:
            return Use("layer", layer=functional_layer_ref(region, user))
        if target in NORM_FUNCTIONS:
            return Use("norm")
        if target is F.batch_norm:
            running = user.kwargs.get("running_mean", user.args[1] if len(user.args) > 1 else None)
            training = user.kwargs.get("training", user.args[5] if len(user.args) > 5 else False)
            if training is True or running is None:
                return Use("norm")
            return Use("break", reason="batch_norm with running statistics")
        if target is F.instance_norm:
            stats = user.kwargs.get("use_input_stats", user.args[5] if len(user.args) > 5 else True)
            if stats is True:
                return Use("norm")
        return Use("break", reason=f"goes into {_name(target)}, not positively homogeneous")
    if user.op == "call_method":
        target = user.target
        if target in NEUTRAL_METHODS:
            return Use("neutral")
        if target in SCALAR_PRODUCT_METHODS:
            other = user.args[1] if len(user.args) > 1 else None
            if first is value and _is_number(other) and not user.kwargs:
                return Use("pass")
            return Use("break", reason=f".{target} by a tensor")
        if first is not value:
            return Use("break", reason=f"is an argument of .{target}()")
        if target in HOMOGENEOUS_METHODS:
            return Use("pass")
        return Use("break", reason=f"goes into .{target}(), not positively homogeneous")
    return Use("break", reason=f"unexpected use by {user.op} {user.name}")


@dataclass
class Reach:
    """Where a value flows through positively homogeneous ops: the layers and norms it ends in,
    whether it reaches the graph output, and the first reason it breaks a candidate (if any)."""

    layers: list[tuple[fx.Node, LayerRef | None]] = field(default_factory=list)
    norms: list[fx.Node] = field(default_factory=list)
    outputs: int = 0
    breaks: list[str] = field(default_factory=list)


def reach(region: Region, start: fx.Node) -> Reach:
    """Follow ``start`` forward through pass-through ops to its terminal consumers."""
    found = Reach()
    seen: set[fx.Node] = set()
    frontier = [start]
    while frontier:
        value = frontier.pop()
        for user in value.users:
            use = classify_use(region, user, value)
            if use.kind == "pass":
                if user not in seen:
                    seen.add(user)
                    frontier.append(user)
            elif use.kind == "layer":
                found.layers.append((user, use.layer))
            elif use.kind == "norm":
                found.norms.append(user)
            elif use.kind == "output":
                found.outputs += 1
            elif use.kind == "break":
                found.breaks.append(use.reason)
    return found
