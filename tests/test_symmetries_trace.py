"""The recorded dataflow (noether_dyn/symmetries/_trace.py) on a tiny LLaMA and GPT-2: who
reads whose output, which outputs meet in attention scores, the residual stream's writers and
readers, and the logits head, as the models' forward code says."""

from __future__ import annotations

import pytest
import torch

from noether_dyn.symmetries._calls import call_model
from noether_dyn.symmetries._trace import MIXED, is_norm, model_loss, output_tensors, trace_flow

transformers = pytest.importorskip("transformers")


def _flow(model, inputs):
    params = dict(model.named_parameters())
    with torch.no_grad():
        return trace_flow(model, lambda: call_model(model, params, inputs))


def test_llama_flow() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 32, (2, 5))
    flow, out = _flow(model, {"input_ids": ids, "labels": ids})
    a, m = "model.layers.1.self_attn", "model.layers.1.mlp"
    assert flow.consumers["model.layers.1.input_layernorm"] == [
        f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"
    ]  # fmt: skip
    assert flow.consumers[f"{a}.v_proj"] == [f"{a}.o_proj"]
    assert flow.consumers["model.layers.1.post_attention_layernorm"] == [
        f"{m}.gate_proj", f"{m}.up_proj"
    ]  # fmt: skip
    assert flow.consumers[f"{m}.up_proj"] == [f"{m}.down_proj"]
    assert f"{m}.gate_proj" not in flow.consumers  # through SiLU: no homogeneous reader
    assert (f"{a}.q_proj", f"{a}.k_proj") in flow.meets
    (stream,) = flow.streams
    assert stream.writers == ["model.embed_tokens"] + [
        f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn.o_proj", "mlp.down_proj")
    ]
    assert set(stream.readers) <= set(flow.norms) and "model.norm" in stream.readers
    assert flow.head == "lm_head" and flow.norms[-1] == "model.norm"
    assert model_loss(out) is out.loss and output_tensors(out) == [out.logits]
    assert all(flow.units[n].norm for n in flow.norms) and is_norm(model.model.norm)


def test_gpt2_flow_fused_attention_and_tied_head() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (2, 5))
    flow, out = _flow(model, {"input_ids": ids})
    h = "transformer.h.0"
    assert flow.consumers[f"{h}.ln_1"] == [f"{h}.attn.c_attn"]
    assert not any(f"{h}.attn.c_attn" in pair for pair in flow.meets), "q and k: one unit"
    (stream,) = flow.streams
    assert stream.writers[:2] == ["transformer.wte", "transformer.wpe"]
    assert flow.units["lm_head"].params == ("transformer.wte.weight",), "tied to the embedding"
    assert model_loss(out) is None and MIXED not in flow.units
