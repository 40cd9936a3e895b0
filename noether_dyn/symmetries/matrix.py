"""GL(n) symmetries of linear compositions, found and checked numerically.

A pair (L, R) of matrices with n rows that enters the loss only through ``R^T L`` is left unchanged
by ``L -> A L``, ``R -> A^{-T} R`` for every invertible n x n A; the generator of ``A = I + s M``
is ``xi_M = (M L, -M^T R)``, and ``<g, xi_M> = <M, G_L L^T - R G_R^T>_F`` vanishes for every M
exactly when the n x n identity ``G_L L^T = R G_R^T`` holds (docs/physics.md, "Matrix-valued
charges"; Kunin et al., "Neural Mechanics", ICLR 2021, §3; Marcotte, Gribonval & Peyré, NeurIPS
2023). The charge is the symmetric matrix ``C = L L^T - R R^T`` (its n(n+1)/2 entries are
:mod:`noether_dyn.quantities.matrix_charges`).

Candidates (:func:`matrix_candidates`):

* ``composed``: the layer-level rescale symmetries that detection returns (``find_symmetries``)
  whose incoming side is one layer with a 2-D weight (n, d) and optional bias (n,), and whose
  outgoing side is one 2-D weight (k, n): ``L = [W1, b1]``, ``R = W2^T`` (``"gl:fc1>fc2"``).
  Detection reports the same rescale through a ReLU (positively homogeneous), where only the
  diagonal of GL survives: the numerical check is what tells the two apart.
* ``qk`` and ``vo`` per head of the attention modules it recognizes by structure: Hugging Face
  GPT-2 (fused ``c_attn``/``c_proj``, Conv1D layout), separate ``q_proj``/``k_proj``/``v_proj``/
  ``o_proj`` (LLaMA, Mistral, ...; grouped-query heads share one record per key/value head) and
  ``nn.MultiheadAttention``. A module with separate query/key/value projections but no output
  projection of its own (BERT's ``BertSelfAttention``, whose ``W_O`` is ``BertSelfOutput.dense``
  in the parent) gets as ``W_O`` the linear layer that reads the module's output in a traced
  forward pass on the sample batch (:func:`output_readers`), whatever it is named (none: no
  ``vo`` candidate, e.g. with a nonlinearity in between). ``qk``: ``L = [W_Q, b_Q]``,
  ``R = [W_K, b_K]`` on the head's rows (the scores are ``[x, 1] L^T R [y, 1]^T``); ``vo``:
  ``L = [W_V, b_V]``, ``R = W_O[:, head]^T``.
  Rotary position embeddings (LLaMA) rotate q and k per position: only matrices commuting with
  every rotation survive, so the ``qk`` candidates of a RoPE model fail the check (measured).

A candidate is promoted (:func:`find_matrix_symmetries`) only when, at the real parameters and
at ``n_perturb`` perturbed points (:func:`~noether_dyn.symmetries.verify.perturbed`), the cosine
``|<g, xi_M>| / (|g_A| |xi_M|)`` for ``n_directions`` random Gaussian M is at most ``tol`` (the
largest is its ``defect``). The check runs on a float64 copy of the model by default, so ``tol``
is float64's 1e-8 (:data:`~noether_dyn.symmetries.verify.DEFAULT_TOL`; the rounding of a
gradient is a few hundred u = 1e-16); a ReLU between the layers measures 1e-2 or more.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import grad

from noether_dyn.symmetries._calls import Inputs, as_call, call_model
from noether_dyn.symmetries.verify import DEFAULT_TOL, default_tol, perturbed

GL_KINDS = ("composed", "qk", "vo")


@dataclass(frozen=True)
class Block:
    """One slice of a parameter, as an (n, m) matrix: ``axis=0`` takes rows ``start:stop`` of a
    2-D tensor (a 1-D bias becomes one column), ``axis=1`` takes its columns ``start:stop`` and
    transposes them."""

    param: str
    axis: int
    start: int
    stop: int

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The (stop - start, m) matrix of this block (a view of ``tensor`` when possible)."""
        if tensor.dim() == 1:
            return tensor[self.start : self.stop].reshape(-1, 1)
        if self.axis == 0:
            return tensor[self.start : self.stop].reshape(self.stop - self.start, -1)
        return tensor[:, self.start : self.stop].T

    def as_list(self) -> list:
        return [self.param, self.axis, self.start, self.stop]


@dataclass(frozen=True)
class MatrixSymmetry:
    """A GL(n) symmetry ``(L, R) -> (A L, A^{-T} R)`` on slices of named parameters.

    Args:
        name: unique, e.g. ``"gl:fc1>fc2"`` or ``"gl:transformer.h.0.attn.qk[2]"``.
        kind: ``"composed"``, ``"qk"`` or ``"vo"``.
        left, right: the blocks whose column concatenation is L (n x a) and R (n x b).
        n: the shared row count (the group is GL(n); the charge has n(n+1)/2 entries).
        verified, defect, note: as :class:`~noether_dyn.symmetries.Symmetry` (defect: the
            largest cosine between the gradient and xi_M over points and directions).
    """

    name: str
    kind: str
    left: tuple[Block, ...]
    right: tuple[Block, ...]
    n: int
    verified: bool | None = None
    defect: float | None = None
    note: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in GL_KINDS:
            raise ValueError(f"MatrixSymmetry {self.name!r}: kind must be one of {GL_KINDS}.")
        for b in (*self.left, *self.right):
            if b.stop - b.start != self.n or b.axis not in (0, 1):
                raise ValueError(
                    f"MatrixSymmetry {self.name!r}: block {b} does not have n={self.n} rows."
                )

    @property
    def params(self) -> tuple[str, ...]:
        """The parameter names the blocks read, in order, each once."""
        return tuple(dict.fromkeys(b.param for b in (*self.left, *self.right)))

    def matrices(self, params: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) read from ``params`` (name -> tensor): (n, a) and (n, b), their dtype."""
        left = torch.cat([b.take(params[b.param]) for b in self.left], dim=1)
        right = torch.cat([b.take(params[b.param]) for b in self.right], dim=1)
        return left, right

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the store keeps the records in ``meta["matrix_symmetries"]``)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "n": self.n,
            "left": [b.as_list() for b in self.left],
            "right": [b.as_list() for b in self.right],
            "verified": self.verified,
            "defect": self.defect,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MatrixSymmetry:
        return cls(
            d["name"], d["kind"], tuple(Block(*b) for b in d["left"]),
            tuple(Block(*b) for b in d["right"]), int(d["n"]), d.get("verified"),
            d.get("defect"), d.get("note", ""),
        )  # fmt: skip


# ------------------------------------------------------------------------------- candidates
def _rows(param: str, start: int, stop: int) -> Block:
    return Block(param, 0, start, stop)


def _cols(param: str, start: int, stop: int) -> Block:
    return Block(param, 1, start, stop)


def composed_candidates(model: nn.Module, rescales: Sequence[Any]) -> list[MatrixSymmetry]:
    """``composed`` candidates from layer-level rescale records (``kind == "rescale"``, +1 on the
    incoming weight and bias, -1 on the outgoing weight)."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out = []
    for s in rescales:
        if getattr(s, "kind", None) != "rescale":
            continue
        plus = [p for p, sg in zip(s.params, s.signs) if sg > 0]
        minus = [p for p, sg in zip(s.params, s.signs) if sg < 0]
        weights = [p for p in plus if len(shapes[p]) == 2]
        if len(weights) != 1 or len(minus) != 1 or len(shapes[minus[0]]) != 2:
            continue
        w1, w2 = weights[0], minus[0]
        n = shapes[w1][0]
        biases = [p for p in plus if p != w1]
        if any(shapes[b] != (n,) for b in biases) or shapes[w2][1] != n:
            continue
        left = (_rows(w1, 0, n), *(_rows(b, 0, n) for b in biases))
        name = f"gl:{w1.removesuffix('.weight')}>{w2.removesuffix('.weight')}"
        out.append(MatrixSymmetry(name, "composed", left, (_cols(w2, 0, n),), n))
    return out


def _attr(module: nn.Module, *names: str) -> Any:
    for name in names:
        for owner in (module, getattr(module, "config", None)):
            value = getattr(owner, name, None) if owner is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def _with_bias(params: Mapping[str, Any], path: str, block: Block) -> tuple[Block, ...]:
    bias = f"{path}.bias"
    return (block,) if bias not in params else (block, _rows(bias, block.start, block.stop))


QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
"""Child names of the query, key and value projections of an attention module."""


def attention_candidates(model: nn.Module, inputs: Inputs | None = None) -> list[MatrixSymmetry]:
    """Per-head ``qk`` and ``vo`` candidates of the attention modules recognized by structure
    (module docstring). ``inputs``: a batch to trace the output projection of a module that
    does not hold one (:func:`output_readers`); without it such modules give no candidate."""
    params = dict(model.named_parameters())
    out: list[MatrixSymmetry] = []
    readers = None
    if inputs is not None:
        bare = [
            p for p, m in model.named_modules()
            if any(set(t) <= {n for n, _ in m.named_children()} for t in QKV_NAMES)
            and not any(n == "o_proj" for n, _ in m.named_children())
        ]  # fmt: skip
        readers = output_readers(model, inputs, bare) if bare else {}
    for path, m in model.named_modules():
        pre = f"{path}." if path else ""
        if isinstance(m, nn.MultiheadAttention):
            if not m._qkv_same_embed_dim or f"{pre}in_proj_weight" not in params:
                continue
            h_n, d, width = m.num_heads, m.head_dim, m.embed_dim
            w, b = f"{pre}in_proj_weight", f"{pre}in_proj_bias"
            o = f"{pre}out_proj.weight"
            for h in range(h_n):
                q, k, v = (
                    _rows(w, off + h * d, off + (h + 1) * d) for off in (0, width, 2 * width)
                )
                bias = b in params
                qb = (q, _rows(b, q.start, q.stop)) if bias else (q,)
                kb = (k, _rows(b, k.start, k.stop)) if bias else (k,)
                vb = (v, _rows(b, v.start, v.stop)) if bias else (v,)
                out.append(MatrixSymmetry(f"gl:{pre}qk[{h}]", "qk", qb, kb, d))
                out.append(
                    MatrixSymmetry(f"gl:{pre}vo[{h}]", "vo", vb, (_cols(o, h * d, (h + 1) * d),), d)
                )
            continue
        names = {n for n, _ in m.named_children()}
        if {"c_attn", "c_proj"} <= names and not getattr(m, "is_cross_attention", False):
            # GPT-2 Conv1D: y = x W + b with W (in, out); q, k, v are column blocks of c_attn
            heads, width = _attr(m, "num_heads", "n_head"), _attr(m, "embed_dim", "n_embd")
            wq = f"{pre}c_attn.weight"
            if heads is None or width is None or wq not in params:
                continue
            if tuple(params[wq].shape) != (width, 3 * width):
                continue
            d, o = width // heads, f"{pre}c_proj.weight"
            for h in range(heads):
                q, k, v = (
                    _cols(wq, off + h * d, off + (h + 1) * d) for off in (0, width, 2 * width)
                )
                qb, kb, vb = (_with_bias(params, f"{pre}c_attn", x) for x in (q, k, v))
                out.append(MatrixSymmetry(f"gl:{pre}qk[{h}]", "qk", qb, kb, d))
                out.append(
                    MatrixSymmetry(f"gl:{pre}vo[{h}]", "vo", vb, (_rows(o, h * d, (h + 1) * d),), d)
                )
            continue
        qkv = next((t for t in QKV_NAMES if set(t) <= names), None)
        if qkv is None:
            continue
        # the output projection: the module's own o_proj, else the linear layer that reads
        # the module's output in the traced forward pass (BERT's BertSelfOutput.dense)
        o_path = f"{pre}o_proj" if "o_proj" in names else (readers or {}).get(path)
        heads = _attr(m, "num_heads", "num_attention_heads")
        kv = _attr(m, "num_key_value_heads", "num_kv_heads") or heads
        wq, wk, wv = (f"{pre}{x}.weight" for x in qkv)
        if heads is None or wq not in params or heads % kv:
            continue
        d = _attr(m, "head_dim", "attention_head_size") or params[wq].shape[0] // heads
        wo = None if o_path is None else f"{o_path}.weight"
        if wo not in params or params[wo].dim() != 2 or params[wo].shape[1] != heads * d:
            wo = None  # no output projection found: qk candidates only
        q_mod, k_mod, v_mod = (f"{pre}{x}" for x in qkv)
        group = heads // kv
        for j in range(kv):
            qs = tuple(
                x for h in range(j * group, (j + 1) * group)
                for x in _with_bias(params, q_mod, _rows(wq, h * d, (h + 1) * d))
            )  # fmt: skip
            kb = _with_bias(params, k_mod, _rows(wk, j * d, (j + 1) * d))
            out.append(MatrixSymmetry(f"gl:{pre}qk[{j}]", "qk", qs, kb, d))
            if wo is None:
                continue
            vb = _with_bias(params, v_mod, _rows(wv, j * d, (j + 1) * d))
            os_ = tuple(_cols(wo, h * d, (h + 1) * d) for h in range(j * group, (j + 1) * group))
            out.append(MatrixSymmetry(f"gl:{pre}vo[{j}]", "vo", vb, os_, d))
    return out


def output_readers(model: nn.Module, inputs: Inputs, paths: Sequence[str]) -> dict[str, str]:
    """For each module path in ``paths``, the ``nn.Linear`` (its path) that reads the module's
    output in one traced forward pass on ``inputs``: the linear layer called with the very
    tensor the module returned (its first element when it returns a tuple) as its input.
    Modules read by no linear layer, or by more than one, are left out. The model, its buffers
    and the global RNG state are left as they were."""
    modules = dict(model.named_modules())
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (module, tensor kept alive)
    readers: dict[str, set[str]] = {}

    def on_output(path: str) -> Callable:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            first = output[0] if isinstance(output, tuple | list) and output else output
            if isinstance(first, torch.Tensor):
                produced[id(first)] = (path, first)

        return hook

    def on_input(path: str) -> Callable:
        def hook(_module: nn.Module, args: Any) -> None:
            hit = produced.get(id(args[0])) if args else None
            if hit is not None and hit[1] is args[0]:
                readers.setdefault(hit[0], set()).add(path)

        return hook

    handles = [modules[p].register_forward_hook(on_output(p)) for p in paths]
    handles += [
        m.register_forward_pre_hook(on_input(p))
        for p, m in modules.items()
        if isinstance(m, nn.Linear)
    ]
    params = {name: p.detach() for name, p in model.named_parameters()}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            call_model(model, params, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {p: next(iter(r)) for p, r in readers.items() if len(r) == 1}


def matrix_candidates(
    model: nn.Module, rescales: Sequence[Any] = (), inputs: Inputs | None = None
) -> list[MatrixSymmetry]:
    """Every candidate, unchecked: composed pairs from ``rescales`` and per-head attention pairs
    (a composed pair inside an attention module it already covers is left out); ``inputs`` as
    :func:`attention_candidates`."""
    attention = attention_candidates(model, inputs)
    covered = {p for s in attention for p in s.params}
    composed = [s for s in composed_candidates(model, rescales) if not set(s.params) <= covered]
    return composed + attention


# ------------------------------------------------------------------------------- the check
def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``value`` (nested tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, Mapping):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _loss_of(loss_fn: Callable | None, targets: Any) -> Callable[[Any], torch.Tensor]:
    def loss(out: Any) -> torch.Tensor:
        if loss_fn is not None:
            return loss_fn(out, targets)
        value = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if value is None:
            raise ValueError(
                "find_matrix_symmetries: the model returns no loss; pass targets and loss_fn."
            )
        return value

    return loss


def gl_defects(
    records: Sequence[MatrixSymmetry],
    params: Mapping[str, torch.Tensor],
    g: Mapping[str, torch.Tensor],
    generator: torch.Generator,
    n_directions: int,
) -> list[float]:
    """Per record, the largest ``|<g, xi_M>| / (|g_A| |xi_M|)`` over ``n_directions`` Gaussian M
    (float64; NaN when g_A vanishes). ``<g, xi_M> = <G_L, M L> - <G_R, M^T R>``: the blocks
    must not overlap (true of every candidate built here)."""
    out = []
    for s in records:
        left, right = (x.detach().double() for x in s.matrices(params))
        g_left, g_right = (x.detach().double() for x in s.matrices(g))
        gg = float(g_left.square().sum() + g_right.square().sum())
        if gg == 0.0:
            out.append(math.nan)
            continue
        worst = 0.0
        for _ in range(n_directions):
            m = torch.randn(s.n, s.n, generator=generator, dtype=torch.float64)
            xl, xr = m @ left, -(m.T @ right)
            dot = float((g_left * xl).sum() + (g_right * xr).sum())
            xx = float(xl.square().sum() + xr.square().sum())
            worst = max(worst, abs(dot) / math.sqrt(gg * xx))
        out.append(worst)
    return out


def check_matrix_symmetries(
    model: nn.Module,
    candidates: Sequence[MatrixSymmetry],
    inputs: Inputs,
    targets: Any = None,
    loss_fn: Callable | None = None,
    *,
    tol: float | None = None,
    n_perturb: int = 3,
    n_directions: int = 4,
    perturb_scale: float = 0.1,
    dtype: torch.dtype | None = torch.float64,
    seed: int = 0,
) -> list[MatrixSymmetry]:
    """Copies of ``candidates`` with ``verified``, ``defect`` and ``note`` set (module docstring).

    ``dtype``: the check runs on a copy of the model in it (None: the model as it is); ``tol``
    defaults to :data:`DEFAULT_TOL` of that dtype. The model, its buffers and the global RNG state
    are left unchanged.
    """
    if not candidates:
        return []
    work = model if dtype is None else copy.deepcopy(model).to(dtype)
    if dtype is not None:
        inputs, targets = _cast(inputs, dtype), _cast(targets, dtype)
    if tol is None:
        tol = DEFAULT_TOL.get(dtype, 1e-4) if dtype is not None else default_tol(model)
    as_call(inputs)
    loss = _loss_of(loss_fn, targets)
    gradient = grad(lambda p: loss(call_model(work, p, inputs)))
    params = {n: p.detach() for n, p in work.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    points = [params] + [perturbed(params, perturb_scale, gen) for _ in range(n_perturb)]
    found: list[list[float]] = [[] for _ in candidates]
    directions = torch.Generator().manual_seed(seed + 1)
    for i, q in enumerate(points):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            g = gradient(q)
        for k, d in enumerate(gl_defects(candidates, q, g, directions, n_directions)):
            if not math.isnan(d):
                found[k].append(d)
    where = f"real + {n_perturb} perturbed points, {n_directions} random M each (seed {seed})"
    out = []
    for s, ds in zip(candidates, found):
        if not ds:
            out.append(dataclasses.replace(s, verified=None, note=f"zero gradient over {where}"))
            continue
        d = max(ds)
        ok = d <= tol
        verdict = "verified" if ok else "FAILED"
        note = f"{verdict}: GL defect {d:.1e} {'<=' if ok else '>'} tol {tol:.0e} over {where}"
        out.append(dataclasses.replace(s, verified=ok, defect=d, note=note))
    return out


def find_matrix_symmetries(
    model: nn.Module,
    inputs: Inputs,
    targets: Any = None,
    loss_fn: Callable | None = None,
    *,
    rescales: Sequence[Any] | None = None,
    keep_failed: bool = False,
    **check: Any,
) -> list[MatrixSymmetry]:
    """The GL(n) symmetries of ``loss_fn(model(inputs), targets)`` (or of the model's own
    ``output.loss`` without a ``loss_fn``) that pass the numerical check.

    Args:
        model, inputs, targets, loss_fn: as :func:`~noether_dyn.symmetries.find_symmetries`.
        rescales: layer-level symmetries to start from (default: ``find_symmetries`` on the same
            batch); only ``kind == "rescale"`` records are used.
        keep_failed: also return the candidates that failed, with ``verified=False``.
        check: keyword arguments of :func:`check_matrix_symmetries` (``tol``, ``n_perturb``,
            ``n_directions``, ``dtype``, ``seed``).

    Returns:
        :class:`MatrixSymmetry` records, composed pairs first, then attention heads by module.
    """
    if rescales is None:
        from noether_dyn.symmetries.detect import find_symmetries

        rescales = find_symmetries(model, inputs, targets=targets, loss_fn=loss_fn)
    checked = check_matrix_symmetries(
        model, matrix_candidates(model, rescales, inputs), inputs, targets, loss_fn, **check
    )
    return [s for s in checked if keep_failed or s.verified]
