"""The block solver's working state: a Krylov basis with its projected matrices.

:class:`RitzBasis` is a :class:`~tinysubspace.linalg.basis.KrylovBasis` (vectors ``Q`` and
images ``HQ``) that also keeps ``T = Qᵀ H Q`` and ``G = (HQ)ᵀ HQ``, from which the Ritz pairs
``(θ_i, Q y_i)`` (``T y_i = θ_i y_i``) and their residual norms come without touching a
``p``-vector:

.. math::  \\|H Q y - θ Q y\\|^2 = y^T G y - θ^2 \\qquad (Q^T H Q = T,\\ T y = θ y).
"""

from __future__ import annotations

import torch

from tinysubspace.linalg.basis import KrylovBasis
from tinysubspace.operator import VectorSpace

__all__ = ["RitzBasis"]


class RitzBasis(KrylovBasis):
    """Basis ``Q``, images ``HQ``, ``T = QᵀHQ`` and ``G = HQᵀ HQ`` (module docstring).

    Args:
        like: a ``(p, ·)`` tensor of the working dtype and device.
        capacity: rows reserved (grown if a start block is wider).
        space: the inner product (:class:`~tinysubspace.operator.VectorSpace`; ``None``: local).
    """

    def __init__(self, like: torch.Tensor, capacity: int,
                 space: VectorSpace | None = None) -> None:
        super().__init__(like.shape[0], like.dtype, like.device, capacity, space=space)
        self.T = like.new_zeros(0, 0)
        self.G = like.new_zeros(0, 0)

    def extend(self, block: torch.Tensor, image: torch.Tensor) -> None:
        """Append orthonormal ``block`` (``⊥ Q``) and its ``image``; border ``T`` and ``G``."""
        cross = self.space.gram(self.Q, image)  # (m, b): Qᵀ H Qn (the old-new entries of T)
        corner = self.space.gram(block, image)
        corner = (corner + corner.T) / 2
        self.T = torch.cat([torch.cat([self.T, cross], 1),
                            torch.cat([cross.T, corner], 1)], 0)
        g_cross, g_corner = self.space.gram(self.HQ, image), self.space.gram(image, image)
        self.G = torch.cat([torch.cat([self.G, g_cross], 1),
                            torch.cat([g_cross.T, g_corner], 1)], 0)
        self.append(block, image)

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ritz values (descending) and coefficient vectors ``y`` of the projected matrix."""
        theta, Y = torch.linalg.eigh((self.T + self.T.T) / 2)
        return theta.flip(0), Y.flip(1)

    def restart(self, Y: torch.Tensor, theta: torch.Tensor) -> None:
        """Keep only the Ritz vectors ``Q Y`` (thick restart)."""
        self.rotate(Y)
        self.T, self.G = torch.diag(theta), Y.T @ self.G @ Y

    def residual_gram(self, theta: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``RᵀR`` of the Ritz residuals ``R = HQ Y − Q Y diag(θ)``, from small matrices only:
        ``Yᵀ G Y − diag(θ²)``, in float64. Cancellation leaves an error of about
        ``eps · ‖H‖²`` (``ConvergenceCriterion.estimate_slack``)."""
        Y64, G64 = Y.double(), self.G.double()
        M = Y64.T @ G64 @ Y64 - torch.diag(theta.double() ** 2)
        return (M + M.T) / 2

    def residual_directions(self, theta: torch.Tensor, Y: torch.Tensor, b: int) -> torch.Tensor:
        """The ``b`` leading left singular directions of ``R = HQ Y − Q Y diag(θ)`` (all of
        ``R`` if it has at most ``b`` columns), computed as ``R Z`` without forming ``R``."""
        if Y.shape[1] > b:
            _, Z = torch.linalg.eigh(self.residual_gram(theta, Y))
            Z = Z[:, -b:].flip(1).to(Y.dtype)
            return self.HQ @ (Y @ Z) - self.Q @ (Y @ (theta[:, None] * Z))
        return self.HQ @ Y - self.Q @ (Y * theta)
