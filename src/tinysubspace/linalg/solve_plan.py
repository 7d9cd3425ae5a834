"""The sizes of one :func:`~tinysubspace.linalg.lanczos.top_eigenpairs` solve and the checks of its
arguments (split out of :mod:`tinysubspace.linalg.lanczos`; no behaviour of its own)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinysubspace.linalg.tolerance import check_tol_scale
from tinysubspace.operator import vector_space

__all__ = ["SolvePlan", "validate_solve"]


@dataclass(frozen=True)
class SolvePlan:
    """The sizes of one solve: ``n = skip + k`` pairs wanted, ``block`` vectors added per
    iteration, ``basis_size`` vectors before a thick restart, at most ``budget`` products, and
    ``check_steps`` products per multiplicity check."""

    n: int
    block: int
    basis_size: int
    budget: int
    check_steps: int


def validate_solve(op, *, k: int, skip: int, tol: float, init: torch.Tensor | None,
                   block_size: int | None, basis_size: int | None, max_matvecs: int | None,
                   check_steps: int, tol_scale: str) -> None:
    """The arguments of :func:`~tinysubspace.linalg.lanczos.top_eigenpairs` checked (raises
    ``TypeError`` / ``ValueError`` saying what was expected and what arrived)."""
    p = op.shape[0]
    check_tol_scale(tol_scale)
    if not isinstance(op.dtype, torch.dtype) or not op.dtype.is_floating_point:
        raise ValueError(f"the operator's dtype must be a real floating-point torch dtype, got "
                         f"{op.dtype!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not isinstance(skip, int) or skip < 0:
        raise ValueError(f"skip must be a non-negative integer, got {skip!r}")
    dim = vector_space(op).dim  # the global dimension (a sharded operator's p is local)
    if k + skip >= dim:
        raise ValueError(f"k + skip = {k + skip} must be smaller than the operator's dimension "
                         f"p = {dim}; for the whole spectrum of a small operator use "
                         "torch.linalg.eigvalsh on a dense matrix")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if init is not None and not isinstance(init, torch.Tensor):
        raise TypeError(f"init must be a torch.Tensor of shape ({p},) or ({p}, m), got "
                        f"{type(init).__name__}")
    if init is not None and (init.ndim not in (1, 2) or init.shape[0] != p):
        raise ValueError(f"init must have shape ({p},) or ({p}, m), got {tuple(init.shape)}")
    if init is not None and init.is_complex():
        raise ValueError(f"init must be real (it is converted to the operator's dtype "
                         f"{op.dtype}), got {init.dtype}")
    if init is not None and not bool(torch.isfinite(init).all()):
        raise ValueError("init has non-finite entries")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    if basis_size is not None and basis_size < k + skip + 1:
        raise ValueError(f"basis_size must exceed k + skip = {k + skip}, got {basis_size}")
    if max_matvecs is not None:
        least = max(k + skip, 1 if init is None else init.reshape(p, -1).shape[1])
        if max_matvecs < least:
            raise ValueError(f"max_matvecs must be at least k + skip = {k + skip} and at least "
                             f"the number of columns of init; got {max_matvecs} (needs {least})")
    if isinstance(check_steps, bool) or not isinstance(check_steps, int) or check_steps < 0:
        raise ValueError(f"check_steps must be a non-negative integer, got {check_steps!r}")
