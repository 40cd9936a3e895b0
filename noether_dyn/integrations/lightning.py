"""Lightning: ``Trainer(callbacks=[NoetherCallback("runs/exp")])`` watches the run.

The loss of each optimizer step is the sum of the losses Lightning backpropagates in it
(``on_before_backward`` receives each micro-batch's loss already divided by
``accumulate_grad_batches``), i.e. the mean micro-batch loss of the step, averaged over ranks;
it is logged in ``on_before_optimizer_step``, after the step's last backward and before the
parameters move.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from noether_dyn.capture import Monitor
from noether_dyn.capture.wrappers import unwrap_optimizer
from noether_dyn.integrations._steploss import LoggedLossWins, StepLoss, attach


class NoetherCallback(pl.Callback):
    """Attach :func:`noether_dyn.watch` to a Lightning fit.

    Args:
        run_dir: the run store's directory (as for ``watch``; default ``runs/noether-<UTC>``).
        optimizer_index: which of ``trainer.optimizers`` to watch; needed only when
            ``configure_optimizers`` returns several.
        **watch_kwargs: passed to ``watch`` (``every``, ``symmetries``, ``inputs``, ...).

    Attributes:
        monitor: the :class:`~noether_dyn.Monitor` of the current fit (None before it starts).

    Under DDP every rank watches (rank 0 writes). The run is closed at the end of the fit and
    when it raises.
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        *,
        optimizer_index: int | None = None,
        **watch_kwargs: Any,
    ) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.optimizer_index = optimizer_index
        self.watch_kwargs = watch_kwargs
        self.monitor: Monitor | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._loss = StepLoss()
        self._wins: LoggedLossWins | None = None
        self._handle: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = list(trainer.optimizers)
        index = self.optimizer_index
        if index is None:
            if len(optimizers) != 1:
                raise ValueError(
                    f"NoetherCallback: the LightningModule configures {len(optimizers)} "
                    "optimizers; pass optimizer_index= to say which one to watch."
                )
            index = 0
        if not 0 <= index < len(optimizers):
            raise ValueError(
                f"NoetherCallback: optimizer_index={index} but the LightningModule configures "
                f"{len(optimizers)} optimizers."
            )
        self._optimizer = unwrap_optimizer(optimizers[index])
        self._loss.clear()
        self.monitor, self._wins, self._handle = attach(
            pl_module, self._optimizer, self.run_dir, self.watch_kwargs
        )

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self.monitor is not None and loss.numel() == 1:
            self._loss.add(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.monitor is None or self._wins is None:
            return
        if unwrap_optimizer(optimizer) is not self._optimizer:
            self._loss.clear()  # another optimizer's step: its backward pieces are not ours
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # under fp16 mixed precision on_before_backward sees the loss times the loss scale
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        self._wins.log(self._loss.take(self.monitor.device, scale))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.monitor is not None:
            self.monitor.close()
        self._loss.clear()
