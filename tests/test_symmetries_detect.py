"""Detection of symmetries on a zoo of models that return a plain tensor, whose symmetries are
written out by hand.

Each :class:`Case` lists ``expected``: every symmetry find_symmetries must report, no more and no
fewer (precision and recall 100%), reasoned out in the comments from the symmetry table of Kunin et
al., "Neural Mechanics", ICLR 2021 (docs/theory.md §3), at layer level: one record per layer and
kind (``translation:<layer>`` with its weight and bias together), a basis of the symmetries found
(a combination of reported ones, such as a BN affine rescaled into a scale-invariant conv, is not
reported again); and ``broken``: plausible candidates that are not symmetries. The invariance of
each expected symmetry is checked here independently of the code under test: the directional
derivative of the loss along xi (torch.func.jvp) and the finite change of the loss under psi_s
(scale e^s q, rescale (e^s q1, e^-s q2), translation q + s), in float64.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.parametrizations import weight_norm

from noether_dyn.symmetries import Symmetry, find_symmetries, verify

P, M = 1.0, -1.0


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    targets: Callable[[], torch.Tensor]
    loss_fn: Callable
    expected: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]]
    broken: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = field(default_factory=dict)
    eval_mode: bool = False


def _x(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _y(n: int, c: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(2))


def _reg(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape, generator=torch.Generator().manual_seed(3))


def mlp_bn() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


class ResCNN(nn.Module):
    """A BN CNN with a post-activation residual block and a residual add that feeds a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(h)) + x)
        y = torch.relu(self.bn3(self.conv3(x) + x))
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.fc(y)


def gn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 4),
    )


class PreLNBlock(nn.Module):
    """Token embedding, one pre-LayerNorm transformer block (attention + GELU MLP), final LN,
    mean pooling over tokens and a classifier head."""

    def __init__(self, d_in: int = 5, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.lnf = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(self.lnf(h).mean(1))


class FunctionalMLP(nn.Module):
    """Activations written as functions and tensor methods, not modules."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 8)
        self.fc4 = nn.Linear(8, 8)
        self.fc5 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(F.relu(self.fc1(x)))
        x = self.fc3(torch.relu(x))
        x = F.dropout(self.fc4(x.relu() * 2.0), 0.1, self.training)
        return self.fc5(F.leaky_relu(x, 0.2))


class Tied(nn.Module):
    """fc2 shares fc1's weight: neither can be rescaled alone."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc2.weight = self.fc1.weight
        self.fc3 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def wn_mlp() -> nn.Module:
    return nn.Sequential(weight_norm(nn.Linear(5, 8)), nn.ReLU(), weight_norm(nn.Linear(8, 3)))


def smooth_mlp(act: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 8), act(), nn.Linear(8, 3))


def mixed_smooth() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Softplus(),
        nn.Linear(8, 2),
    )  # fmt: skip


class FLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass calling F.layer_norm itself (timm's style): a norm all the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerNorm2d(nn.LayerNorm):
    """timm/torchvision-style LayerNorm over the channels of (N, C, H, W), via F.layer_norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)  # fmt: skip
        return x.permute(0, 3, 1, 2)


class LayerScaleBlock(nn.Module):
    """Pre-norm residual MLP block with a layer-scale factor (CaiT, ConvNeXt): h + gamma * f(h)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.norm = FLayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.gamma * self.fc2(F.gelu(self.fc1(self.norm(h))))


class LayerScaleNet(nn.Module):
    """Token projection plus a learned position embedding, one layer-scale block, a final norm,
    mean pooling and a classifier head."""

    def __init__(self, d_in: int = 5, d: int = 8, tokens: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(d_in, d)
        self.pos = nn.Parameter(0.1 * torch.randn(1, tokens, d))
        self.block = LayerScaleBlock(d)
        self.norm = FLayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.stem(x) + self.pos)
        return self.head(self.norm(h).mean(1))


class LN2dCNN(nn.Module):
    """conv -> LayerNorm2d -> ReLU -> conv -> ReLU -> avg pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = LayerNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(F.relu(self.norm(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(h), 1).flatten(1))


CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()

ZOO: list[Case] = [
    Case(
        # Linear -> BN(train) -> ReLU -> Linear -> BN(train) -> ReLU -> Linear -> CE.
        # 0 and 3 feed a train-mode BN: scale. The BN affines reach the next Linear through ReLU:
        # rescale. BN 1's affine also reaches BN 4 through ReLU and 3 only: scale (BN 4 undoes
        # it). The head gives the logits: translation of its weight and bias together. 0 and 3's
        # biases alone: BN subtracts the per-channel batch mean, so b -> b + c is exact, while
        # W -> W + c 1 adds c sum(x_n), which varies over the batch (the layer's translation
        # record holds its bias alone).
        "mlp_bn",
        mlp_bn,
        _x(32, 6),
        _y(32, 4),
        CE,
        {
            "scale:0": ("scale", ("0.weight", "0.bias"), (P, P)),
            "scale:1": ("scale", ("1.weight", "1.bias"), (P, P)),
            "rescale:1": ("rescale", ("1.weight", "1.bias", "3.weight"), (P, P, M)),
            "scale:3": ("scale", ("3.weight", "3.bias"), (P, P)),
            "rescale:4": ("rescale", ("4.weight", "4.bias", "6.weight"), (P, P, M)),
            "translation:0": ("translation", ("0.bias",), (P,)),
            "translation:3": ("translation", ("3.bias",), (P,)),
            "translation:6": ("translation", ("6.weight", "6.bias"), (P, P)),
        },
        # (0, -3) across BN *is* a symmetry (0 and 3 are each scale symmetric), but (3, -6) is
        # not: 6 feeds the logits directly.
        {"rescale:3": ("rescale", ("3.weight", "3.bias", "6.weight"), (P, P, M))},
    ),
    Case(
        # Same MLP in eval mode: BN normalizes with running statistics, a fixed affine map. No
        # scale; it breaks rescale of 0 and 3; its own affine still rescales into the next Linear.
        "mlp_bn_eval",
        mlp_bn,
        _x(32, 6),
        _y(32, 4),
        CE,
        {
            "rescale:1": ("rescale", ("1.weight", "1.bias", "3.weight"), (P, P, M)),
            "rescale:4": ("rescale", ("4.weight", "4.bias", "6.weight"), (P, P, M)),
            "translation:6": ("translation", ("6.weight", "6.bias"), (P, P)),
        },
        {
            "scale:0": ("scale", ("0.weight", "0.bias"), (P, P)),
            "rescale:0": ("rescale", ("0.weight", "0.bias", "3.weight"), (P, P, M)),
        },
        eval_mode=True,
    ),
    Case(
        # stem, conv1, conv2 feed BN only: scale. bn1 -> ReLU -> conv2 -> bn2: scale (its
        # rescale into conv2 is scale:bn1 - scale:conv2, a combination: not reported). bn3 ->
        # ReLU -> avg pool -> flatten -> fc: rescale. fc: translation. The residual stream x
        # (bn0 through ReLU, plus bn2) is read by conv3 and by the add before bn3: scaling bn0,
        # bn2 and conv3's bias scales bn3's input (conv3's weight is both a writer and a reader:
        # it cancels): scale, through bn3. Not symmetries alone: conv3 (its output is added to x
        # before bn3), bn0 (its ReLU output also feeds the residual add), bn2 (added to x).
        # conv1's and conv3's biases alone add a per-channel constant that bn1 and bn3 remove
        # (translation, exact); their weights shifted do not (a per-pixel sum of the input).
        "res_cnn_bn",
        ResCNN,
        _x(8, 3, 6, 6),
        _y(8, 5),
        CE,
        {
            "scale:stem": ("scale", ("stem.weight",), (P,)),
            "scale:conv1": ("scale", ("conv1.weight", "conv1.bias"), (P, P)),
            "scale:bn1": ("scale", ("bn1.weight", "bn1.bias"), (P, P)),
            "scale:conv2": ("scale", ("conv2.weight",), (P,)),
            "scale:stream@bn2>*": (
                "scale",
                ("bn2.weight", "bn2.bias", "bn0.weight", "bn0.bias", "conv3.bias"),
                (P, P, P, P, P),
            ),
            "rescale:bn3": ("rescale", ("bn3.weight", "bn3.bias", "fc.weight"), (P, P, M)),
            "translation:conv1": ("translation", ("conv1.bias",), (P,)),
            "translation:conv3": ("translation", ("conv3.bias",), (P,)),
            "translation:fc": ("translation", ("fc.weight", "fc.bias"), (P, P)),
        },
        {
            "translation:stem": ("translation", ("stem.weight",), (P,)),
            "scale:conv3": ("scale", ("conv3.weight", "conv3.bias"), (P, P)),
            "rescale:bn0": ("rescale", ("bn0.weight", "bn0.bias", "conv1.weight"), (P, P, M)),
            "rescale:bn2": ("rescale", ("bn2.weight", "bn2.bias", "conv3.weight"), (P, P, M)),
        },
    ),
    Case(
        # GroupNorm always uses the statistics of its input: scale on both convs; the GN affines
        # rescale through ReLU (and max pool, flatten) into the next layer; translation on 8.
        # Each conv's bias alone shifts every channel of every group by the same constant, which
        # the group mean removes (translation, exact).
        "gn_cnn",
        gn_cnn,
        _x(4, 3, 8, 8),
        _y(4, 4),
        CE,
        {
            "scale:0": ("scale", ("0.weight", "0.bias"), (P, P)),
            "rescale:1": ("rescale", ("1.weight", "1.bias", "3.weight"), (P, P, M)),
            "scale:3": ("scale", ("3.weight", "3.bias"), (P, P)),
            "rescale:4": ("rescale", ("4.weight", "4.bias", "8.weight"), (P, P, M)),
            "translation:0": ("translation", ("0.bias",), (P,)),
            "translation:3": ("translation", ("3.bias",), (P,)),
            "translation:8": ("translation", ("8.weight", "8.bias"), (P, P)),
        },
        {"translation:0:all": ("translation", ("0.weight", "0.bias"), (P, P))},
    ),
    Case(
        # embed feeds ln1 but also the residual stream: no scale alone. ln1 feeds
        # nn.MultiheadAttention(a, a, a) only: rescale into its fused in_proj_weight (q, k and v
        # all scale down). ln2 -> fc1 directly: rescale. fc1 -> GELU: no rescale. fc2 is added to
        # the residual stream before lnf: no scale alone. The stream (embed, attention's
        # out_proj, fc2) is read by LayerNorms only: shifting any writer's weight and bias adds
        # a per-token constant that the mean removes (translation, exact); scaling all writers is
        # undone by every norm (scale, approximate). lnf -> mean over tokens -> head: rescale.
        # head: translation.
        "pre_ln_transformer",
        PreLNBlock,
        _x(4, 6, 5),
        _y(4, 3),
        CE,
        {
            "rescale:ln1": (
                "rescale",
                ("ln1.weight", "ln1.bias", "attn.in_proj_weight"),
                (P, P, M),
            ),
            "rescale:ln2": ("rescale", ("ln2.weight", "ln2.bias", "fc1.weight"), (P, P, M)),
            "rescale:lnf": ("rescale", ("lnf.weight", "lnf.bias", "head.weight"), (P, P, M)),
            "translation:embed": ("translation", ("embed.weight", "embed.bias"), (P, P)),
            "translation:attn.out_proj": (
                "translation",
                ("attn.out_proj.weight", "attn.out_proj.bias"),
                (P, P),
            ),
            "translation:fc2": ("translation", ("fc2.weight", "fc2.bias"), (P, P)),
            "scale:stream@embed": (
                "scale",
                (
                    "embed.weight",
                    "embed.bias",
                    "attn.out_proj.weight",
                    "attn.out_proj.bias",
                    "fc2.weight",
                    "fc2.bias",
                ),
                (P,) * 6,
            ),  # fmt: skip
            "translation:head": ("translation", ("head.weight", "head.bias"), (P, P)),
        },
        {
            "scale:fc2": ("scale", ("fc2.weight", "fc2.bias"), (P, P)),
            "scale:embed": ("scale", ("embed.weight", "embed.bias"), (P, P)),
            "rescale:fc1": ("rescale", ("fc1.weight", "fc1.bias", "fc2.weight"), (P, P, M)),
        },
    ),
    Case(
        # ReLU MLP under MSE: rescale 0 -> 2 and 2 -> 4; no translation (MSE is not shift
        # invariant: the numerical check rejects it).
        "relu_mlp_mse",
        smooth_mlp(nn.ReLU),
        _x(16, 5),
        _reg(16, 3),
        MSE,
        {
            "rescale:0": ("rescale", ("0.weight", "0.bias", "2.weight"), (P, P, M)),
            "rescale:2": ("rescale", ("2.weight", "2.bias", "4.weight"), (P, P, M)),
        },
        {"translation:4": ("translation", ("4.weight", "4.bias"), (P, P))},
    ),
    Case(
        "leaky_mlp",
        smooth_mlp(lambda: nn.LeakyReLU(0.1)),
        _x(16, 5),
        _y(16, 3),
        CE,
        {
            "rescale:0": ("rescale", ("0.weight", "0.bias", "2.weight"), (P, P, M)),
            "rescale:2": ("rescale", ("2.weight", "2.bias", "4.weight"), (P, P, M)),
            "translation:4": ("translation", ("4.weight", "4.bias"), (P, P)),
        },
    ),
    Case(
        # fc1 -> fc2 (no activation: identity) -> relu -> fc3 -> x.relu()*2 -> fc4 -> dropout
        # -> leaky_relu -> fc5: every hidden layer rescales into the next.
        "functional_mlp",
        FunctionalMLP,
        _x(16, 5),
        _y(16, 3),
        CE,
        {
            "rescale:fc1": ("rescale", ("fc1.weight", "fc1.bias", "fc2.weight"), (P, P, M)),
            "rescale:fc2": ("rescale", ("fc2.weight", "fc2.bias", "fc3.weight"), (P, P, M)),
            "rescale:fc3": ("rescale", ("fc3.weight", "fc3.bias", "fc4.weight"), (P, P, M)),
            "rescale:fc4": ("rescale", ("fc4.weight", "fc4.bias", "fc5.weight"), (P, P, M)),
            "translation:fc5": ("translation", ("fc5.weight", "fc5.bias"), (P, P)),
        },
    ),
    Case(
        # The shared weight appears in both layers: scaling it scales fc1 and fc2 at once.
        "tied",
        Tied,
        _x(16, 6),
        _y(16, 3),
        CE,
        {"translation:fc3": ("translation", ("fc3.weight", "fc3.bias"), (P, P))},
        {
            "rescale:fc1": ("rescale", ("fc1.weight", "fc1.bias", "fc2.bias"), (P, P, M)),
            "rescale:fc2": ("rescale", ("fc1.weight", "fc2.bias", "fc3.weight"), (P, P, M)),
        },
    ),
    Case(
        # W = g v/|v|: v is scale symmetric in both layers (the layer's one scale record: its
        # tensors together or its weights alone are not); the output of layer 0 scales with g
        # (original0) and its bias, so (b0, g0, -g2) rescale through ReLU, reported as the
        # layer-level rescale (b0, g0, v0, -g2, -v2), which differs from it by the two v scales.
        # The head's translation record holds its bias alone, which shifts every logit equally;
        # its bias, g and v shifted together do not (adding c to v turns W's direction
        # non-uniformly), nor g or v alone.
        "weight_norm",
        wn_mlp,
        _x(16, 5),
        _y(16, 3),
        CE,
        {
            "scale:0.parametrizations.weight.original1": (
                "scale",
                ("0.parametrizations.weight.original1",),
                (P,),
            ),
            "scale:2.parametrizations.weight.original1": (
                "scale",
                ("2.parametrizations.weight.original1",),
                (P,),
            ),
            "rescale:0": (
                "rescale",
                (
                    "0.bias",
                    "0.parametrizations.weight.original0",
                    "0.parametrizations.weight.original1",
                    "2.parametrizations.weight.original0",
                    "2.parametrizations.weight.original1",
                ),
                (P, P, P, M, M),
            ),
            "translation:2": ("translation", ("2.bias",), (P,)),
        },
        {
            "translation:2:all": (
                "translation",
                (
                    "2.bias",
                    "2.parametrizations.weight.original0",
                    "2.parametrizations.weight.original1",
                ),
                (P, P, P),
            )
        },
    ),
    Case(
        "tanh_mlp",
        smooth_mlp(nn.Tanh),
        _x(16, 5),
        _y(16, 3),
        CE,
        {"translation:4": ("translation", ("4.weight", "4.bias"), (P, P))},
        {"rescale:0": ("rescale", ("0.weight", "0.bias", "2.weight"), (P, P, M))},
    ),
    Case(
        # GELU, sigmoid, softplus, and a regression loss: no symmetry at all.
        "no_symmetry",
        mixed_smooth,
        _x(16, 5),
        _reg(16, 2),
        MSE,
        {},
        {
            "rescale:0": ("rescale", ("0.weight", "0.bias", "2.weight"), (P, P, M)),
            "rescale:4": ("rescale", ("4.weight", "4.bias", "6.weight"), (P, P, M)),
        },
    ),
    Case(
        # stem feeds only the channel LayerNorm2d (a subclass calling F.layer_norm): its weight
        # and bias scaled together is undone by the norm (scale, approximate) and shifted
        # together adds c (1 + sum of the patch) to every channel of a position, which the
        # mean removes (translation, exact). norm -> ReLU -> conv only: rescale; conv -> ReLU
        # -> avg pool -> fc: rescale; fc: translation.
        "layernorm2d_cnn",
        LN2dCNN,
        _x(4, 3, 6, 6),
        _y(4, 4),
        CE,
        {
            "scale:stem": ("scale", ("stem.weight", "stem.bias"), (P, P)),
            "translation:stem": ("translation", ("stem.weight", "stem.bias"), (P, P)),
            "rescale:norm": ("rescale", ("norm.weight", "norm.bias", "conv.weight"), (P, P, M)),
            "rescale:conv": ("rescale", ("conv.weight", "conv.bias", "fc.weight"), (P, P, M)),
            "translation:fc": ("translation", ("fc.weight", "fc.bias"), (P, P)),
        },
        {"scale:conv": ("scale", ("conv.weight", "conv.bias"), (P, P))},
    ),
    Case(
        # The stream h = stem(x) + pos + gamma * fc2(...) is read by block.norm and norm only
        # (LayerNorm subclasses): shifting stem (weight and bias) or pos adds a per-token
        # constant (translation, exact); scaling stem, pos and the layer scale gamma together
        # scales h (scale, approximate). gamma * fc2: fc2's weight and bias up, gamma down
        # (rescale, exact; gamma times fc2's output alone is not: fc2's bias). block.norm ->
        # fc1 only, norm -> mean -> head: rescale. head: translation. Not symmetries: fc1 ->
        # GELU, gamma alone, gamma shifted.
        "layer_scale",
        LayerScaleNet,
        _x(8, 6, 5),
        _y(8, 3),
        CE,
        {
            "translation:pos": ("translation", ("pos",), (P,)),
            "translation:stem": ("translation", ("stem.weight", "stem.bias"), (P, P)),
            "scale:stream@stem": (
                "scale",
                ("stem.weight", "stem.bias", "pos", "block.gamma"),
                (P, P, P, P),
            ),
            "rescale:block.gamma~block.fc2": (
                "rescale",
                ("block.gamma", "block.fc2.weight", "block.fc2.bias"),
                (P, M, M),
            ),
            "rescale:block.norm": (
                "rescale",
                ("block.norm.weight", "block.norm.bias", "block.fc1.weight"),
                (P, P, M),
            ),
            "rescale:norm": ("rescale", ("norm.weight", "norm.bias", "head.weight"), (P, P, M)),
            "translation:head": ("translation", ("head.weight", "head.bias"), (P, P)),
        },
        {
            "rescale:block.fc1": (
                "rescale",
                ("block.fc1.weight", "block.fc1.bias", "block.fc2.weight"),
                (P, P, M),
            ),
            "scale:block.gamma": ("scale", ("block.gamma",), (P,)),
            "translation:block.gamma": ("translation", ("block.gamma",), (P,)),
        },
    ),
]


def build(case: Case, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, torch.Tensor]:
    """The case's model (seeded, in the case's mode) and inputs, in ``dtype``."""
    torch.manual_seed(0)
    model = case.build().to(dtype)
    model.train(not case.eval_mode)
    if case.eval_mode:
        _fill_running_stats(model)
    return model, case.inputs().to(dtype)


def _fill_running_stats(model: nn.Module) -> None:
    """Give BN running statistics values that differ from one batch's statistics."""
    g = torch.Generator().manual_seed(4)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# --- independent invariance checks ------------------------------------------------------------

EXACT_TOL = 1e-10
"""float64, normalization eps set to 1e-12: an exact symmetry leaves only rounding (~1e-16
relative per operation, a few hundred operations deep); measured below 1e-15."""

EPS_TOL = 1e-3
"""float64, default normalization eps (1e-5): the eps breaks scale symmetry by about
eps/(var + eps) ~ 1e-5 for unit-scale pre-activations, so the loss changes by ~1e-5 s relative
under psi_s (s = 0.5); measured at most 4e-6."""

BROKEN_MIN = 1e-3
"""A non-symmetry's defect in this zoo is at least 2.1e-3 (rescale through GELU), most 1e-2..0.4."""


def _shrink_eps(model: nn.Module, eps: float = 1e-12) -> nn.Module:
    clone = copy.deepcopy(model)
    for m in clone.modules():
        if hasattr(m, "eps") and isinstance(
            m, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm
        ):
            m.eps = eps
    return clone


def _loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, names):
    """f(q_A) with all other parameters fixed, fresh buffers and a fixed dropout seed."""
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def f(sub: dict[str, torch.Tensor]) -> torch.Tensor:
        torch.manual_seed(123)
        fresh = {n: b.clone() for n, b in buffers.items()}
        return loss_fn(functional_call(model, ({**fixed, **sub}, fresh), (x,)), y)

    return f, {n: fixed[n] for n in names}


def _psi(q: dict[str, torch.Tensor], kind: str, signs: dict[str, float], s: float):
    if kind == "translation":
        return {n: v + signs[n] * s for n, v in q.items()}
    return {n: v * math.exp(signs[n] * s) for n, v in q.items()}


def _xi(q: dict[str, torch.Tensor], kind: str, signs: dict[str, float]):
    if kind == "translation":
        return {n: torch.full_like(v, signs[n]) for n, v in q.items()}
    return {n: signs[n] * v for n, v in q.items()}


def jvp_defect(model, x, y, loss_fn, kind, names, signs) -> float:
    """|d/ds f(psi_s q)| at s = 0 (torch.func.jvp) over |g_A| |xi_A|."""
    sign = dict(zip(names, signs))
    f, q = _loss_of(model, x, y, loss_fn, names)
    xi = _xi(q, kind, sign)
    # The math SDPA kernel has forward AD; the fused CPU attention kernel has not.
    with torch.random.fork_rng(devices=[]), sdpa_kernel(SDPBackend.MATH):
        try:
            _, d = jvp(f, (q,), (xi,))
        except NotImplementedError:  # no forward AD for _weight_norm_interface: double backward
            keys = list(q)
            _, d = torch.autograd.functional.jvp(
                lambda *t: f(dict(zip(keys, t))), tuple(q.values()), tuple(xi.values())
            )
        leaves = {n: v.clone().requires_grad_(True) for n, v in q.items()}
        g = torch.autograd.grad(f(leaves), list(leaves.values()))
    g_norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g))
    xi_norm = math.sqrt(sum(float(t.pow(2).sum()) for t in xi.values()))
    return abs(float(d)) / (g_norm * xi_norm)


def finite_change(model, x, y, loss_fn, kind, names, signs, s: float = 0.5) -> float:
    """|f(psi_s q) - f(q)| / max(1, |f(q)|) for a finite s."""
    f, q = _loss_of(model, x, y, loss_fn, names)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        f0 = float(f(q))
        f1 = float(f(_psi(q, kind, dict(zip(names, signs)), s)))
    return abs(f1 - f0) / max(1.0, abs(f0))


def _as_sets(symmetries):
    return {s.name: (s.kind, dict(zip(s.params, s.signs))) for s in symmetries}


def _expected_sets(expected):
    return {k: (kind, dict(zip(p, sg))) for k, (kind, p, sg) in expected.items()}


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_zoo_detection_verified_float64(case: Case) -> None:
    model, x = build(case)
    found = find_symmetries(model, x, case.targets(), case.loss_fn)
    assert _as_sets(found) == _expected_sets(case.expected)
    assert all(s.verified is True and s.defect is not None for s in found)
    assert len({s.name for s in found}) == len(found)


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_zoo_detection_without_targets(case: Case) -> None:
    """Without targets the candidates are verified on a random linear function of the logits
    (a symmetry of the function is one of every loss): the same set here but for the logits
    translation, a symmetry of the cross-entropy only, which comes back unverified when the loss
    states a cross-entropy (whether it holds is then up to the training gradients), on the same
    tensors as with targets (the weight-normalized head's bias alone: its other translations
    do not shift the logits by a per-sample constant), and not at all for another loss."""
    model, x = build(case)
    head = "translation:" + [n for n, c in model.named_children() if list(c.parameters())][-1]
    found = find_symmetries(model, x, loss_fn=case.loss_fn)
    verified = [s for s in found if s.verified is not None]
    expected = {k: v for k, v in case.expected.items() if k != head}
    assert _as_sets(verified) == _expected_sets(expected)
    assert all(s.verified is True and s.defect is not None and s.exactness for s in verified)
    waiting = [s for s in found if s.verified is None]
    stated = isinstance(case.loss_fn, nn.CrossEntropyLoss)
    assert [s.name for s in waiting] == ([head] if stated else [])
    if stated:
        assert _as_sets(waiting) == _expected_sets({head: case.expected[head]})
    assert all(s.defect is None and s.exactness == "" for s in waiting)


@pytest.mark.parametrize(
    "case",
    [c for c in ZOO if c.name in ("mlp_bn", "res_cnn_bn", "pre_ln_transformer", "weight_norm")],
    ids=lambda c: c.name,
)
def test_zoo_detection_float32(case: Case) -> None:
    model, x = build(case, torch.float32)
    found = find_symmetries(model, x, case.targets(), case.loss_fn)
    assert _as_sets(found) == _expected_sets(case.expected)
    assert all(s.defect < 1e-4 for s in found)


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_zoo_expected_are_invariant(case: Case) -> None:
    """<g, xi> = 0 and f(psi_s q) = f(q): exactly once normalization eps is ~0, approximately
    (eps/(var+eps)) with the default eps."""
    model, x = build(case)
    y = case.targets()
    exact = _shrink_eps(model)
    for name, (kind, names, signs) in case.expected.items():
        assert jvp_defect(exact, x, y, case.loss_fn, kind, names, signs) < EXACT_TOL, name
        assert finite_change(exact, x, y, case.loss_fn, kind, names, signs) < EXACT_TOL, name
        assert finite_change(model, x, y, case.loss_fn, kind, names, signs) < EPS_TOL, name


@pytest.mark.parametrize("case", [c for c in ZOO if c.broken], ids=lambda c: c.name)
def test_zoo_broken_candidates_have_large_defect(case: Case) -> None:
    """The candidates the detector must not report are really not symmetries, and the verifier
    says so (it would catch a false negative of the structural rules)."""
    model, x = build(case)
    y = case.targets()
    declared = [Symmetry(k, kind, p, sg) for k, (kind, p, sg) in case.broken.items()]
    for s in verify(model, declared, x, y, case.loss_fn):
        assert (
            jvp_defect(_shrink_eps(model), x, y, case.loss_fn, s.kind, s.params, s.signs)
            > BROKEN_MIN
        ), s.name
        assert s.verified is False and s.defect > BROKEN_MIN, s.name


class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lin(h) if h.sum() > 0 else -self.lin(h)


class _GatedNet(nn.Module):
    """A child with control flow on tensor values (no symbolic trace can follow it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.gate = _Gate()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.gate(F.relu(self.bn(self.fc0(x))))))


class _BranchyRoot(nn.Module):
    """Control flow on tensor values in the model's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if h.mean() > 100:
            h = h * 0
        return self.head(torch.tanh(h))


class _CalledTwice(nn.Module):
    """body.2 is called a second time by the root, on its own output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if h.mean() > 100:
            h = h * 0
        return self.body[2](F.relu(h))


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        # fc0 -> BN: scale. BN's affine -> ReLU -> gate.lin (the branch taken, h.sum() > 0,
        # keeps its sign under positive scaling): rescale; gate.lin -> ReLU -> fc2: rescale;
        # fc2: translation.
        # fc0's bias alone before the train-mode BN: translation.
        (
            _GatedNet,
            {"scale:fc0", "rescale:bn", "rescale:gate.lin", "translation:fc0", "translation:fc2"},
        ),
        # body.0 -> BN: scale, and its bias alone translation; BN -> ReLU -> body.3: rescale;
        # body.3 -> tanh: nothing; head: translation.
        (
            _BranchyRoot,
            {"scale:body.0", "translation:body.0", "rescale:body.1", "translation:head"},
        ),
        # body.2 reads body.0's output and its own: scaling body.0 and body.2 against each
        # other, or shifting body.2 (it feeds itself), changes the second call: none.
        (_CalledTwice, set()),
    ],
)
def test_control_flow_on_tensor_values_is_read_from_the_real_pass(factory, expected) -> None:
    """The engine records the pass the batch takes: control flow is no reason to skip code."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    model = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = find_symmetries(model, x, y, nn.CrossEntropyLoss())
    assert {s.name for s in found} == expected
    for s in found:
        assert s.verified
        defect = jvp_defect(
            _shrink_eps(model.double()), x.double(), y, CE, s.kind, s.params, s.signs
        )
        assert defect < EXACT_TOL, s.name


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


class _Refuses(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.overrides._is_torch_function_mode_enabled():
            raise RuntimeError("no function modes here")
        return torch.relu(x)


@pytest.mark.parametrize(
    ("factory", "named", "expected"),
    [
        (_RefusesModes, "_RefusesModes", {"translation:fc2"}),
        (
            lambda: nn.Sequential(nn.Linear(4, 8), _Refuses(), nn.Linear(8, 3)),
            r"1 \(_Refuses\)",
            {"translation:2"},
        ),
    ],
)
def test_a_model_that_cannot_be_recorded_is_warned_about_by_name(factory, named, expected):
    """One line naming the innermost module that failed and the reason; per-layer candidates
    are still verified (the logits head's shift)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    reason = r": the dataflow could not be recorded \(RuntimeError: no function modes here\)"
    with pytest.warns(UserWarning, match=named + reason):
        found = find_symmetries(factory(), x, y, nn.CrossEntropyLoss())
    assert {s.name for s in found} == expected


def test_no_symmetry_is_empty_list_without_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_symmetries(model, torch.randn(8, 4), torch.randn(8, 1), nn.MSELoss()) == []
        assert find_symmetries(model, torch.randn(8, 4)) == []


def test_inputs_that_do_not_fit_raise_value_error() -> None:
    with pytest.raises(ValueError, match=r"inputs: model\(\*inputs\) failed .*tensor\(3, 5\)"):
        find_symmetries(nn.Linear(4, 2), torch.randn(3, 5))
    with pytest.raises(ValueError, match="inputs: expected a tensor"):
        find_symmetries(nn.Linear(4, 2), "not a tensor")
    with pytest.raises(ValueError, match="loss_fn: targets were given"):
        find_symmetries(nn.Linear(4, 2), torch.randn(3, 4), targets=torch.zeros(3))
    with pytest.raises(ValueError, match="tol, eps_tol: must be positive"):
        find_symmetries(nn.Linear(4, 2), torch.randn(3, 4), tol=0.0)
    with pytest.raises(ValueError, match="n_perturb: must be at least 1"):
        find_symmetries(nn.Linear(4, 2), torch.randn(3, 4), n_perturb=0)


def test_detection_leaves_model_and_rng_untouched() -> None:
    model, x = build(ZOO[0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    find_symmetries(model, x, ZOO[0].targets(), nn.CrossEntropyLoss())
    assert torch.equal(torch.rand(3), expected_draw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_cross_entropy_functional_states_translation_and_inputs_as_kwargs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    found = find_symmetries(model, {"input": torch.randn(8, 5)}, loss_fn=F.cross_entropy)
    assert {s.name for s in found} == {"rescale:0", "translation:2"}


class SequenceHead(nn.Module):
    """Per-token logits (B, T, C) reshaped inside the model for the loss."""

    def __init__(self, axis_mixing: bool = False) -> None:
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.head = nn.Linear(8, 3)
        self.axis_mixing = axis_mixing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.body(x)))
        return logits.flatten(1) if self.axis_mixing else logits.flatten(0, 1)


def test_translation_through_reshaped_logits_is_verified_numerically():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    model = SequenceHead().double()
    y = torch.randint(0, 3, (24,))
    found = find_symmetries(model, x, y, nn.CrossEntropyLoss())
    assert [s.name for s in found] == ["translation:head"]
    assert found[0].verified
    # without targets a cross-entropy states it, unverified: a reshape might mix the class axis
    (waiting,) = find_symmetries(model, x, loss_fn=nn.CrossEntropyLoss())
    assert waiting.name == "translation:head" and waiting.verified is None
    assert found[0].params == ("head.weight", "head.bias")
    # flatten(1) mixes tokens into classes: the weight shifted adds c sum(h) per token, which
    # differs between the classes of one example (it fails verification, with or without
    # targets); the bias alone still adds c to every class: the head's one translation record
    mixing = SequenceHead(axis_mixing=True).double()
    for targets in (torch.randint(0, 18, (4,)), None):
        (shift,) = find_symmetries(mixing, x, targets, nn.CrossEntropyLoss())
        assert shift.name == "translation:head" and shift.params == ("head.bias",)
        assert shift.verified is (True if targets is not None else None)


def _zero_config_names(model: nn.Module, loss_of: Callable[[], torch.Tensor], run_dir) -> set:
    """The symmetries the one-line ``watch(model, optimizer, run_dir)`` tracks after 2 steps."""
    import noether_dyn as nd

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    monitor = nd.watch(model, opt, run_dir)
    for _ in range(2):
        opt.zero_grad()
        loss = loss_of()
        loss.backward()
        monitor.log_loss(loss)
        opt.step()
    monitor.close()
    return set(nd.load_run(run_dir).symmetries["symmetry"])


@pytest.mark.parametrize("name", ["mlp", "bn_cnn", "gpt2", "bn_mlp", "wn_head"])
def test_zero_config_and_a_sample_batch_give_the_same_names(name: str, tmp_path) -> None:
    """One naming convention: the zero-config path (detected on the first forward call, the
    logits translation checked on the first real gradients) and find_symmetries with a batch
    name the same symmetries of the same model identically."""
    from noether_dyn.symmetries.engine import clear_cache

    torch.manual_seed(0)
    if name == "gpt2":
        pytest.importorskip("transformers")
        from tests.test_symmetries_hf import gpt2

        model, inputs = gpt2(False)  # no dropout: its stream writers have translations
        with_batch = find_symmetries(model, inputs)  # the model's own output.loss

        def loss_of() -> torch.Tensor:
            return model(**inputs).loss

    else:
        builders = {"mlp": smooth_mlp(nn.ReLU), "bn_cnn": ResCNN, "bn_mlp": bn_head,
                    "wn_head": wn_mlp}  # fmt: skip
        model = builders[name]()
        x = torch.randn(8, 3, 6, 6) if name == "bn_cnn" else torch.randn(16, 5)
        y = torch.randint(0, 3, (x.shape[0],))
        with_batch = find_symmetries(model, x, y, CE)

        def loss_of() -> torch.Tensor:
            return CE(model(x), y)

    model.train()
    clear_cache()
    zero_config = _zero_config_names(model, loss_of, tmp_path / "run")
    assert with_batch and zero_config == {s.name for s in with_batch}
    # layer level: one translation record per layer, named by the layer, never by a tensor
    translations = [n for n in zero_config if n.startswith("translation:")]
    assert translations and not any(n.endswith((".weight", ".bias")) for n in translations)


# --- layer level: one translation record per layer, on the largest verified set ----------------


def bn_head() -> nn.Module:
    """Linear (with bias) -> BatchNorm1d -> ReLU -> Linear head."""
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


class ConvBN(nn.Module):
    """Conv2d with bias -> BatchNorm2d -> ReLU -> average pool -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


@pytest.mark.parametrize(
    ("factory", "shape", "first", "head"),
    [(bn_head, (16, 5), "0", "3"), (ConvBN, (8, 3, 6, 6), "conv", "fc")],
    ids=["linear_bn", "conv_bn"],
)
def test_bias_alone_before_a_train_mode_batchnorm_is_the_layers_translation(
    factory, shape, first: str, head: str
) -> None:
    """BN in train mode subtracts the per-channel batch mean: b -> b + c is exact, while
    W -> W + c 1 adds c sum(x_n) (c times a patch sum for a conv), which varies over the batch
    and the positions. The first layer's one translation record holds its bias alone; the head's
    holds its weight and bias (softmax cross-entropy). Each is checked here independently: the
    directional derivative of the loss (torch.func.jvp) and a finite shift, in float64 with the
    BN eps at 1e-12 (EXACT_TOL: rounding only); the weight shifted is broken (BROKEN_MIN)."""
    from noether_dyn.symmetries.engine import detect

    torch.manual_seed(0)
    model = factory().double()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],), generator=torch.Generator().manual_seed(2))
    found = find_symmetries(model, x, y, CE)
    shifts = {s.name: s for s in found if s.kind == "translation"}
    assert set(shifts) == {f"translation:{first}", f"translation:{head}"}
    bias, whole = shifts[f"translation:{first}"], shifts[f"translation:{head}"]
    assert bias.params == (f"{first}.bias",) and bias.signs == (P,)
    assert whole.params == (f"{head}.weight", f"{head}.bias")
    for s in (bias, whole):
        assert s.verified is True and s.exactness == "exact" and s.defect < 1e-12, s.name
    exact = _shrink_eps(model)
    for s in found:  # precision: every reported symmetry leaves the loss unchanged
        limit = EXACT_TOL if s.exactness == "exact" else EPS_TOL
        assert jvp_defect(exact, x, y, CE, s.kind, s.params, s.signs) < EXACT_TOL, s.name
        assert finite_change(model, x, y, CE, s.kind, s.params, s.signs) < limit, s.name
    for names in ((f"{first}.weight", f"{first}.bias"), (f"{first}.weight",)):
        signs = (P,) * len(names)
        assert jvp_defect(exact, x, y, CE, "translation", names, signs) > BROKEN_MIN, names
    # the larger sets were tried and dropped with their defect; never two records for one layer
    dropped = [
        d for d in detect(model, x, y, CE, cache=False).dropped
        if d.name == f"translation:{first}"
    ]  # fmt: skip
    assert {d.params for d in dropped} == {
        (f"{first}.weight", f"{first}.bias"),
        (f"{first}.weight",),
    }
    assert all(d.defect > BROKEN_MIN and "tol" in d.rule for d in dropped)


def test_head_translation_without_targets_needs_a_per_sample_logit_shift() -> None:
    """Without targets a head translation is checked on a random linear function of the logits
    centered along the class axis, blind to per-sample constant shifts only. A plain head's
    weight and bias shift every logit of an example equally: kept, unverified (the training
    loss decides). A weight-normalized head's g, v or all its tensors shifted turn W's direction
    non-uniformly: dropped with the rule; its bias alone is its translation record. Without a
    bias nothing of it remains. Every other candidate's check is unchanged."""
    from noether_dyn.symmetries.engine import detect

    torch.manual_seed(0)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = detect(smooth_mlp(nn.ReLU)().double(), x, cache=False)
    (waiting,) = [s for s in plain.symmetries if s.verified is None]
    assert waiting.name == "translation:4" and waiting.params == ("4.weight", "4.bias")
    assert "per-sample constant" in waiting.note

    wn = wn_mlp().double()
    found = detect(wn, x, cache=False)
    (waiting,) = [s for s in found.symmetries if s.kind == "translation"]
    assert waiting.name == "translation:2" and waiting.params == ("2.bias",)
    assert waiting.verified is None
    not_logits = [d for d in found.dropped if d.rule.startswith("not a logits translation")]
    g, v = "2.parametrizations.weight.original0", "2.parametrizations.weight.original1"
    assert {d.params for d in not_logits} == {("2.bias", g, v), (g,), (v,)}
    # and they are not: each changes the loss of another target assignment's cross-entropy
    for y in (torch.zeros(16, dtype=torch.long), torch.arange(16) % 3):
        for d in not_logits:
            assert jvp_defect(wn, x, y, CE, "translation", d.params, d.signs) > BROKEN_MIN
    assert found.passes == plain.passes  # one pass for the class-centered check in each

    no_bias = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), weight_norm(nn.Linear(8, 3, bias=False)))
    found = detect(no_bias.double(), x, cache=False)
    assert not [s for s in found.symmetries if s.kind == "translation"]
    assert {d.params for d in found.dropped if d.rule.startswith("not a logits")} == {
        (g, v),
        (g,),
        (v,),
    }


class ConvHead(nn.Module):
    """Per-pixel logits (N, C, H, W) from a 1x1 convolution: cross-entropy over dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def test_conv_head_translation_is_checked_along_the_channel_axis() -> None:
    """A convolution head's logits shift by a per-pixel constant along the channel axis (the
    class axis of F.cross_entropy on (N, C, H, W)): verified with targets, kept unverified
    without them (centering along the last, spatial axis would wrongly drop it)."""
    torch.manual_seed(0)
    model = ConvHead().double()
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.randint(0, 4, (2, 5, 5), generator=torch.Generator().manual_seed(2))
    (with_targets,) = find_symmetries(model, x, y, CE)
    assert with_targets.name == "translation:head" and with_targets.verified is True
    assert with_targets.params == ("head.weight", "head.bias")
    (waiting,) = find_symmetries(model, x, loss_fn=CE)
    assert waiting.params == with_targets.params and waiting.verified is None
