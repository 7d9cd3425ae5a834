"""Krylov building blocks: block orthogonalisation and the plain Lanczos tridiagonalisation.

``lanczos_tridiagonal`` is the textbook three-term recurrence with full reorthogonalisation
(PAPER.txt, Appendix A): after ``m`` steps from ``q_1``, ``Q_mᵀ A Q_m = T_m`` is tridiagonal
with diagonal ``α`` and off-diagonal ``β``. Stochastic Lanczos quadrature and the
full-dimension test use it directly; the restarted eigensolver lives in ``eigen.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Tridiagonal", "lanczos_tridiagonal", "orthonormalize_against", "random_block"]


def random_block(rows: int, cols: int, dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator) -> torch.Tensor:
    """A ``(rows, cols)`` standard normal block drawn on the CPU from ``generator``.

    Drawing on the CPU makes the numbers identical on every device and every process.
    """
    block = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return block.to(device=device, dtype=dtype)


def orthonormalize_against(block: torch.Tensor, basis: torch.Tensor | None,
                           drop_tol: float | None = None) -> torch.Tensor:
    """Orthonormal columns spanning ``(I − QQᵀ) block`` (classical Gram–Schmidt, twice).

    Columns whose component outside ``span(basis)`` (and outside the preceding columns) is
    below ``drop_tol`` times their original norm are dropped, so the result may have fewer
    columns than ``block`` (none at all if ``block ⊂ span(basis)``).

    Args:
        block: ``(p, b)``.
        basis: ``(p, m)`` with orthonormal columns, or ``None``.
        drop_tol: relative norm below which a direction counts as already spanned
            (default ``100·eps`` of the dtype, times ``sqrt(p)``).
    """
    eps = torch.finfo(block.dtype).eps
    drop_tol = drop_tol if drop_tol is not None else 100 * eps * block.shape[0] ** 0.5
    norms = block.norm(dim=0).clamp_min(torch.finfo(block.dtype).tiny)
    work = block.clone()
    for _ in range(2):
        if basis is not None and basis.shape[1] > 0:
            work -= basis @ (basis.T @ work)
    kept = []
    for j in range(work.shape[1]):
        column = work[:, j]
        for _ in range(2):
            for q in kept:
                column = column - q * (q @ column)
            if basis is not None and basis.shape[1] > 0:
                column = column - basis @ (basis.T @ column)
        norm = column.norm()
        if norm > drop_tol * norms[j]:
            kept.append(column / norm)
    if not kept:
        return block.new_zeros(block.shape[0], 0)
    return torch.stack(kept, dim=1)


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
    (``β_j ≈ 0``), which gives exact eigenvalues of ``A`` restricted to it.

    Args:
        op: a symmetric operator (``op @ v``, ``op.shape``).
        start: ``(p,)`` non-zero start vector (normalised here).
        steps: number of iterations, ``1 ≤ steps ≤ p``.
        keep_basis: return the ``(p, m)`` Lanczos basis too.

    Raises:
        ValueError: ``steps`` out of range, or a zero start vector.
    """
    p = op.shape[0]
    if not 1 <= steps <= p:
        raise ValueError(f"steps must be between 1 and p = {p}, got {steps}")
    norm = start.norm()
    if not norm > 0:
        raise ValueError("the start vector of Lanczos must be non-zero")
    Q = torch.zeros(p, steps, dtype=start.dtype, device=start.device)
    Q[:, 0] = start / norm
    alpha, beta = [], []
    for j in range(steps):
        w = op @ Q[:, j]
        alpha.append(Q[:, j] @ w)
        for _ in range(2):  # full reorthogonalisation against every previous vector
            w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        if j == steps - 1:
            break
        b = w.norm()
        scale = max(float(torch.stack(alpha).abs().max()), float(torch.finfo(start.dtype).tiny))
        if b <= 1e3 * torch.finfo(start.dtype).eps * scale:  # invariant subspace found
            break
        beta.append(b)
        Q[:, j + 1] = w / b
    m = len(alpha)
    alpha_t = torch.stack(alpha)
    beta_t = torch.stack(beta) if beta else alpha_t.new_zeros(0)
    return Tridiagonal(alpha_t, beta_t[: m - 1], Q[:, :m] if keep_basis else None)
