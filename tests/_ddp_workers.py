"""What the 2-process DDP tests of test_integrations.py run in each spawned process (kept out
of the test module, which the children would otherwise import with all its frameworks).

Each process is started as torchrun would start it (environment variables; the frameworks then
join that process group instead of launching their own processes), saves what the test checks,
and leaves with ``os._exit(0)`` after a barrier: under torch 2.13, freeing a DDP model's gloo
process group at interpreter exit can wait forever (seen in about 1 of 2 runs here).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

STEPS = 3
ACCUMULATE = 2


def random_batches(n: int = 64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


class LitRecorder(pl.LightningModule):
    """Saves, per rank, the ``loss`` Lightning hands to on_train_batch_end."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
        self.out_dir = out_dir
        self.reported: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.reported.append(outputs["loss"].clone())

    def on_train_end(self):
        torch.save(torch.stack(self.reported), Path(self.out_dir) / f"rank{self.global_rank}.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _torchrun_env(rank: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        GROUP_RANK="0",
        NODE_RANK="0",
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
    )


def _leave() -> None:
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def lightning_worker(rank: int, out_dir: str, port: int) -> None:
    """One rank of a Lightning fit with strategy="ddp" (gloo on the CPU)."""
    _torchrun_env(rank, port)
    from noether_dyn.integrations.lightning import NoetherCallback

    x, y = random_batches()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(
        max_steps=STEPS,
        accumulate_grad_batches=ACCUMULATE,
        callbacks=[NoetherCallback(f"{out_dir}/run", symmetries=[])],
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LitRecorder(out_dir), loader)
    _leave()


def tiny_bert(g: torch.Generator, n_samples: int, divided: bool):
    """A 1-layer BERT sequence classifier from a config (random weights) and ``n_samples``
    random examples; with ``divided`` (``accepts_loss_kwargs = False``) the Trainer divides
    output.loss by gradient_accumulation_steps before backward (factor 1/k)."""
    import transformers

    config = transformers.BertConfig(
        num_hidden_layers=1,
        num_attention_heads=2,
        hidden_size=16,
        intermediate_size=32,
        vocab_size=50,
        max_position_embeddings=16,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config)
    if divided:
        model.accepts_loss_kwargs = False
    data = [
        {"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": torch.randint(0, 3, ())}
        for _ in range(n_samples)
    ]
    return model, data


def hf_worker(rank: int, out_dir: str, port: int) -> None:
    """One rank of an HF Trainer run under DDP (gloo on the CPU)."""
    _torchrun_env(rank, port)
    import transformers

    from noether_dyn.integrations.hf import NoetherTrainerCallback

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model, data = tiny_bert(g, n_samples=64, divided=True)
    args = transformers.TrainingArguments(
        output_dir=f"{out_dir}/out",
        report_to=[],
        logging_steps=1,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=ACCUMULATE,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=1e-2,
    )
    callback = NoetherTrainerCallback(f"{out_dir}/run", symmetries=[])
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    if rank == 0:
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        Path(f"{out_dir}/logged.json").write_text(json.dumps(logged))
    _leave()
