"""Single-vector thick-restart Lanczos in Krylov–Schur form: the fast path of ``top_eigenpairs``.

A Krylov basis ``Q = [q_1 … q_j]`` grown from one start vector satisfies, after every step,

.. math::  H Q = Q T + f\\, e_j^T, \\qquad Q^T f = 0,

with ``T = Qᵀ H Q`` (tridiagonal, or arrow-plus-tridiagonal after a thick restart). Hence every
Ritz pair ``(θ_i, Q y_i)`` of ``T`` has the residual ``f · (e_jᵀ y_i)``, of norm
``‖f‖ |y_{j,i}|``: residual norms for free, and one new direction ``f/‖f‖`` per step, as in
ARPACK. A step reads the basis four times (``Qᵀ w``, ``w − Q h`` and once more to
reorthogonalise) and never reads ``H Q``; the general block solver in ``eigen.py`` needs twice
that and more small operations, which on a CPU, where a Hessian-vector product of a small
network takes ~10 ms, was a third of a solve.

``T`` is assembled from the products themselves (``h = Qᵀ H q_j``, in float64), not from the
three-term recurrence, so the relation holds to rounding after restarts too. Convergence is
decided on exact residuals ``H Q y − θ Q y``: the images ``H Q`` are stored (written once, read
only when the estimates say every wanted pair has converged, and at restarts).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tinysubspace.linalg.orthogonalize import orthonormalize_against, random_block
from tinysubspace.linalg.stagnation import ProgressWatch
from tinysubspace.linalg.tolerance import relative_residual, thresholds

__all__ = ["KrylovResult", "apply_operator", "krylov_schur"]


class KrylovResult(NamedTuple):
    """What a solve leaves: values descending ``(n,)``, orthonormal vectors ``(p, n)`` and their
    images ``H V``, exact residual norms ``(n,)``, products used, whether every residual is
    within the tolerance, and whether the basis filled the whole space (the answer is exact)."""

    values: torch.Tensor
    vectors: torch.Tensor
    images: torch.Tensor
    residuals: torch.Tensor
    products: int
    converged: bool
    full: bool


def krylov_schur(op, start: torch.Tensor, n: int, tol: float, basis_size: int, budget: int,
                 gen: torch.Generator, watch: ProgressWatch | None = None,
                 tol_scale: str = "top") -> KrylovResult:
    """The ``n`` largest eigenpairs of ``op`` by thick-restart Lanczos from ``start``.

    Args:
        op: symmetric operator (``shape``, ``dtype``, ``device``, ``@`` on ``(p, 1)`` blocks).
        start: ``(p, 1)`` unit start vector.
        n: pairs wanted (``n < p``).
        tol: converged when every ``‖H v_i − θ_i v_i‖ ≤ tol · max |θ|`` (``tol_scale="top"``)
            or ``≤ tol · |θ_i|`` (``"pair"``; :mod:`tinysubspace.linalg.tolerance`).
        basis_size: largest basis (``n < basis_size ≤ p``); a full basis restarts thick with
            the best ``min(max(n + 1, (basis_size + n) // 2), basis_size − 1)`` Ritz vectors.
        budget: most products to use.
        gen: source of random directions (when the Krylov space becomes invariant early).
        watch: stops the solve (``converged=False``) when the residuals stagnate at the
            precision floor (:mod:`tinysubspace.linalg.stagnation`).
        tol_scale: ``"top"`` or ``"pair"``: what ``tol`` is relative to (see ``tol``).

    Returns:
        :class:`KrylovResult`.

    Raises:
        FloatingPointError: the operator returned NaN or infinity.
    """
    p, m = start.shape[0], basis_size
    Q = start.new_empty(m, p)  # row i is q_i
    HQ = start.new_empty(m, p)
    T = torch.zeros(m, m, dtype=torch.float64)
    q, j, used = start[:, 0], 0, 0
    tiny, eps = float(torch.finfo(start.dtype).tiny), float(torch.finfo(start.dtype).eps)
    while True:
        Q[j] = q
        w = apply_operator(op, q[:, None], used)[:, 0]
        used += 1
        HQ[j] = w
        f, h = _orthogonal_part(w, Q[: j + 1])
        column = h.cpu().double()  # Qᵀ H q_j: column j of T
        T[: j + 1, j] = column
        T[j, : j + 1] = column
        j += 1
        theta, Y = torch.linalg.eigh(T[:j, :j])
        theta, Y = theta.flip(0), Y.flip(1)
        beta = float(f.norm())
        scale = max(float(theta.abs().max()), tiny)
        bar = thresholds(theta[:n], scale, tol, tol_scale, start.dtype)
        invariant = beta <= 10 * eps * max(scale, float(w.norm()))
        full = j >= p
        estimates = beta * Y[j - 1, :n].abs()
        claimed = j >= n and bool((estimates <= bar).all())
        if not (claimed or full or used >= budget) and watch is not None and j >= n:
            # stalled: stop
            claimed = watch.update(relative_residual(estimates, bar, tol, scale), used)
        if claimed or full or used >= budget:
            wanted = Y[:, :n].to(start.dtype).to(start.device)
            V, HV = Q[:j].T @ wanted, HQ[:j].T @ wanted
            values = theta[:n].to(start.dtype).to(start.device)
            residuals = (HV - V * values).norm(dim=0)
            exact_bar = thresholds(values, scale, tol, tol_scale, start.dtype)
            done = full or (j >= n and bool((residuals <= exact_bar).all()))
            stalled = (watch is not None and not done and (watch.stalled or watch.update(
                relative_residual(residuals, exact_bar, tol, scale), used)))
            if done or stalled or used >= budget:
                return KrylovResult(values, V, HV, residuals, used, done, full)
        # an invariant Krylov space: go on from a new random direction
        q = _random_direction(Q[:j], gen) if invariant else f / beta
        if j == m:  # basis full: thick restart with the best Ritz vectors (Krylov–Schur)
            keep = min(max(n + 1, (m + n) // 2), m - 1)
            kept = Y[:, :keep].to(start.dtype).to(start.device)
            Q[:keep] = kept.T @ Q[:m]
            HQ[:keep] = kept.T @ HQ[:m]
            T.zero_()
            T[:keep, :keep] = torch.diag(theta[:keep])
            j = keep


def apply_operator(op, block: torch.Tensor, used: int) -> torch.Tensor:
    """``op @ block``, checked: a finite tensor of the block's shape, dtype and device.

    Raises:
        ValueError: the product has another shape, dtype or device than ``block`` (which is in
            the operator's declared ``dtype`` and ``device``).
        FloatingPointError: it has NaN or infinite entries.
    """
    image = op @ block
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"op @ block must return a torch.Tensor, got {type(image).__name__}")
    if (image.shape, image.dtype, image.device) != (block.shape, block.dtype, block.device):
        raise ValueError(
            f"op @ block must return a tensor of the block's shape {tuple(block.shape)}, dtype "
            f"{block.dtype} and device {block.device} (the operator declares dtype={op.dtype}, "
            f"device={op.device}); got shape {tuple(image.shape)}, dtype {image.dtype}, device "
            f"{image.device}. Make the operator's products match its declared dtype and device")
    if not bool(torch.isfinite(image).all()):
        raise FloatingPointError(f"the operator returned non-finite values (after {used + 1} "
                                 "products)")
    return image


def _orthogonal_part(w: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f, h)`` with ``w = basisᵀ h + f`` and ``f ⊥ basis`` (rows orthonormal): classical
    Gram–Schmidt twice, and a third time when the second pass removed more than half of what was
    left (a ``w`` nearly inside the span; DGKS)."""
    h = basis @ w
    f = w - basis.T @ h
    for _ in range(2):
        before = f.norm()
        correction = basis @ f
        f = f - basis.T @ correction
        h = h + correction
        if f.norm() > 0.5 * before:
            break
    return f, h


def _random_direction(basis: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A unit random vector orthogonal to the rows of ``basis`` (``(j, p)``, ``j < p``)."""
    p = basis.shape[1]
    while True:
        candidate = random_block(p, 1, basis.dtype, basis.device, gen)
        direction = orthonormalize_against(candidate, basis.T)
        if direction.shape[1]:
            return direction[:, 0]
