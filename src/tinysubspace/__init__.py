"""tinysubspace: where gradient descent moves — the Hessian's top eigen-subspace and the
gradient's share of it (Gur-Ari, Roberts, Dyer 2018, "Gradient Descent Happens in a Tiny
Subspace")."""

from . import toy
from .datasets import (
    DatasetNotFoundError,
    TensorData,
    dataset_names,
    even_odd,
    load_dataset,
    random_labels,
    standardize,
    subset,
)
from .density import SpectralDensity, broadened_density, exact_spectrum, spectral_density
from .distributed import DistributedError
from .eigen import Eigenpairs, top_eigenpairs
from .hessian import HVP_METHODS, HessianOperator, NonDeterministicError, NonFiniteError
from .krylov import lanczos_tridiagonal
from .linear_operator import DenseOperator, SymmetricOperator
from .metrics import (
    eigenvector_overlaps,
    gradient_overlap,
    project,
    subspace_overlap,
    top_fraction,
)
from .models import build_model, model_names, parameter_groups
from .optim import (
    BulkProjection,
    HessianSubspace,
    LowRankNewton,
    SubspaceSGD,
    SwitchOnTopFraction,
    TopProjection,
    lowrank_newton_direction,
    project_bulk,
    project_top,
)
from .store import Run, load_run
from .tracker import Tracker
from .tracking import WARM_STARTS, track_eigenpairs

__version__ = "0.1.0"

__all__ = [
    "HVP_METHODS",
    "WARM_STARTS",
    "BulkProjection",
    "DatasetNotFoundError",
    "DenseOperator",
    "DistributedError",
    "Eigenpairs",
    "HessianOperator",
    "HessianSubspace",
    "LowRankNewton",
    "NonDeterministicError",
    "NonFiniteError",
    "Run",
    "SpectralDensity",
    "SubspaceSGD",
    "SwitchOnTopFraction",
    "SymmetricOperator",
    "TensorData",
    "TopProjection",
    "Tracker",
    "broadened_density",
    "build_model",
    "dataset_names",
    "eigenvector_overlaps",
    "even_odd",
    "exact_spectrum",
    "gradient_overlap",
    "lanczos_tridiagonal",
    "load_dataset",
    "load_run",
    "lowrank_newton_direction",
    "model_names",
    "parameter_groups",
    "project",
    "project_bulk",
    "project_top",
    "random_labels",
    "spectral_density",
    "standardize",
    "subset",
    "subspace_overlap",
    "top_eigenpairs",
    "top_fraction",
    "toy",
    "track_eigenpairs",
]
