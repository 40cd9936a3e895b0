"""Per-tensor reductions, stacked into one float64 vector each: the hot path's only arithmetic.

Every function takes a list of n tensors (one per parameter) and returns a float64 tensor of shape
(n,) on ``device``, without a host-device sync. Sharded tensors (DTensor, as FSDP2 holds them)
are reduced over their local shard: every reduction here is a sum over entries, so the global
value is the sum of the local ones over ranks (one all-reduce, done by the caller).
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()  # type: ignore[assignment,misc]


def local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The local shard of each DTensor; other tensors unchanged."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _stack(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not values:
        return torch.zeros(0, dtype=torch.float64, device=device)
    try:  # mixed float dtypes promote to a wider one exactly, then widen to float64 exactly
        return torch.stack(values).to(device=device, dtype=torch.float64)
    except RuntimeError:  # values on different devices
        return torch.stack([v.to(device=device, dtype=torch.float64) for v in values])


def stacked(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-d per-tensor reductions (each in its tensor's dtype) as one (n,) float64 vector."""
    return _stack(values, device)


def sq_norms(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """|x_i|^2 for each tensor (one fused ``_foreach_norm`` pass in the tensors' dtype: asking
    for float64 accumulation would copy every float32 tensor to float64 first)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return _stack(list(torch._foreach_norm(local(tensors))), device).square()


def sq_norm_lists(lists: list[list[torch.Tensor]], device: torch.device) -> list[torch.Tensor]:
    """:func:`sq_norms` of several lists in one ``_foreach_norm``, one stack, one widening and
    one square (each entry the same as :func:`sq_norms` of its list gives: per tensor the same
    norm kernel, widened and squared in float64); one (len(list),) vector per list."""
    flat = [x for lst in lists for x in lst]
    if not flat:
        return [torch.zeros(0, dtype=torch.float64, device=device) for _ in lists]
    values = _stack(list(torch._foreach_norm(local(flat))), device).square()
    return list(values.split([len(lst) for lst in lists]))


def dots(a: list[torch.Tensor], b: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """<a_i, b_i> for each pair of same-shaped tensors."""
    return _stack(
        [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(local(a), local(b))], device
    )


def sums(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """sum(x_i) for each tensor (pairwise summation in the tensor's dtype)."""
    return _stack([t.sum() for t in local(tensors)], device)


def inverse_sums(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """sum(1 / x_i) for each tensor (the order -1 norm would need no temporary, but its generic
    power kernel is about 3x slower than a reciprocal and a sum on the CPU)."""
    return sums(torch._foreach_reciprocal(local(tensors)), device)
