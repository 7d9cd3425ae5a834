"""The plain Lanczos tridiagonalisation (PAPER.txt, Appendix A).

``lanczos_tridiagonal`` is the textbook three-term recurrence with full reorthogonalisation:
after ``m`` steps from ``q_1``, ``Q_mᵀ A Q_m = T_m`` is tridiagonal with diagonal ``α`` and
off-diagonal ``β``. Stochastic Lanczos quadrature (:mod:`tinysubspace.linalg.density`) and the
full-dimension test use it directly; the restarted eigensolver is in
:mod:`tinysubspace.linalg.lanczos`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinysubspace.linalg.basis import KrylovBasis, apply_operator, working_dtype
from tinysubspace.operator import vector_space

__all__ = ["Tridiagonal", "lanczos_tridiagonal"]


@dataclass(frozen=True)
class Tridiagonal:
    """The result of ``m`` Lanczos steps: ``T = tridiag(beta, alpha, beta)`` and the basis."""

    alpha: torch.Tensor  # (m,)
    beta: torch.Tensor  # (m - 1,)
    basis: torch.Tensor | None  # (p, m) if kept

    def matrix(self) -> torch.Tensor:
        """The dense ``(m, m)`` tridiagonal matrix."""
        return (torch.diag(self.alpha) + torch.diag(self.beta, 1) + torch.diag(self.beta, -1))


def lanczos_tridiagonal(op, start: torch.Tensor, steps: int,
                        keep_basis: bool = False) -> Tridiagonal:
    """``steps`` Lanczos iterations from ``start`` with full reorthogonalisation.

    .. math::  \\beta_j q_{j+1} = A q_j - \\alpha_j q_j - \\beta_{j-1} q_{j-1},
               \\quad \\alpha_j = q_j^T A q_j

    Stops early (returning fewer steps) when the Krylov space becomes invariant
    (``β_j ≈ 0``, :meth:`~tinysubspace.linalg.basis.KrylovBasis.invariant`), which gives exact
    eigenvalues of ``A`` restricted to it. The basis is a
    :class:`~tinysubspace.linalg.basis.KrylovBasis` (float32 for a half-precision operator).

    Args:
        op: a symmetric operator (``op @ v``, ``op.shape``).
        start: ``(p,)`` non-zero start vector (normalised here).
        steps: number of iterations, ``1 ≤ steps ≤ p``.
        keep_basis: return the ``(p, m)`` Lanczos basis too.

    Raises:
        ValueError: ``steps`` out of range, or a zero start vector.
    """
    space = vector_space(op)
    p = space.dim
    if not 1 <= steps <= p:
        raise ValueError(f"steps must be between 1 and p = {p}, got {steps}")
    norm = space.norm(start)
    if not norm > 0:
        raise ValueError("the start vector of Lanczos must be non-zero")
    basis = KrylovBasis(op.shape[0], working_dtype(start.dtype), start.device, steps,
                        images=False, space=space)
    q = (start / norm).to(basis.dtype)
    alpha, beta = [], []
    while True:
        basis.append(q)
        w = apply_operator(op, q[:, None], basis.size - 1)[:, 0]
        f, h = basis.orthogonal_part(w)  # full reorthogonalisation against every previous q
        alpha.append(h[-1])
        if basis.size == steps:
            break
        b = space.norm(f)
        scale = max(float(torch.stack(alpha).abs().max()), float(space.norm(w)))
        if basis.invariant(float(b), scale):  # invariant subspace found
            break
        beta.append(b)
        q = f / b
    alpha_t = torch.stack(alpha).to(start.dtype)
    beta_t = torch.stack(beta).to(start.dtype) if beta else alpha_t.new_zeros(0)
    return Tridiagonal(alpha_t, beta_t, basis.Q.to(start.dtype) if keep_basis else None)
