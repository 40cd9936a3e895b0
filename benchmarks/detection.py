"""Cost of symmetry detection plus verification (:func:`noether_dyn.symmetries.detect`) against
one forward+backward pass of the same batch, on Hugging Face architectures built from configs.

For each model: the time of one fwd+bwd of the sample batch (median of ``--repeats`` after a
warm-up, measured before and after the detections), the time of a first ``detect`` (trace,
candidates, float64 gradients on 2 examples, eps checks; median of ``--repeats`` with the cache
cleared), its ratio to the fwd+bwd, the passes the detection counts, the time of a
second ``detect`` on a fresh model of the same structure (cached) and the symmetries found.
Target (issue 17): detection plus verification within 10 fwd+bwd passes, a second call nearly free.

Run: ``python benchmarks/detection.py [--size small|base] [--batch 8] [--repeats 3]
[--device cpu|cuda] [--models gpt2,llama,...]``. ``small`` is a few layers of width 256-384 (a
quiet 2-core CPU); ``base`` is GPT-2 small, BERT-base, ViT-base, LLaMA at 12 x 768 and a
ResNet-50 (a GPU, or patience).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from noether_dyn.symmetries.engine import clear_cache, detect


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def builders(size: str, batch: int) -> dict[str, Callable[[], tuple[torch.nn.Module, dict]]]:
    """Model factories: ``name -> () -> (model, inputs with labels)``."""
    import transformers as tr

    base = size == "base"
    layers, width, heads = (12, 768, 12) if base else (4, 256, 4)
    seq = 128 if base else 64
    image = 224 if base else 64

    def ids(vocab: int) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))

    def pixels() -> torch.Tensor:
        return torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(0))

    labels = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1))

    def gpt2():
        cfg = tr.GPT2Config(n_layer=layers, n_embd=width, n_head=heads)
        x = ids(cfg.vocab_size)
        return tr.GPT2LMHeadModel(cfg), {"input_ids": x, "labels": x}

    def llama():
        cfg = tr.LlamaConfig(
            vocab_size=32000, hidden_size=width, intermediate_size=4 * width,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        )  # fmt: skip
        x = ids(cfg.vocab_size)
        return tr.LlamaForCausalLM(cfg), {"input_ids": x, "labels": x}

    def bert():
        cfg = tr.BertConfig(
            hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * width, num_labels=10,
        )  # fmt: skip
        return tr.BertForSequenceClassification(cfg), {"input_ids": ids(cfg.vocab_size),
                                                        "labels": labels}  # fmt: skip

    def vit():
        cfg = tr.ViTConfig(
            image_size=image, patch_size=16 if base else 8, hidden_size=width,
            num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * width,
            num_labels=10,
        )  # fmt: skip
        return tr.ViTForImageClassification(cfg), {"pixel_values": pixels(), "labels": labels}

    def resnet():
        cfg = (
            tr.ResNetConfig(num_labels=10)  # ResNet-50
            if base
            else tr.ResNetConfig(
                depths=[2, 2, 2, 2],
                hidden_sizes=[64, 128, 256, 512],
                layer_type="basic",
                num_labels=10,
            )  # fmt: skip  (ResNet-18)
        )
        return tr.ResNetForImageClassification(cfg), {"pixel_values": pixels(), "labels": labels}

    return {"gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit, "resnet": resnet}


def fwd_bwd_seconds(model: torch.nn.Module, inputs: dict, repeats: int, device: str) -> float:
    """Median time of one forward+backward of the batch (after one warm-up)."""
    times = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        model(**inputs).loss.backward()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def run(name: str, build: Callable, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    model, inputs = build()
    model.to(device).train()
    inputs = {k: v.to(device) for k, v in inputs.items()}
    floor = fwd_bwd_seconds(model, inputs, repeats, device)
    times = []
    for _ in range(repeats):  # a shared machine: medians of interleaved runs
        clear_cache()
        _sync(device)
        t0 = time.perf_counter()
        found = detect(model, inputs)
        _sync(device)
        times.append(time.perf_counter() - t0)
    first = statistics.median(times)
    floor = statistics.median([floor, fwd_bwd_seconds(model, inputs, repeats, device)])
    torch.manual_seed(1)
    twin, _ = build()
    twin.to(device).train()
    t0 = time.perf_counter()
    again = detect(twin, inputs)
    _sync(device)
    second = time.perf_counter() - t0
    kinds = {}
    for s in found.symmetries:
        label = f"{s.kind}/{s.exactness or 'unverified'}"
        kinds[label] = kinds.get(label, 0) + 1
    return {
        "model": name,
        "params(M)": sum(p.numel() for p in model.parameters()) / 1e6,
        "fwd+bwd(s)": floor,
        "detect(s)": first,
        "ratio": first / floor,
        "passes": found.passes,
        "cached(s)": second,
        "cached ratio": second / floor,
        "cache hit": again.cached,
        "found": len(found.symmetries),
        "dropped": len(found.dropped),
        "kinds": ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "base"), default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="gpt2,llama,bert,vit,resnet")
    args = parser.parse_args()
    table = builders(args.size, args.batch)
    rows = [run(n, table[n], args.repeats, args.device) for n in args.models.split(",")]
    columns = list(rows[0])
    print(f"size={args.size} batch={args.batch} device={args.device} (target: ratio <= 10)")
    print(" | ".join(columns))
    for row in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
