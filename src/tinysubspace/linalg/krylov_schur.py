"""Single-vector thick-restart Lanczos in Krylov–Schur form: the fast path of ``top_eigenpairs``.

A Krylov basis ``Q = [q_1 … q_j]`` grown from one start vector satisfies, after every step,

.. math::  H Q = Q T + f\\, e_j^T, \\qquad Q^T f = 0,

with ``T = Qᵀ H Q`` (tridiagonal, or arrow-plus-tridiagonal after a thick restart). Hence every
Ritz pair ``(θ_i, Q y_i)`` of ``T`` has the residual ``f · (e_jᵀ y_i)``, of norm
``‖f‖ |y_{j,i}|``: residual norms for free, and one new direction ``f/‖f‖`` per step, as in
ARPACK. A step reads the basis four times (``Qᵀ w``, ``w − Q h`` and once more to
reorthogonalise) and never reads ``H Q``; the general block solver in
:mod:`tinysubspace.linalg.lanczos` needs twice that and more small operations, which on a CPU,
where a Hessian-vector product of a small network takes ~10 ms, was a third of a solve.

``T`` is assembled from the products themselves (``h = Qᵀ H q_j``, in float64), not from the
three-term recurrence, so the relation holds to rounding after restarts too. Convergence is
decided on exact residuals ``H Q y − θ Q y``: the images ``H Q`` are stored (written once, read
only when the estimates say every wanted pair has converged, and at restarts). The basis,
its reorthogonalisation and random directions are :class:`~tinysubspace.linalg.basis.KrylovBasis`'s;
the bars are :class:`~tinysubspace.linalg.tolerance.ConvergenceCriterion`'s.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tinysubspace.linalg.basis import KrylovBasis, apply_operator
from tinysubspace.linalg.stagnation import ProgressWatch
from tinysubspace.linalg.tolerance import ConvergenceCriterion
from tinysubspace.operator import vector_space

__all__ = ["KrylovResult", "apply_operator", "krylov_schur"]


class KrylovResult(NamedTuple):
    """What a solve leaves: values descending ``(n,)``, orthonormal vectors ``(p, n)`` and their
    images ``H V`` (in the working dtype), exact residual norms ``(n,)``, products used, whether
    every residual is within the tolerance, and whether the basis filled the whole space (the
    answer is exact)."""

    values: torch.Tensor
    vectors: torch.Tensor
    images: torch.Tensor
    residuals: torch.Tensor
    matvecs: int
    converged: bool
    full: bool


def krylov_schur(op, start: torch.Tensor, n: int, criterion: ConvergenceCriterion, *,
                 basis_size: int, budget: int, gen: torch.Generator,
                 watch: ProgressWatch | None = None) -> KrylovResult:
    """The ``n`` largest eigenpairs of ``op`` by thick-restart Lanczos from ``start``.

    Args:
        op: symmetric operator (``shape``, ``dtype``, ``device``, ``@`` on ``(p, 1)`` blocks).
        start: ``(p, 1)`` unit start vector, in the working dtype
            (:func:`~tinysubspace.linalg.basis.working_dtype`).
        n: pairs wanted (``n < p``).
        criterion: converged when every ``‖H v_i − θ_i v_i‖`` is within its bar
            (:class:`~tinysubspace.linalg.tolerance.ConvergenceCriterion`).
        basis_size: largest basis (``n < basis_size ≤ p``); a full basis restarts thick with
            the best ``min(max(n + 1, (basis_size + n) // 2), basis_size − 1)`` Ritz vectors.
        budget: most products to use.
        gen: source of random directions (when the Krylov space becomes invariant early).
        watch: stops the solve (``converged=False``) when the residuals stagnate at the
            precision floor (:mod:`tinysubspace.linalg.stagnation`).

    Returns:
        :class:`KrylovResult`.

    Raises:
        FloatingPointError: the operator returned NaN or infinity.
    """
    p, m = start.shape[0], basis_size
    basis = KrylovBasis(p, start.dtype, start.device, m, space=vector_space(op))
    space, p = basis.space, basis.dim
    T = torch.zeros(m, m, dtype=torch.float64)
    q, used = start[:, 0], 0
    tiny = float(torch.finfo(start.dtype).tiny)
    while True:
        w = apply_operator(op, q[:, None], used)[:, 0]
        used += 1
        basis.append(q, w)
        f, h = basis.orthogonal_part(w)
        j = basis.size
        column = h.cpu().double()  # Qᵀ H q_j: column j of T
        T[:j, j - 1] = column
        T[j - 1, :j] = column
        theta, Y = torch.linalg.eigh(T[:j, :j])
        theta, Y = theta.flip(0), Y.flip(1)
        beta = float(space.norm(f))
        scale = max(float(theta.abs().max()), tiny)
        bar = criterion.bars(theta[:n], scale)
        invariant = basis.invariant(beta, max(scale, float(space.norm(w))))
        full = j >= p
        estimates = beta * Y[j - 1, :n].abs()
        claimed = j >= n and bool((estimates <= bar).all())
        if not (claimed or full or used >= budget) and watch is not None and j >= n:
            # stalled: stop
            claimed = watch.update(criterion.relative(estimates, bar, scale), used)
        if claimed or full or used >= budget:
            wanted = Y[:, :n].to(start.dtype).to(start.device)
            V, HV = basis.Q @ wanted, basis.HQ @ wanted
            values = theta[:n].to(start.dtype).to(start.device)
            residuals = space.norm(HV - V * values)
            exact_bar = criterion.bars(values, scale)
            done = full or (j >= n and bool((residuals <= exact_bar).all()))
            stalled = (watch is not None and not done and (watch.stalled or watch.update(
                criterion.relative(residuals, exact_bar, scale), used)))
            if done or stalled or used >= budget:
                return KrylovResult(values, V, HV, residuals, used, done, full)
        # an invariant Krylov space: go on from a new random direction
        q = basis.random_direction(gen) if invariant else f / beta
        if j == m:  # basis full: thick restart with the best Ritz vectors (Krylov–Schur)
            keep = min(max(n + 1, (m + n) // 2), m - 1)
            basis.rotate(Y[:, :keep])
            T.zero_()
            T[:keep, :keep] = torch.diag(theta[:keep])
