"""The residual of every Hessian eigenpair, and whether the multiplicity check ran: one column
group, added to any tracker with ``SubspaceTracker(..., groups=[ResidualsGroup(k)])``.

``hessian/res_i`` (``i ≤ 2k``) is the relative residual of pair ``i`` of the measurement's top
``2k`` solve,

.. math::  \\mathrm{res}_i = \\frac{\\|H v_i - \\lambda_i v_i\\|}{\\max_j |\\lambda_j|},

so that ``max_i res_i`` is the tracker's ``hessian/residual_max``; with ``tol_scale="top"``
a converged solve has every ``res_i ≤ tol``. ``hessian/multiplicity_checked`` is 1.0 when the
solve's multiplicity check ran to its end and found no missed eigenvalue
(:attr:`~tinysubspace.linalg.lanczos.Eigenpairs.multiplicity_checked`), else 0.0.
"""

from __future__ import annotations

from typing import Any

from tinysubspace.experiments.measurement import Context

__all__ = ["ResidualsGroup"]


class ResidualsGroup:
    """``hessian/multiplicity_checked`` and ``hessian/res_1 … res_2k`` (module docstring).

    Args:
        k: the tracker's top-k (the solve has ``2k`` pairs).
    """

    name = "residuals"
    deferred = False
    bucket = None

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ResidualsGroup needs the tracker's k, an integer >= 1, got {k!r}")
        self.k = k

    def names(self) -> list[str]:
        return ["hessian/multiplicity_checked",
                *(f"hessian/res_{i}" for i in range(1, 2 * self.k + 1))]

    def measure(self, ctx: Context) -> dict[str, float]:
        eig = ctx.eig
        if eig.values.numel() != 2 * self.k:
            raise ValueError(f"ResidualsGroup(k={self.k}) expects the 2k = {2 * self.k} pairs of "
                             f"the tracker's solve, got {eig.values.numel()}; pass the "
                             "tracker's k")
        scale = max(float(eig.values.abs().max()), 1e-300)
        row = {f"hessian/res_{i + 1}": float(r) / scale for i, r in enumerate(eig.residuals)}
        row["hessian/multiplicity_checked"] = float(eig.multiplicity_checked)
        return row

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
