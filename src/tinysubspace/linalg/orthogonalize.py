"""Orthogonalisation for Krylov solvers: classical Gram–Schmidt (twice) against a basis, and
seeded random blocks drawn on the CPU (the same numbers on every device and process)."""

from __future__ import annotations

import torch

__all__ = ["orthonormalize_against", "random_block"]


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
