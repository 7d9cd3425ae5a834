"""The curvature core: exact operators over a whole data set (H·V, never the matrix).

``operator`` (the operator protocol, dense operators, ``A − B``), ``hessian``
(:class:`HessianOperator`), ``ggn`` and ``fisher`` (Gauss–Newton and Fisher matrices),
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
