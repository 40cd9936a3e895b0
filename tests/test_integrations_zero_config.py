"""The framework callbacks with no arguments but the run directory: the HF Trainer on a tiny
GPT-2 and Lightning on a small LayerNorm/ReLU net (random weights, nothing downloaded) detect
the symmetries at the first step (zero-config ``watch``) and store their charges.

Each stored charge obeys its exact split C_{n+1} - C_n = decay + rule + ksb (docs/theory.md §3). The
parameters are float32 and the statistics float64: the split is algebra on dq, while C_{n+1} is
computed from the stored q_{n+1}, rounded to float32 (unit roundoff u = 6e-8). Per entry that
moves q_i^2 by at most ~2u q_i^2 and q_i by u |q_i|, so |change - split| <= 2u |q|^2 (scale and
rescale charges) or u sqrt(N) |q| (translations, N entries), |q| the norm of all parameters; the
tolerance takes 1e-6 in place of 2u (8x margin for the rounding of dq itself).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import noether_dyn as nd
from noether_dyn.symmetries.engine import clear_cache

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

from noether_dyn.integrations.hf import NoetherTrainerCallback  # noqa: E402
from noether_dyn.integrations.lightning import NoetherCallback  # noqa: E402


def _assert_exact_split(run, n_params: int) -> None:
    assert len(run.symmetries) > 0, "zero-config detection found no symmetry"
    charges = run.charges
    assert set(charges["symmetry"]) == set(run.symmetries["symmetry"])
    norm = run.steps.set_index("step")["param_norm"]
    for name, kind in zip(run.symmetries["symmetry"], run.symmetries["kind"]):
        rows = charges[charges["symmetry"] == name].sort_values("step")
        steps = rows["step"].to_numpy()
        assert (np.diff(steps) == 1).all() and steps[0] == run.meta["symmetries_from_step"]
        change = np.diff(rows["charge"].to_numpy())
        split = (rows["decay"] + rows["rule"] + rows["ksb"]).to_numpy()[:-1]
        q = norm.loc[steps[1:]].to_numpy()
        atol = 1e-6 * (math.sqrt(n_params) * q if kind == "translation" else q**2)
        assert np.all(np.abs(change - split) <= atol), (name, change - split, atol)


# ------------------------------------------------------------------------------- Lightning


class _LitNorm(pl.LightningModule):
    """LayerNorm -> Linear -> ReLU -> Linear, called as ``self.net(x)`` (the common Lightning
    pattern: the LightningModule's own forward never runs)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def test_lightning_callback_with_no_arguments_stores_detected_charges(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(64, 6, generator=g), torch.randint(0, 4, (64,), generator=g)
    )
    module = _LitNorm()
    clear_cache()
    trainer = pl.Trainer(
        max_steps=5, callbacks=[NoetherCallback(tmp_path / "run")], accelerator="cpu",
        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    run = nd.load_run(tmp_path / "run")
    names = set(run.symmetries["symmetry"])
    # hand-derived: the LayerNorm's gain and bias feed only net.2 (exact rescale); ReLU between
    # net.2 and net.4 (exact rescale); the head's shifts under cross-entropy (exact)
    assert {"rescale:net.2", "translation:net.4"} <= names, names
    # Lightning runs training_step inside step(closure): detected there, tracked from step 1
    assert run.meta["symmetries_from_step"] == 1
    assert "child 'net'" in run.meta["symmetry_note"]
    _assert_exact_split(run, sum(p.numel() for p in module.parameters()))


# ------------------------------------------------------------------------ HF Trainer


def test_hf_trainer_callback_with_no_arguments_stores_detected_charges(tmp_path) -> None:
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16, eos_token_id=0,
        bos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(32):
        ids = torch.randint(0, 50, (8,), generator=g)
        data.append({"input_ids": ids, "labels": ids.clone()})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), report_to=[], logging_steps=1, max_steps=4,
        per_device_train_batch_size=4, save_strategy="no", use_cpu=True, disable_tqdm=True,
        learning_rate=1e-3,
    )  # fmt: skip
    clear_cache()
    callback = NoetherTrainerCallback(tmp_path / "run")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    run = nd.load_run(tmp_path / "run")
    names = set(run.symmetries["symmetry"])
    # hand-derived (tests/test_symmetries_hf.py): ln_1 -> c_attn and ln_2 -> c_fc rescales
    assert {
        "rescale:transformer.h.0.ln_1",
        "rescale:transformer.h.0.ln_2",
    } <= names, names
    assert run.meta["symmetries_from_step"] == 0
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    np.testing.assert_allclose(run.steps["loss"].to_numpy(), logged, rtol=1e-6, atol=0)
    _assert_exact_split(run, sum(p.numel() for p in model.parameters()))
