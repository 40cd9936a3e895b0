"""Per-layer diagnostics of a deep net read as an integrator, and the two invariants
(docs/theory.md §5).

Notation: y_0 = x, y_{j+1} = layer_j(y_j), L = depth, A_j = d layer_j / dy at y_j (per sample),
M_j = dy_L/dy_j = A_{L-1} ... A_j (backward sensitivity), J = [[0, I], [-I, 0]].

* :func:`profile`: one row per layer j = 0..L-1 (the state y_j entering layer j).
* :func:`adjoint_pairing`: p_j . dx_j with p_j = dL/dy_j (vector-Jacobian products) and
  dx_j = dy_j/dy_0 dx_0 (Jacobian-vector products). Equal at every j for *any* net, since
  p_j . dx_j = g^T M_j (dy_j/dy_0) dx_0 = g^T (dy_L/dy_0) dx_0: the discrete Noether charge of the
  adjoint (costate) system, conserved exactly.
* :func:`symplectic_form`: omega(u_j, v_j) = u_j^T J v_j of two forward tangents. Constant in j
  iff every A_j preserves omega, i.e. for symplectic nets (Hairer, Lubich, Wanner, "Geometric
  Numerical Integration", §VI.2), not for residual or plain nets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import jacrev, jvp, vmap

from noether_dyn.depth.stability import amplification, branch_eigvals

Loss = Callable[[torch.Tensor], torch.Tensor]
"""y_L of shape (batch, dim) -> scalar loss."""

COLUMNS = ("layer", "sigma_max", "sigma_min", "defect", "transmission", "stability")


def _layers(model: nn.Module) -> Sequence[nn.Module]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(
            f"{type(model).__name__} has no `layers`; profile needs a stack of shape-preserving "
            "layers such as SymplecticNet, EulerResNet or TanhMLP"
        )
    return list(layers)


def _sum_loss(y: torch.Tensor) -> torch.Tensor:
    return y.sum()


def poisson_matrix(dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """J = [[0, I], [-I, 0]] of shape (dim, dim), dim even (first half q, second half p)."""
    if dim % 2:
        raise ValueError(f"dim={dim} must be even for a symplectic form")
    n = dim // 2
    eye = torch.eye(n, dtype=dtype)
    zero = torch.zeros(n, n, dtype=dtype)
    return torch.cat([torch.cat([zero, eye], 1), torch.cat([-eye, zero], 1)], 0)


def symplecticity_defect(m: torch.Tensor) -> torch.Tensor:
    """|M^T J M - J|_F / |J|_F per matrix; m of shape (..., dim, dim) -> (...). Zero iff M is
    symplectic; dimensionless."""
    j = poisson_matrix(m.shape[-1], m.dtype)
    return torch.linalg.matrix_norm(m.mT @ j @ m - j) / torch.linalg.matrix_norm(j)


def layer_jacobians(
    model: nn.Module, x: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """States [y_0..y_L] (each (batch, dim)) and per-sample layer Jacobians [A_0..A_{L-1}]
    (each (batch, dim, dim)), via torch.func.jacrev vmapped over the batch."""
    ys, jacs = [x.detach()], []
    with torch.no_grad():
        for layer in _layers(model):
            jacs.append(vmap(jacrev(layer))(ys[-1]))
            ys.append(layer(ys[-1]))
    return ys, jacs


def sensitivities(jacs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Backward sensitivities [M_0..M_{L-1}], M_j = A_{L-1} ... A_j, each (batch, dim, dim)."""
    out: list[torch.Tensor] = []
    m = torch.eye(jacs[0].shape[-1], dtype=jacs[0].dtype).expand_as(jacs[0])
    for a in reversed(jacs):
        m = m @ a
        out.append(m)
    return out[::-1]


def _stability(layer: nn.Module, y: torch.Tensor) -> float:
    field = getattr(layer, "vector_field", None)
    if field is None:
        return float("nan")
    return float(amplification(branch_eigvals(field, y), layer.h).amax())


def profile(model: nn.Module, x: torch.Tensor, loss_fn: Loss | None = None) -> pd.DataFrame:
    """Per-layer sensitivity table of a layered net (docs/theory.md §5).

    Args:
        model: a net with ``layers`` (SymplecticNet, EulerResNet, TanhMLP, or any stack of
            shape-preserving modules).
        x: inputs y_0, shape (batch, dim). Run in float64 to read defects near 1e-15.
        loss_fn: y_L -> scalar; default L = sum of outputs.

    Returns:
        DataFrame with one row per layer j = 0..L-1 (the state y_j entering layer j):

        - ``sigma_max``, ``sigma_min``: extreme singular values of M_j = dy_L/dy_j, *worst case
          over the batch*: the smallest sigma_max and the smallest sigma_min of any sample
          (a symplectic net certifies sigma_max >= 1 for every sample).
        - ``defect``: |M_j^T J M_j - J|_F / |J|_F, largest over the batch (NaN for odd dim).
        - ``transmission``: |dL/dy_j|_F / |dL/dy_L|_F for the batch loss (norms over the whole
          (batch, dim) gradient), the gradient actually reaching layer j.
        - ``stability``: forward-Euler factor max_i |1 + h lambda_i(df_j/dy at y_j)| (Haber &
          Ruthotto 2018), largest over the batch; NaN for layers that are not residual
          y + h f(y) (symplectic and plain tanh layers).
    """
    loss_fn = _sum_loss if loss_fn is None else loss_fn
    layers = _layers(model)
    ys, jacs = layer_jacobians(model, x)
    ms = sensitivities(jacs)

    grads = adjoints(model, x, loss_fn)
    g_last = grads[-1].norm()

    rows = []
    dim = x.shape[-1]
    for j, m in enumerate(ms):
        sv = torch.linalg.svdvals(m)
        defect = float(symplecticity_defect(m).amax()) if dim % 2 == 0 else float("nan")
        rows.append(
            {
                "layer": j,
                "sigma_max": float(sv[:, 0].amin()),
                "sigma_min": float(sv[:, -1].amin()),
                "defect": defect,
                "transmission": float(grads[j].norm() / g_last),
                "stability": _stability(layers[j], ys[j]),
            }
        )
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype({"layer": np.int64})


def tangents(model: nn.Module, x: torch.Tensor, dx: torch.Tensor) -> list[torch.Tensor]:
    """Forward tangents [dx_0 = dx, ..., dx_L], dx_{j+1} = A_j dx_j (Jacobian-vector products);
    x and dx of shape (batch, dim)."""
    y, out = x.detach(), [dx]
    for layer in _layers(model):
        y, t = jvp(layer, (y,), (out[-1],))
        out.append(t.detach())
        y = y.detach()
    return out


def adjoints(model: nn.Module, x: torch.Tensor, loss_fn: Loss | None = None) -> list[torch.Tensor]:
    """Adjoints (costates) [p_0..p_L], p_j = dL/dy_j of shape (batch, dim) (vector-Jacobian
    products); default L = sum of outputs."""
    loss_fn = _sum_loss if loss_fn is None else loss_fn
    with torch.enable_grad():
        ys = [x.detach().requires_grad_(True)]
        for layer in _layers(model):
            ys.append(layer(ys[-1]))
        return [g.detach() for g in torch.autograd.grad(loss_fn(ys[-1]), ys)]


def adjoint_pairing(
    model: nn.Module, x: torch.Tensor, dx: torch.Tensor, loss_fn: Loss | None = None
) -> torch.Tensor:
    """p_j . dx_j per layer and sample, shape (L+1, batch); equal across j for any net [exact]."""
    p = adjoints(model, x, loss_fn)
    t = tangents(model, x, dx)
    return torch.stack([(pj * tj).sum(-1) for pj, tj in zip(p, t, strict=True)])


def symplectic_form(
    model: nn.Module, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """omega(u_j, v_j) = u_j^T J v_j per layer and sample, shape (L+1, batch); u, v, x of shape
    (batch, dim), dim even. Constant in j for symplectic nets only."""
    j = poisson_matrix(x.shape[-1], x.dtype)
    tu, tv = tangents(model, x, u), tangents(model, x, v)
    return torch.stack([((a @ j) * b).sum(-1) for a, b in zip(tu, tv, strict=True)])
