"""The curvature core: operators over a whole data set (H·V, never the matrix).

``dataset_operator`` (:class:`DataSetOperator`: the snapshot, the data loop, the weighting of
uneven batches, the sum over ranks; each operator supplies its per-batch product), ``hessian``
(:class:`HessianOperator`), ``ggn`` and ``fisher`` (Gauss–Newton and Fisher matrices; their
shared ``Jᵀ M J V`` engine is ``linearized``), ``graphs`` (kept gradient graphs),
``preconditioned`` (``P^{-1/2} A P^{-1/2}`` for an optimizer's diagonal ``P``),
``class_means`` (Papyan's class means of per-example gradients),
``hvp`` (the exact H·V strategies), ``data`` (batches and calling the model), ``layout``
(parameters, flattening), ``collectives`` (what the operator needs of ``torch.distributed``).
Imports nothing above it: no pandas, matplotlib, configs or files.
"""

from tinysubspace.curvature.class_means import (
    ClassMeans,
    class_gradient_means,
    class_mean_basis,
    papyan_basis,
)
from tinysubspace.curvature.collectives import DistributedError
from tinysubspace.curvature.dataset_operator import DataSetOperator
from tinysubspace.curvature.fisher import FisherOperator
from tinysubspace.curvature.ggn import GaussNewtonResidual, GGNOperator
from tinysubspace.curvature.hessian import (
    HessianOperator,
    NonDeterministicError,
    NonFiniteError,
)
from tinysubspace.curvature.hvp import HVP_METHODS
from tinysubspace.curvature.preconditioned import (
    PreconditionedOperator,
    preconditioner_diagonal,
)
from tinysubspace.operator import (
    DenseOperator,
    DifferenceOperator,
    SymmetricOperator,
)

__all__ = [
    "HVP_METHODS",
    "ClassMeans",
    "DataSetOperator",
    "DenseOperator",
    "DifferenceOperator",
    "DistributedError",
    "FisherOperator",
    "GGNOperator",
    "GaussNewtonResidual",
    "HessianOperator",
    "NonDeterministicError",
    "NonFiniteError",
    "PreconditionedOperator",
    "SymmetricOperator",
    "class_gradient_means",
    "class_mean_basis",
    "papyan_basis",
    "preconditioner_diagonal",
]
