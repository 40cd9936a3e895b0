"""What the 2-process DDP tests of test_integrations.py run in each spawned process (kept out
of the test module, which the children would otherwise import with all its frameworks)."""

from __future__ import annotations

import json
import os
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


def hf_worker(rank: int, out_dir: str, port: int) -> None:
    """One rank of an HF Trainer run under DDP (gloo on the CPU), as torchrun would start it."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )
    import transformers

    from noether_dyn.integrations.hf import NoetherTrainerCallback

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
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
    model.accepts_loss_kwargs = False  # the Trainer divides by gradient_accumulation_steps
    data = [
        {"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": torch.randint(0, 3, ())}
        for _ in range(64)
    ]
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
    torch.distributed.destroy_process_group()
