"""The solver core: algorithms that see only an operator (``shape``, ``dtype``, ``device``, ``@``).

``basis`` (the one Krylov basis: Gram–Schmidt, random directions), ``tridiagonal`` (textbook
Lanczos, for SLQ), ``lanczos`` (:func:`top_eigenpairs`: thick-restart block Lanczos with exact
Rayleigh–Ritz residuals), ``rayleigh_ritz`` (its working state), ``krylov_schur`` (its
single-vector form), ``deflation`` (the multiplicity check), ``tolerance`` (the convergence
criterion: ``tol``, ``tol_scale``, the precision floor), ``warm_start``
(:func:`track_eigenpairs` between training steps), ``amortised`` (its multiplicity check spread
over the measurements), ``budget`` (its fixed-budget mode), ``folded`` (the warm block solver with
the check in its passes), ``pass_cost`` (what a pass costs; ``warm="auto"``), ``density``
(stochastic Lanczos quadrature, exact spectra).
"""

from tinysubspace.linalg.budget import refine_eigenpairs
from tinysubspace.linalg.deflation import GuardState
from tinysubspace.linalg.density import (
    SpectralDensity,
    broadened_density,
    exact_spectrum,
    spectral_density,
)
from tinysubspace.linalg.folded import folded_eigenpairs
from tinysubspace.linalg.lanczos import Eigenpairs, top_eigenpairs
from tinysubspace.linalg.pass_cost import PassCost
from tinysubspace.linalg.tridiagonal import lanczos_tridiagonal
from tinysubspace.linalg.warm_start import WARM_STARTS, track_eigenpairs

__all__ = [
    "WARM_STARTS",
    "Eigenpairs",
    "GuardState",
    "PassCost",
    "SpectralDensity",
    "broadened_density",
    "exact_spectrum",
    "folded_eigenpairs",
    "lanczos_tridiagonal",
    "refine_eigenpairs",
    "spectral_density",
    "top_eigenpairs",
    "track_eigenpairs",
]
