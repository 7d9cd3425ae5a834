"""The maths of projected training, pure functions: ``P_top g`` (eq. 1), ``(I − P_top) g`` and the
low-rank Newton direction ``V (Λ + δ)⁻¹ Vᵀ g`` (eq. 11)."""

from __future__ import annotations

import torch

__all__ = ["lowrank_newton_direction", "project_bulk", "project_top"]


def project_top(g: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``P_top g = V Vᵀ g`` (eq. 1): the part of ``g`` in ``span(V)``, ``V`` orthonormal ``(p, k)``.

    >>> V = torch.tensor([[1.0], [0.0]]); project_top(torch.tensor([3.0, 4.0]), V)
    tensor([3., 0.])
    """
    return V @ (V.T @ g)


def project_bulk(g: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``(I − V Vᵀ) g``: the part of ``g`` orthogonal to ``span(V)`` (the "bulk").

    >>> V = torch.tensor([[1.0], [0.0]]); project_bulk(torch.tensor([3.0, 4.0]), V)
    tensor([0., 4.])
    """
    return g - V @ (V.T @ g)


def lowrank_newton_direction(g: torch.Tensor, values: torch.Tensor, V: torch.Tensor,
                             damping: float = 0.0, rcond: float = 1e-6) -> torch.Tensor:
    """``V (Λ + δ)⁻¹ Vᵀ g``: Newton's step inside ``span(V)`` (eq. 11 with damping ``δ``).

    Guard: a direction whose damped curvature ``λ_i + δ`` is not above ``rcond · max_j |λ_j|``
    (a non-positive or vanishing eigenvalue, where Newton would climb or jump) is left out, as a
    pseudo-inverse does; the step is then zero along it.

    Args:
        g: ``(p,)`` gradient.
        values: ``(k,)`` eigenvalues ``λ_i`` belonging to the columns of ``V``.
        V: ``(p, k)`` orthonormal eigenvectors.
        damping: ``δ ≥ 0`` added to every eigenvalue.
        rcond: relative floor of the curvatures kept.

    Raises:
        ValueError: negative ``damping`` or ``rcond``, or ``values`` not of length ``k``.

    >>> V = torch.eye(3)[:, :2]; lam = torch.tensor([4.0, -1.0])
    >>> lowrank_newton_direction(torch.tensor([8.0, 1.0, 5.0]), lam, V)
    tensor([2., 0., 0.])
    """
    if damping < 0 or rcond < 0:
        raise ValueError(f"damping and rcond must be non-negative, got {damping} and {rcond}")
    if values.shape != (V.shape[1],):
        raise ValueError(f"values must have shape ({V.shape[1]},) to match V, got "
                         f"{tuple(values.shape)}")
    curvature = values.to(g.dtype) + damping
    floor = rcond * float(values.abs().max()) if values.numel() else 0.0
    inverse = torch.where(curvature > floor, 1.0 / curvature, torch.zeros_like(curvature))
    return V @ (inverse * (V.T @ g))
