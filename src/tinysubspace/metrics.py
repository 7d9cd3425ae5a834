"""The paper's measurements, as pure functions of tensors (equation numbers of PAPER.txt).

>>> import torch
>>> g = torch.tensor([3.0, 4.0, 0.0])
>>> V = torch.eye(3)[:, :1]
>>> round(top_fraction(g, V), 6)   # |3|^2 / |(3, 4, 0)|^2
0.36

**Vectors held as shards.** An operator whose vectors are sharded over ranks (an FSDP2 model's
:class:`~tinysubspace.curvature.sharded.ShardedHessianOperator`) gives each rank the local rows
of ``g``, ``H g`` and the eigenvectors; the inner products must then be summed over ranks (its
``vector_space``). A caller need not say so: the objects that come from the operator carry it —
:class:`~tinysubspace.Eigenpairs` (their ``space``) stand wherever a basis ``V`` does
(``top_fraction(g, eig)``, ``subspace_overlap(eig_1, eig_2)``), and the operator itself stands
for ``H g`` (``gradient_overlap(g, op)``: ``H g`` is computed, in the operator's space). Plain
tensors are local vectors, exactly as before; ``space=`` (a space or an operator) says it
explicitly, e.g. for a slice ``eig.vectors[:, :k]``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

__all__ = [
    "eigenvector_displacement",
    "eigenvector_overlaps",
    "gradient_overlap",
    "orthonormality_error",
    "principal_angles",
    "project",
    "subspace_overlap",
    "top_fraction",
]


def _space_of(item: Any) -> Any:
    """The inner product ``item`` declares: a space itself (anything with ``gram``), an
    operator's ``vector_space``, eigenpairs' ``space``; ``None`` for a tensor. A plain local
    space (``space.sharded`` false) counts as ``None`` (plain tensor algebra, the same numbers
    as without one); a space that does not say is taken as sharded."""
    if isinstance(item, torch.Tensor) or item is None:
        return None
    space = item if hasattr(item, "gram") else getattr(item, "vector_space", None)
    if space is None and not hasattr(item, "vector_space"):
        space = getattr(item, "space", None)
    return None if space is None or not getattr(space, "sharded", True) else space


def _resolve_space(space: Any, *items: Any) -> Any:
    """``space`` (a space or an operator) if given, else the one space the non-tensor
    ``items`` (eigenpairs, operators) carry, else ``None``: local tensors.

    Raises:
        ValueError: the items carry spaces of different kinds or dimensions.
    """
    if space is not None:
        return _space_of(space)
    found = [s for s in (_space_of(item) for item in items) if s is not None]
    for other in found[1:]:
        if type(other) is not type(found[0]) or other.dim != found[0].dim:
            raise ValueError(f"the inputs carry different vector spaces: {type(found[0]).__name__}"
                             f" of dimension {found[0].dim} and {type(other).__name__} of "
                             f"dimension {other.dim}")
    return found[0] if found else None


def _basis(V: Any) -> Any:
    """A basis argument's tensor: ``V`` itself, or the ``vectors`` of eigenpairs."""
    return V if isinstance(V, torch.Tensor) else getattr(V, "vectors", V)


def _gram(A: torch.Tensor, B: torch.Tensor, space: Any = None) -> torch.Tensor:
    """``Aᵀ B``; with ``space`` (an operator's ``vector_space``, e.g. vectors sharded over
    ranks: :class:`~tinysubspace.curvature.sharded.ShardedSpace`) its inner product
    ``space.gram(A, B)``, the sum over ranks of the local rows' products."""
    if space is None:
        return A.T @ B if A.ndim == 2 else A @ B
    return space.gram(A, B)


def orthonormality_error(V: torch.Tensor, space: Any = None) -> float:
    """``max |VᵀV − I|``: how far the columns of ``V`` are from orthonormal, with ``VᵀV``
    accumulated in float64 (at least): a float32 Gram matrix of long columns carries a rounding
    error of order ``ε₃₂ √p`` or worse (0.02 for two columns of ``±1/√p`` with ``p = 2·10⁶``),
    which would call a basis that is orthonormal to 1e-7 not orthonormal."""
    space, V = _resolve_space(space, V), _basis(V)
    W = V.to(torch.promote_types(V.dtype, torch.float64))
    gram = _gram(W, W, space)
    return float((gram - torch.eye(V.shape[1], dtype=W.dtype, device=W.device)).abs().max())


def default_basis_atol(V: torch.Tensor) -> float:
    """The ``max |VᵀV − I|`` a basis may have when no ``atol`` is given:
    ``max(1e-6, 10³ ε, 10 √p ε)`` for ``V`` of ``p`` rows in a dtype of machine epsilon ``ε``.
    The last term is the rounding that orthogonalising columns of length ``p`` leaves (float32
    eigenvectors of a 1.2M-parameter model are orthonormal to about 1e-4, not 1.2e-4 · 10⁻³)."""
    eps = torch.finfo(V.dtype).eps
    return max(1e-6, 1e3 * eps, 10 * math.sqrt(V.shape[0]) * eps)


def _check_tensor(x: object, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name} must be real, got {x.dtype}")


def _common(**tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The inputs in one floating dtype — the widest of theirs (``torch.promote_types``; the
    default float dtype if all are integer), so a float32 vector against a float64 basis is
    computed in float64 — after checking that they share a device.

    Raises:
        ValueError: the inputs are on different devices (the devices are named).
    """
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"the inputs must be on one device, got {where}; move them with .to()")
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors.values()))
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return tuple(t.to(dtype) for t in tensors.values())


def _check_basis(V: torch.Tensor, name: str, atol: float | None, space: Any = None) -> None:
    _check_tensor(V, name)
    if V.ndim != 2:
        raise ValueError(f"{name} must be a (p, k) matrix of orthonormal columns, got shape "
                         f"{tuple(V.shape)}")
    if V.shape[1] == 0:
        raise ValueError(f"{name} has no columns: a subspace of dimension 0")
    tol = atol if atol is not None else default_basis_atol(V)
    error = orthonormality_error(V, space)
    if not error <= tol:
        raise ValueError(f"the columns of {name} must be orthonormal (max |VᵀV − I| = "
                         f"{error:.2e} > {tol:.1e}); orthonormalise them first, e.g. with "
                         "torch.linalg.qr")


def _check_vector(g: torch.Tensor, name: str, p: int | None = None,
                  other: str | None = None) -> None:
    _check_tensor(g, name)
    if g.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector, got shape {tuple(g.shape)}")
    if p is not None and g.shape[0] != p:
        expected = f"the basis has {p} rows" if other is None else f"{other} has length {p}"
        raise ValueError(f"{name} has length {g.shape[0]} but {expected}")
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"{name} has non-finite entries")


def _nonzero_norm(g: torch.Tensor, name: str, space: Any = None) -> float:
    norm = float(g.norm()) if space is None else float(space.norm(g))
    if norm == 0.0:
        raise ValueError(f"{name} is the zero vector: the quantity is undefined")
    return norm


def project(g: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``P_top g = V Vᵀ g`` for orthonormal columns ``V`` (eq. 1 with ``P_top = V Vᵀ``; not
    checked here: this is the hot path of projected training), in the wider of the two dtypes.

    Raises:
        ValueError: ``V`` not 2-D, ``g``'s length not ``V``'s row count, or different devices.
    """
    _check_tensor(g, "g")
    _check_tensor(V, "V")
    if V.ndim != 2 or g.ndim not in (1, 2) or g.shape[0] != V.shape[0]:
        raise ValueError(f"project needs g of shape (p,) or (p, m) and V of shape (p, k), got "
                         f"{tuple(g.shape)} and {tuple(V.shape)}")
    if g.dtype != V.dtype or g.device != V.device:
        g, V = _common(g=g, V=V)
    return V @ (V.T @ g)


def top_fraction(g: torch.Tensor, V: torch.Tensor, atol: float | None = None,
                 space: Any = None) -> float:
    """Fraction of the gradient in the subspace ``span(V)`` (eq. 2).

    .. math::  f_{top} = \\frac{\\|P_{top} g\\|^2}{\\|g\\|^2} = \\frac{\\|V^T g\\|^2}{\\|g\\|^2}

    Computed in the wider of the two dtypes (a float32 gradient on a float64 basis is fine);
    at most 1 (clipped: ``V`` is orthonormal only to ``atol``).

    Args:
        g: gradient ``(p,)``.
        V: ``(p, k)`` with orthonormal columns (checked to ``atol``), or
            :class:`~tinysubspace.Eigenpairs` (their vectors, in their ``space``).
        space: the vectors' inner product when they are shards (an operator's
            ``vector_space``, or the operator); ``None``: the one ``V`` carries, else plain
            tensors. The same for every function here (module docstring).

    Raises:
        TypeError: an input that is not a tensor.
        ValueError: wrong shapes, ``V`` not orthonormal, ``g`` zero or non-finite, complex
            inputs, or inputs on different devices.
    """
    space, V = _resolve_space(space, V), _basis(V)
    _check_basis(V, "V", atol, space)
    _check_vector(g, "g", V.shape[0])
    g, V = _common(g=g, V=V)
    norm = _nonzero_norm(g, "g", space)
    # at most 1 up to rounding and atol
    return min(1.0, float(_gram(V, g, space).square().sum()) / norm**2)


def eigenvector_overlaps(g: torch.Tensor, V: torch.Tensor, atol: float | None = None,
                         space: Any = None) -> torch.Tensor:
    """Squared overlaps ``c_i² = (v_iᵀ g)² / ‖g‖²`` of ``g`` with each column of ``V`` (eq. 12).

    ``sum(c_i²)`` over the columns of an orthonormal ``V`` equals :func:`top_fraction`.

    Returns:
        ``(k,)`` tensor of ``c_i²``.
    """
    space, V = _resolve_space(space, V), _basis(V)
    _check_basis(V, "V", atol, space)
    _check_vector(g, "g", V.shape[0])
    g, V = _common(g=g, V=V)
    norm = _nonzero_norm(g, "g", space)
    return _gram(V, g, space).square() / norm**2


def gradient_overlap(g: torch.Tensor, Hg: Any, space: Any = None) -> float:
    """Cosine between the gradient and the Hessian-gradient product (eq. 3).

    .. math::  \\mathrm{overlap}(g, Hg) = \\frac{g^T H g}{\\sqrt{g^T g}\\,\\sqrt{g^T H^2 g}}

    In the wider of the two dtypes; clipped to ``[−1, 1]`` (a cosine, up to rounding).

    Args:
        g: the gradient ``(p,)``.
        Hg: ``H g`` ``(p,)``, or the operator ``H`` itself (:mod:`tinysubspace.operator`'s
            protocol: ``H g`` is computed, one product, and the inner products are the
            operator's ``vector_space``).
        space: as :func:`top_fraction`.

    Raises:
        ValueError: shapes differ, a vector is zero or non-finite, or on different devices.
    """
    space = _resolve_space(space, Hg)
    if not isinstance(Hg, torch.Tensor) and hasattr(Hg, "matvecs"):  # an operator's protocol
        _check_vector(g, "g", Hg.shape[0], other="the operator's vectors")
        Hg = Hg @ g
    _check_vector(g, "g")
    _check_vector(Hg, "Hg", g.shape[0], other="g")
    g, Hg = _common(g=g, Hg=Hg)
    cosine = float(_gram(g, Hg, space)) / (_nonzero_norm(g, "g", space)
                                          * _nonzero_norm(Hg, "Hg", space))
    return max(-1.0, min(1.0, cosine))  # a cosine, up to rounding


def subspace_overlap(V1: torch.Tensor, V2: torch.Tensor, atol: float | None = None,
                     space: Any = None) -> float:
    """Overlap of two subspaces, possibly of different dimensions (eq. 5).

    .. math::  \\mathrm{overlap}(V_1, V_2) = \\frac{\\mathrm{Tr}(P_1 P_2)}
               {\\sqrt{\\mathrm{Tr}(P_1)\\,\\mathrm{Tr}(P_2)}}
               = \\frac{\\|V_1^T V_2\\|_F^2}{\\sqrt{k_1 k_2}}

    ``V1``, ``V2``: ``(p, k1)``, ``(p, k2)`` orthonormal columns, or eigenpairs.
    Equal to 1 for the same subspace, 0 for orthogonal ones; for ``k1 ≠ k2`` at most
    ``sqrt(min(k1, k2) / max(k1, k2))``. Clipped to ``[0, 1]`` (bases orthonormal only to
    ``atol`` could give ``1 + O(atol)``); computed in the wider of the two dtypes.
    """
    space, V1, V2 = _resolve_space(space, V1, V2), _basis(V1), _basis(V2)
    _check_basis(V1, "V1", atol, space)
    _check_basis(V2, "V2", atol, space)
    if V1.shape[0] != V2.shape[0]:
        raise ValueError(f"V1 and V2 live in spaces of different dimension: {V1.shape[0]} and "
                         f"{V2.shape[0]} rows")
    V1, V2 = _common(V1=V1, V2=V2)
    k1, k2 = V1.shape[1], V2.shape[1]
    return min(1.0, float(_gram(V1, V2, space).square().sum()) / math.sqrt(k1 * k2))


def principal_angles(V1: torch.Tensor, V2: torch.Tensor, atol: float | None = None) -> torch.Tensor:
    """All principal angles ``0 ≤ θ_1 ≤ … ≤ θ_m`` (radians, ``m = min(k1, k2)``) between
    ``span(V1)`` and ``span(V2)`` (Björck & Golub 1973).

    .. math::  \\cos\\theta_i = \\sigma_i(V_1^T V_2), \\qquad
               \\sin\\theta_{m+1-i} = \\sigma_i\\big((I - V_1 V_1^T) V_2\\big)
               \\quad (k_2 \\le k_1;\\ \\text{else swap})

    Angles with ``cos² θ ≥ 1/2`` come from the sines, the others from the cosines, so small
    angles keep full relative accuracy (Knyazev & Argentati 2002). Eq. 5 is their mean squared
    cosine when ``k1 = k2 = k``: ``overlap(V1, V2) = (1/k) Σ_i cos² θ_i``.

    >>> V1 = torch.eye(3, dtype=torch.float64)[:, :1]
    >>> V2 = torch.tensor([[0.6], [0.8], [0.0]], dtype=torch.float64)
    >>> round(float(principal_angles(V1, V2)[0]), 6) == round(math.acos(0.6), 6)
    True

    Raises:
        ValueError: wrong shapes, columns not orthonormal (to ``atol``), or bases of different
            row counts.
    """
    _check_basis(V1, "V1", atol)
    _check_basis(V2, "V2", atol)
    if V1.shape[0] != V2.shape[0]:
        raise ValueError(f"V1 and V2 live in spaces of different dimension: {V1.shape[0]} and "
                         f"{V2.shape[0]} rows")
    big, small = (V1, V2) if V1.shape[1] >= V2.shape[1] else (V2, V1)
    cross = big.T @ small
    cosines = torch.linalg.svdvals(cross).clamp(0.0, 1.0)  # descending: angles ascending
    sines = torch.linalg.svdvals(small - big @ cross).flip(0).clamp(0.0, 1.0)
    return torch.where(cosines.square() >= 0.5, torch.arcsin(sines), torch.arccos(cosines))


def eigenvector_displacement(V_old: torch.Tensor, V_new: torch.Tensor) -> torch.Tensor:
    """How far each eigenvector moved between two measurements, ignoring its sign.

    .. math::  d_i = \\min_{s = \\pm 1} \\|v_i^{new} - s\\, v_i^{old}\\|
               = \\sqrt{2 - 2\\,|\\langle v_i^{old}, v_i^{new} \\rangle|}
               = 2 \\sin(\\phi_i / 2),

    ``φ_i`` the angle between the two lines. ``0`` for the same direction (either sign),
    ``√2`` for orthogonal ones. Columns are paired by index (eigenvalue order): a crossing of
    two eigenvalues shows as two displacements near ``√2``.

    Args:
        V_old, V_new: ``(p, k)`` matrices of unit columns, in the same order.

    Returns:
        ``(k,)`` tensor of ``d_i``.

    Raises:
        ValueError: shapes differ, not 2-D, or a column is not a unit vector (to
            :func:`default_basis_atol`, the rule every basis here is checked by; norms in
            float64).
    """
    if V_old.ndim != 2 or V_old.shape != V_new.shape:
        raise ValueError(f"V_old and V_new must be (p, k) matrices of the same shape, got "
                         f"{tuple(V_old.shape)} and {tuple(V_new.shape)}")
    for name, V in (("V_old", V_old), ("V_new", V_new)):
        wide = V.to(torch.promote_types(V.dtype, torch.float64))
        error = float((wide.norm(dim=0) - 1).abs().max()) if V.shape[1] else 0.0
        if not error <= default_basis_atol(V):
            raise ValueError(f"the columns of {name} must be unit vectors (max | ‖v‖ − 1 | = "
                             f"{error:.2e})")
    sign = torch.where((V_old * V_new).sum(0) < 0, -1.0, 1.0).to(V_old.dtype)
    return (V_new - sign * V_old).norm(dim=0)
