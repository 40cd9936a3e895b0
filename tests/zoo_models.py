"""A zoo of tiny models nobody in this project wrote the detection for, and one harness to train
them under a monitor and check what it stores.

Every builder returns a :class:`Case`: the model (random weights from a config, no download), a
batch, the loss of the training loop (the model's own ``output.loss`` for Hugging Face models
given ``labels``, else cross-entropy), and the ``inputs``/``targets``/``loss_fn`` a user would
pass to ``watch(..., inputs=...)``. Models are float64 where the layers allow it, so the exact
split closes to float64 rounding; the Hugging Face models are float32 as users train them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import noether_dyn as nd

B = 4  # batch of every tiny model
GEN = lambda seed=1: torch.Generator().manual_seed(seed)  # noqa: E731


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in the logits' dtype, 16-bit logits promoted to float32 (as AMP does)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, y)


@dataclass
class Case:
    """One zoo model with its batch and the loss the training loop uses."""

    model: nn.Module
    batch: dict[str, Any]
    """Keyword arguments of ``model(**batch)`` (HF) or ``{"x": ..., "y": ...}`` (plain)."""
    hf: bool
    groups: Callable[[nn.Module], Any] | None = None
    """Param groups for the optimizer (default: ``model.parameters()`` minus frozen ones)."""
    adam_eps: float | None = None
    """Adam-type eps for this model (float16: 1e-8 rounds to 0 and v = 0 gives 0/0 = NaN)."""

    def loss(self, model: nn.Module) -> torch.Tensor:
        if self.hf:
            return model(**self.batch).loss
        return cross_entropy(model(self.batch["x"]), self.batch["y"])

    def watch_batch(self) -> dict[str, Any]:
        """``inputs``/``targets``/``loss_fn`` for ``watch(...)`` on this case's batch."""
        if self.hf:
            return {"inputs": self.batch}
        return {
            "inputs": self.batch["x"],
            "targets": self.batch["y"],
            "loss_fn": cross_entropy,
        }

    def params(self) -> Any:
        if self.groups is not None:
            return self.groups(self.model)
        return [p for p in self.model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- Hugging Face


def _ids(vocab: int, n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, n), generator=GEN(seed))


def _causal(cls_name: str, cfg_name: str, **kw: Any) -> Case:
    import transformers

    config = getattr(transformers, cfg_name)(
        vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, **kw,
    )  # fmt: skip
    ids = _ids(48)
    return Case(getattr(transformers, cls_name)(config), {"input_ids": ids, "labels": ids}, True)


def mistral() -> Case:
    return _causal("MistralForCausalLM", "MistralConfig", num_key_value_heads=1, sliding_window=4)


def qwen2() -> Case:
    return _causal("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=1)


def llama_tied() -> Case:
    return _causal(
        "LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2, tie_word_embeddings=True
    )


def gpt2() -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=48, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    ids = _ids(48)
    return Case(GPT2LMHeadModel(config), {"input_ids": ids, "labels": ids}, True)


def _encoder(cfg_name: str, cls_name: str, **kw: Any) -> Case:
    import transformers

    config = getattr(transformers, cfg_name)(
        vocab_size=48, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=24, num_labels=3, **kw,
    )  # fmt: skip
    ids = _ids(48)
    labels = torch.tensor([0, 2, 1, 0])
    model = getattr(transformers, cls_name)(config)
    return Case(model, {"input_ids": ids, "labels": labels}, True)


def roberta() -> Case:
    return _encoder("RobertaConfig", "RobertaForSequenceClassification", pad_token_id=1)


def distilbert() -> Case:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(
        vocab_size=48, dim=16, n_layers=1, n_heads=2, hidden_dim=24,
        max_position_embeddings=24, num_labels=3,
    )  # fmt: skip
    ids = _ids(48)
    labels = torch.tensor([0, 2, 1, 0])
    return Case(
        DistilBertForSequenceClassification(config), {"input_ids": ids, "labels": labels}, True
    )


def t5() -> Case:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=48, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=1,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    ids = _ids(48)
    return Case(
        T5ForConditionalGeneration(config), {"input_ids": ids, "labels": _ids(48, 4, 2)}, True
    )


def bart() -> Case:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=48, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
        decoder_ffn_dim=24, max_position_embeddings=16,
    )  # fmt: skip
    ids = _ids(48)
    return Case(
        BartForConditionalGeneration(config), {"input_ids": ids, "labels": _ids(48, 4, 2)}, True
    )


def vit() -> Case:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=24, num_labels=3,
    )  # fmt: skip
    x = torch.randn(B, 3, 8, 8, generator=GEN())
    return Case(
        ViTForImageClassification(config),
        {"pixel_values": x, "labels": torch.tensor([0, 2, 1, 0])},
        True,
    )


def convnext(layer_scale: float = 1.0) -> Case:
    """ConvNeXt with its layer scale initialized to ``layer_scale`` (HF default 1e-6: paths
    through a block then carry 1e-6 of the gradient, and a translation broken only there passes
    detection's float64 tolerance 1e-8 at initialization; see test_zoo.py)."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
        patch_size=2, image_size=8, layer_scale_init_value=layer_scale,
    )  # fmt: skip
    x = torch.randn(B, 3, 8, 8, generator=GEN())
    return Case(
        ConvNextForImageClassification(config),
        {"pixel_values": x, "labels": torch.tensor([0, 2, 1, 0])},
        True,
    )


def resnet_hf() -> Case:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
        layer_type="basic", num_labels=3,
    )  # fmt: skip
    x = torch.randn(B, 3, 16, 16, generator=GEN())
    return Case(
        ResNetForImageClassification(config),
        {"pixel_values": x, "labels": torch.tensor([0, 2, 1, 0])},
        True,
    )


# ---------------------------------------------------------------------------- plain torch


def _plain(model: nn.Module, x: torch.Tensor, n_classes: int, dtype=torch.float64, **kw) -> Case:
    y = torch.randint(0, n_classes, (x.shape[0],), generator=GEN(2))
    x = x.to(dtype) if x.is_floating_point() else x
    return Case(model.to(dtype), {"x": x, "y": y}, False, **kw)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


def transformer_encoder() -> Case:
    torch.manual_seed(0)
    return _plain(_Encoder(), torch.randn(B, 5, 16, generator=GEN()), 3)


def groupnorm_cnn() -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip
    return _plain(model, torch.randn(B, 3, 6, 6, generator=GEN()), 3)


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = cell(8, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(ids))
        return self.head(out[:, -1])


def lstm() -> Case:
    torch.manual_seed(0)
    return _plain(_Recurrent(nn.LSTM), torch.randint(0, 20, (B, 5), generator=GEN()), 3)


def gru() -> Case:
    torch.manual_seed(0)
    return _plain(_Recurrent(nn.GRU), torch.randint(0, 20, (B, 5), generator=GEN()), 3)


class _TiedLM(nn.Module):
    """Embedding -> LayerNorm -> Linear -> ReLU -> decoder whose weight is the embedding's."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.norm = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 12)
        self.out = nn.Linear(12, 20)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc(self.norm(self.emb(ids))))).mean(1)


def tied_embeddings() -> Case:
    torch.manual_seed(0)
    return _plain(_TiedLM(), torch.randint(0, 20, (B, 5), generator=GEN()), 20)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)
    )


def frozen() -> Case:
    model = _mlp()
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    return _plain(model, torch.randn(B, 6, generator=GEN()), 3)


def param_groups() -> Case:
    def groups(m: nn.Module) -> list[dict]:
        return [
            {"params": list(m[0].parameters()) + list(m[1].parameters()), "lr": 1e-2},
            {"params": list(m[2].parameters()), "lr": 3e-3, "weight_decay": 0.0},
            {"params": list(m[4].parameters()), "lr": 1e-3, "weight_decay": 0.05},
        ]

    return _plain(_mlp(), torch.randn(B, 6, generator=GEN()), 3, groups=groups)


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.spare = nn.Linear(6, 6)  # never called: no gradient ever

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def unused() -> Case:
    return _plain(_Unused(), torch.randn(B, 6, generator=GEN()), 3)


def bf16() -> Case:
    return _plain(_mlp(), torch.randn(B, 6, generator=GEN()), 3, dtype=torch.bfloat16)


def fp16() -> Case:
    x = torch.randn(B, 6, generator=GEN())
    return _plain(_mlp(), x, 3, dtype=torch.float16, adam_eps=1e-4)


HF_CASES: dict[str, Callable[[], Case]] = {
    "gpt2": gpt2, "llama-tied": llama_tied, "mistral": mistral, "qwen2": qwen2,
    "roberta": roberta, "distilbert": distilbert, "t5": t5, "bart": bart, "vit": vit,
    "convnext": convnext, "resnet": resnet_hf,
}  # fmt: skip
PLAIN_CASES: dict[str, Callable[[], Case]] = {
    "transformer-encoder": transformer_encoder, "groupnorm-cnn": groupnorm_cnn, "lstm": lstm,
    "gru": gru, "tied-embeddings": tied_embeddings, "frozen": frozen,
    "param-groups": param_groups, "unused": unused, "bf16": bf16, "fp16": fp16,
}  # fmt: skip
CASES = {**HF_CASES, **PLAIN_CASES}


# ------------------------------------------------------------------------------- harness

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
    "sgdm-wd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=1e-2),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-2),
}


def train(case: Case, opt_name: str, run_dir, steps: int = 4, **watch_kw: Any):
    """``steps`` steps of ``opt_name`` on the case's loss under ``nd.watch``; returns the closed
    monitor. Seeded (dropout masks)."""
    opt = OPTIMIZERS[opt_name](case.params())
    for group in opt.param_groups:
        if case.adam_eps is not None and "eps" in group:
            group["eps"] = case.adam_eps
    torch.manual_seed(123)
    mon = nd.watch(case.model, opt, run_dir, **watch_kw)
    for _ in range(steps):
        opt.zero_grad()
        loss = case.loss(case.model)
        loss.backward()
        mon.log_loss(loss)
        opt.step()
    mon.close()
    return mon


def split_residuals(run, every: int = 1) -> list[tuple[str, float]]:
    """Per symmetry, max |(C_{n+k} - C_n) - sum of decay+rule+ksb over the k steps| over the
    stored rows, divided by the symmetry's scale (|C| of a scale/rescale charge... measured
    by param_norm^2, translation by sqrt(n) * param_norm, as tests/test_integrations_zero_config
    does)."""
    out = []
    c = run.charges
    norm = run.steps.set_index("step")["param_norm"]
    n_params = int(run.meta.get("n_params", 0) or 0)
    for name in sorted(set(c["symmetry"])):
        rows = c[c["symmetry"] == name].sort_values("step")
        if len(rows) < 2:
            continue
        kind = rows["kind"].iloc[0]
        change = np.diff(rows["charge"].to_numpy())
        split = (rows["decay"] + rows["rule"] + rows["ksb"]).to_numpy()[:-1]
        q = norm.loc[rows["step"].to_numpy()[1:]].to_numpy()
        scale = math.sqrt(max(n_params, 1)) * q if kind == "translation" else q**2
        out.append((name, float(np.max(np.abs(change - split) / scale))))
    return out


def _norm_eps(model: nn.Module, factor: float) -> None:
    for m in model.modules():
        for attr in ("eps", "variance_epsilon", "layer_norm_eps"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, getattr(m, attr) * factor)


def directional_defects(case: Case, symmetries) -> dict[str, float]:
    """|<g, xi>| / (|g| |xi|) of each symmetry at the case's current parameters, computed here
    without the library: a float64 copy of the model (eps of every norm shrunk 1e8-fold for an
    approximate symmetry), the training loss on the case's batch, same dropout masks; xi is
    sign * q (scale, rescale) or sign * 1 (translation) on the symmetry's tensor or slice.
    0 when |g_A| <= 1e-12 |g|: a gradient at float64 rounding (u = 1.1e-16 of |g| per entry)
    on the symmetry's parameters is a zero derivative along any direction there."""
    out = {}
    for approx in (False, True):
        model = copy.deepcopy(case.model).double()
        if approx:
            _norm_eps(model, 1e-8)
        batch = {k: v.double() if v.is_floating_point() else v for k, v in case.batch.items()}
        c64 = Case(model, batch, case.hf)
        for p in model.parameters():
            p.grad = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            c64.loss(model).double().backward()
        params = dict(model.named_parameters(remove_duplicate=False))
        g_norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()
                               if p.grad is not None))  # fmt: skip
        for s in symmetries:
            if (s.exactness == "approximate") != approx:
                continue
            dot = gg = xx = 0.0
            slices = s.slices or (None,) * len(s.params)
            for name, sign, where in zip(s.params, s.signs, slices):
                q, g = params[name].detach(), params[name].grad
                g = torch.zeros_like(q) if g is None else g
                if where is not None:
                    q, g = q.select(*where), g.select(*where)
                xi = sign * (torch.ones_like(q) if s.kind == "translation" else q)
                dot += float((g * xi).sum())
                gg += float((g * g).sum())
                xx += float((xi * xi).sum())
            # g_A at float64 rounding of the whole gradient (the attention key's bias, whose
            # every effect the softmax removes): the derivative is zero, the ratio is noise
            exact_zero = gg <= (1e-12 * g_norm) ** 2
            out[s.name] = 0.0 if exact_zero or xx == 0 else abs(dot) / math.sqrt(gg * xx)
    return out
