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
"""

from __future__ import annotations

import torch

__all__ = ["TOL_SCALES", "check_tol_scale", "relative_residual", "thresholds"]

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
