"""Framework integrations on real code nobody here wrote: Lightning's Trainer and the Hugging Face
Trainer on tiny models with random weights (built from configs, nothing downloaded), plus the
optimizer-wrapper unwrapping in ``watch``.

Loss tolerance: the frameworks compute the loss in float32 (eps 1.2e-7) and so does the
callback; each side rounds once per division by the accumulation count and once per addition of
the step's (at most 2) micro-batch pieces, possibly in a different order, so the two agree to a
few float32 ulp: relative 1e-6. A wrong loss (the last micro-batch only, or a missing factor 2)
is off by far more than that (asserted too).
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import noether_dyn as nd
from noether_dyn.capture.wrappers import unwrap_optimizer

RTOL = 1e-6


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def _assert_closed(model: nn.Module, optimizer, tmp_path: Path) -> None:
    """A closed monitor has let go of the optimizer: watching it again is allowed."""
    again = nd.watch(model, optimizer, tmp_path / "again", symmetries=[])
    again.close()


def _assert_charge_conserved(run, symmetry: str, steps: int) -> None:
    """The logits translation of a cross-entropy head: sum(bias) has zero gradient, so plain SGD
    (with momentum, no weight decay) keeps it constant. float32 bias of a few entries of order
    0.3: each stored sum rounds at ~1e-7, hence absolute 1e-6."""
    charge = run.charge(symmetry)["charge"].to_numpy()
    assert len(charge) == steps
    np.testing.assert_allclose(charge, charge[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- import cost


def test_import_noether_dyn_imports_no_framework():
    code = (
        "import sys, noether_dyn, noether_dyn.integrations\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_package_names_both_callbacks_lazily():
    import noether_dyn.integrations as integrations
    from noether_dyn.integrations.hf import NoetherTrainerCallback
    from noether_dyn.integrations.lightning import NoetherCallback

    assert integrations.NoetherCallback is NoetherCallback
    assert integrations.NoetherTrainerCallback is NoetherTrainerCallback
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        integrations.Nope  # noqa: B018


# ---------------------------------------------------------------------- unwrap_optimizer


def test_unwrap_sees_through_wrappers():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    opt = _sgd(nn.Linear(2, 2))
    assert unwrap_optimizer(opt) is opt
    lit = LightningOptimizer(opt)
    assert isinstance(lit, torch.optim.Optimizer)  # it imitates the class: a check alone fails
    assert unwrap_optimizer(lit) is opt
    chain = types.SimpleNamespace(optimizer=types.SimpleNamespace(optimizer=opt))
    assert unwrap_optimizer(chain) is opt


def test_unwrap_keeps_an_initialized_optimizer_that_holds_another():
    inner = _sgd(nn.Linear(2, 2))

    class Lookahead(torch.optim.Optimizer):  # steps itself around an inner optimizer
        def __init__(self, optimizer):
            super().__init__(optimizer.param_groups[0]["params"], {"lr": 0.1})
            self.optimizer = optimizer

    outer = Lookahead(inner)
    assert unwrap_optimizer(outer) is outer


class _FakeOptimizer(torch.optim.Optimizer):
    """Subclasses Optimizer without initializing it and holds nothing: what a foreign wrapper
    looks like to watch (before unwrap_optimizer: a raw AttributeError and a stale store)."""

    def __init__(self, params):
        self._params = list(params)

    @property
    def param_groups(self):
        return [{"params": self._params, "lr": 0.1}]


@pytest.mark.parametrize(
    "make",
    [
        lambda m: _FakeOptimizer(m.parameters()),
        lambda m: types.SimpleNamespace(optimizer=None),
        lambda m: object(),
        lambda m: types.SimpleNamespace(optimizer=types.SimpleNamespace(optimizer=object())),
    ],
    ids=["uninitialized-subclass", "optimizer-None", "no-optimizer-attr", "chain-to-object"],
)
def test_watch_on_unknown_wrapper_raises_and_leaves_no_store(tmp_path, make):
    model = nn.Linear(3, 2)
    run_dir = tmp_path / "run"
    with pytest.raises(TypeError, match=r"watch: optimizer must be a torch\.optim\.Optimizer"):
        nd.watch(model, make(model), run_dir)
    assert not run_dir.exists()


def test_unwrap_error_names_the_chain_and_cycles_end():
    a = types.SimpleNamespace()
    b = types.SimpleNamespace(optimizer=a)
    a.optimizer = b
    with pytest.raises(TypeError, match="types.SimpleNamespace -> types.SimpleNamespace"):
        unwrap_optimizer(a)


# ---------------------------------------------------------------------- Lightning

import lightning.pytorch as pl  # noqa: E402

from noether_dyn.integrations.lightning import NoetherCallback  # noqa: E402


class _LitMLP(pl.LightningModule):
    """Records what Lightning computes: each training_step's raw loss and the ``loss`` Lightning
    hands to on_train_batch_end (divided by accumulate_grad_batches)."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
        self.raw: list[float] = []
        self.reported: list[torch.Tensor] = []
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and batch_idx == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.raw.append(float(loss.detach()))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.reported.append(outputs["loss"].clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _loader(n: int = 64, batch: int = 8) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=batch)


def _lit_trainer(callback: pl.Callback, steps: int, accumulate: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        callbacks=[callback],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_logs_the_accumulated_step_loss(tmp_path, accumulate):
    steps = 4
    module = _LitMLP()
    head = nd.Symmetry("translation:head", "translation", ("net.2.bias",))
    callback = NoetherCallback(tmp_path / "run", symmetries=[head])
    _lit_trainer(callback, steps, accumulate).fit(module, _loader())

    run = nd.load_run(tmp_path / "run")
    assert run.steps["step"].tolist() == list(range(steps))
    stored = run.steps["loss"].to_numpy()
    # Lightning's own per-batch "loss" (already / accumulate), summed over each step's batches
    reported = torch.stack(module.reported).reshape(steps, accumulate).sum(dim=1)
    np.testing.assert_allclose(stored, reported.double().numpy(), rtol=RTOL, atol=0)
    # and, independently, the mean of the raw training_step losses of each step
    raw = np.asarray(module.raw).reshape(steps, accumulate)
    np.testing.assert_allclose(stored, raw.mean(axis=1), rtol=RTOL, atol=0)
    if accumulate > 1:  # not what the closure returns: the last micro-batch / accumulate
        last = raw[:, -1] / accumulate
        assert np.all(np.abs(stored - last) > 1e-3 * np.abs(stored))
    assert callback.monitor.optimizer is module.trainer.optimizers[0]
    _assert_charge_conserved(run, "translation:head", steps)
    _assert_closed(module, module.trainer.optimizers[0], tmp_path)


def test_lightning_closes_the_run_when_the_fit_raises(tmp_path):
    module = _LitMLP(fail_at=3)
    callback = NoetherCallback(tmp_path / "run", symmetries=[])
    with pytest.raises(RuntimeError, match="boom"):
        _lit_trainer(callback, 10, 1).fit(module, _loader())
    run = nd.load_run(tmp_path / "run")
    assert run.steps["step"].tolist() == [0, 1, 2]  # the steps before the failure, flushed
    np.testing.assert_allclose(run.steps["loss"].to_numpy(), module.raw, rtol=RTOL, atol=0)
    _assert_closed(module, module.trainer.optimizers[0], tmp_path)


def test_lightning_asks_which_of_several_optimizers(tmp_path):
    class TwoOpt(_LitMLP):
        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                torch.optim.SGD(self.net[2].parameters(), lr=0.1),
            ]

        def training_step(self, batch, batch_idx):
            self.automatic_optimization = False
            return None

    module = TwoOpt()
    module.automatic_optimization = False
    callback = NoetherCallback(tmp_path / "run", symmetries=[])
    with pytest.raises(ValueError, match="optimizer_index="):
        _lit_trainer(callback, 1, 1).fit(module, _loader())
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- Hugging Face Trainer

import transformers  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402

from noether_dyn.integrations.hf import NoetherTrainerCallback  # noqa: E402


def _gpt2(g: torch.Generator):
    """Causal LM: accepts loss kwargs, so the model normalizes by the step's token count and the
    Trainer backpropagates output.loss as is (factor 1)."""
    config = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=16,
        vocab_size=50,
        n_positions=16,
        eos_token_id=0,
        bos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    data = []
    for i in range(32):
        ids = torch.randint(0, 50, (8,), generator=g)
        labels = ids.clone()
        labels[: i % 3] = -100  # micro-batches with different token counts
        data.append({"input_ids": ids, "labels": labels})
    return model, data


def _bert(g: torch.Generator, divided: bool):
    """Sequence classifier; with ``accepts_loss_kwargs = False`` the Trainer divides output.loss
    by gradient_accumulation_steps before backward (factor 1/k)."""
    from _ddp_workers import tiny_bert

    return tiny_bert(g, n_samples=32, divided=divided)


head_translation = nd.Symmetry("translation:classifier", "translation", ("classifier.bias",))


@pytest.mark.parametrize(
    "kind, accumulate, factor",
    [("gpt2", 2, 1.0), ("bert-divided", 2, 0.5), ("bert-divided", 1, 1.0)],
)
def test_hf_trainer_logs_the_trainers_step_loss(tmp_path, kind, accumulate, factor):
    steps = 3
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model, data = _gpt2(g) if kind == "gpt2" else _bert(g, divided=True)
    raw: list[torch.Tensor] = []  # each training forward's output.loss, as the model returns it
    model.register_forward_hook(
        lambda m, i, out: raw.append(out.loss.detach().clone()) if m.training else None
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        logging_steps=1,
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulate,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=1e-2,
        optim="sgd",  # plain SGD keeps the translation charge (AdamW's metric breaks it)
        eval_strategy="steps" if accumulate == 1 else "no",  # eval forwards must not count
        eval_steps=1,
    )
    # BERT's classifier feeds a cross-entropy: its bias has the logits translation
    symmetries = [] if kind == "gpt2" else [head_translation]
    callback = NoetherTrainerCallback(tmp_path / "run", symmetries=symmetries)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data[:4] if accumulate == 1 else None,
        callbacks=[callback],
    )
    trainer.train()

    assert isinstance(trainer.optimizer, AcceleratedOptimizer)
    assert callback.monitor.optimizer is trainer.optimizer.optimizer
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == steps
    run = nd.load_run(tmp_path / "run")
    assert run.steps["step"].tolist() == list(range(steps))
    stored = run.steps["loss"].to_numpy()
    np.testing.assert_allclose(stored, logged, rtol=RTOL, atol=0)
    # the factor the Trainer applied to output.loss, seen through autograd
    per_step = torch.stack(raw).double().reshape(steps, accumulate).sum(dim=1).numpy()
    np.testing.assert_allclose(stored, factor * per_step, rtol=RTOL, atol=0)
    if symmetries:
        _assert_charge_conserved(run, head_translation.name, steps)
    _assert_closed(model, trainer.optimizer, tmp_path)  # watch on the wrapper itself works


def test_hf_trainer_warns_when_no_output_loss_is_backpropagated(tmp_path):
    g = torch.Generator().manual_seed(0)
    model, data = _bert(g, divided=False)

    class OwnLoss(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            logits = model(**inputs).logits
            return nn.functional.cross_entropy(logits, labels)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        logging_steps=1,
        max_steps=2,
        per_device_train_batch_size=4,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = NoetherTrainerCallback(tmp_path / "run", symmetries=[])
    trainer = OwnLoss(model=model, args=args, train_dataset=data, callbacks=[callback])
    with pytest.warns(RuntimeWarning, match="no output.loss"):
        trainer.train()
    run = nd.load_run(tmp_path / "run")
    assert len(run.steps) == 2 and run.steps["loss"].isna().all()


# ---------------------------------------------------------------------- DDP, 2 processes (gloo)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_two(worker, out_dir: Path, timeout: float = 300.0) -> None:
    """Run ``worker(rank, out_dir, port)`` in 2 processes; fail instead of hanging."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=(str(out_dir), _free_port()), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the DDP workers were still running after {timeout:.0f} s")


def _step_sums(per_batch: torch.Tensor, steps: int, accumulate: int) -> np.ndarray:
    return per_batch.double().reshape(steps, accumulate).sum(dim=1).numpy()


def test_lightning_ddp_logs_the_step_loss_averaged_over_ranks(tmp_path):
    """Every rank watches, rank 0 writes; the stored loss is the mean over ranks of each rank's
    accumulated step loss (the loss whose gradient DDP's averaged gradient is)."""
    from _ddp_workers import ACCUMULATE, STEPS, lightning_worker

    _spawn_two(lightning_worker, tmp_path)
    ranks = [_step_sums(torch.load(tmp_path / f"rank{r}.pt"), STEPS, ACCUMULATE) for r in (0, 1)]
    assert not np.allclose(ranks[0], ranks[1])  # the ranks saw different batches
    run = nd.load_run(tmp_path / "run")
    assert run.steps["step"].tolist() == list(range(STEPS))
    np.testing.assert_allclose(run.steps["loss"], (ranks[0] + ranks[1]) / 2, rtol=RTOL, atol=0)


def test_hf_trainer_ddp_logs_the_loss_the_trainer_logs(tmp_path):
    """The Trainer logs the mean over ranks of each rank's accumulated loss; so does the run."""
    import json

    from _ddp_workers import STEPS, hf_worker

    _spawn_two(hf_worker, tmp_path)
    logged = json.loads((tmp_path / "logged.json").read_text())
    run = nd.load_run(tmp_path / "run")
    assert run.steps["step"].tolist() == list(range(STEPS))
    np.testing.assert_allclose(run.steps["loss"], logged, rtol=RTOL, atol=0)
