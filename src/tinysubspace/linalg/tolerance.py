"""What a solve's ``tol`` is relative to: the top eigenvalue, or each pair's own.

A Ritz pair ``(θ_i, v_i)`` with residual ``r_i = H v_i − θ_i v_i`` is converged when

* ``tol_scale="top"`` (the default): ``‖r_i‖ ≤ tol · |θ_1|``, with ``|θ_1|`` the largest
  ``|θ|`` among the current Ritz values (``≈ ‖H‖``). One absolute bar for every pair: the
  eigenvalue error of pair ``i`` is at most ``‖r_i‖ ≈ tol · |θ_1|``, i.e. a *relative* error
  of ``tol · |θ_1 / θ_i|``, looser for small pairs.
* ``tol_scale="pair"`` (ARPACK's criterion, ``scipy.sparse.linalg.eigsh(tol=...)``):
  ``‖r_i‖ ≤ tol · max(|θ_i|, ε^{2/3} |θ_1|)``: each pair to ``tol`` relative to itself. The
  ``ε^{2/3}`` floor (``ε`` the dtype's machine epsilon; 3.7e-11 · |θ_1| in float64, ARPACK
  uses the same power of ``ε``, absolute) keeps a pair with ``θ_i ≈ 0`` reachable.

For the top pair both agree; for the ``i``-th, ``pair`` is stricter by ``|θ_1 / θ_i|``.

:class:`ConvergenceCriterion` carries all a solve needs to decide convergence — ``tol``,
``tol_scale``, the operator's dtype and dimension, and the relative error of each product
(``op.product_error``, e.g. a finite-difference ``H·v``; 0 when exact) — and is shared by the cold,
warm, block, SLQ and multiplicity-check paths: the per-pair bars, the floor below which no
iteration can bring a residual (:attr:`ConvergenceCriterion.floor`), and the stagnation watch
armed near that floor (:mod:`tinysubspace.linalg.stagnation`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tinysubspace.linalg.stagnation import ARM_FACTOR, ProgressWatch

__all__ = ["TOL_SCALES", "ConvergenceCriterion", "check_tol_scale", "relative_residual",
           "thresholds"]

TOL_SCALES = ("top", "pair")
"""The accepted ``tol_scale`` values (module docstring)."""


def check_tol_scale(tol_scale: object) -> str:
    """``tol_scale`` if it is one of :data:`TOL_SCALES`.

    Raises:
        ValueError: anything else (the accepted values are listed).

    >>> check_tol_scale("pair")
    'pair'
    """
    if not isinstance(tol_scale, str) or tol_scale not in TOL_SCALES:
        raise ValueError(f"tol_scale must be one of {TOL_SCALES} ('top': ‖r_i‖ ≤ tol·|θ_1|, "
                         f"'pair': ‖r_i‖ ≤ tol·|θ_i| as ARPACK), got {tol_scale!r}")
    return tol_scale


def thresholds(theta: torch.Tensor, scale: float, tol: float, tol_scale: str,
               dtype: torch.dtype) -> float | torch.Tensor:
    """The residual bar of each Ritz value ``theta`` (``(n,)``) of a solve whose largest
    ``|θ|`` is ``scale``, for an operator of ``dtype`` (its ``ε``): the number ``tol · scale``
    for ``"top"`` (so the default compares exactly as before), an ``(n,)`` tensor
    ``tol · max(|θ_i|, ε^{2/3} scale)`` on ``theta``'s device for ``"pair"``.

    >>> theta = torch.tensor([4.0, 1.0], dtype=torch.float64)
    >>> thresholds(theta, 4.0, 0.1, "pair", torch.float64).tolist()
    [0.4, 0.1]
    >>> thresholds(theta, 4.0, 0.1, "top", torch.float64)
    0.4
    """
    if tol_scale == "top":
        return tol * scale
    floor = torch.finfo(dtype).eps ** (2 / 3) * scale
    return tol * theta.abs().clamp_min(floor)


def relative_residual(residuals: torch.Tensor, bar: float | torch.Tensor, tol: float,
                      scale: float) -> float:
    """The largest residual relative to its bar, in units of ``tol``: ``max_i ‖r_i‖ / |θ_1|``
    for ``"top"`` (``bar`` a number; computed as before, what the stagnation watch follows) and
    ``tol · max_i ‖r_i‖ / bar_i`` for ``"pair"``. Converged when it is ``≤ tol``."""
    if not isinstance(bar, torch.Tensor):
        return float(residuals.max()) / scale
    return float((residuals / bar.to(residuals.device, residuals.dtype)).max()) * tol


@dataclass(frozen=True)
class ConvergenceCriterion:
    """When a Ritz pair counts as converged, and what an operator's precision can reach.

    Attributes:
        tol: the relative residual tolerance (``> 0``).
        tol_scale: ``"top"`` or ``"pair"`` (module docstring).
        dtype: the operator's dtype (the precision of its products).
        p: the operator's dimension.
        product_error: relative error of each product, ``‖fl(Hv) − Hv‖ ≤ δ ‖H‖ ‖v‖`` (0: exact
            to rounding).
    """

    tol: float
    tol_scale: str = "top"
    dtype: torch.dtype = torch.float64
    p: int = 1
    product_error: float = 0.0

    @classmethod
    def for_operator(cls, op, tol: float, tol_scale: str = "top") -> ConvergenceCriterion:
        """The criterion of a solve on ``op`` (its dtype, dimension and
        ``getattr(op, "product_error", 0.0)``).

        Raises:
            ValueError: a ``product_error`` that is not a finite number in ``[0, 1)``.
        """
        error = getattr(op, "product_error", 0.0)
        error = 0.0 if error is None else error
        if isinstance(error, bool) or not isinstance(error, (int, float)) or not (
                math.isfinite(error) and 0 <= error < 1):
            raise ValueError(f"op.product_error must be a relative error in [0, 1), got "
                             f"{error!r}")
        return cls(tol, check_tol_scale(tol_scale), op.dtype, op.shape[0], float(error))

    @property
    def floor(self) -> float:
        """The relative residual (``‖r‖ / |θ_1|``) products of this precision resolve:
        ``max(√p · ε, δ)`` (``δ`` = :attr:`product_error`); a ``tol`` within
        :data:`~tinysubspace.linalg.stagnation.ARM_FACTOR` of it is watched for stagnation."""
        return max(math.sqrt(self.p) * torch.finfo(self.dtype).eps, self.product_error)

    def bars(self, theta: torch.Tensor, scale: float) -> float | torch.Tensor:
        """The residual bar of each Ritz value (:func:`thresholds`)."""
        return thresholds(theta, scale, self.tol, self.tol_scale, self.dtype)

    def relative(self, residuals: torch.Tensor, bar: float | torch.Tensor, scale: float) -> float:
        """The largest residual relative to its bar, in units of ``tol``
        (:func:`relative_residual`)."""
        return relative_residual(residuals, bar, self.tol, scale)

    def estimate_slack(self, norm: float) -> float:
        """How far a residual norm computed from a Gram matrix (``yᵀ G y − θ²``) may be off: its
        entries are ``p``-term sums of rounded products, so about ``√(10 max(√p ε, δ))`` times
        ``norm`` (≥ the largest ``‖H q‖`` seen)."""
        eps = torch.finfo(self.dtype).eps
        return math.sqrt(10 * max(eps * math.sqrt(self.p), self.product_error)) * norm

    def watch(self, window: int) -> ProgressWatch:
        """A stagnation watch for this solve, armed when ``tol < ARM_FACTOR · floor``."""
        return ProgressWatch(self.tol, self.dtype, self.p, window,
                             product_error=self.product_error)

    @property
    def armed(self) -> bool:
        """Whether ``tol`` is close enough to the floor to be watched."""
        return self.tol < ARM_FACTOR * self.floor
