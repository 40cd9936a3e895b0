"""The monitor's state, declared once: each state with its default, how ranks combine it and
whether a checkpoint keeps it; reset, cross-rank sync and ``state_dict`` follow from the
declarations (as torchmetrics' ``add_state`` does). Reductions are those of
:data:`noether_dyn.records.REDUCTIONS`; the per-tensor statistics carry theirs per column
(:data:`noether_dyn.records.STATS_SPEC`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from noether_dyn.records import GLOBAL_STATS, REDUCTIONS, STEP_SPEC

STATE_VERSION = 1
"""Version of the dict of :meth:`Monitor.state_dict`."""


@dataclass(frozen=True)
class State:
    """One declared state: ``default()`` builds its reset value, ``reduce`` says how ranks
    combine it, ``checkpoint`` whether ``state_dict`` keeps it (restored through ``load``;
    a checkpoint without it restores ``default()`` unless ``required``)."""

    name: str
    default: Callable[[], Any]
    reduce: str
    checkpoint: bool
    load: Callable[[Any], Any] = lambda v: v
    required: bool = True

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"State {self.name!r}: reduce must be one of {REDUCTIONS}.")


class States:
    """Holds the values of declared states as attributes."""

    def __init__(self, *declared: State) -> None:
        object.__setattr__(self, "_declared", {s.name: s for s in declared})
        self.reset()

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._declared:
            raise AttributeError(f"no state {name!r} is declared")
        object.__setattr__(self, name, value)

    def reset(self) -> None:
        """Every state back to its default."""
        for s in self._declared.values():
            setattr(self, s.name, s.default())

    def state_dict(self) -> dict[str, Any]:
        """The checkpointed states (host values)."""
        kept = [s.name for s in self._declared.values() if s.checkpoint]
        return {name: _copy(getattr(self, name)) for name in kept}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for s in self._declared.values():
            if s.checkpoint and (s.required or s.name in state):
                setattr(self, s.name, s.load(state[s.name]))
            elif s.checkpoint:  # added after the version's first release: default when absent
                setattr(self, s.name, s.default())

    def synced(self, name: str, sharded: bool) -> Any:
        """The state ``name`` combined over ranks by its declared reduction (unchanged when the
        parameters are not sharded)."""
        return sync(getattr(self, name), self._declared[name].reduce, sharded)


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def sync(value: torch.Tensor, reduce: str, sharded: bool) -> torch.Tensor:
    """``value`` combined over ranks: summed (``"sum"``), averaged in float64 (``"mean"``), or
    unchanged (the other reductions, and whenever the parameters are not sharded)."""
    if not sharded or reduce not in ("sum", "mean"):
        return value
    if reduce == "mean":
        value = value.to(dtype=torch.float64).clone()
        torch.distributed.all_reduce(value)
        return value / torch.distributed.get_world_size()
    torch.distributed.all_reduce(value)
    return value


def sync_stats(stats: torch.Tensor, global_values: torch.Tensor, sharded: bool) -> torch.Tensor:
    """The (n_tensors, len(STATS)) statistics summed over ranks in place, column by column as
    declared: the summed columns added, the global ones (entry counts, ``global_values`` of
    shape (n_tensors, len(GLOBAL_STATS))) restored after the all-reduce."""
    if not sharded:
        return stats
    keep = list(GLOBAL_STATS)
    stats[:, keep] = 0.0
    torch.distributed.all_reduce(stats)
    stats[:, keep] = global_values
    return stats


def monitor_states(n_groups: int) -> States:
    """The monitor's own states: step count, time t_n, the log prefactor t/tau per group and the
    wall-clock seconds of monitoring so far (host, checkpointed: a resumed run's wall_time goes
    on from the checkpoint's), and the loss logged for the coming step, directly or by a closure
    (averaged over ranks like the stored ``loss`` column, not checkpointed)."""
    loss = next(c.reduce for c in STEP_SPEC if c.name == "loss")
    return States(
        State("step", int, "host", True, int),
        State("time", float, "host", True, float),
        State("log_prefactor", lambda: [0.0] * n_groups, "host", True, _floats),
        State("wall_time", float, "host", True, float, required=False),
        State("loss", _none, loss, False),
        State("closure_loss", _none, loss, False),
    )


def checkpoint(states: States, predictor: Any, symmetries: list[str]) -> dict[str, Any]:
    """The dict of :meth:`Monitor.state_dict` (host values, JSON-able)."""
    return {
        "version": STATE_VERSION,
        **states.state_dict(),
        "predictor": predictor.state_dict(),
        "symmetries": symmetries,
    }


def check_checkpoint(state: Mapping[str, Any], symmetries: list[str]) -> None:
    """Raise when ``state`` is not a monitor state of this version and these symmetries."""
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"load_state_dict: monitor state version {state.get('version')!r}, expected "
            f"{STATE_VERSION}. Was it saved by monitor.state_dict()?"
        )
    names = list(state.get("symmetries", []))
    if names != symmetries:
        raise ValueError(
            f"load_state_dict: the checkpoint tracked symmetries {names} but this monitor "
            f"tracks {symmetries}. Resume with the same symmetries (pass symmetries= as in the "
            "first run)."
        )


def _none() -> None:
    return None


def _floats(values: Any) -> list[float]:
    return [float(v) for v in values]
