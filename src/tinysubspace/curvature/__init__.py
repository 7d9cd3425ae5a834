"""The curvature core: exact operators over a whole data set (H·V, never the matrix).

``operator`` (the operator protocol, dense operators), ``hessian`` (:class:`HessianOperator`),
``hvp`` (the exact H·V strategies), ``data`` (batches and calling the model), ``layout``
(parameters, flattening), ``collectives`` (what the operator needs of ``torch.distributed``).
Imports nothing above it: no pandas, matplotlib, configs or files.
"""

from tinysubspace.curvature.collectives import DistributedError
from tinysubspace.curvature.hessian import (
    HessianOperator,
    NonDeterministicError,
    NonFiniteError,
)
from tinysubspace.curvature.hvp import HVP_METHODS
from tinysubspace.curvature.operator import DenseOperator, SymmetricOperator

__all__ = [
    "HVP_METHODS",
    "DenseOperator",
    "DistributedError",
    "HessianOperator",
    "NonDeterministicError",
    "NonFiniteError",
    "SymmetricOperator",
]
