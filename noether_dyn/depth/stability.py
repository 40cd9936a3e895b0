"""Training-stability diagnostic for residual nets: per-layer stability factor and stable step.

A residual layer y <- y + h f_j(y) is one forward-Euler step of y' = f_j(y). Linearized at the
state y_j entering it, the step multiplies a perturbation along an eigenvector of the branch
Jacobian F_j = df_j/dy (eigenvalue lambda) by 1 + h lambda. Haber & Ruthotto ("Stable
architectures for deep neural networks", Inverse Problems 34, 2018) ask for

* a stable ODE, max Re lambda <= 0 (reported as ``max_real``, a growth rate per unit time), and
* a stable step, |1 + h lambda| <= 1 for every lambda (reported as ``stability`` =
  max |1 + h lambda|, dimensionless; > 1 means some direction grows through the layer).

The largest step that satisfies the second condition is
``h_max = min over lambda != 0 of -2 Re(lambda) / |lambda|^2`` when every Re lambda < 0, and 0
when any eigenvalue has Re lambda >= 0 with lambda != 0 (no positive step is stable:
imaginary eigenvalues, as in Hamiltonian fields, are never damped by forward Euler; Hairer,
Lubich, Wanner, "Geometric Numerical Integration", §I.1). The smallest h_max over the layers is
the step the net tolerates; ``h / h_max`` > 1 flags the layers that exceed it.

Use on your own residual net: wrap each residual branch in :class:`Residual` (``y + h
branch(y)``; a standard ResNet block has h = 1), stack them in a :class:`ResidualStack`, and
call :func:`stability_profile` (or :func:`noether_dyn.depth.profile`, whose ``stability`` column
is the same factor, for ``Monitor.log_depth_profile``) at the steps you want to follow.
Cost: one dense Jacobian (dim x dim) and its eigenvalues per sample and layer, O(batch L dim^3);
a handful of samples suffices (the columns are worst cases over the batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import jacrev, vmap

COLUMNS = ("layer", "h", "stability", "max_real", "h_max")


def amplification(eigvals: torch.Tensor, h: float) -> torch.Tensor:
    """max_i |1 + h lambda_i| over the last axis; eigvals (..., d) complex or real -> (...)."""
    return (1 + h * eigvals).abs().amax(-1)


def largest_stable_step(eigvals: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """sup{h >= 0 : max_i |1 + h lambda_i| <= 1} over the last axis; (..., d) -> (...).

    |1 + h lambda|^2 = 1 + 2 h Re(lambda) + h^2 |lambda|^2 <= 1 iff h <= -2 Re(lambda)/|lambda|^2,
    so each eigenvalue with Re < 0 allows that much, lambda = 0 allows any h (inf), and any other
    eigenvalue allows only h = 0. ``atol`` treats |lambda| <= atol as 0 (rounding of a
    singular Jacobian).
    """
    lam = torch.as_tensor(eigvals).to(torch.complex128)
    mod2 = lam.real**2 + lam.imag**2
    bound = torch.where(lam.real < 0, -2 * lam.real / mod2, torch.zeros_like(mod2))
    bound = torch.where(mod2.sqrt() <= atol, torch.full_like(mod2, float("inf")), bound)
    return bound.amin(-1)


def branch_eigvals(field: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the per-sample Jacobian df/dy at y; y (batch, dim) -> (batch, dim) complex."""
    with torch.no_grad():
        jac = vmap(jacrev(field))(y)
        return torch.linalg.eigvals(jac)


class Residual(nn.Module):
    """y -> y + h branch(y): one forward-Euler step of y' = branch(y).

    Args:
        branch: shape-preserving module (batch, dim) -> (batch, dim), e.g. a ResNet block's
            residual path.
        h: step size; 1 for a standard ResNet block.
    """

    def __init__(self, branch: nn.Module, h: float = 1.0) -> None:
        super().__init__()
        self.branch, self.h = branch, float(h)

    def vector_field(self, y: torch.Tensor) -> torch.Tensor:
        """f(y) = branch(y), (..., dim) -> (..., dim)."""
        return self.branch(y)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        return y + self.h * self.branch(y)


class ResidualStack(nn.Module):
    """A chain of :class:`Residual` layers held in ``layers`` (what :func:`stability_profile`
    and :func:`noether_dyn.depth.profile` read)."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """(batch, dim) -> (batch, dim)."""
        for layer in self.layers:
            y = layer(y)
        return y


def _residual_layers(model: nn.Module) -> list[nn.Module]:
    layers = list(getattr(model, "layers", []))
    if not layers or not all(hasattr(m, "vector_field") and hasattr(m, "h") for m in layers):
        raise TypeError(
            f"stability_profile: {type(model).__name__} needs `layers` whose every entry has "
            "`vector_field` and `h` (y + h f(y)); wrap your blocks as "
            "ResidualStack([Residual(block_branch, h=1.0), ...])"
        )
    return layers


def stability_profile(model: nn.Module, x: torch.Tensor) -> pd.DataFrame:
    """Per residual layer j, at the states the batch x reaches (worst case over the batch).

    Args:
        model: a net whose ``layers`` all have ``vector_field`` and ``h`` (EulerResNet,
            :class:`ResidualStack`).
        x: inputs y_0, shape (batch, dim).

    Returns:
        DataFrame, one row per layer: ``layer``, ``h``, ``stability`` = max |1 + h lambda(F_j)|
        (largest over the batch), ``max_real`` = max Re lambda(F_j) (1/time, largest over the
        batch), ``h_max`` = largest stable step (smallest over the batch; 0 when an eigenvalue
        has Re >= 0).
    """
    layers = _residual_layers(model)
    rows, y = [], x.detach()
    for j, layer in enumerate(layers):
        lam = branch_eigvals(layer.vector_field, y)
        rows.append(
            {
                "layer": j,
                "h": layer.h,
                "stability": float(amplification(lam, layer.h).amax()),
                "max_real": float(lam.real.amax()),
                "h_max": float(largest_stable_step(lam).amin()),
            }
        )
        with torch.no_grad():
            y = layer(y)
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype({"layer": np.int64})


def stable_step(table: pd.DataFrame) -> float:
    """The step the whole net tolerates: the smallest ``h_max`` over the layers of a
    :func:`stability_profile` table."""
    return float(table["h_max"].min())
