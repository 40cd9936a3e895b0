"""Scalar potentials with analytic gradients, the learned parts of a separable Hamiltonian.

Each module exposes ``energy(x)`` (shape (..., n) -> (...)) and ``grad(x)`` (shape-preserving).
A symplectic layer only ever calls ``grad``: an explicit closed form keeps the layer one cheap,
explicit step, and any gradient field of a scalar potential keeps the step exactly symplectic
(its Jacobian, the Hessian, is symmetric; docs/theory.md §5).
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


class PolynomialPotential(nn.Module):
    """V(x) = sum_i sum_{k=1..degree} c_ik x_i^k, a sum of one-coordinate polynomials.

    Contains every uniform force field (degree 1, e.g. gravity g q) and every uncoupled harmonic
    one (degree 2) exactly, so a net built on it can extrapolate beyond its training states when
    the physics is of that form. ``c`` (n, degree) starts at 0.
    """

    def __init__(self, n: int, degree: int) -> None:
        super().__init__()
        if degree < 1:
            raise ValueError(f"degree={degree} must be >= 1")
        self.c = nn.Parameter(torch.zeros(n, degree))

    def _powers(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.arange(self.c.shape[1], device=x.device, dtype=x.dtype)
        return x[..., None] ** k  # x^0 .. x^(degree-1), shape (..., n, degree)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """V(x), shape (..., n) -> (...)."""
        return (self.c * self._powers(x) * x[..., None]).sum((-1, -2))

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """dV/dx_i = sum_k k c_ik x_i^(k-1), shape-preserving."""
        k = torch.arange(1, self.c.shape[1] + 1, device=x.device, dtype=x.dtype)
        return (k * self.c * self._powers(x)).sum(-1)


class FourierPotential(nn.Module):
    """V(x) = sum_i sum_{k=1..modes} (a_ik cos(k x_i) + b_ik sin(k x_i)), 2 pi-periodic in each
    coordinate: the family of an angle (a pendulum's V = -cos q is a_11 = -1). ``a``, ``b``
    (n, modes) start at 0."""

    def __init__(self, n: int, modes: int) -> None:
        super().__init__()
        if modes < 1:
            raise ValueError(f"modes={modes} must be >= 1")
        self.a = nn.Parameter(torch.zeros(n, modes))
        self.b = nn.Parameter(torch.zeros(n, modes))

    def _angles(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.arange(1, self.a.shape[1] + 1, device=x.device, dtype=x.dtype)
        return k, x[..., None] * k

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """V(x), shape (..., n) -> (...)."""
        _, kx = self._angles(x)
        return (self.a * torch.cos(kx) + self.b * torch.sin(kx)).sum((-1, -2))

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """dV/dx_i = sum_k k (b_ik cos(k x_i) - a_ik sin(k x_i)), shape-preserving."""
        k, kx = self._angles(x)
        return (k * (self.b * torch.cos(kx) - self.a * torch.sin(kx))).sum(-1)


class CentralPotential(nn.Module):
    """V(x) = sum_{k=1..order} c_k |x|^(-k), a central field (Kepler's V = -mu/|x| is c_1 = -mu).

    Its force is parallel to x, so symplectic steps on it also conserve the angular momentum
    x ^ p exactly (the kick and the drift each do). ``c`` starts at (-1, 0, ..., 0).
    """

    def __init__(self, order: int = 2) -> None:
        super().__init__()
        if order < 1:
            raise ValueError(f"order={order} must be >= 1")
        self.c = nn.Parameter(torch.zeros(order))
        with torch.no_grad():
            self.c[0] = -1.0

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """V(x), shape (..., d) -> (...)."""
        r = x.norm(dim=-1, keepdim=True)
        k = torch.arange(1, self.c.shape[0] + 1, device=x.device, dtype=x.dtype)
        return (self.c * r ** (-k)).sum(-1)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """grad V = -sum_k k c_k |x|^(-k-2) x, shape-preserving."""
        r = x.norm(dim=-1, keepdim=True)
        k = torch.arange(1, self.c.shape[0] + 1, device=x.device, dtype=x.dtype)
        return -(k * self.c * r ** (-k - 2)).sum(-1, keepdim=True) * x


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
