"""Scalar potentials with analytic gradients, the learned parts of a separable Hamiltonian.

Each module exposes ``energy(x)`` (shape (..., n) -> (...)) and ``grad(x)`` (shape-preserving).
A symplectic layer only ever calls ``grad``: an explicit closed form keeps the layer one cheap,
explicit step, and any gradient field of a scalar potential keeps the step exactly symplectic
(its Jacobian, the Hessian, is symmetric; THEORY.md §5).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from noether_dyn.depth.integrators import Gradient


class LogCoshPotential(nn.Module):
    """V(x) = sum_k a_k log cosh((K x + b)_k), grad V(x) = K^T (a * tanh(K x + b)).

    Args:
        n: input size (the q or p half of the state).
        width: number of log-cosh units k (rows of K).
        init_std: standard deviation of the Gaussian init of K; defaults to 1/sqrt(width), so
            that the Hessian K^T diag(a sech^2) K is O(1) at init whatever the width.

    ``a`` starts at 1 (a convex potential: oscillatory, not hyperbolic, at init), ``b`` at 0.
    """

    def __init__(self, n: int, width: int, init_std: float | None = None) -> None:
        super().__init__()
        std = 1.0 / math.sqrt(width) if init_std is None else init_std
        self.K = nn.Parameter(torch.randn(width, n) * std)
        self.b = nn.Parameter(torch.zeros(width))
        self.a = nn.Parameter(torch.ones(width))

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """V(x), shape (..., n) -> (...)."""
        z = x @ self.K.T + self.b
        log_cosh = torch.logaddexp(z, -z) - math.log(2.0)
        return (self.a * log_cosh).sum(-1)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """grad V(x) = K^T (a * tanh(K x + b)), shape (..., n) -> (..., n)."""
        return (self.a * torch.tanh(x @ self.K.T + self.b)) @ self.K


class QuadraticKinetic(nn.Module):
    """T(p) = |p|^2 / 2 (unit mass), grad T(p) = p; no parameters."""

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """T(p), shape (..., n) -> (...)."""
        return 0.5 * (x * x).sum(-1)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """grad T(p) = p."""
        return x


class FixedGradient(nn.Module):
    """A known potential given by its gradient (e.g. the pendulum's grad V(q) = sin q).

    Args:
        grad_fn: x -> grad F(x), shape-preserving.
    """

    def __init__(self, grad_fn: Gradient) -> None:
        super().__init__()
        self.grad_fn = grad_fn

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """grad F(x), shape-preserving."""
        return self.grad_fn(x)
