"""The dataflow of one real forward pass, read at the level of torch functions, with the module
that owns each parameter.

Why not torch.fx: Hugging Face models (and most models with Python-level control flow, caches or
ModelOutput returns) cannot be traced symbolically. Running the model once under a
``TorchFunctionMode`` works on every model that runs: each torch function call is seen with its
real tensors, and module hooks say which module a tensor comes out of. What it shows holds for the
path this batch took; every candidate built from it is verified numerically before it is reported
(:mod:`noether_dyn.symmetries.engine`), so the trace only has to propose, never to prove.

A *unit* is a module that owns parameters directly and has no submodule with parameters (a
Linear, a Conv, an Embedding, a norm with its gain, HF's GPT-2 ``Conv1D``, LLaMA's ``RMSNorm``),
called atomically: nothing inside it is recorded. A parameter used outside its unit (ViT's
``cls_token`` and ``position_embeddings``, read by their parent module) is a unit of its own.

Each recorded tensor carries an *origin*: the unit whose output it is a positively homogeneous
degree-1 function of (through reshapes, dropout, ReLU, products with tensors that depend on no
unit or only on other units' nonlinear outputs), a *stream* (a sum of several units' outputs, such
as a residual stream; its *writers* are those units), :data:`MIXED` (anything else), or none (no
parameter involved). From these the trace collects, for candidate generation:

- ``consumers[u]``: the units that read an input of origin ``u`` (fan-out of a norm, producer to
  consumer pairs);
- ``meets``: pairs of units whose outputs meet in one bilinear op (attention scores q k^T);
- ``streams``: writers and readers of every sum of several units' outputs;
- ``head``: the unit whose output is the model's output (logits), and the norm units in call order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized
from torch.overrides import TorchFunctionMode

MIXED = "<mixed>"
"""Origin of a tensor that is no positively homogeneous function of a single unit or stream."""

_PASS = frozenset(
    {
        "view", "reshape", "transpose", "permute", "contiguous", "expand", "expand_as",
        "__getitem__", "split", "chunk", "unbind", "dropout", "relu", "relu_", "neg",
        "__neg__", "clone", "to", "float", "half", "bfloat16", "double", "type_as", "flatten",
        "unflatten", "squeeze", "unsqueeze", "narrow", "select", "repeat", "repeat_interleave",
        "t", "transpose_", "mean", "sum", "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d",
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "pad",
        "mul", "__mul__", "__rmul__", "mul_", "__imul__", "div", "__truediv__", "div_",
        "matmul", "__matmul__", "bmm", "einsum", "add", "__add__", "__radd__", "add_",
        "__iadd__", "sub", "__sub__", "__rsub__", "cat", "stack", "leaky_relu", "prelu",
        "masked_fill", "dropout1d", "dropout2d", "feature_dropout", "alpha_dropout",
        "_max_pool2d", "max_pool2d_with_indices", "scaled_dot_product_attention",
    }
)  # fmt: skip
"""Functions (by ``__name__``) that pass the origin of their one origin-carrying operand on."""

_SUMS = frozenset(
    {"add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "__rsub__", "cat", "stack"}
)
"""Functions whose operands of different origins form a stream (residual sums, concatenations)."""

_PRODUCTS = frozenset(
    {"mul", "__mul__", "__rmul__", "matmul", "__matmul__", "bmm", "einsum", "baddbmm"}
)
"""Bilinear functions: two operands of different units *meet* (q k^T)."""

_ELEMENTWISE = frozenset({"mul", "__mul__", "__rmul__"})
"""Elementwise products: a loose parameter times a unit's output (layer scale) carries the
parameter's origin on (the product is degree 1 in it), so it can write into a stream."""

NORM_EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")
"""Attributes holding the eps of a normalization module (torch, LLaMA/T5 RMSNorm, others)."""


def is_norm(module: nn.Module) -> bool:
    """A normalization module: torch's norms, or any class named ``*Norm*`` with an eps."""
    if isinstance(
        module,
        nn.modules.batchnorm._BatchNorm
        | nn.modules.instancenorm._InstanceNorm
        | nn.GroupNorm
        | nn.LayerNorm
        | nn.RMSNorm,
    ):
        return True
    return "norm" in type(module).__name__.lower() and any(
        isinstance(getattr(module, a, None), float) for a in NORM_EPS_ATTRIBUTES
    )


@dataclass(frozen=True)
class Unit:
    """A module (or one loose parameter) whose parameters are scaled together.

    Args:
        path: module path, or the parameter's name for a loose parameter.
        params: names (as in ``model.named_parameters()``) of its trainable floating parameters.
        gains: the subset that multiplies its output (all but biases).
        norm: True for a normalization module (its eps is shrunk in the approximate check).
    """

    path: str
    params: tuple[str, ...]
    gains: tuple[str, ...]
    norm: bool = False


@dataclass
class Stream:
    """A sum of several units' outputs: who writes into it and which units read it."""

    writers: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)


@dataclass
class Flow:
    """What one forward pass shows (see the module docstring)."""

    units: dict[str, Unit]
    consumers: dict[str, list[str]]
    meets: set[tuple[str, str]]
    streams: list[Stream]
    head: str | None
    norms: list[str]
    calls: dict[str, int]


def find_units(model: nn.Module) -> tuple[dict[str, Unit], dict[int, str], dict[int, str]]:
    """Units, {id(module): unit path} of module units, {id(param): unit path} of loose ones."""
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad and p.is_floating_point()}
    units: dict[str, Unit] = {}
    module_units: dict[int, str] = {}
    loose: dict[int, str] = {}
    parametrized: list[str] = []
    for path, module in model.named_modules():
        if any(p == "" or path.startswith(p + ".") for p in parametrized):
            continue  # inside a parametrized module's unit
        if is_parametrized(module):  # weight normalization: the layer with g and v is the unit
            parametrized.append(path)
            own = list(module.named_parameters())
            has_param_child = False
        else:
            own = list(module.named_parameters(recurse=False))
            has_param_child = any(next(c.parameters(), None) is not None for c in module.children())
        if not own:
            continue
        keep = [(n, p) for n, p in own if id(p) in trainable]
        if has_param_child:
            for _, p in keep:
                if id(p) not in loose:
                    loose[id(p)] = names[id(p)]
                    units[names[id(p)]] = Unit(names[id(p)], (names[id(p)],), (names[id(p)],))
            continue
        if not keep:
            continue
        params = tuple(dict.fromkeys(names[id(p)] for _, p in keep))
        gains = tuple(dict.fromkeys(names[id(p)] for n, p in keep if not n.startswith("bias")))
        units[path] = Unit(path, params, gains, norm=is_norm(module))
        module_units[id(module)] = path
    return units, module_units, loose


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class _Recorder(TorchFunctionMode):
    """Propagates origins through torch function calls made outside units."""

    def __init__(self, loose: dict[int, str], param_units: dict[int, str]) -> None:
        super().__init__()
        self.loose = loose
        self.param_units = param_units  # id(parameter) -> its module unit
        self.loose_paths = set(loose.values())
        self.origin: dict[int, str] = {}
        self.keep: list[torch.Tensor] = []  # keeps ids unique while the pass runs
        self.inside = 0  # depth of unit calls: nothing inside a unit is recorded
        self.meets: set[tuple[str, str]] = set()
        self.stream_of: dict[str, Stream] = {}
        self.consumers: dict[str, list[str]] = defaultdict(list)

    def consume(self, origin: str | None, unit: str) -> None:
        """``unit`` reads an input of this origin."""
        if origin and origin.startswith("stream:"):
            self.stream_of[origin].readers.append(unit)
        elif origin and origin != MIXED and unit not in self.consumers[origin]:
            self.consumers[origin].append(unit)

    def of(self, t: torch.Tensor) -> str | None:
        if id(t) in self.loose:
            return self.loose[id(t)]
        return self.origin.get(id(t))

    def mark(self, value: Any, origin: str | None) -> None:
        for t in _tensors(value):
            self.keep.append(t)
            if origin is None:
                self.origin.pop(id(t), None)
            else:
                self.origin[id(t)] = origin

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.inside:
            return result
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__", "size", "dim", "numel", "shape"):
            return result
        operands = _tensors(args) + _tensors(kwargs)
        origins = [self.of(t) for t in operands]
        distinct = list(dict.fromkeys(o for o in origins if o is not None))
        units = [o for o in distinct if o != MIXED]
        if not distinct:
            return result
        if name == "multi_head_attention_forward" and self._attention_module(args, kwargs, result):
            return result
        if name == "scaled_dot_product_attention" and len(origins) >= 3:
            q, k, v = origins[:3]
            if q and k and MIXED not in (q, k) and q != k:
                self.meets.add((q, k))
            self.mark(result, v if v and v != MIXED else MIXED)
        elif len(distinct) == 1 and name in _PASS:
            self.mark(result, distinct[0])
        elif name in _SUMS and len(units) >= 2:
            self.mark(result, self.join(units))
        elif name in _PRODUCTS and len(units) == 2 and MIXED not in distinct:
            a, b = units
            if not (a.startswith("stream:") or b.startswith("stream:")):
                self.meets.add((a, b))
            loose = [u for u in (a, b) if u in self.loose_paths]
            if name in _ELEMENTWISE and len(loose) == 1:
                self.mark(result, loose[0])  # layer scale gamma * f(x): degree 1 in gamma
            else:
                self.mark(result, MIXED)
        elif name in _PRODUCTS and len(units) == 1 and MIXED in distinct:
            self.mark(result, units[0])  # silu(gate) * up, probs @ v: linear in the unit
        else:
            self.mark(result, MIXED)
        return result

    def _attention_module(self, args: tuple, kwargs: dict, result: Any) -> bool:
        """``nn.MultiheadAttention(x, x, x)`` projects x with its fused ``in_proj_weight`` (a
        loose parameter, read inside the functional call): record that read. Its output is
        ``out_proj``'s affine map of values linear in the inputs: of ``out_proj``'s origin
        (``out_proj`` runs inside the call, not as a module). True when the result is marked."""
        names = (
            "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
            "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
            "out_proj_bias",
        )  # fmt: skip
        given = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        q, weight = given.get("query"), given.get("in_proj_weight")
        if q is not None and weight is not None and id(weight) in self.loose:
            if given.get("key") is q and given.get("value") is q:
                self.consume(self.of(q), self.loose[id(weight)])
        out_unit = self.param_units.get(id(given.get("out_proj_weight")))
        if out_unit is None or not isinstance(result, tuple) or not result:
            return False
        self.mark(result[0], out_unit)
        self.mark(result[1:], MIXED)
        return True

    def join(self, origins: list[str]) -> str:
        """The stream that the sum of ``origins`` belongs to (streams merge)."""
        streams = [self.stream_of[o] for o in origins if o.startswith("stream:")]
        stream = streams[0] if streams else Stream()
        for other in streams[1:]:
            if other is not stream:
                stream.writers += other.writers
                stream.readers += other.readers
                for key, s in list(self.stream_of.items()):
                    if s is other:
                        self.stream_of[key] = stream
        for o in origins:
            if not o.startswith("stream:") and o not in stream.writers:
                stream.writers.append(o)
        key = f"stream:{id(stream)}"
        self.stream_of[key] = stream
        return key


class RecordingError(Exception):
    """The forward pass failed under the recorder: ``module`` is the path of the innermost
    module running when it did ("" for the model itself), ``error`` what it raised."""

    def __init__(self, module: str, error: Exception) -> None:
        super().__init__(f"{module or '<model>'}: {type(error).__name__}: {error}")
        self.module = module
        self.error = error


def trace_flow(model: nn.Module, call: Any) -> tuple[Flow, Any]:
    """Run ``call()`` (one forward pass of ``model``) under the recorder; return the flow and
    what ``call()`` returned (the model's output).

    Raises:
        RecordingError: naming the innermost module that was running when the pass failed."""
    units, module_units, loose = find_units(model)
    named = dict(model.named_parameters())
    param_units = {id(named[n]): path for path, u in units.items() for n in u.params}
    recorder = _Recorder(loose, param_units)
    norms: list[str] = []
    calls: dict[str, int] = defaultdict(int)

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        path = module_units[id(module)]
        calls[path] += 1
        if recorder.inside == 0:
            first = next(iter(_tensors(args) + _tensors(kwargs)), None)
            recorder.consume(recorder.of(first) if first is not None else None, path)
            if units[path].norm:
                norms.append(path)
        recorder.inside += 1

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        recorder.inside -= 1
        if recorder.inside == 0:
            recorder.mark(output, module_units[id(module)])

    paths = {id(m): p for p, m in model.named_modules()}
    active: list[str] = []  # the modules running now, outermost first

    def enter(module: nn.Module, args: tuple) -> None:
        active.append(paths.get(id(module), "?"))

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        active.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))  # not on an exception: it stays
        if id(module) in module_units:
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
    try:
        with recorder:
            out = call()
    except Exception as err:
        raise RecordingError(active[-1] if active else "", err) from err
    finally:
        for h in handles:
            h.remove()
    head = None
    logits = output_tensors(out)
    if logits:
        origin = recorder.of(logits[0])
        head = origin if origin in units else None
    streams = list({id(s): s for s in recorder.stream_of.values()}.values())
    flow = Flow(
        units=units,
        consumers=dict(recorder.consumers),
        meets=recorder.meets,
        streams=streams,
        head=head,
        norms=list(dict.fromkeys(norms)),
        calls=dict(calls),
    )
    return flow, out


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The floating tensors a model returns that carry its prediction: ``logits`` when the output
    has them (HF ``ModelOutput``, dict), else every floating tensor in it except ``loss``.
    Caches (``past_key_values``) and other objects are skipped."""
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        keys = list(out.keys())
        if "logits" in keys and isinstance(out["logits"], torch.Tensor):
            return [out["logits"]]
        found = []
        for k in keys:
            if k in ("loss", "past_key_values"):
                continue
            found += [t for t in _tensors(out[k]) if t.is_floating_point()]
        return found
    return [t for t in _tensors(out) if t.is_floating_point()]


def model_loss(out: Any) -> torch.Tensor | None:
    """The scalar ``loss`` a model returned (HF models given ``labels``), else None."""
    loss = None
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        loss = out.get("loss") if hasattr(out, "get") else None
    elif hasattr(out, "loss"):
        loss = out.loss
    if isinstance(loss, torch.Tensor) and loss.ndim == 0:
        return loss
    return None
