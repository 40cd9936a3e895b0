"""Running a model on user inputs without side effects: the argument convention, a probe forward
pass that counts module calls, and the functional loss used by the verifier."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

Inputs = torch.Tensor | tuple | list | Mapping
"""``inputs`` of :func:`find_symmetries` and :func:`verify`: one tensor (``model(x)``), a tuple or
list of positional arguments (``model(*inputs)``), or a mapping of keyword arguments."""


def as_call(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split ``inputs`` into positional and keyword arguments of ``model.forward``."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    raise ValueError(
        f"inputs: expected a tensor, a tuple/list of positional arguments or a dict of keyword "
        f"arguments for model.forward, got {type(inputs).__name__}. "
        "Pass e.g. inputs=x for model(x)."
    )


def fresh_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's buffers, so that a train-mode BatchNorm updates the copies, not the
    model's running statistics."""
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def call_model(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Inputs) -> Any:
    """``model(*inputs)`` with ``params`` in place of the parameters and fresh buffer copies."""
    args, kwargs = as_call(inputs)
    return functional_call(model, ({**params}, fresh_buffers(model)), args, kwargs)


def probe(model: nn.Module, inputs: Inputs) -> tuple[Counter[str], Any]:
    """Run the model once on ``inputs``; return the calls of every submodule (by path) and the
    model's output.

    The model's parameters, buffers and the global RNG state are left as they were. Raises
    ValueError when the forward pass fails: the inputs do not fit the model.
    """
    as_call(inputs)
    paths = {id(m): name for name, m in model.named_modules()}
    calls: Counter[str] = Counter()

    def count(module: nn.Module, _args: Any) -> None:
        calls[paths.get(id(module), "?")] += 1

    handles = [m.register_forward_pre_hook(count) for m in model.modules()]
    params = {name: p.detach() for name, p in model.named_parameters()}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            out = call_model(model, params, inputs)
    except Exception as err:
        shapes = _describe(inputs)
        raise ValueError(
            f"inputs: model(*inputs) failed on the given inputs ({shapes}) with "
            f"{type(err).__name__}: {err}. Pass inputs that the model accepts: one batch as a "
            "tensor for model(x), a tuple for model(*args), or a dict for model(**kwargs)."
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    return calls, out


def _describe(inputs: Inputs) -> str:
    args, kwargs = as_call(inputs)

    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"tensor{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
        return type(v).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "no arguments"


def make_loss(
    model: nn.Module,
    inputs: Inputs,
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """The loss as a function of the named parameters: ``loss_fn(model(*inputs), targets)``."""

    def loss(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(call_model(model, params, inputs), targets)

    return loss
