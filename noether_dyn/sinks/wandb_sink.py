"""Weights & Biases: scalars logged to a W&B run (``pip install 'noether-dyn[wandb]'``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from noether_dyn.sinks.rows import PREFIX, check_charge_columns

_MISSING = (
    "WandbSink needs wandb: pip install 'noether-dyn[wandb]' (or pip install wandb), "
    "or pass run= an object with log(dict, step=)"
)


class WandbSink:
    """Logs each logged step's scalars in one ``run.log`` call.

    W&B accepts steps that only increase. By default the sink logs ``run.log(scalars,
    step=step)`` with the optimizer step. Rows arrive at each flush, up to ``flush_every`` steps
    late: if you also ``wandb.log`` live, pass ``step_metric="noether/step"`` instead; the sink
    then declares that metric as the x-axis of every ``noether/*`` tag (``define_metric``) and
    logs ``{step_metric: step, **scalars}`` without ``step=``, so neither log waits for the other.

    Args:
        run: the W&B run (default: the active ``wandb.run``; then wandb must be installed and
            ``wandb.init()`` called first). The run is yours: the sink never finishes it.
        step_metric: see above; None (default) logs with ``step=``.
        charge_columns: the charge columns to log per symmetry (default: all eleven).
    """

    def __init__(
        self,
        run: Any = None,
        *,
        step_metric: str | None = None,
        charge_columns: Sequence[str] | None = None,
    ) -> None:
        self.charge_columns = check_charge_columns(charge_columns)
        if run is None:
            try:
                import wandb
            except ImportError:
                raise ImportError(_MISSING) from None
            run = wandb.run
            if run is None:
                raise ValueError(
                    "WandbSink: no active W&B run; call wandb.init(...) first or pass run="
                )
        if not callable(getattr(run, "log", None)):
            raise TypeError(f"WandbSink: run must have log(dict, step=), got {type(run).__name__}")
        self.run, self.step_metric = run, step_metric
        if step_metric is not None:
            run.define_metric(step_metric)
            run.define_metric(f"{PREFIX}/*", step_metric=step_metric)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if self.step_metric is None:
            self.run.log(dict(scalars), step=step)
        else:
            self.run.log({self.step_metric: step, **scalars})

    def flush(self) -> None:
        """W&B sends in the background: nothing to do."""

    def close(self) -> None:
        """The run is the user's: left open."""
