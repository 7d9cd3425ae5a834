"""The multiplicity check: did a solve miss an eigenvalue above the ones it found?

A Krylov space grown from one start vector ``q`` holds exactly one direction of each eigenspace
(the projection of ``q`` onto it), and ``s`` start vectors hold at most ``s``: a solve with a
single start vector finds one copy of a repeated eigenvalue, converges every pair it has, and
would report the others as if they did not exist (spectrum ``(1, 1, 0.6, …)``, ``k = 2``: it
returns ``[1, 0.6]``). Nearly equal eigenvalues behave the same way at a finite tolerance. So
before a solve declares convergence of ``(θ_i, v_i)``, ``i ≤ n``, it asks whether

.. math::  H_\\perp = P H P, \\qquad P = I - V V^T,

has an eigenvalue above ``θ_n``: Lanczos on ``H_⊥`` from a fresh seeded random start ``q ⊥ V``
(every product ``H q`` projected onto ``V^⊥``). Its Ritz values are lower bounds of the
eigenvalues of ``H`` on ``V^⊥`` (Cauchy interlacing), so a Ritz value above
``θ_n + tol·|θ_1|`` *proves* a miss, and its Ritz vectors, with their images, are handed back to
the solver to go on with.

The other way round is a matter of probability, not proof: a missed eigenvalue
``λ* = θ_n + γ (θ_n − λ_min)`` shows once ``s`` steps have amplified its component in ``q`` (about
``1/√p``) over the rest, i.e. once the Chebyshev factor ``T_{s−1}(1 + 2γ)`` exceeds about ``√p``:
well-separated copies (``γ ≳ 0.5``, as in the paper's toy model) within 8–10 steps for
``p ≤ 10⁶``, copies only slightly above ``θ_n`` later or not at all. Those are also the cheap
misses: an eigenvalue within ``tol·|θ_1|`` of ``θ_n`` is not a miss at all (the values returned
are right to the tolerance). An invariant Krylov space of ``H_⊥`` (or one that fills ``V^⊥``)
ends the check early with its exact top eigenvalue. The search grows a
:class:`~tinysubspace.linalg.basis.KrylovBasis` locked against ``V``: the same
reorthogonalisation, breakdown rule and random directions as every other Lanczos path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinysubspace.linalg.basis import KrylovBasis, apply_operator
from tinysubspace.linalg.tolerance import ConvergenceCriterion
from tinysubspace.operator import vector_space

__all__ = ["CHECK_STEPS", "DeflatedSearch", "GuardState", "deflated_search", "miss_bar"]

CHECK_STEPS = 8
"""Default products of the multiplicity check (``top_eigenpairs(check_steps=...)``)."""


@dataclass(frozen=True)
class DeflatedSearch:
    """What Lanczos on ``P H P`` found.

    Attributes:
        basis: ``(p, j)`` orthonormal Lanczos vectors, orthogonal to ``V``.
        images: ``(p, j)`` their products ``H q`` (not projected).
        top: the largest Ritz value of ``P H P`` on ``span(basis)`` (a lower bound of the largest
            eigenvalue of ``H`` on ``V^⊥``).
        matvecs: operator products used (``j``).
        exact: the Krylov space became invariant or filled ``V^⊥``: ``top`` is the largest
            eigenvalue of ``H`` on ``V^⊥`` seen from the start vector, not a bound.
        ritz_vector: ``(p,)`` the unit Ritz vector of ``top`` (in ``span(basis)``, ``⊥ V``): the
            best start for a later search (the amortised check's guard).
    """

    basis: torch.Tensor
    images: torch.Tensor
    top: float
    matvecs: int
    exact: bool
    ritz_vector: torch.Tensor


@dataclass(frozen=True)
class GuardState:
    """The amortised multiplicity check's state, carried from one measurement to the next in
    the result (``Eigenpairs.guard``) and passed back in with it (no hidden cache).

    Attributes:
        vector: ``(p,)`` unit guard vector (the top Ritz vector of the last search on
            ``(I − VVᵀ) H (I − VVᵀ)``), or ``None`` (the next search starts at random).
        since_full: measurements since the last full check (0: this one ran it).
    """

    vector: torch.Tensor | None
    since_full: int


def miss_bar(values: torch.Tensor, criterion: ConvergenceCriterion) -> float:
    """``θ_n`` plus its residual bar: a Ritz value of ``(I − VVᵀ) H (I − VVᵀ)`` above it is a
    missed eigenvalue (``values``: the ``n`` found, descending)."""
    scale = max(float(values.abs().max()), float(torch.finfo(values.dtype).tiny))
    margin = criterion.bars(values[-1:], scale)
    margin = float(margin[0]) if isinstance(margin, torch.Tensor) else margin
    return float(values[-1]) + margin


def deflated_search(op, V: torch.Tensor, bar: float, steps: int, gen: torch.Generator,
                    start: torch.Tensor | None = None) -> DeflatedSearch:
    """Up to ``steps`` Lanczos steps on ``(I − VVᵀ) H (I − VVᵀ)``, stopping early once a Ritz
    value exceeds ``bar``.

    Args:
        op: symmetric operator (``shape``, ``dtype``, ``device``, ``@`` on ``(p, 1)`` blocks).
        V: ``(p, n)`` orthonormal columns (the pairs a solve found), ``n < p``, in the working
            dtype (the search's vectors are in ``V``'s dtype).
        bar: a Ritz value above this is a missed eigenvalue (``θ_n + tol·|θ_1|``).
        steps: most products (≥ 1).
        gen: source of the random start vector.
        start: ``(p,)`` start vector instead (projected onto ``V^⊥``; a random one if nothing
            of it is left there, or if it is ``None``).

    Raises:
        FloatingPointError: the operator returned NaN or infinity.
    """
    space = vector_space(op)
    basis = KrylovBasis(V.shape[0], V.dtype, V.device, capacity=min(steps, space.dim),
                        locked=V, space=space)
    steps = min(steps, basis.room)  # a Krylov space in V^⊥ has at most dim V^⊥ vectors
    T = torch.zeros(steps, steps, dtype=torch.float64)
    q = _start(basis, start, gen)
    top, exact = float("-inf"), False
    while basis.size < steps:
        w = apply_operator(op, q[:, None], basis.size)[:, 0]
        basis.append(q, w)
        f, h = basis.orthogonal_part(w)  # h = Qᵀ H q_j = Qᵀ P H P q_j (q_j ⊥ V): column j of T
        j = basis.size
        T[:j, j - 1] = T[j - 1, :j] = h.cpu().double()
        theta, Y = torch.linalg.eigh(T[:j, :j])
        top = float(theta[-1])
        beta = float(space.norm(f))
        if top > bar:
            break
        if basis.room == 0 or basis.invariant(beta, max(abs(top), float(space.norm(w)))):
            exact = True  # invariant, or V^⊥ exhausted: nothing above top is reachable from q
            break
        q = f / beta
    ritz = basis.Q @ Y[:, -1].to(basis.dtype).to(basis.device)
    return DeflatedSearch(basis.Q, basis.HQ, top, basis.size, exact, ritz / space.norm(ritz))


def _start(basis: KrylovBasis, start: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """``start`` projected onto the room of ``basis`` and normalised, or a random direction."""
    if start is not None and start.shape == (basis.p,):
        kept = KrylovBasis(basis.p, basis.dtype, basis.device, 1, locked=basis.locked,
                           images=False, space=basis.space)
        kept = kept.add_columns(start.to(basis.device, basis.dtype)[:, None])
        if kept.shape[1]:
            return kept[:, 0]
    return basis.random_direction(gen)
