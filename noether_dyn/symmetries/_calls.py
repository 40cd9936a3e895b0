"""Running a model on user inputs without side effects: the argument convention, a description of
the inputs for error messages, and the functional loss used by the verifier."""

from __future__ import annotations

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


def fresh_buffers(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Copies of the model's buffers, so that a train-mode BatchNorm updates the copies, not the
    model's running statistics; floating ones in ``dtype`` when given."""
    return {
        name: b.detach().to(dtype if dtype is not None and b.is_floating_point() else b.dtype,
                            copy=True)
        for name, b in model.named_buffers()
    }  # fmt: skip


def call_model(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    inputs: Inputs,
    dtype: torch.dtype | None = None,
) -> Any:
    """``model(*inputs)`` with ``params`` in place of the parameters and fresh buffer copies
    (floating ones in ``dtype`` when given: the model runs in the parameters' dtype)."""
    args, kwargs = as_call(inputs)
    return functional_call(model, ({**params}, fresh_buffers(model, dtype)), args, kwargs)


def describe(inputs: Inputs) -> str:
    """The inputs as an error message shows them: ``tensor(3, 5) float32, mask=tensor(3) bool``."""
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
