"""The parameters a monitor tracks: names, tensors, param groups and the index maps between them.

Positions are the optimizer's order (group by group); every per-tensor vector of the monitor is a
float64 tensor of shape (n_tensors,) on the parameters' device in that order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from noether_dyn.quantities.reductions import DTensor, local
from noether_dyn.symmetries.symmetry import Symmetry
from noether_dyn.symmetries.units import check_granularity


class Tracked:
    """The optimizer's parameters as named by ``model``, with cached device index tensors.

    Attributes:
        names, params, group_of: per tracked tensor, its name (``model.named_parameters()``), the
            tensor and the index of its param group.
        symmetries: the checked symmetries (names unique, every parameter tracked, slices in
            range). granularity: ``"layer"`` or ``"unit"`` (zero-config detection splits its
            symmetries into per-unit ones: :func:`noether_dyn.symmetries.units.choose_units`).
        index: name -> position. device: where the parameters (and all statistics) live.
        n_groups: param groups. group_params: the tensors of each group, in order.
        group_index: (n_tensors,) long on the device. numel, local_numel: (n_tensors,) float64
            entry counts (global, and of the local shards under FSDP2).
        sharded: whether the parameters are DTensors (FSDP2: statistics are summed over ranks).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        symmetries: Sequence[Symmetry],
        granularity: str = "layer",
    ) -> None:
        self.granularity = check_granularity(granularity)
        self.names, self.params, self.group_of = tracked_parameters(model, optimizer)
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.index = {name: i for i, name in enumerate(self.names)}
        self.symmetries = check_symmetries(symmetries, self.index, model)
        self.n_groups = len(optimizer.param_groups)
        self.group_params = [
            [p for p, gi in zip(self.params, self.group_of) if gi == g]
            for g in range(self.n_groups)
        ]
        self.group_index = self.to_device(self.group_of, torch.long)
        self.numel = self.to_device([float(p.numel()) for p in self.params], torch.float64)
        self.local_numel = self.to_device(
            [float(p.numel()) for p in local(self.params)], torch.float64
        )
        self.sharded = any(isinstance(p, DTensor) for p in self.params)
        if self.sharded and (granularity == "unit" or any(s.is_unit for s in self.symmetries)):
            raise ValueError(
                "watch: per-unit symmetries (granularity='unit') are not supported with sharded "
                "(FSDP2) parameters: a unit's slice would span ranks. Use granularity='layer'."
            )
        self.widened = [accumulation_dtype(p.dtype) != p.dtype for p in self.params]
        self.widened_groups = [
            any(w for w, gi in zip(self.widened, self.group_of) if gi == g)
            for g in range(self.n_groups)
        ]
        self._idx_cache: dict[tuple[int, ...], torch.Tensor] = {}
        # a model-wide cast (model.float(), .half(), .to(dtype)) changes every tensor: the first
        # one stands for all (one comparison per step)
        self._first_dtype = self.params[0].dtype if self.params else None

    def __len__(self) -> int:
        return len(self.params)

    def check_unchanged(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise when the optimizer's parameters changed after ``watch()``."""
        n_params = sum(len(g["params"]) for g in optimizer.param_groups)
        if n_params != len(self.params) or len(optimizer.param_groups) != self.n_groups:
            raise RuntimeError(
                "noether-dyn: the optimizer's parameters changed after watch() (add_param_group?). "
                "Call watch() after the optimizer has all its param groups."
            )
        if self._first_dtype is not None and (p := self.params[0]).dtype != self._first_dtype:
            raise RuntimeError(
                f"noether-dyn: the model's parameters changed dtype after watch() "
                f"({self._first_dtype} -> {p.dtype}): the statistics were planned for the old "
                "dtype (16-bit parameters need a float64 copy of each step). Close this monitor "
                "and call watch(..., resume=True) after the cast."
            )

    def with_grad(self, idx: Sequence[int] | None = None) -> list[int]:
        """The positions (of ``idx``, default all) whose tensor holds a gradient."""
        idx = range(len(self.params)) if idx is None else idx
        return [i for i in idx if self.params[i].grad is not None]

    def grads(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self.params]

    def widen(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """``tensors`` (one per position, or any list of the tracked tensors' companions) with
        every 16-bit float tensor copied to :func:`accumulation_dtype`; the list itself when no
        tracked tensor is 16-bit (no copy, no per-tensor check)."""
        if not any(self.widened):
            return tensors
        return [widen(x) for x in tensors]

    def to_device(self, values: Any, dtype: torch.dtype) -> torch.Tensor:
        """Host values as a device tensor without a blocking copy (nothing waits on it)."""
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def per_tensor(self, per_group: list[float]) -> torch.Tensor:
        """A per-group host list as a (n_tensors,) float64 device vector."""
        return self.to_device(per_group, torch.float64)[self.group_index]

    def index_tensor(self, idx: list[int]) -> torch.Tensor:
        """``idx`` as a long device tensor, cached per distinct list."""
        key = tuple(idx)
        if key not in self._idx_cache:
            self._idx_cache[key] = self.to_device(idx, torch.long)
        return self._idx_cache[key]

    def subset(self, fn: Callable[..., torch.Tensor], idx: list[int], *lists: list) -> torch.Tensor:
        """fn over the tensors at positions ``idx`` of each list, scattered into a (n_tensors,)
        vector with zeros elsewhere."""
        n = len(self.params)
        if len(idx) == n:
            return fn(*lists, self.device)
        out = torch.zeros(n, dtype=torch.float64, device=self.device)
        if idx:
            out[self.index_tensor(idx)] = fn(*[[lst[i] for i in idx] for lst in lists], self.device)
        return out

    def restrict(self, values: torch.Tensor, idx: list[int]) -> torch.Tensor:
        """``values`` at positions ``idx``, zeros elsewhere."""
        if len(idx) == len(self.params):
            return values
        out = torch.zeros_like(values)
        if idx:
            sel = self.index_tensor(idx)
            out[sel] = values[sel]
        return out


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter's statistics are accumulated in: float64 (the store's dtype) for
    16-bit floats (bf16 keeps 8 significant bits, fp16 11: sums and norms formed in them lose
    the change of a step), the parameter's own dtype otherwise (float32 and float64). The one
    place this is decided, for the eager and compiled paths alike."""
    return torch.float64 if dtype in (torch.float16, torch.bfloat16) else dtype


def widen(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` in :func:`accumulation_dtype` (the same tensor when that is its dtype)."""
    return x if x is None or accumulation_dtype(x.dtype) == x.dtype else x.to(torch.float64)


def tracked_parameters(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[list[str], list[torch.Tensor], list[int]]:
    """Names (as in ``model.named_parameters()``), tensors and group index of every optimizer
    parameter, in the optimizer's order."""
    by_id = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), name)
    names, params, group_of = [], [], []
    seen: dict[int, tuple[int, int]] = {}
    for g, group in enumerate(optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            if id(p) in seen:
                raise ValueError(
                    f"watch: optimizer lists parameter '{by_id.get(id(p), '?')}' twice (param "
                    f"group {seen[id(p)][0]} entry {seen[id(p)][1]} and param group {g} entry "
                    f"{j}); its statistics would count twice. Build the optimizer with each "
                    "parameter once (e.g. list(model.parameters()) or distinct groups)."
                )
            seen[id(p)] = (g, j)
            if id(p) not in by_id:
                raise ValueError(
                    f"watch: parameter {j} of param group {g} (shape {tuple(p.shape)}) is not a "
                    f"parameter of the {type(model).__name__} given. Pass the model whose "
                    "parameters the optimizer updates."
                )
            if p.is_sparse:
                raise ValueError(
                    f"watch: parameter '{by_id[id(p)]}' is sparse; noether-dyn handles dense "
                    "parameters only."
                )
            if p.is_complex():
                raise ValueError(
                    f"watch: parameter '{by_id[id(p)]}' is complex ({p.dtype}); noether-dyn's "
                    "charges and metric are defined for real parameters. Watch a model with "
                    "real parameters (store a complex weight as its real and imaginary parts, "
                    "e.g. torch.view_as_real)."
                )
            names.append(by_id[id(p)])
            params.append(p)
            group_of.append(g)
    return names, params, group_of


def check_symmetries(
    symmetries: Sequence[Symmetry], index: dict[str, int], model: torch.nn.Module
) -> list[Symmetry]:
    """The symmetries as a list, after checking their type, unique names and parameters."""
    seen: set[str] = set()
    out = []
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    model_names = set(shapes)
    for s in symmetries:
        if not isinstance(s, Symmetry):
            raise TypeError(
                f"watch: symmetries must be noether_dyn.Symmetry records, got {type(s).__name__}."
            )
        if s.name in seen:
            raise ValueError(f"watch: two symmetries are named {s.name!r}; names must be unique.")
        seen.add(s.name)
        unknown = [n for n in s.params if n not in index]
        if unknown:
            where = (
                "not parameters of the model"
                if any(n not in model_names for n in unknown)
                else "not updated by the optimizer"
            )
            raise ValueError(
                f"watch: symmetry {s.name!r} names {unknown}, {where}. Use names from "
                "model.named_parameters() of parameters the optimizer updates."
            )
        for name, where in zip(s.params, s.slices):
            shape = shapes[name]
            if where is not None and (where[0] >= len(shape) or where[1] >= shape[where[0]]):
                raise ValueError(
                    f"watch: symmetry {s.name!r} takes slice {where} (dim, index) of {name!r}, "
                    f"whose shape is {shape}."
                )
        out.append(s)
    return out
