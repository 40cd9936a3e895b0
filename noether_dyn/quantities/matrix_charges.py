"""Matrix-valued charges of GL(n) symmetries of linear compositions, with their exact per-step
split (Kunin et al., "Neural Mechanics", ICLR 2021, §3; Marcotte, Gribonval & Peyré, NeurIPS 2023;
for two-layer linear nets the "balancedness" of Arora, Cohen & Hazan, ICML 2018).

Both cases are a pair (L, R) of matrices with n rows that enter the loss only through
``R^T L``, which ``L -> A L``, ``R -> A^{-T} R`` leaves unchanged for every invertible n x n A:

* two linear layers with nothing between, ``y = W2 (W1 x + b1) + b2`` (torch layout, W1: n x d,
  W2: k x n): ``L = [W1, b1]`` (n x (d + 1)), ``R = W2^T`` (n x k), since
  ``W2 W1 = R^T L`` and ``(A L, A^{-T} R)`` gives the same product;
* attention's per-head bilinear form ``Q K^T = X W_Q^T W_K X^T`` (W_Q, W_K: d_head x d_model):
  ``L = W_Q``, ``R = W_K``; and its value-output product ``W_O W_V`` is the composed case with
  ``L = W_V`` (and its bias), ``R = W_O^T`` restricted to the head's columns.

The generator of ``A = I + s M`` is ``(M L, -M^T R)``; ``<g, xi> = 0`` for all M means
``G_L L^T = R G_R^T`` (an n x n identity of every gradient). The gradient-flow charge is the
n x n symmetric matrix

    C = L L^T - R R^T        (n(n+1)/2 independent entries; the trace is the layer-level
                              rescale charge, the diagonal the per-unit ones)

and, exactly for any update (dL, dR),

    C_{n+1} - C_n = (L dL^T + dL L^T - R dR^T - dR R^T) + (dL dL^T - dR dR^T)
                  =            first order              +      kinetic (ksb)

Under gradient descent ``dL = -eta (G_L + lambda L)`` (same for R) the symmetry turns the first
order term into ``-2 eta lambda C`` exactly, and the kinetic term into
``eta^2 (G_L G_L^T - G_R G_R^T) + eta^2 lambda^2 C``, so (the matrix form of docs/theory.md §3.2)

    C_{n+1} = (1 - eta lambda)^2 C_n + eta^2 (G_L G_L^T - G_R G_R^T).

Without decay the charge moves only by the kinetic term, O(eta^2) per step: small-step gradient
descent conserves it up to that and rounding. Weight decay breaks it at first order
(-2 eta lambda C), a preconditioner (Adam) through the first-order term (``G_L L^T = R G_R^T``
no longer makes it vanish once each side is divided elementwise by its own sqrt(v)).
"""

from __future__ import annotations

import torch


def composed_pair(
    w1: torch.Tensor, w2: torch.Tensor, b1: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) of ``y = W2 (W1 x + b1)``: ``L = [W1, b1]`` (n x (d [+ 1])), ``R = W2^T``.

    Args:
        w1: (n, d) first layer's weight (torch Linear layout). w2: (k, n). b1: (n,) or None.
    """
    if w1.dim() != 2 or w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
        raise ValueError(
            f"w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)}: need 2-D Linear weights with "
            "w2.shape[1] == w1.shape[0] (the shared width n)."
        )
    left = w1 if b1 is None else torch.cat([w1, b1.reshape(-1, 1)], dim=1)
    return left, w2.T


def attention_head_pairs(
    query: tuple[torch.Tensor, torch.Tensor | None],
    key: tuple[torch.Tensor, torch.Tensor | None],
    value: tuple[torch.Tensor, torch.Tensor | None],
    output_weight: torch.Tensor,
    n_heads: int,
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per head, the (L, R) pairs of its two GL(d_head) symmetries: ``"qk"`` (``L = [W_Q, b_Q]``,
    ``R = [W_K, b_K]`` restricted to the head's rows; biases ride on the input's constant 1)
    and ``"vo"`` (``L = [W_V, b_V]`` rows, ``R = W_O[:, head]^T``; softmax rows sum to 1, so
    b_V passes through attention unchanged). Separate query/key/value Linear layers of
    width ``n_heads * d_head`` (torch layout), heads contiguous, e.g. Hugging Face BERT's.

    Args:
        query, key, value: (weight (H, d_model), bias (H,) or None), H = n_heads * d_head.
        output_weight: (d_model, H), the output projection's weight.
        n_heads: number of heads; must divide H.
    """
    width = query[0].shape[0]
    if width % n_heads:
        raise ValueError(f"n_heads={n_heads} does not divide the projection width {width}.")
    d = width // n_heads

    def rows(wb: tuple[torch.Tensor, torch.Tensor | None], h: int) -> torch.Tensor:
        w, b = wb
        part = w[h * d : (h + 1) * d]
        return part if b is None else torch.cat([part, b[h * d : (h + 1) * d, None]], dim=1)

    return [
        {
            "qk": (rows(query, h), rows(key, h)),
            "vo": (rows(value, h), output_weight[:, h * d : (h + 1) * d].T),
        }
        for h in range(n_heads)
    ]


def gl_charge(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """C = L L^T - R R^T, (n, n) symmetric, in float64."""
    if left.shape[0] != right.shape[0]:
        raise ValueError(
            f"left {tuple(left.shape)} and right {tuple(right.shape)} must share dim 0 (n)."
        )
    left, right = left.to(torch.float64), right.to(torch.float64)
    return left @ left.T - right @ right.T


def gl_split(
    left: torch.Tensor, right: torch.Tensor, d_left: torch.Tensor, d_right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first order, kinetic) parts of C_{n+1} - C_n for the update (dL, dR), each (n, n)
    float64; their sum is the exact change (module docstring)."""
    L, R = left.to(torch.float64), right.to(torch.float64)
    dL, dR = d_left.to(torch.float64), d_right.to(torch.float64)
    cross = L @ dL.T - R @ dR.T
    return cross + cross.T, dL @ dL.T - dR @ dR.T


def gd_prediction(
    charge: torch.Tensor,
    grad_left: torch.Tensor,
    grad_right: torch.Tensor,
    lr: float,
    weight_decay: float = 0.0,
) -> torch.Tensor:
    """C_{n+1} under plain gradient descent with coupled L2, exact given the symmetry:
    ``(1 - eta lambda)^2 C_n + eta^2 (G_L G_L^T - G_R G_R^T)``; G_L, G_R the loss gradients in
    the (L, R) layout (for the composed case ``G_R = grad(W2)^T``)."""
    gl, gr = grad_left.to(torch.float64), grad_right.to(torch.float64)
    return (1.0 - lr * weight_decay) ** 2 * charge + lr**2 * (gl @ gl.T - gr @ gr.T)


def upper_entries(charge: torch.Tensor) -> torch.Tensor:
    """The n(n+1)/2 independent entries of a symmetric (n, n) charge, row-major upper triangle
    (the layout to store entry by entry)."""
    n = charge.shape[0]
    rows, cols = torch.triu_indices(n, n)
    return charge[rows, cols]


def batched_split(
    left: torch.Tensor, right: torch.Tensor, d_left: torch.Tensor, d_right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C_n, first order, kinetic) of B pairs at once, each (B, n, n) float64: the batched
    :func:`gl_charge` and :func:`gl_split` (one ``bmm`` per product).

    Args:
        left, d_left: (B, n, a) L_n and dL = L_{n+1} - L_n. right, d_right: (B, n, b).
    """
    L, R = left.to(torch.float64), right.to(torch.float64)
    dL, dR = d_left.to(torch.float64), d_right.to(torch.float64)
    charge = L @ L.mT - R @ R.mT
    cross = L @ dL.mT - R @ dR.mT
    return charge, cross + cross.mT, dL @ dL.mT - dR @ dR.mT
