"""The run's metadata as the monitor records it when a run starts (``meta`` table)."""

from __future__ import annotations

import datetime as _dt
import sys
from typing import Any

import torch

from noether_dyn.capture.tracked import Tracked
from noether_dyn.optimizers import OptimizerAdapter
from noether_dyn.quantities.decay_rule import DECAY_RULES, decay_rule
from noether_dyn.quantities.effective_rate import RATE_RULES
from noether_dyn.records import VERSION, GroupHyper
from noether_dyn.store.schema import SCHEMA_VERSION
from noether_dyn.symmetries.kinds import kind_of


def run_meta(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tracked: Tracked,
    adapter: OptimizerAdapter,
    hypers: list[GroupHyper],
    regime: str,
    every: int,
    note: str,
    state: dict[str, Any],
    exact_decay: bool = False,
) -> dict[str, Any]:
    """The ``meta`` items of a new run (see ``noether_dyn.store.schema``)."""
    groups = []
    for group, h in zip(optimizer.param_groups, hypers):
        groups.append(
            {
                **{k: jsonable(v) for k, v in group.items() if k != "params"},
                "n_params": len(group["params"]),
                "beta": h.beta,
                "decoupled_weight_decay": h.decoupled,
            }
        )
    n_total = sum(p.numel() for p in model.parameters())
    summary = str(model)
    return {
        "schema_version": SCHEMA_VERSION,
        "noether_dyn_version": VERSION,
        "torch_version": torch.__version__,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "model": {
            "class": type(model).__name__,
            "summary": summary if len(summary) < 20000 else summary[:20000] + "\n...",
            "n_parameters": n_total,
            "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        },
        "parameters": [
            {"name": n, "shape": list(p.shape), "group": g, "dtype": str(p.dtype)}
            for n, p, g in zip(tracked.names, tracked.params, tracked.group_of)
        ],
        "optimizer": {
            "class": type(optimizer).__name__,
            "adapter": adapter.name,
            "metric": adapter.metric_name,
            "metric_fallback": adapter.fallback,
            "family": adapter.family,
            "effective_rate": RATE_RULES[adapter.family],
            "prediction": regime,
            "param_groups": groups,
        },
        "decay": {
            "rules": DECAY_RULES,
            "by_symmetry": {
                s.name: decay_rule(
                    adapter.family,
                    hypers[tracked.group_of[tracked.index[s.params[0]]]],
                    kind_of(s.kind).linear,
                    exact_decay,
                )
                for s in tracked.symmetries
            },
        },
        "every": every,
        "symmetry_note": note,
        "monitor_state": state,
    }


def jsonable(value: Any) -> Any:
    """A param-group value as JSON: tensors as lists (CPU) or their repr, others as strings."""
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.device.type == "cpu" else str(value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)
