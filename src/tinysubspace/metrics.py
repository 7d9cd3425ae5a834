"""The paper's measurements, as pure functions of tensors (equation numbers of PAPER.txt).

>>> import torch
>>> g = torch.tensor([3.0, 4.0, 0.0])
>>> V = torch.eye(3)[:, :1]
>>> round(top_fraction(g, V), 6)   # |3|^2 / |(3, 4, 0)|^2
0.36
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "eigenvector_overlaps",
    "gradient_overlap",
    "orthonormality_error",
    "project",
    "subspace_overlap",
    "top_fraction",
]


def orthonormality_error(V: torch.Tensor) -> float:
    """``max |VᵀV − I|``: how far the columns of ``V`` are from orthonormal."""
    gram = V.T @ V
    return float((gram - torch.eye(V.shape[1], dtype=V.dtype, device=V.device)).abs().max())


def _check_basis(V: torch.Tensor, name: str, atol: float | None) -> None:
    if V.ndim != 2:
        raise ValueError(f"{name} must be a (p, k) matrix of orthonormal columns, got shape "
                         f"{tuple(V.shape)}")
    if V.shape[1] == 0:
        raise ValueError(f"{name} has no columns: a subspace of dimension 0")
    tol = atol if atol is not None else max(1e-6, 1e3 * torch.finfo(V.dtype).eps)
    error = orthonormality_error(V)
    if not error <= tol:
        raise ValueError(f"the columns of {name} must be orthonormal (max |VᵀV − I| = "
                         f"{error:.2e} > {tol:.1e}); orthonormalise them first, e.g. with "
                         "torch.linalg.qr")


def _check_vector(g: torch.Tensor, name: str, p: int | None = None,
                  other: str | None = None) -> None:
    if g.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector, got shape {tuple(g.shape)}")
    if p is not None and g.shape[0] != p:
        expected = f"the basis has {p} rows" if other is None else f"{other} has length {p}"
        raise ValueError(f"{name} has length {g.shape[0]} but {expected}")
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"{name} has non-finite entries")


def _nonzero_norm(g: torch.Tensor, name: str) -> float:
    norm = float(g.norm())
    if norm == 0.0:
        raise ValueError(f"{name} is the zero vector: the quantity is undefined")
    return norm


def project(g: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``P_top g = V Vᵀ g`` for orthonormal columns ``V`` (eq. 1 with ``P_top = V Vᵀ``)."""
    return V @ (V.T @ g)


def top_fraction(g: torch.Tensor, V: torch.Tensor, atol: float | None = None) -> float:
    """Fraction of the gradient in the subspace ``span(V)`` (eq. 2).

    .. math::  f_{top} = \\frac{\\|P_{top} g\\|^2}{\\|g\\|^2} = \\frac{\\|V^T g\\|^2}{\\|g\\|^2}

    Args:
        g: gradient ``(p,)``.
        V: ``(p, k)`` with orthonormal columns (checked to ``atol``).

    Raises:
        ValueError: wrong shapes, ``V`` not orthonormal, ``g`` zero or non-finite.
    """
    _check_basis(V, "V", atol)
    _check_vector(g, "g", V.shape[0])
    norm = _nonzero_norm(g, "g")
    return float((V.T @ g).square().sum()) / norm**2


def eigenvector_overlaps(g: torch.Tensor, V: torch.Tensor,
                         atol: float | None = None) -> torch.Tensor:
    """Squared overlaps ``c_i² = (v_iᵀ g)² / ‖g‖²`` of ``g`` with each column of ``V`` (eq. 12).

    ``sum(c_i²)`` over the columns of an orthonormal ``V`` equals :func:`top_fraction`.

    Returns:
        ``(k,)`` tensor of ``c_i²``.
    """
    _check_basis(V, "V", atol)
    _check_vector(g, "g", V.shape[0])
    norm = _nonzero_norm(g, "g")
    return (V.T @ g).square() / norm**2


def gradient_overlap(g: torch.Tensor, Hg: torch.Tensor) -> float:
    """Cosine between the gradient and the Hessian-gradient product (eq. 3).

    .. math::  \\mathrm{overlap}(g, Hg) = \\frac{g^T H g}{\\sqrt{g^T g}\\,\\sqrt{g^T H^2 g}}

    Raises:
        ValueError: shapes differ, a vector is zero or non-finite.
    """
    _check_vector(g, "g")
    _check_vector(Hg, "Hg", g.shape[0], other="g")
    return float(g @ Hg) / (_nonzero_norm(g, "g") * _nonzero_norm(Hg, "Hg"))


def subspace_overlap(V1: torch.Tensor, V2: torch.Tensor, atol: float | None = None) -> float:
    """Overlap of two subspaces, possibly of different dimensions (eq. 5).

    .. math::  \\mathrm{overlap}(V_1, V_2) = \\frac{\\mathrm{Tr}(P_1 P_2)}
               {\\sqrt{\\mathrm{Tr}(P_1)\\,\\mathrm{Tr}(P_2)}}
               = \\frac{\\|V_1^T V_2\\|_F^2}{\\sqrt{k_1 k_2}}

    Equal to 1 for the same subspace, 0 for orthogonal ones; for ``k1 ≠ k2`` at most
    ``sqrt(min(k1, k2) / max(k1, k2))``.
    """
    _check_basis(V1, "V1", atol)
    _check_basis(V2, "V2", atol)
    if V1.shape[0] != V2.shape[0]:
        raise ValueError(f"V1 and V2 live in spaces of different dimension: {V1.shape[0]} and "
                         f"{V2.shape[0]} rows")
    k1, k2 = V1.shape[1], V2.shape[1]
    return float((V1.T @ V2).square().sum()) / math.sqrt(k1 * k2)
