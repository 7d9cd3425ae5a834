"""tinysubspace: where gradient descent moves — the Hessian's top eigen-subspace and the
gradient's share of it (Gur-Ari, Roberts, Dyer 2018, "Gradient Descent Happens in a Tiny
Subspace").

``import tinysubspace`` loads the math core only (curvature operators, eigensolvers, the paper's
metrics: torch, numpy and scipy). Every other public name — data sets, models, optimizers, the
tracker, the run store, the toy model — is imported on first use (module ``__getattr__``), so
that the core never pulls in pandas, matplotlib or the experiment layer. docs/architecture.md
shows the layers.
"""

from __future__ import annotations

import importlib
from typing import Any

from tinysubspace.curvature import (
    HVP_METHODS,
    ClassMeans,
    DenseOperator,
    DifferenceOperator,
    DistributedError,
    FisherOperator,
    GaussNewtonResidual,
    GGNOperator,
    HessianOperator,
    NonDeterministicError,
    NonFiniteError,
    PreconditionedOperator,
    SymmetricOperator,
    class_gradient_means,
    class_mean_basis,
    papyan_basis,
    preconditioner_diagonal,
)
from tinysubspace.linalg import (
    WARM_STARTS,
    Eigenpairs,
    SpectralDensity,
    broadened_density,
    exact_spectrum,
    lanczos_tridiagonal,
    spectral_density,
    top_eigenpairs,
    track_eigenpairs,
)
from tinysubspace.metrics import (
    eigenvector_displacement,
    eigenvector_overlaps,
    gradient_overlap,
    principal_angles,
    project,
    subspace_overlap,
    top_fraction,
)

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    # problems: what is studied
    "DatasetNotFoundError": "tinysubspace.problems.datasets",
    "TensorData": "tinysubspace.problems.datasets",
    "dataset_names": "tinysubspace.problems.datasets",
    "even_odd": "tinysubspace.problems.datasets",
    "load_dataset": "tinysubspace.problems.datasets",
    "random_labels": "tinysubspace.problems.datasets",
    "standardize": "tinysubspace.problems.datasets",
    "subset": "tinysubspace.problems.datasets",
    "build_model": "tinysubspace.problems.models",
    "model_names": "tinysubspace.problems.models",
    "parameter_groups": "tinysubspace.problems.models",
    "block_spectra": "tinysubspace.problems.block_curvature",
    "block_measurements": "tinysubspace.problems.block_curvature",
    "parameter_blocks": "tinysubspace.problems.models.blocks",
    # optim: training in (or out of) the top subspace
    "BulkProjection": "tinysubspace.optim",
    "HessianSubspace": "tinysubspace.optim",
    "LowRankNewton": "tinysubspace.optim",
    "SubspaceSGD": "tinysubspace.optim",
    "SwitchOnTopFraction": "tinysubspace.optim",
    "TopProjection": "tinysubspace.optim",
    "lowrank_newton_direction": "tinysubspace.optim",
    "project_bulk": "tinysubspace.optim",
    "project_top": "tinysubspace.optim",
    "sharpness": "tinysubspace.optim.stability",
    "sharpness_threshold": "tinysubspace.optim.stability",
    "stability_row": "tinysubspace.optim.stability",
    # experiments and results
    "Tracker": "tinysubspace.experiments.tracker",
    "SubspaceTracker": "tinysubspace.experiments.subspace_tracker",
    "measurement_steps": "tinysubspace.experiments.schedules",
    "RunStore": "tinysubspace.results.store",
    "Run": "tinysubspace.results.store",
    "load_run": "tinysubspace.results.store",
    # losses in the measurement's dtype (core, imported on use)
    "causal_lm_loss": "tinysubspace.curvature.losses",
}
_LAZY_MODULES: dict[str, str] = {
    "toy": "tinysubspace.problems.toy",
    "curvature": "tinysubspace.curvature",
    "linalg": "tinysubspace.linalg",
    "optim": "tinysubspace.optim",
    "problems": "tinysubspace.problems",
    "experiments": "tinysubspace.experiments",
    "integrations": "tinysubspace.integrations",
    "results": "tinysubspace.results",
    "plots": "tinysubspace.plots",
    "runtime": "tinysubspace.runtime",
    "cli": "tinysubspace.cli",
}


def __getattr__(name: str) -> Any:
    """Import the layer that defines ``name`` on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(_LAZY_MODULES[name])
    else:
        raise AttributeError(f"module 'tinysubspace' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES))


__all__ = [
    "HVP_METHODS",
    "WARM_STARTS",
    "BulkProjection",
    "ClassMeans",
    "DatasetNotFoundError",
    "DenseOperator",
    "DifferenceOperator",
    "DistributedError",
    "Eigenpairs",
    "FisherOperator",
    "GGNOperator",
    "GaussNewtonResidual",
    "HessianOperator",
    "HessianSubspace",
    "LowRankNewton",
    "NonDeterministicError",
    "NonFiniteError",
    "PreconditionedOperator",
    "Run",
    "RunStore",
    "SpectralDensity",
    "SubspaceSGD",
    "SubspaceTracker",
    "SwitchOnTopFraction",
    "SymmetricOperator",
    "TensorData",
    "TopProjection",
    "Tracker",
    "block_measurements",
    "block_spectra",
    "broadened_density",
    "build_model",
    "causal_lm_loss",
    "class_gradient_means",
    "class_mean_basis",
    "dataset_names",
    "eigenvector_displacement",
    "eigenvector_overlaps",
    "even_odd",
    "exact_spectrum",
    "gradient_overlap",
    "lanczos_tridiagonal",
    "load_dataset",
    "load_run",
    "lowrank_newton_direction",
    "measurement_steps",
    "model_names",
    "papyan_basis",
    "parameter_blocks",
    "parameter_groups",
    "preconditioner_diagonal",
    "principal_angles",
    "project",
    "project_bulk",
    "project_top",
    "random_labels",
    "sharpness",
    "sharpness_threshold",
    "spectral_density",
    "stability_row",
    "standardize",
    "subset",
    "subspace_overlap",
    "top_eigenpairs",
    "top_fraction",
    "toy",
    "track_eigenpairs",
]
