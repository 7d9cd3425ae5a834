"""The generalised Gauss–Newton matrix of a mean loss over a whole data set, as an operator.

For a network with outputs :math:`z_i = f(x_i; \\theta)` (flattened, :math:`C` numbers each) and
a loss :math:`\\ell(z, y)`, the Hessian splits as (Sagun et al. 2017; Papyan 2019, eq. 2)

.. math::  \\nabla^2 L = \\underbrace{\\frac1N \\sum_i J_i^T\\, \\nabla^2_{z}\\ell_i\\, J_i}_{G}
           \\;+\\; \\underbrace{\\frac1N \\sum_i \\sum_c \\frac{\\partial \\ell_i}{\\partial z_{ic}}
           \\nabla^2_\\theta z_{ic}}_{H - G},
           \\qquad J_i = \\partial z_i / \\partial \\theta \\;(C \\times p).

:class:`GGNOperator` applies :math:`G` exactly, never forming :math:`J`: per batch the product
``Jᵀ (∇²_z ℓ_j) J V`` of :mod:`tinysubspace.curvature.linearized`. Batches are weighted by their
sizes, :math:`G = \\frac1N \\sum_j n_j G_j`, and summed over ranks by the data-set base
(:class:`~tinysubspace.curvature.dataset_operator.DataSetOperator`), exactly as the Hessian.
``G`` is positive semi-definite whenever the loss is convex in the outputs (cross-entropy, MSE).
:class:`GaussNewtonResidual` applies ``H − G`` in one data pass. Both are siblings of
:class:`~tinysubspace.curvature.hessian.HessianOperator` on that base.
"""

from __future__ import annotations

import torch

from tinysubspace.curvature.data import Batch
from tinysubspace.curvature.dataset_operator import DataSetOperator
from tinysubspace.curvature.hvp import ProductEstimate
from tinysubspace.curvature.linearized import OutputCurvature, linearized_product, output_hessian

__all__ = ["GGNOperator", "GaussNewtonResidual", "OutputCurvature"]


class GGNOperator(DataSetOperator):
    """Exact generalised Gauss–Newton matrix ``G = (1/N) Σ_i J_iᵀ ∇²_z ℓ_i J_i`` of a data set.

    Same contract as :class:`~tinysubspace.curvature.hessian.HessianOperator` (a snapshot of the
    parameters; mean over the whole data set, weighted by batch size; a block of ``b`` columns
    in one data pass; ``dtype=torch.float64`` on demand; distributed the same way) and the same
    arguments (``hvp_method`` is accepted and unused: no Hessian product is taken). The model
    must return a tensor with a leading batch dimension.

    ``mode="train"`` with batch norm gives the GGN of the batch-statistics network: each
    ``J`` is then the Jacobian of a whole batch's outputs, and ``G`` depends on the batching.

    Raises:
        TypeError: the model does not return a tensor (when a product is taken).
        (And everything :class:`~tinysubspace.curvature.dataset_operator.DataSetOperator`
        raises.)
    """

    product_name = "GGN-vector product"

    def batch_product(self, batch: Batch, index: int, block: torch.Tensor) -> torch.Tensor:
        """``G_j V = Jᵀ (∇²_z ℓ_j) J V`` for one batch."""
        return linearized_product(self, batch, index, block, self._output_curvature)

    def _output_curvature(self, outputs: torch.Tensor, batch: Batch,
                          index: int) -> OutputCurvature:
        """``w ↦ ∇²_z ℓ_j w`` (:func:`~tinysubspace.curvature.linearized.output_hessian`)."""
        return output_hessian(self, outputs, batch, index)


class GaussNewtonResidual(DataSetOperator):
    """``H − G = (1/N) Σ_i Σ_c (∂ℓ_i/∂z_ic) ∇²_θ z_ic``, the part of the Hessian the GGN leaves
    out, in one data pass (per batch the Hessian product by ``hvp_method`` minus the GGN
    product). Zero for a model linear in its parameters; small where the residuals
    ``∂ℓ/∂z`` are small (a well-fitted training set). Arguments as :class:`GGNOperator`
    (``hvp_method`` names the Hessian part's method, finite differences included).

    The same operator by operator arithmetic (two data passes):
    ``HessianOperator(...) - GGNOperator(...)``.
    """

    product_name = "Gauss–Newton residual product"
    uses_hvp = True

    def batch_product(self, batch: Batch, index: int,
                      block: torch.Tensor) -> torch.Tensor | ProductEstimate:
        """``(∇²ℓ_j − G_j) V`` for one batch (an estimate if the Hessian part is one)."""
        hessian = self.hvp_strategy()(self, batch, index, block)
        ggn = linearized_product(self, batch, index, block,
                                 lambda z, b, i: output_hessian(self, z, b, i))
        if isinstance(hessian, ProductEstimate):
            return ProductEstimate(hessian.value - ggn, hessian.error)
        return hessian - ggn
