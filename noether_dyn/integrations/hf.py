"""Hugging Face Trainer: ``Trainer(..., callbacks=[NoetherTrainerCallback("runs/exp")])``.

The Trainer hands callbacks accelerate's ``AcceleratedOptimizer``; the monitor is attached to the
torch optimizer inside it. Callbacks never see the loss before the optimizer step (the Trainer
keeps it to itself until it logs), so it is read from the model: a forward hook takes the
``loss`` of each training forward (``output.loss``, as the Trainer's ``compute_loss`` does) and a
gradient hook on that tensor receives ``c = d(backpropagated loss) / d(output.loss)``, the factor
the Trainer applied before ``backward`` (``1 / gradient_accumulation_steps``, or 1 when the model
normalized by the number of items in the batch). The step's loss is the sum over its
micro-batches of ``c * output.loss``: the sum the Trainer logs as ``loss`` (``logging_steps=1``),
averaged over ranks as the Trainer averages it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from noether_dyn.capture import Monitor
from noether_dyn.integrations._steploss import LoggedLossWins, StepLoss, attach


class NoetherTrainerCallback(TrainerCallback):
    """Attach :func:`noether_dyn.watch` to a ``transformers.Trainer`` run.

    Args:
        run_dir: the run store's directory (as for ``watch``; default ``runs/noether-<UTC>``).
        **watch_kwargs: passed to ``watch`` (``every``, ``symmetries``, ``inputs``, ...).

    Attributes:
        monitor: the :class:`~noether_dyn.Monitor` of the current ``train()`` (None before it).

    The loss logged is the model's ``output.loss`` as the Trainer scaled it for ``backward``; a
    ``compute_loss`` or ``compute_loss_func`` that does not backpropagate ``output.loss`` itself
    (label smoothing, an added term) is not seen, and the monitor warns once and logs no loss.
    Under DDP every rank watches (rank 0 writes). The run is closed at the end of ``train()``;
    the Trainer has no hook for an exception, so then the monitor closes at interpreter exit.
    """

    def __init__(self, run_dir: str | Path | None = None, **watch_kwargs: Any) -> None:
        self.run_dir = run_dir
        self.watch_kwargs = watch_kwargs
        self.monitor: Monitor | None = None
        self._loss = StepLoss()
        self._wins: LoggedLossWins | None = None
        self._handles: list[Any] = []
        self._scaler: Any = None
        self._warned = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if not isinstance(model, torch.nn.Module) or optimizer is None:
            raise TypeError(
                "NoetherTrainerCallback: the Trainer passed no model or optimizer to "
                "on_train_begin; add the callback to a transformers.Trainer (callbacks=[...])."
            )
        self._close()
        self._loss.clear()
        self._scaler = getattr(optimizer, "scaler", None)
        self.monitor, self._wins, handle = attach(model, optimizer, self.run_dir, self.watch_kwargs)
        self._handles = [handle, model.register_forward_hook(self._on_forward)]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None or self._wins is None:
            return
        # under fp16 mixed precision the gradient reaching output.loss carries the loss scale
        scale = float(self._scaler.get_scale()) if self._scaler is not None else 1.0
        loss = self._loss.take(self.monitor.device, scale)
        if loss is None and not self._warned:
            self._warned = True
            warnings.warn(
                "NoetherTrainerCallback: no output.loss of the model was backpropagated in this "
                "step (a compute_loss that computes its own loss?); the run stores no loss. Log "
                "it yourself with callback.monitor.log_loss(loss) before the optimizer step.",
                RuntimeWarning,
                stacklevel=2,
            )
        self._wins.log(loss)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()

    def _on_forward(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if isinstance(output, Mapping):
            loss = output.get("loss")
        else:
            loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.requires_grad and loss.numel() == 1:
            value = loss.detach()
            loss.register_hook(lambda grad: self._loss.add(value * grad))

    def _close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.monitor is not None:
            self.monitor.close()
        self._loss.clear()
