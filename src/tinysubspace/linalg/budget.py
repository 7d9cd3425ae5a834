"""A fixed budget of products per measurement: refine the previous subspace, report the error.

:func:`refine_eigenpairs` spends exactly ``matvecs = P`` operator-vector products and stops — it
does not iterate to a tolerance. From the previous measurement's orthonormal ``V_prev``
(``p × m0``) it builds a basis ``Q`` of ``P`` columns with their images ``HQ`` in one of two
ways (``method``):

``"krylov"`` (default): the Krylov space ``K_P(H, s)`` of one start vector ``s = Σ_i v_i``
    (``v_i`` the previous vectors, orthonormal): ``P`` single-vector Lanczos steps with full
    reorthogonalisation, one product (and one pass) each. If ``V_prev`` is exactly invariant,
    ``K_{m0}(H, s) = span(V_prev)`` and the next step breaks down (then it goes on from a seeded
    random direction), so an exact previous answer stays exact; otherwise every product raises
    the degree of the polynomial ``π(H) s`` that corrects *all* previous directions at once. No
    random part is added to ``s`` (``track_eigenpairs``' krylov warm start adds ``10⁻²``): on
    digits (``k = 10``, 14 products, 49 measurements) ``0``, ``10⁻³`` and ``10⁻²`` gave the same
    ``f_top`` errors (max 3.5e-3) and ``10⁻¹`` a larger one (6.2e-3), and a random part keeps an
    exact previous subspace from staying exact.
``"block"``: one pass ``H V_prev`` (``m0`` products), then passes of at most ``b`` products
    (``block_size``, default ``k``): the ``b`` leading left singular directions of the residuals
    ``R = H V − V Θ`` of the top ``k`` Ritz pairs (a block Krylov extension, as in
    ``warm="subspace"``). Few passes (two for ``P ≤ m0 + k``), but a block of ``k`` residuals
    raises the polynomial degree of the correction by one per ``k`` products.

Why the Krylov space wins per product (digits FC, ``k = 10``, 49 measurements 10 SGD steps
apart, docs/performance.md section 4): the block method spends ``k = 10`` of 15 products on
``H V_prev`` — a degree-1 correction — and the other 5 on half of the residual directions, so
the pairs nearest ``λ_k`` are not corrected at all (max ``|Δ f_top|`` 6.2e-3); the Krylov space
of the same 15 products is a degree-14 polynomial filter of ``s`` (max ``|Δ f_top|`` 3.1e-4).
Its limit: a single start vector sees one vector of an exactly repeated eigenvalue's
eigenspace, so ``"krylov"`` keeps one copy of a double eigenvalue among the top ``k`` (the
returned ``subspace_error`` then does not bound the error); ``"block"`` multiplies every previous
vector and keeps both.

Either way, a last Rayleigh–Ritz on the whole basis ``Q`` gives the Ritz pairs
``(θ_i, v_i = Q y_i)`` with *exact* residuals ``r_i = HQ y_i − θ_i v_i`` (``HQ`` is known: no
extra product). A budget ``P ≤ k`` is refused: Rayleigh–Ritz of ``P ≤ k`` products can only
rotate inside ``span(V_prev)`` (``"block"``), or returns no ``(k+1)``-th Ritz pair to estimate
the error with, and the subspace would never move (seen: a tracker with ``2k = 20`` pairs and
20 products drifted to overlap 0.13 with the true subspace in three measurements).

The result is ``converged`` only if every ``‖r_i‖`` meets the tolerance's bar (``tol · |θ_1|``,
or ``tol · |θ_i|`` for ``tol_scale="pair"``); no multiplicity check runs
(``multiplicity_checked=False``, ``certificate="none"``).

**Error estimate.** Let ``P = VVᵀ`` (the returned top-``k`` Ritz vectors) and ``P*`` the
projector on the top-``k`` eigenvectors of ``H``. The Davis–Kahan sin Θ theorem, for
``R = HV − VΘ`` and the Ritz values ``Θ ≥ θ_k`` separated by ``δ = θ_k − λ_{k+1} > 0`` from the
rest of the spectrum, gives

.. math::  \\|P − P^*\\|_2 = \\sin θ_{\\max} ≤ \\|R\\|_2 / δ ,

and for any ``g ≠ 0`` the top fraction (eq. 2) ``f_top = gᵀPg / ‖g‖²`` moves by

.. math::  |f_{top}(V) − f_{top}(V^*)| = |gᵀ(P − P^*)g| / \\|g\\|^2 ≤ \\|P − P^*\\|_2 ,

and the overlap (eq. 5) with the true subspace is at least ``1 − sin² θ_max``. ``λ_{k+1}`` is
not known: it is estimated by ``θ_{k+1} + ‖r_{k+1}‖`` (the next Ritz value of the basis plus its
residual; a Ritz pair lies within its residual of an eigenvalue, and ``λ_{k+1} ≥ θ_{k+1}`` by
interlacing). The estimate :attr:`Eigenpairs.subspace_error` ``= min(1, ‖R‖₂ / δ̂)`` (1 when
``δ̂ ≤ 0`` or the basis has no ``(k+1)``-th Ritz value) is therefore a bound whenever the
eigenvalue nearest ``θ_{k+1}`` is ``λ_{k+1}`` — it fails only if the basis misses an eigenvector
of ``H`` with an eigenvalue above ``θ_{k+1} + ‖r_{k+1}‖`` entirely (an eigenvalue entering the
top ``k`` from a direction no residual points to; a periodic converged solve with the
multiplicity check finds it).

With ``"krylov"`` the ``(k+1)``-th Ritz pair is often not resolved (the Krylov space of ``Σ v_i``
holds little of ``u_{k+1}``): its residual is large and ``δ̂ ≤ 0`` (the estimate is the trivial
1: so on digits), or the interval ``θ_{k+1} ± ‖r_{k+1}‖`` holds a lower eigenvalue and
``λ_{k+1}`` lies above it, and the estimate can fall short of ``sin θ_max``: by up to a factor
1.22–1.29 on a dense outlier spectrum (``θ_{11} + r_{11} ≈ 0.93 < λ_{11} = 1.0``;
tests/test_budget.py; the factor moves with the BLAS thread count, 0.62 on one thread and 1.29
on two along the same trajectory), where ``|Δ f_top|`` stayed below ``f_top_error`` by two
orders of magnitude. Read it as an
estimate there; ``"block"``'s is a bound in every test.

When to use it: along a training run where the top subspace moves little between measurements
(the Hessian's top subspace "freezes" early, PAPER.txt section 3), when a fixed, known cost per
measurement matters more than a certified tolerance — e.g. measuring every step. Numbers:
docs/performance.md, section 4, "A fixed budget per measurement".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tinysubspace.linalg.basis import KrylovBasis, apply_operator, working_dtype
from tinysubspace.linalg.lanczos import Eigenpairs
from tinysubspace.linalg.rayleigh_ritz import RitzBasis
from tinysubspace.linalg.tolerance import ConvergenceCriterion
from tinysubspace.operator import vector_space

__all__ = ["BUDGET_METHODS", "refine_eigenpairs", "subspace_error_estimate"]

BUDGET_METHODS = ("krylov", "block")
"""How :func:`refine_eigenpairs` spends its products (module docstring)."""


def previous_block(previous: Eigenpairs | torch.Tensor, p: int) -> torch.Tensor:
    """The ``(p, m)`` block of previous vectors in ``previous`` (its ``vectors``, or the tensor).

    Raises:
        TypeError: ``previous`` is neither :class:`Eigenpairs` nor a tensor.
        ValueError: its vectors have the wrong shape (another model's, say).
    """
    if isinstance(previous, Eigenpairs):
        block = previous.vectors
    elif isinstance(previous, torch.Tensor):
        block = previous
    else:
        raise TypeError(f"previous must be Eigenpairs, a (p, m) tensor or None, got "
                        f"{type(previous).__name__}")
    if block.ndim not in (1, 2) or block.shape[0] != p or block.numel() == 0:
        raise ValueError(f"previous vectors must have shape ({p},) or ({p}, m) with m >= 1 (the "
                         f"operator's dimension is p = {p}), got {tuple(block.shape)}")
    return block.reshape(p, -1)


def _start(previous: Eigenpairs | torch.Tensor, p: int, k: int, matvecs: int,
           dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """The orthonormal first block: ``previous``'s vectors, filled at random up to ``k``."""
    block = previous_block(previous, p)
    if block.shape[1] > matvecs:
        raise ValueError(f"matvecs = {matvecs} cannot even multiply the {block.shape[1]} "
                         "previous vectors; pass at least as many products as previous columns")
    basis = KrylovBasis(p, dtype, device, max(k, block.shape[1]), images=False)
    basis.add_columns(block.to(device=device, dtype=dtype))
    return basis.fill_random(max(k, basis.size), gen).clone()


def subspace_error_estimate(R: torch.Tensor, theta_k: float, next_value: float | None,
                            next_residual: float | None, space: Any = None) -> float:
    """``min(1, ‖R‖₂ / δ̂)`` with ``δ̂ = θ_k − (θ_{k+1} + ‖r_{k+1}‖)`` (module docstring): an
    estimate of ``sin θ_max`` between ``span(V)`` and the top-``k`` eigenvectors, hence of the
    largest change of ``f_top`` (eq. 2). ``1`` when ``δ̂ ≤ 0`` or there is no ``θ_{k+1}``.
    ``space``: the inner product of ``R``'s columns (sharded rows: summed over ranks).

    >>> R = torch.tensor([[0.0], [0.1]], dtype=torch.float64)
    >>> subspace_error_estimate(R, 2.0, 0.9, 0.1)
    0.1
    """
    if next_value is None or next_residual is None:
        return 1.0
    gap = theta_k - (next_value + next_residual)
    if not gap > 0:
        return 1.0
    gram = (R.T @ R if space is None else space.gram(R, R)).double()
    norm = float(torch.linalg.eigvalsh((gram + gram.T) / 2)[-1].clamp_min(0).sqrt())
    return min(1.0, norm / gap)


def refine_eigenpairs(op, k: int, previous: Eigenpairs | torch.Tensor, matvecs: int,
                      tol: float = 1e-4, block_size: int | None = None, seed: int = 0,
                      tol_scale: str = "top", method: str = "krylov") -> Eigenpairs:
    """The top ``k`` Ritz pairs of ``op`` from ``previous``, refined with exactly ``matvecs``
    products (module docstring: the steps, the error estimate, when to use it).

    Args:
        op: symmetric operator (``shape``, ``dtype``, ``device``, ``@``).
        k: number of pairs.
        previous: the previous measurement (:class:`Eigenpairs` or its ``(p, m0)`` vectors; any
            ``m0 ≤ products`` columns, filled at random up to ``k``).
        matvecs: operator-vector products to spend (``k < matvecs < p``; with ``"block"`` also
            ``≥ m0``).
        tol: the bar that decides ``converged`` (never used to stop).
        block_size: ``"block"`` only: products per extension pass (default ``k``: the residuals
            of ``k`` pairs span at most ``k`` new directions per pass; ``matvecs − m0 ≤ k`` is
            one pass).
        seed: seed of any random fill.
        tol_scale: ``"top"`` or ``"pair"`` (:mod:`tinysubspace.linalg.tolerance`).
        method: ``"krylov"`` (default: one product per pass, the most accurate per product)
            or ``"block"`` (fewest passes) — module docstring.

    Returns:
        :class:`Eigenpairs` with exact residuals, ``matvecs`` equal to the budget, ``converged``
        only if every residual meets its bar, ``solver="budget"`` and ``subspace_error`` (the
        estimate of ``sin θ_max``, which bounds the error of ``f_top``).

    Raises:
        TypeError: ``previous`` of an unusable kind.
        ValueError: ``matvecs ≤ k`` (the subspace could not move), ``matvecs ≥ p``, or below
            the previous columns with ``"block"``; a bad ``k``, ``tol``, ``tol_scale``,
            ``method`` or ``block_size`` (given with ``"krylov"``); previous vectors of the
            wrong shape.
    """
    p = op.shape[0]
    _check_sizes(k, matvecs, p, tol, block_size, method)
    criterion = ConvergenceCriterion.for_operator(op, tol, tol_scale)
    gen = torch.Generator().manual_seed(seed)
    work = working_dtype(op.dtype)
    if method == "krylov":
        state = _krylov_basis(op, previous_block(previous, p), matvecs, work, gen)
        return _result(state, k, criterion, matvecs, tol_scale, op.dtype)
    start = _start(previous, p, k, matvecs, work, op.device, gen)
    state = RitzBasis(start, capacity=matvecs)
    state.extend(start, apply_operator(op, start, 0))
    used = start.shape[1]
    while used < matvecs:
        theta, Y = state.ritz()
        b = min(block_size or k, matvecs - used)
        directions = state.residual_directions(theta[:k], Y[:, :k], b)
        scratch = KrylovBasis(p, work, op.device, b, locked=state.Q, images=False)
        scratch.add_columns(directions)
        block = scratch.fill_random(b, gen).clone()
        state.extend(block, apply_operator(op, block, used))
        used += b
    return _result(state, k, criterion, used, tol_scale, op.dtype)


def _krylov_basis(op, block: torch.Tensor, matvecs: int, work: torch.dtype,
                  gen: torch.Generator) -> RitzBasis:
    """``matvecs`` Lanczos steps from ``Σ_i v_i`` (module docstring), full reorthogonalisation;
    an invariant subspace (breakdown) continues with a seeded random direction."""
    space = vector_space(op)
    s = block.to(device=op.device, dtype=work).sum(dim=1)
    norm = float(space.norm(s))
    q = s / norm if norm > 0 else space.random_block(1, work, op.device, gen)[:, 0]
    q = q / space.norm(q)
    state = RitzBasis(q[:, None], capacity=matvecs, space=space)
    for used in range(matvecs):
        image = apply_operator(op, q[:, None], used)
        state.extend(q[:, None], image)
        if used + 1 == matvecs:
            break
        f, _ = state.orthogonal_part(image[:, 0])
        beta = float(space.norm(f))
        scale = max(float(state.T.abs().max()), float(space.norm(image[:, 0])))
        q = state.random_direction(gen) if state.invariant(beta, scale) else f / beta
    return state


def _check_sizes(k: int, matvecs: int, p: int, tol: float, block_size: int | None,
                 method: str) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not isinstance(matvecs, int) or isinstance(matvecs, bool) or not k < matvecs < p:
        raise ValueError(f"matvecs must be an integer with k = {k} < matvecs < p = {p} (with "
                         f"matvecs <= k Rayleigh-Ritz cannot move the previous subspace), got "
                         f"{matvecs!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if method not in BUDGET_METHODS:
        raise ValueError(f"method must be one of {BUDGET_METHODS}, got {method!r}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
    if block_size is not None and method != "block":
        raise ValueError(f"block_size={block_size} is the passes' width of method='block'; got "
                         f"method={method!r} (one product per pass)")


def _result(state: RitzBasis, k: int, criterion: ConvergenceCriterion, used: int,
            tol_scale: str, dtype: torch.dtype) -> Eigenpairs:
    """Rayleigh–Ritz on the whole basis, exact residuals, the verdict and the estimate."""
    theta, Y = state.ritz()
    m = min(k + 1, theta.shape[0])
    V, HV = state.Q @ Y[:, :m], state.HQ @ Y[:, :m]
    R = HV - V * theta[:m]
    res = state.space.norm(R)  # summed over ranks for sharded vectors
    scale = max(float(theta.abs().max()), float(torch.finfo(theta.dtype).tiny))
    converged = bool((res[:k] <= criterion.bars(theta[:k], scale)).all())
    has_next = m > k
    error = subspace_error_estimate(R[:, :k], float(theta[k - 1]),
                                    float(theta[k]) if has_next else None,
                                    float(res[k]) if has_next else None, space=state.space)
    found = Eigenpairs(theta[:k].to(dtype).clone(), V[:, :k].to(dtype).clone(),
                       res[:k].to(dtype).clone(), used, converged, 0, False, tol_scale, "none")
    return dataclasses.replace(found, solver="budget", subspace_error=error)
