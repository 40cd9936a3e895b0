"""Deep networks read as integrators: symplectic nets and their two baselines (docs/theory.md §5).

All three map a state of shape (batch, dim) to (batch, dim) through ``depth`` layers held in
``self.layers``; ``trajectory(x)`` returns every intermediate state y_0 = x, ..., y_L.

* :class:`SymplecticNet`: each layer is one explicit symplectic partitioned Runge-Kutta step
  (order 1, 2 or 4) on a separable Hamiltonian with learned potentials; y = (q, p).
* :class:`EulerResNet`: y <- y + h tanh(W y + b), a forward-Euler step of y' = tanh(W y + b)
  (Haber & Ruthotto, "Stable architectures for deep neural networks", Inverse Problems 34, 2018).
* :class:`TanhMLP`: y <- tanh(W y + b), no skip connection, PyTorch's default Linear init.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from noether_dyn.depth.integrators import Gradient, check_order, symplectic_step
from noether_dyn.depth.potentials import FixedGradient, LogCoshPotential, QuadraticKinetic


def _check_depth(depth: int) -> None:
    if depth < 1:
        raise ValueError(f"depth={depth} must be >= 1")


def _default_h(h: float | None, depth: int) -> float:
    _check_depth(depth)
    return 1.0 / depth if h is None else float(h)


class SymplecticLayer(nn.Module):
    """One symplectic step y = (q, p) -> (q', p') of size ``h`` on H = T(p) + V(q).

    Args:
        dim: state size (even); q = y[..., :dim//2], p = y[..., dim//2:].
        order: 1 (symplectic Euler), 2 (Stormer-Verlet) or 4 (Forest-Ruth/Yoshida).
        h: step size.
        potential: module with ``grad(q)`` (V); kinetic: module with ``grad(p)`` (T).
    """

    def __init__(
        self, dim: int, order: int, h: float, potential: nn.Module, kinetic: nn.Module
    ) -> None:
        super().__init__()
        check_order(order)
        self.dim, self.order, self.h = dim, order, h
        self.potential = potential
        self.kinetic = kinetic

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        n = self.dim // 2
        q, p = symplectic_step(
            y[..., :n], y[..., n:], self.kinetic.grad, self.potential.grad, self.h, self.order
        )
        return torch.cat([q, p], dim=-1)

    def energy(self, y: torch.Tensor) -> torch.Tensor:
        """H(y) = T(p) + V(q) of this layer, shape (..., dim) -> (...); needs ``energy`` on both
        potentials (not available for :class:`FixedGradient`)."""
        n = self.dim // 2
        return self.kinetic.energy(y[..., n:]) + self.potential.energy(y[..., :n])


class EulerLayer(nn.Module):
    """y -> y + h f(y), f(y) = tanh(W y + b); W ~ N(0, init_std^2), default init_std = 1/sqrt(dim).

    ``vector_field`` and ``h`` are what :func:`noether_dyn.depth.profile` uses for the
    forward-Euler stability factor max |1 + h lambda(df/dy)| (Haber & Ruthotto 2018).
    """

    def __init__(self, dim: int, h: float, init_std: float | None = None) -> None:
        super().__init__()
        std = 1.0 / math.sqrt(dim) if init_std is None else init_std
        self.h = h
        self.weight = nn.Parameter(torch.randn(dim, dim) * std)
        self.bias = nn.Parameter(torch.zeros(dim))

    def vector_field(self, y: torch.Tensor) -> torch.Tensor:
        """f(y) = tanh(W y + b), (..., dim) -> (..., dim)."""
        return torch.tanh(y @ self.weight.T + self.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        return y + self.h * self.vector_field(y)


class TanhLayer(nn.Module):
    """y -> tanh(W y + b) with ``nn.Linear``'s default init (uniform, variance 1/(3 dim))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        return torch.tanh(self.linear(y))


class _LayeredNet(nn.Module):
    """A stack of shape-preserving layers with a checked input size."""

    dim: int
    layers: nn.ModuleList

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (batch, {self.dim}), "
                f"got {tuple(x.shape)}; embed the input to {self.dim} features first"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, dim) -> (batch, dim)."""
        self._check(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def trajectory(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[y_0 = x, y_1, ..., y_L], each (batch, dim)."""
        self._check(x)
        ys = [x]
        for layer in self.layers:
            ys.append(layer(ys[-1]))
        return ys


class SymplecticNet(_LayeredNet):
    """``depth`` explicit symplectic steps on learned separable Hamiltonians H_j = T_j(p) + V_j(q).

    Every layer, hence the whole net, is a symplectic map for any weights: its Jacobian A
    satisfies A^T J A = J with J = [[0, I], [-I, 0]] (Hairer, Lubich, Wanner, "Geometric
    Numerical Integration", §VI.3; Forest & Ruth 1990; Yoshida 1990). Consequence
    (docs/theory.md §5): the backward sensitivity M_j = dy_L/dy_j has |M_j|_2 >= 1 at every depth.

    Args:
        dim: state size, even; first half q, second half p.
        depth: number of layers L.
        order: 1, 2 or 4.
        h: step size per layer; default 1/depth (unit total time).
        width: log-cosh units per learned potential; default dim // 2.
        kinetic: ``"quadratic"`` (T = |p|^2/2) or ``"learned"`` (a log-cosh T per layer).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        order: int,
        h: float | None = None,
        width: int | None = None,
        kinetic: str = "quadratic",
    ) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim={dim} must be even (q and p halves of equal size)")
        if kinetic not in ("quadratic", "learned"):
            raise ValueError(f"kinetic={kinetic!r}: use 'quadratic' or 'learned'")
        check_order(order)
        self.dim, self.depth, self.order = dim, depth, order
        self.h = _default_h(h, depth)
        n = dim // 2
        m = n if width is None else width
        self.layers = nn.ModuleList(
            SymplecticLayer(
                dim,
                order,
                self.h,
                LogCoshPotential(n, m),
                LogCoshPotential(n, m) if kinetic == "learned" else QuadraticKinetic(),
            )
            for _ in range(depth)
        )

    @classmethod
    def from_gradients(
        cls,
        dim: int,
        depth: int,
        order: int,
        h: float,
        grad_t: Gradient,
        grad_v: Gradient,
    ) -> SymplecticNet:
        """A net whose every layer steps one known Hamiltonian, e.g. the pendulum
        H = p^2/2 - cos q via ``grad_t = lambda p: p, grad_v = torch.sin``. Total time depth*h."""
        net = cls(dim, depth, order, h)
        kin, pot = FixedGradient(grad_t), FixedGradient(grad_v)
        net.layers = nn.ModuleList(
            SymplecticLayer(dim, order, net.h, pot, kin) for _ in range(depth)
        )
        return net

    @classmethod
    def from_potentials(
        cls,
        dim: int,
        order: int,
        h: float,
        potentials: Sequence[nn.Module],
        kinetic: nn.Module | None = None,
    ) -> SymplecticNet:
        """One layer per entry of ``potentials`` (modules with ``grad``), T = |p|^2/2 unless
        ``kinetic`` is given. Passing the same module several times shares one vector field
        across those layers (one Hamiltonian integrated for len(potentials) steps of size h)."""
        if not potentials:
            raise ValueError("potentials is empty; pass one module per layer")
        net = cls(dim, len(potentials), order, h)
        kin = QuadraticKinetic() if kinetic is None else kinetic
        net.layers = nn.ModuleList(
            SymplecticLayer(dim, order, net.h, pot, kin) for pot in potentials
        )
        return net


class EulerResNet(_LayeredNet):
    """``depth`` forward-Euler residual layers y <- y + h tanh(W_j y + b_j) (Haber & Ruthotto 2018).

    Args:
        dim: state size.
        depth: number of layers.
        h: step size; default 1/depth.
        init_std: Gaussian std of W_j; default 1/sqrt(dim).
    """

    def __init__(
        self, dim: int, depth: int, h: float | None = None, init_std: float | None = None
    ) -> None:
        super().__init__()
        self.dim, self.depth = dim, depth
        self.h = _default_h(h, depth)
        self.layers = nn.ModuleList(EulerLayer(dim, self.h, init_std) for _ in range(depth))


class TanhMLP(_LayeredNet):
    """``depth`` layers y <- tanh(W_j y + b_j) of constant width ``dim``, no skips."""

    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        _check_depth(depth)
        self.dim, self.depth = dim, depth
        self.layers = nn.ModuleList(TanhLayer(dim) for _ in range(depth))
