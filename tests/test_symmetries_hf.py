"""Symmetry detection on tiny Hugging Face models built from configs with random weights.

For each architecture the symmetries are derived by hand below (the table of Kunin et al.,
"Neural Mechanics", ICLR 2021, docs/theory.md §3, applied to the model's forward code), and
:func:`detect` must report exactly them (recall and precision against the truth), each with the
right exactness. Independently of the code under test, every reported symmetry is checked on a
float64 copy of the model by the finite change of the model's own loss under psi_s (scale e^s q,
rescale (e^s q_+, e^-s q_-), translation q + s): an exact symmetry leaves the loss unchanged to
float64 rounding; an eps-approximate one does so once every normalization eps is shrunk 1e8-fold.
Negative controls (plausible non-symmetries) show that this check fails where it should.

Models run in train mode (dropout on where the config has it, BatchNorm on batch statistics),
as in training; the loss is the model's own ``output.loss`` (``labels`` given).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noether_dyn.symmetries import Symmetry, find_symmetries
from noether_dyn.symmetries.engine import EPS_TOL, clear_cache, detect
from noether_dyn.symmetries.step_check import gradient_defects, judge_defects

transformers = pytest.importorskip("transformers")

L = 2  # layers of every tiny model
B = 8  # batch: the float64 check takes 4 examples, as much as one float32 pass of all 8
LABELS = torch.tensor([0, 2, 1, 0, 1, 2, 2, 0])
REL_EXACT = 1e-11
"""Largest relative loss change under psi_s of an exact symmetry in float64: the loss is a sum
of ~1e3-1e4 rounded terms (u = 1.1e-16), so rounding moves it by ~1e-13 relative at most."""
REL_BROKEN = 1e-6
"""Smallest relative loss change a negative control must show (they move it by 1e-4 or more)."""

Key = tuple[bool, frozenset]


def key(kind: str, plus: Iterable[str] = (), minus: Iterable[str] = ()) -> Key:
    """A symmetry up to the sign of its generator (xi and -xi are one symmetry)."""
    pairs = [(n, 1.0) for n in plus] + [(n, -1.0) for n in minus]
    if sorted(pairs)[0][1] < 0:
        pairs = [(n, -s) for n, s in pairs]
    return kind == "translation", frozenset(pairs)


def key_of(s: Symmetry) -> Key:
    plus = [n for n, x in zip(s.params, s.signs) if x > 0]
    minus = [n for n, x in zip(s.params, s.signs) if x < 0]
    return key(s.kind, plus, minus)


def wb(*paths: str) -> list[str]:
    return [f"{p}.{n}" for p in paths for n in ("weight", "bias")]


def w(*paths: str) -> list[str]:
    return [f"{p}.weight" for p in paths]


# ---------------------------------------------------------------- models and hand-derived truth


def llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=tied,
    )  # fmt: skip
    ids = torch.randint(0, 64, (B, 8), generator=torch.Generator().manual_seed(1))
    return LlamaForCausalLM(config), {"input_ids": ids, "labels": ids}


def llama_truth(tied: bool) -> tuple[dict[Key, str], list[Key]]:
    """LLaMA (pre-RMSNorm, no biases, SwiGLU MLP, RoPE attention). Per layer l:
    - input_layernorm's gain g1 only feeds q, k, v: x -> a g1 and W_{q,k,v} -> W/a is exact;
    - q/k: scores (a q)(k/a)^T unchanged (RoPE rotates q and k linearly, so it commutes);
    - v/o: attention output is linear in v, o_proj linear: exact;
    - post_attention_layernorm's gain feeds gate and up: gain*a, W_gate/a, W_up/a exact;
    - up/down: down(silu(gate) * a up) with W_down/a: exact (gate is not: silu).
    Residual stream h = embed + sum(o_proj, down_proj outputs) is read by RMSNorms only, up to
    the final norm: scaling every writer by a is invariant but for eps -> approximate.
    Untied: final norm gain -> lm_head rescale (exact); lm_head.weight translation: logits
    shift by c sum(h) per position, which softmax cross-entropy ignores (exact).
    Tied (lm_head = embed): both of those break (the embedding also feeds the stream, and RMSNorm
    does not remove a shift); the stream scale needs the final norm to compensate, since
    scaling the embedding scales the logits: (writers +, model.norm -), approximate.
    """
    truth: dict[Key, str] = {}
    writers = ["model.embed_tokens.weight"]
    for i in range(L):
        p = f"model.layers.{i}"
        a, m = f"{p}.self_attn", f"{p}.mlp"
        truth[key("rescale", w(f"{p}.input_layernorm"), w(f"{a}.q_proj", f"{a}.k_proj",
                                                           f"{a}.v_proj"))] = "exact"  # fmt: skip
        truth[key("rescale", w(f"{a}.q_proj"), w(f"{a}.k_proj"))] = "exact"
        truth[key("rescale", w(f"{a}.v_proj"), w(f"{a}.o_proj"))] = "exact"
        truth[key("rescale", w(f"{p}.post_attention_layernorm"),
                  w(f"{m}.gate_proj", f"{m}.up_proj"))] = "exact"  # fmt: skip
        truth[key("rescale", w(f"{m}.up_proj"), w(f"{m}.down_proj"))] = "exact"
        writers += w(f"{a}.o_proj", f"{m}.down_proj")
    if tied:
        truth[key("rescale", writers, w("model.norm"))] = "approximate"
    else:
        truth[key("rescale", w("model.norm"), w("lm_head"))] = "exact"
        truth[key("translation", w("lm_head"))] = "exact"
        truth[key("scale", writers)] = "approximate"
    broken = [
        key(
            "rescale", w("model.layers.0.post_attention_layernorm"), w("model.layers.0.mlp.up_proj")
        ),
        key("rescale", w("model.layers.0.mlp.gate_proj"), w("model.layers.0.mlp.down_proj")),
        key("translation", w("model.embed_tokens")),
    ]
    return truth, broken


def gpt2(dropout: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    p = 0.1 if dropout else 0.0
    config = GPT2Config(
        vocab_size=64, n_embd=32, n_layer=L, n_head=4, n_positions=32, resid_pdrop=p,
        embd_pdrop=p, attn_pdrop=p, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    ids = torch.randint(0, 64, (B, 8), generator=torch.Generator().manual_seed(1))
    return GPT2LMHeadModel(config), {"input_ids": ids, "labels": ids}


def gpt2_truth(dropout: bool) -> tuple[dict[Key, str], list[Key]]:
    """GPT-2 (pre-LayerNorm, tied lm_head = wte, fused c_attn for q, k, v). Per layer:
    - ln_1 (gain and bias) only feeds c_attn: (ln_1 +, c_attn.weight -) exact; likewise ln_2 and
      c_fc. q/k and v/o rescales act on column blocks of the fused c_attn: not tensor-level.
    Residual stream (wte, wpe, attn.c_proj, mlp.c_proj) is read by LayerNorms only; scaling it
    scales the tied logits too, so ln_f (gain and bias) compensates: approximate (eps).
    Without dropout, the stream's writers feed mean-centering LayerNorms only: shifting wpe, or
    a c_proj's weight and bias together (adds c (1 + sum(input)) to every feature; one record per
    layer) is exact; shifting wte also shifts every logit of a position by c sum(h), which
    cross-entropy ignores: exact. Dropout between a writer and the stream multiplies the shift
    by a random mask: broken.
    """
    truth: dict[Key, str] = {}
    writers = w("transformer.wte", "transformer.wpe")
    for i in range(L):
        p = f"transformer.h.{i}"
        truth[key("rescale", wb(f"{p}.ln_1"), w(f"{p}.attn.c_attn"))] = "exact"
        truth[key("rescale", wb(f"{p}.ln_2"), w(f"{p}.mlp.c_fc"))] = "exact"
        writers += wb(f"{p}.attn.c_proj", f"{p}.mlp.c_proj")
        if not dropout:
            for c in (f"{p}.attn.c_proj", f"{p}.mlp.c_proj"):
                truth[key("translation", wb(c))] = "exact"
    truth[key("rescale", writers, wb("transformer.ln_f"))] = "approximate"
    if not dropout:
        truth[key("translation", w("transformer.wte"))] = "exact"
        truth[key("translation", w("transformer.wpe"))] = "exact"
    broken = [
        key("rescale", wb("transformer.h.0.attn.c_attn"), w("transformer.h.0.attn.c_proj")),
        key("scale", w("transformer.h.0.attn.c_attn")),
    ]
    return truth, broken


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=L, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    ids = torch.randint(1, 64, (B, 8), generator=torch.Generator().manual_seed(1))
    ids[:, -2:] = config.pad_token_id  # padded sequences: the padding row gets no gradient
    return BertForSequenceClassification(config), {"input_ids": ids, "labels": LABELS}


def bert_truth() -> tuple[dict[Key, str], list[Key]]:
    """BERT (post-LayerNorm, dropout 0.1 after every sublayer, classifier on the tanh pooler).
    - word + position + token-type embeddings are summed into the embeddings LayerNorm (before
      dropout): each shifted alone is exact (mean-centering). Scaling all three together leaves
      the loss unchanged, but the padding row of the word embeddings (``padding_idx``) gets no
      gradient, so <g, xi> != 0 on padded batches: no conservation law, not a symmetry of the
      training dynamics (see test_padding_row_breaks_the_embedding_scale).
    - Per layer: q/k (weights and biases, +/-) exact; v (weight, bias) / attention output dense
      weight exact. A LayerNorm's output also goes into the residual: no fan-out rescale; the
      dense biases reach a LayerNorm only through dropout: no translation.
    - The key's bias alone shifts query i's scores by q_i . c 1, the same for every key (padded
      ones too: the mask is added): the softmax removes it, exact (translation:<key> holds the
      bias alone; the key weight shifted adds q_i . c sum(x_j), which differs between keys).
    - The last layer's output LayerNorm only feeds the pooler dense: rescale exact.
    - classifier weight and bias shifted together move every logit equally: exact under
      cross-entropy (one record per layer).
    """
    e = "bert.embeddings"
    embeddings = w(f"{e}.word_embeddings", f"{e}.position_embeddings", f"{e}.token_type_embeddings")
    truth = {key("translation", [n]): "exact" for n in embeddings}
    for i in range(L):
        a = f"bert.encoder.layer.{i}.attention"
        truth[key("rescale", wb(f"{a}.self.query"), wb(f"{a}.self.key"))] = "exact"
        truth[key("rescale", wb(f"{a}.self.value"), w(f"{a}.output.dense"))] = "exact"
        truth[key("translation", [f"{a}.self.key.bias"])] = "exact"
    last = f"bert.encoder.layer.{L - 1}.output.LayerNorm"
    truth[key("rescale", wb(last), w("bert.pooler.dense"))] = "exact"
    truth[key("translation", wb("classifier"))] = "exact"
    broken = [
        key("translation", wb("bert.encoder.layer.0.output.dense")),
        key("scale", w("classifier")),
    ]
    return truth, broken


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=L,
        num_attention_heads=4, intermediate_size=48, num_labels=3,
    )  # fmt: skip
    x = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return ViTForImageClassification(config), {"pixel_values": x, "labels": LABELS}


def vit_truth() -> tuple[dict[Key, str], list[Key]]:
    """ViT (pre-LayerNorm, no dropout by default, eps 1e-12, classifier on the CLS token).
    - Stream writers: patch projection (conv), cls_token, position_embeddings, every o_proj and
      fc2; read by LayerNorms only. Each writer layer's tensors shifted together are exact (a
      conv or linear weight shift adds c sum(input) to every feature: removed by the mean); all
      scaled together is approximate (eps; invisible at eps 1e-12, shown with eps grown).
    - Per layer: layernorm_before -> q, k, v fan-out, q/k (weights and biases), v/o,
      layernorm_after -> fc1: exact; k_proj's bias alone (a per-query constant in the scores,
      removed by the softmax): exact. Final layernorm -> classifier: exact.
    - classifier weight and bias shifted together: exact under cross-entropy.
    """
    e = "vit.embeddings"
    layers = [f"{e}.patch_embeddings.projection"] + [
        f"vit.layers.{i}.{m}" for i in range(L) for m in ("attention.o_proj", "mlp.fc2")
    ]
    writers = [f"{e}.cls_token", f"{e}.position_embeddings"] + wb(*layers)
    truth = {key("translation", wb(c)): "exact" for c in layers + ["classifier"]}
    truth |= {key("translation", [n]): "exact" for n in writers[:2]}
    truth[key("scale", writers)] = "approximate"
    for i in range(L):
        p = f"vit.layers.{i}"
        a = f"{p}.attention"
        truth[key("rescale", wb(f"{p}.layernorm_before"),
                  w(f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"))] = "exact"  # fmt: skip
        truth[key("rescale", wb(f"{a}.q_proj"), wb(f"{a}.k_proj"))] = "exact"
        truth[key("rescale", wb(f"{a}.v_proj"), w(f"{a}.o_proj"))] = "exact"
        truth[key("translation", [f"{a}.k_proj.bias"])] = "exact"
        truth[key("rescale", wb(f"{p}.layernorm_after"), w(f"{p}.mlp.fc1"))] = "exact"
    truth[key("rescale", wb("vit.layernorm"), w("classifier"))] = "exact"
    broken = [key("rescale", wb("vit.layers.0.mlp.fc1"), w("vit.layers.0.mlp.fc2"))]
    return truth, broken


def resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
        layer_type="basic", num_labels=3,
    )  # fmt: skip
    x = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return ResNetForImageClassification(config), {"pixel_values": x, "labels": LABELS}


def resnet_truth() -> tuple[dict[Key, str], list[Key]]:
    """ResNet (basic blocks, conv -> BatchNorm on batch statistics in train mode).
    - Every conv feeds a BatchNorm directly: its weight alone is scale symmetric (approximate,
      BatchNorm's eps).
    - The first BatchNorm of a block feeds ReLU -> conv -> BatchNorm only: (gain, bias) scale,
      approximate.
    - Stage 0 stream (stem BatchNorm through ReLU and max-pool, plus the block's last
      BatchNorm on the identity shortcut) is read by stage 1's convs, each before a BatchNorm:
      scaling its writers is approximate.
    - Stage 1 stream (last BatchNorm + shortcut BatchNorm) goes through ReLU, average pooling
      and flatten to the classifier: writers +, classifier weight -, exact.
    - classifier weight and bias shifted together: exact under cross-entropy.
    """
    s0, s1 = "resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.1.layers.0"
    convs = [
        "resnet.embedder.embedder.convolution", f"{s0}.layer.0.convolution",
        f"{s0}.layer.1.convolution", f"{s1}.shortcut.convolution", f"{s1}.layer.0.convolution",
        f"{s1}.layer.1.convolution",
    ]  # fmt: skip
    truth = {key("scale", w(c)): "approximate" for c in convs}
    for s in (s0, s1):
        truth[key("scale", wb(f"{s}.layer.0.normalization"))] = "approximate"
    stem = "resnet.embedder.embedder.normalization"
    truth[key("scale", wb(stem, f"{s0}.layer.1.normalization"))] = "approximate"
    last = wb(f"{s1}.layer.1.normalization", f"{s1}.shortcut.normalization")
    truth[key("rescale", last, w("classifier.1"))] = "exact"
    truth[key("translation", wb("classifier.1"))] = "exact"
    broken = [key("scale", wb(f"{s0}.layer.1.normalization"))]
    return truth, broken


CASES: dict[str, tuple[Callable, Callable]] = {
    "llama": (lambda: llama(False), lambda: llama_truth(False)),
    "llama-tied": (lambda: llama(True), lambda: llama_truth(True)),
    "gpt2": (lambda: gpt2(True), lambda: gpt2_truth(True)),
    "gpt2-no-dropout": (lambda: gpt2(False), lambda: gpt2_truth(False)),
    "bert": (bert, bert_truth),
    "vit": (vit, vit_truth),
    "resnet": (resnet, resnet_truth),
}


# ------------------------------------------------------------------- the independent checker


def _norm_eps(model: nn.Module, factor: float) -> None:
    for m in model.modules():
        if "norm" in type(m).__name__.lower():
            for attr in ("eps", "variance_epsilon"):
                if isinstance(getattr(m, attr, None), float):
                    setattr(m, attr, getattr(m, attr) * factor)


def loss_change(model64: nn.Module, inputs: dict, k: Key, s: float = 0.5) -> float:
    """|f(psi_s(q)) - f(q)| / |f(q)| for the symmetry ``k`` on a float64 model (same dropout
    masks on both sides)."""
    translation, pairs = k
    params = dict(model64.named_parameters())
    inputs64 = {n: v.double() if v.is_floating_point() else v for n, v in inputs.items()}

    def loss() -> float:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(7)
            return float(model64(**inputs64).loss)

    before = loss()
    saved = {n: params[n].detach().clone() for n, _ in pairs}
    with torch.no_grad():
        for n, sign in pairs:
            if translation:
                params[n].add_(s * sign)
            else:
                params[n].mul_(math.exp(s * sign))
    after = loss()
    with torch.no_grad():
        for n, q in saved.items():
            params[n].copy_(q)
    return abs(after - before) / abs(before)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, truth = CASES[request.param]
    torch.manual_seed(0)
    model, inputs = build()
    model.train()
    clear_cache()
    return request.param, model, inputs, *truth()


def test_recall_and_precision_against_hand_derived_truth(case) -> None:
    name, model, inputs, truth, _ = case
    found = detect(model, inputs)
    reported = {key_of(s): s for s in found.symmetries}
    missing = [sorted(k[1]) for k in truth if k not in reported]
    extra = [s.name for k, s in reported.items() if k not in truth]
    assert not missing, f"{name}: not found {missing}"
    assert not extra, f"{name}: reported beyond the hand-derived truth: {extra}"
    for k, s in reported.items():
        assert s.verified is True
        assert s.exactness == truth[k], f"{name}: {s.name} is {truth[k]}, got {s.exactness}"
        assert s.defect is not None and s.defect <= EPS_TOL
    assert found.passes <= 10, "detection plus verification within 10 forward+backward passes"
    assert found.notes == []


def test_every_reported_symmetry_leaves_the_float64_loss_unchanged(case) -> None:
    name, model, inputs, truth, broken = case
    found = detect(model, inputs)
    model64 = copy.deepcopy(model).double()
    shrunk = copy.deepcopy(model64)
    _norm_eps(shrunk, 1e-8)
    for s in found.symmetries:
        k = key_of(s)
        if s.exactness == "exact":
            assert loss_change(model64, inputs, k) <= REL_EXACT, s.name
        else:
            assert loss_change(shrunk, inputs, k) <= REL_EXACT, s.name
    for k in broken:  # the check fails where it should
        assert loss_change(shrunk, inputs, k, s=2.0) > REL_BROKEN, sorted(k[1])
        assert k not in {key_of(s) for s in found.symmetries}


def test_padding_row_breaks_the_embedding_scale() -> None:
    torch.manual_seed(0)
    model, inputs = bert()
    clear_cache()
    found = detect(model, inputs)
    e = "bert.embeddings"
    k = key(
        "scale", w(f"{e}.word_embeddings", f"{e}.position_embeddings", f"{e}.token_type_embeddings")
    )
    assert loss_change(copy.deepcopy(model).double(), inputs, k) <= REL_EXACT
    (dropped,) = [d for d in found.dropped if key(d.kind, *_split(d.params, d.signs)) == k]
    assert dropped.defect > 1e-6 and "tol" in dropped.rule
    clear_cache()
    unpadded = {**inputs, "input_ids": inputs["input_ids"].clamp(min=1)}
    assert k in {key_of(s) for s in detect(model, unpadded).symmetries}


def test_negative_controls_are_listed_as_dropped_with_defect_and_rule(case) -> None:
    name, model, inputs, _, broken = case
    found = detect(model, inputs)
    dropped = {key(d.kind, *_split(d.params, d.signs)): d for d in found.dropped}
    for k in broken:
        if k in dropped:
            d = dropped[k]
            assert d.defect is not None and d.defect > 1e-5 and "tol" in d.rule
    assert all(d.rule for d in found.dropped)


def _split(params, signs):
    return [n for n, s in zip(params, signs) if s > 0], [n for n, s in zip(params, signs) if s < 0]


# ------------------------------------------------------------------------ calls and contracts


def test_loss_fn_on_logits_finds_what_the_model_loss_finds() -> None:
    torch.manual_seed(0)
    model, inputs = llama(False)
    clear_cache()
    own = {key_of(s) for s in detect(model, inputs).symmetries}
    ids = inputs["input_ids"]

    def causal_lm_loss(out, labels):
        return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    clear_cache()
    given = detect(model, {"input_ids": ids}, ids, causal_lm_loss)
    assert {key_of(s) for s in given.symmetries} == own


def test_without_a_loss_function_level_symmetries_are_verified_and_logits_shift_waits() -> None:
    torch.manual_seed(0)
    model, inputs = llama(False)
    truth, _ = llama_truth(False)
    clear_cache()
    found = detect(model, {"input_ids": inputs["input_ids"]})
    verified = {key_of(s) for s in found.symmetries if s.verified}
    waiting = [s for s in found.symmetries if s.verified is None]
    shift = key("translation", w("lm_head"))
    assert verified == set(truth) - {shift}
    assert [key_of(s) for s in waiting] == [shift]
    assert "gradient_defects" in waiting[0].note


def test_batch_encoding_and_positional_inputs() -> None:
    from transformers import BatchEncoding

    torch.manual_seed(0)
    model, inputs = bert()
    clear_cache()
    via_dict = {key_of(s) for s in detect(model, inputs).symmetries}
    clear_cache()
    via_encoding = {key_of(s) for s in detect(model, BatchEncoding(inputs)).symmetries}
    assert via_encoding == via_dict
    net, images = resnet()
    clear_cache()
    positional = detect(net, (images["pixel_values"],))  # ModelOutput, no loss: function level
    assert len(positional.symmetries) >= 10


def test_second_call_on_same_structure_is_cached() -> None:
    torch.manual_seed(0)
    clear_cache()
    model, inputs = gpt2(True)
    first = detect(model, inputs)
    torch.manual_seed(1)
    other, _ = gpt2(True)
    second = detect(other, inputs)
    assert not first.cached and second.cached
    assert second.passes < 1 <= first.passes
    assert [s.name for s in second.symmetries] == [s.name for s in first.symmetries]
    bigger = gpt2(True)[0]
    bigger.transformer.h = bigger.transformer.h[:1]
    bigger.config.n_layer = 1
    assert not detect(bigger, inputs).cached


def test_wrong_loss_fn_raises_naming_it_even_without_candidates() -> None:
    model, inputs = gpt2(True)
    ids = inputs["input_ids"]
    with pytest.raises(ValueError, match="loss_fn"):
        detect(model, {"input_ids": ids}, ids, lambda out, y: F.cross_entropy(out, y))
    with pytest.raises(ValueError, match="loss_fn"):
        detect(nn.ReLU(), torch.randn(3, 2), torch.zeros(3), lambda out, y: out.foo)
    with pytest.raises(ValueError, match="scalar"):
        detect(nn.Linear(2, 2), torch.randn(3, 2), torch.zeros(3, 2), lambda out, y: out - y)
    with pytest.raises(ValueError, match="loss_fn"):
        find_symmetries(nn.Tanh(), torch.randn(3, 2), torch.zeros(3), lambda out, y: out.foo)


def test_module_never_called_gets_a_note() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.spare = nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    found = detect(Net(), torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), nn.CrossEntropyLoss())
    assert any(n.startswith("spare:") and "no gradient" in n for n in found.notes)
    assert all("spare" not in p for s in found.symmetries for p in s.params)


class _LayerNorm2d(nn.LayerNorm):
    """timm/torchvision-style LayerNorm over channels of (N, C, H, W), via F.layer_norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _NormAttention(nn.Module):
    """Conv -> LayerNorm2d -> conv, then LayerNorm -> nn.MultiheadAttention(x, x, x) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm2d = _LayerNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 1)
        self.ln = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.norm2d(self.stem(x))).flatten(2).transpose(1, 2)
        a = self.ln(h)
        return self.head(self.attn(a, a, a, need_weights=False)[0].mean(1))


def test_layernorm_subclass_and_layernorm_into_multihead_attention() -> None:
    """LayerNorm2d (a subclass calling F.layer_norm) feeds only the 1x1 conv: (gain, bias) +,
    conv weight -, exact. The stem feeds only the channel LayerNorm: its weight and bias scaled
    together is approximate (eps); shifted together, exact (a per-position shift common to all
    channels, c (1 + sum of the patch), removed by the mean). The LayerNorm
    feeding nn.MultiheadAttention(a, a, a) rescales into the fused in_proj_weight: exact."""
    torch.manual_seed(0)
    model = _NormAttention()
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 3, (8,))
    found = detect(model, x, y, nn.CrossEntropyLoss())
    keys = {key_of(s): s for s in found.symmetries}
    fan = key("rescale", wb("norm2d"), w("conv"))
    into_attention = key("rescale", wb("ln"), ["attn.in_proj_weight"])
    assert keys[fan].exactness == "exact" and keys[into_attention].exactness == "exact"
    assert keys[key("scale", wb("stem"))].exactness == "approximate"
    assert keys[key("translation", wb("stem"))].exactness == "exact"
    for k in (fan, into_attention):
        translation, pairs = k
        sym = Symmetry("s", "rescale", tuple(n for n, _ in pairs), tuple(s for _, s in pairs))
        assert _loss_rel_change(model, x, y, sym) <= REL_EXACT


def _loss_rel_change(model: nn.Module, x, y, sym: Symmetry, s: float = 0.5) -> float:
    m = copy.deepcopy(model).double()

    def loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(m(x.double()), y))

    before = loss()
    params = dict(m.named_parameters())
    with torch.no_grad():
        for n, sign in zip(sym.params, sym.signs):
            params[n].mul_(math.exp(s * sign))
    return abs(loss() - before) / abs(before)


def test_detection_leaves_model_buffers_and_rng_untouched() -> None:
    torch.manual_seed(0)
    model, inputs = resnet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    clear_cache()
    detect(model, inputs)
    assert torch.equal(rng, torch.get_rng_state())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.resnet.embedder.embedder.normalization.eps == 1e-5


def test_find_symmetries_uses_the_recorded_dataflow_on_hf_models() -> None:
    torch.manual_seed(0)
    model, inputs = llama(False)
    truth, _ = llama_truth(False)
    clear_cache()
    found = find_symmetries(model, inputs)
    assert {key_of(s) for s in found} == set(truth)


# ----------------------------------------------------- verification on real training gradients


def _mlp_step(symmetries, steps: int = 2):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = []
    for _ in range(steps):
        x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        params = dict(net.named_parameters())
        out.append(gradient_defects(symmetries, params, {n: p.grad for n, p in params.items()}))
        opt.step()
    return out


def test_gradient_defects_and_drop_rule_on_training_steps() -> None:
    rescale = Symmetry("rescale:0", "rescale", ("0.weight", "0.bias", "2.weight"), (1, 1, -1))
    shift = Symmetry("translation:2", "translation", ("2.weight", "2.bias"))
    fake = Symmetry("scale:0", "scale", ("0.weight", "0.bias"))
    eps_like = Symmetry("scale:2", "scale", ("2.weight",), exactness="approximate")
    defects = _mlp_step([rescale, shift, fake, eps_like])
    assert all(d["rescale:0"] < 1e-6 and d["translation:2"] < 1e-6 for d in defects)
    assert all(d["scale:0"] > 1e-3 for d in defects)
    kept, dropped = judge_defects([rescale, shift, fake, eps_like], defects)
    assert [s.name for s in kept] == ["rescale:0", "translation:2"]
    assert all(s.verified and s.exactness == "exact" for s in kept)
    assert {d.name for d in dropped} == {"scale:0", "scale:2"}
    assert all(d.defect > 1e-3 and "tol" in d.rule for d in dropped)


def test_gradient_defects_is_none_without_gradient() -> None:
    s = Symmetry("scale:a", "scale", ("a",))
    q = {"a": torch.ones(3)}
    assert gradient_defects([s], q, {"a": None}) == {"scale:a": None}
    assert gradient_defects([s], q, {"a": torch.zeros(3)}) == {"scale:a": None}
    kept, dropped = judge_defects([s], [{"scale:a": None}])
    assert kept == [s] and dropped == []
    with pytest.raises(KeyError, match="params"):
        gradient_defects([s], {}, {})


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.head(torch.tanh(self.body(x)))}


def test_dict_output_keeps_its_logits_translation() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    clear_cache()
    found = find_symmetries(_DictOut(), x, y, lambda out, t: F.cross_entropy(out["logits"], t))
    assert {key_of(s) for s in found} == {key("translation", wb("head"))}


def test_watch_tracks_the_detected_symmetries_of_an_hf_model(tmp_path) -> None:
    import noether_dyn as nd

    torch.manual_seed(0)
    model, batch = llama(False)
    truth, _ = llama_truth(False)
    clear_cache()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with nd.watch(model, opt, tmp_path / "run", inputs=batch) as monitor:
        for _ in range(2):
            opt.zero_grad()
            out = model(**batch)
            out.loss.backward()
            monitor.log_loss(out.loss)
            opt.step()
    run = nd.load_run(tmp_path / "run")
    assert len(run.symmetries) == len(truth)
    assert run.symmetries["verified"].all()
    assert set(run.charges["symmetry"]) == set(run.symmetries["symmetry"])


class _RefusesModes(nn.Module):
    """Runs normally, but not under a torch function mode (as some compiled or C++ paths)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.overrides._is_torch_function_mode_enabled():
            raise RuntimeError("no function modes here")
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_model_that_cannot_be_recorded_gets_a_note_not_a_silent_zero() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    clear_cache()
    found = detect(_RefusesModes(), x, y, nn.CrossEntropyLoss())
    (note,) = found.notes
    assert note.startswith("_RefusesModes: the dataflow could not be recorded (RuntimeError")
    # per-module candidates are still tried and verified: the head's logits shift
    assert key("translation", wb("fc2")) in {key_of(s) for s in found.symmetries}


def test_frozen_parameters_are_left_out_and_the_cache_tells_losses_apart() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    net[0].weight.requires_grad_(False)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    clear_cache()
    found = detect(net, x, y, nn.CrossEntropyLoss())
    assert all("0.weight" not in s.params for s in found.symmetries)
    assert key("translation", wb("2")) in {key_of(s) for s in found.symmetries}
    mse = detect(net, x, F.one_hot(y, 3).float(), lambda out, t: F.mse_loss(out, t))
    assert not mse.cached, "another loss is another structure"
    assert key("translation", wb("2")) not in {key_of(s) for s in mse.symmetries}


def test_non_finite_parameters_are_noted_and_not_cached() -> None:
    """A detection at NaN parameters verifies nothing; a later model of the same structure with
    finite parameters must not get that empty result from the cache."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    broken = copy.deepcopy(net)
    with torch.no_grad():
        broken[0].weight.fill_(float("nan"))
    clear_cache()
    bad = detect(broken, x, y, nn.CrossEntropyLoss())
    assert bad.symmetries == [] and any("non-finite" in n for n in bad.notes)
    good = detect(net, x, y, nn.CrossEntropyLoss())
    assert not good.cached
    assert {s.name for s in good.symmetries} == {"rescale:0", "translation:2"}
