"""tinysubspace: where gradient descent moves — the Hessian's top eigen-subspace and the
gradient's share of it (Gur-Ari, Roberts, Dyer 2018, "Gradient Descent Happens in a Tiny
Subspace")."""

from .eigen import Eigenpairs, top_eigenpairs
from .hessian import HessianOperator, NonDeterministicError, NonFiniteError
from .krylov import lanczos_tridiagonal
from .linear_operator import DenseOperator, SymmetricOperator
from .metrics import (
    eigenvector_overlaps,
    gradient_overlap,
    project,
    subspace_overlap,
    top_fraction,
)

__version__ = "0.1.0"

__all__ = [
    "DenseOperator",
    "Eigenpairs",
    "HessianOperator",
    "NonDeterministicError",
    "NonFiniteError",
    "SymmetricOperator",
    "eigenvector_overlaps",
    "gradient_overlap",
    "lanczos_tridiagonal",
    "project",
    "subspace_overlap",
    "top_eigenpairs",
    "top_fraction",
]
