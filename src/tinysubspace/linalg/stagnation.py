"""Stopping a solve whose tolerance is below what the operator's precision can reach.

A residual ``‖H v − θ v‖`` computed in a dtype with unit roundoff ``eps`` carries an error of
about ``eps · ‖H‖`` (more when each product sums many rounded terms, as a Hessian-vector
product over a data set does): no iteration brings it below that floor, and a solve asked for
less would run to its budget (``50 p`` products: 10,000 for ``p = 200`` in float32 at
``tol = 1e-9``; hours for a network). :class:`ProgressWatch` stops it instead.

It is armed when ``tol`` is within a factor :data:`ARM_FACTOR` of the rounding level of a
``p``-term sum, ``√p · eps``, and always for approximate products (``op.product_error > 0``, a
finite-difference ``H·v``), whose error along the solve's own directions is known only as it is
measured: the watch then follows the residual history without trusting any estimate. float64
solves with exact products at ordinary tolerances are never watched, so their results cannot
change. Independently, :func:`unreachable_tolerance` keeps a solve from being called converged at
a ``tol`` below the error its products were *measured* to carry (``op.product_error`` after the
solve: finite differences measure theirs along the vectors they are applied to).

Armed, the watch follows the largest wanted residual: when its best value has not halved over
:data:`window` products, the solve has stagnated at the floor. The solver then returns
``converged=False`` and warns with the tolerance that was reached.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ARM_FACTOR", "ProgressWatch", "reachable_tolerance", "stagnation_message",
           "unreachable_tolerance"]

ARM_FACTOR = 100.0
"""The watch is armed when ``tol < ARM_FACTOR · √p · eps`` (float32: ``tol < 1.7e-4`` for
``p = 200``, ``< 3.6e-3`` for ``p = 89,000``; float64: ``tol < 3e-12`` for ``p = 200``)."""


class ProgressWatch:
    """Detects stagnation of the largest wanted residual (relative to ``|θ_1|``).

    Args:
        tol: the solve's relative tolerance.
        dtype: the operator's dtype.
        p: the operator's dimension.
        window: products without a halving of the best residual that count as stagnation.
        product_error: the relative error ``δ`` of each product (0: exact to rounding).
    """

    def __init__(self, tol: float, dtype: torch.dtype, p: int, window: int,
                 product_error: float = 0.0) -> None:
        floor = max(math.sqrt(p) * torch.finfo(dtype).eps, product_error)
        self.armed = tol < ARM_FACTOR * floor or product_error > 0
        self.product_error = product_error
        self.window = window
        self.best = math.inf  # smallest relative residual seen
        self._mark = math.inf  # the best value at the last halving
        self._since = 0  # products at the last halving
        self.stalled = False

    def update(self, relative_residual: float, matvecs: int) -> bool:
        """Record the largest wanted residual ``max_i ‖r_i‖ / |θ_1|`` after ``matvecs``
        products; ``True`` (and :attr:`stalled` set) once it has stagnated."""
        if not self.armed:
            return False
        self.best = min(self.best, relative_residual)
        if self.best <= 0.5 * self._mark:
            self._mark, self._since = self.best, matvecs
        elif matvecs - self._since >= self.window:
            self.stalled = True
        return self.stalled



def reachable_tolerance(reached: float) -> float:
    """A tolerance a solve that reached the relative residual ``reached`` can meet: twice that,
    rounded up to one digit.

    >>> reachable_tolerance(3.2e-7)
    7e-07
    """
    value = 2 * reached
    exponent = math.floor(math.log10(value))
    return float(f"{math.ceil(value / 10**exponent - 1e-9)}e{exponent}")


def stagnation_message(tol: float, dtype: torch.dtype, reached: float, window: int,
                       matvecs: int, product_error: float = 0.0) -> str:
    """The warning a stagnated solve gives (``reached``: its largest residual / ``|θ_1|``)."""
    accuracy = (f" (products accurate to {product_error:.1e} relative)" if product_error > 0
                else "")
    return (f"top_eigenpairs: tol={tol:.1e} is below what this {str(dtype).replace('torch.', '')} "
            f"operator{accuracy} can reach: the residuals stopped decreasing (no halving in "
            f"{window} products) at {reached:.1e} · |λ1|, so the solve stopped after {matvecs} "
            f"products with converged=False. Use tol >= {reachable_tolerance(reached):.0e}, or an "
            "operator in float64 (dtype=torch.float64)"
            + (" with exact products." if product_error > 0 else "."))


def unreachable_tolerance(op, tol: float) -> str | None:
    """The warning for a solve that met ``tol`` on products measured less accurate than ``tol``
    (``op.product_error``, relative to ``‖H v‖ ≤ |λ_1| ‖v‖``: a residual of the approximate
    operator then certifies nothing below it), or ``None`` when ``tol`` is within reach."""
    error = float(getattr(op, "product_error", 0.0) or 0.0)
    if error <= tol:
        return None
    return (f"top_eigenpairs: the residuals met tol={tol:.1e}, but the products were measured to "
            f"be accurate to {error:.1e} (relative) only, so the result is returned with "
            f"converged=False. Use tol >= {reachable_tolerance(error):.0e}, "
            "hvp_method='finite_difference4', or exact products (hvp_method='auto').")
