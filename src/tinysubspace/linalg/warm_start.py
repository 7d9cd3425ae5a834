"""Eigenpairs along a training run: each solve warm-started from the previous measurement's.

The tracker measures the top ``n = skip + k`` eigenpairs of a Hessian ``H_t`` that changes
between measurements (PAPER.txt section 3: the top subspace "freezes" early, so ``V_t`` is a
first guess for ``V_{t+1}``). :func:`track_eigenpairs` runs the thick-restart Lanczos of
:func:`tinysubspace.top_eigenpairs` from ``V_t`` in one of two ways:

``warm="subspace"``: fewest passes over the data.
    1. The previous vectors are the first block: one pass of ``m0`` products gives the
       Rayleigh–Ritz pairs of ``span(V_t)`` with exact residuals ``r_i = H v_i − θ_i v_i``; if
       every ``‖r_i‖ ≤ tol · |θ_1|`` that single pass is the whole solve.
    2. Then blocks of ``b = ⌈n/4⌉`` directions per pass (:func:`warm_block_size`): the ``b``
       leading left singular vectors of the unconverged residuals, the ``b``-dimensional
       subspace closest to all of them. (``b = n``, every residual every pass, costs 2–3 times
       the products for the same accuracy: a block Krylov space gains one polynomial degree per
       pass whatever ``b`` is.)

``warm="krylov"``: fewest products.
    Single-vector Lanczos (Krylov–Schur, :mod:`tinysubspace.linalg.krylov_schur`) from ``Σ_i v_i``
    plus a random part of relative weight ``10⁻²``: a Krylov space corrects all ``n`` directions
    at once, one product per pass. Like any single-vector start it sees one copy of an exactly
    repeated eigenvalue; the multiplicity check below finds the others.

``warm="auto"`` (default) picks the start from the measured cost of a pass, ``c0 + c1 b`` (a
gradient graph, then ``c1`` per product): on a GPU ``c1 ≪ c0`` (a 20-column block costs 0.06
(FC) to 0.3 (ResNet-18) of a single product per column), so passes are what count; on a CPU
``c1 ≈ c0`` (0.6–1.0), so products are. The cost is ``pass_cost=`` if given (``"measure"``:
timed here by :func:`~tinysubspace.linalg.pass_cost.measure_pass_cost`, its products counted —
what a tracker does at its first warm measurement), else ``previous.pass_cost``; it is carried on
in the result's ``pass_cost``, so one measurement serves the whole run; the choice is
:func:`~tinysubspace.linalg.pass_cost.choose_warm_start`, a pure function of the costs; where
it says ``subspace`` (passes cost), the solve is the folded block solver
(:mod:`tinysubspace.linalg.folded`: the multiplicity check rides in the block passes instead of
adding ``check_steps`` single-product passes; with ``skip=0`` and ``check="full"``). With
no cost known ``auto`` falls back to the device (``subspace`` on a GPU, ``krylov`` elsewhere):
timing is never taken unasked, so a run without it stays reproducible to the last digit.
Numbers: docs/performance.md.

``solver="budget"`` does not solve to ``tol``: it refines ``previous`` with exactly
``matvecs`` products (:func:`~tinysubspace.linalg.budget.refine_eigenpairs`: Rayleigh–Ritz,
exact residuals, an ``f_top`` error estimate, ``converged`` only if the residuals meet ``tol``).

Every returned pair meets ``‖H v − λ v‖ ≤ tol · |λ_1|`` (or ``≤ tol · |λ|`` with
``tol_scale="pair"``), checked on exact residuals, and then, as in every solve of
:func:`top_eigenpairs`, the multiplicity check (:mod:`tinysubspace.linalg.deflation`) runs
``check_steps`` Lanczos steps on ``(I − VVᵀ) H (I − VVᵀ)`` from a fresh random start. An
eigenvector that enters the top ``n`` from a direction the warm start cannot see — orthogonal to
``span(V_t)`` and to every residual, as when ``span(V_t)`` is exactly invariant for ``H_{t+1}``
(``subspace``), or nearly so, which leaves only the ``10⁻²`` random part to find it (``krylov``) —
shows there as a Ritz value above ``θ_n`` and joins the solve, as a cold start would find it. Issue
12's case (tol 1e-4, top 20, the previous basis rotated by 10⁻³, an eigenvalue rising from the bulk
to 2.0 above ``θ_20 = 1.5``) was missed with ``converged=True`` (eigenvalue error 0.45, overlap
0.95) and is found now. The check's reach is a Lanczos run's: an eigenvalue ``λ*`` above ``θ_n`` is
found within a few steps when ``λ* − θ_n`` is large against the spread of the rest of ``H`` on
``V^⊥`` below it; one just above ``θ_n`` with that rest close below (1.55 over a bulk up to 1.45 in
the same case) can need more steps (``check_steps=16`` there) and is otherwise returned as missed
with ``converged=True`` — the returned values are then off by at most that distance.
``multiplicity_checked`` says whether the check ran. By default (``check="amortised"``, issue 23)
its cost is spread over the measurements: a full check at the first and at least every ``M = 4``,
a 2-product guard carried from row to row in between (none with ``guard_steps=0``); a miss within
the check's reach is found within ``M`` measurements (:mod:`tinysubspace.linalg.amortised`);
``check="full"`` checks every measurement.
Tests (tests/test_tracking.py):
``test_krylov_warm_start_finds_an_eigenvector_entering_a_nearly_invariant_subspace``,
``test_the_reach_of_the_multiplicity_check_grows_with_check_steps``.
"""

from __future__ import annotations

import dataclasses

import torch

from tinysubspace.linalg.amortised import (
    CHECK_EVERY,
    GUARD_STEPS,
    amortised_check,
    check_amortised_arguments,
)
from tinysubspace.linalg.basis import KrylovBasis, working_dtype
from tinysubspace.linalg.budget import previous_block, refine_eigenpairs
from tinysubspace.linalg.deflation import CHECK_STEPS
from tinysubspace.linalg.folded import folded_eigenpairs
from tinysubspace.linalg.lanczos import Eigenpairs, in_operator_space, top_eigenpairs
from tinysubspace.linalg.pass_cost import PassCost, choose_warm_start, measure_pass_cost
from tinysubspace.linalg.tolerance import ConvergenceCriterion
from tinysubspace.operator import VectorSpace, vector_space

__all__ = ["SOLVERS", "WARM_STARTS", "track_eigenpairs", "warm_block_size"]

SOLVERS = ("lanczos", "budget", "folded")
"""What :func:`track_eigenpairs` does: solve to ``tol`` (``lanczos``; ``folded``: the warm block
solver with the multiplicity check in its passes, :mod:`tinysubspace.linalg.folded`) or spend a
fixed number of products (``budget``)."""

WARM_STARTS = ("auto", "subspace", "krylov")
"""How :func:`track_eigenpairs` uses the previous vectors (see its ``warm`` argument)."""

KRYLOV_RANDOM_PART = 0.01
"""Weight of the random part of the ``krylov`` start vector (relative to the previous part).

Measured on digits (k = 20, tol 1e-4, ten measurements two SGD steps apart): with ``10⁻³`` the
solve once stopped with λ21 in place of a λ20 it had not yet resolved (overlap 0.950 with
eigsh); ``10⁻²``, ``10⁻¹`` and ``1`` did not, at the same products (857, 851, 859, 866 over nine
measurements). A larger part costs products when nothing moves (a dense test at tol 1e-10: 211,
240, 272 products for ``10⁻³, 10⁻², 10⁻¹``; cold 340). No start can exclude such a miss of a
nearly equal eigenvalue at a loose tolerance — a cold Lanczos can make it too, and the
multiplicity check only catches eigenvalues clearly above ``θ_n``; docs/performance.md."""


def default_check(skip: int) -> str:
    """The multiplicity check of :func:`track_eigenpairs` when ``check`` is not given:
    ``"amortised"``, or ``"full"`` with ``skip > 0`` (the guard deflates the returned vectors
    only, which leave the skipped ones out).

    >>> default_check(0), default_check(10)
    ('amortised', 'full')
    """
    return "full" if skip else "amortised"


def warm_block_size(n: int, previous_columns: int) -> int:
    """Default block size of a ``subspace`` warm start: ``⌈n/4⌉``, at most ``previous_columns``,
    at least 1.

    >>> warm_block_size(20, 20), warm_block_size(10, 10), warm_block_size(1, 1)
    (5, 3, 1)
    """
    return max(1, min(-(-n // 4), previous_columns))


def resolve_warm_start(warm: str, device: torch.device | str) -> str:
    """``subspace`` or ``krylov``: what ``warm`` means on ``device`` (``auto``: ``subspace`` on a
    GPU, ``krylov`` elsewhere).

    Raises:
        ValueError: an unknown ``warm`` (the known ones are listed).
    """
    if warm not in WARM_STARTS:
        raise ValueError(f"warm must be one of {WARM_STARTS}, got {warm!r}")
    if warm != "auto":
        return warm
    return "subspace" if torch.device(device).type == "cuda" else "krylov"


@in_operator_space
def track_eigenpairs(op, k: int, previous: Eigenpairs | torch.Tensor | None = None,
                     tol: float = 1e-4, seed: int = 0, max_matvecs: int | None = None,
                     skip: int = 0, block_size: int | None = None,
                     basis_size: int | None = None, warm: str = "auto",
                     check_steps: int = CHECK_STEPS, tol_scale: str = "top",
                     check: str | None = None, check_every: int = CHECK_EVERY,
                     guard_steps: int = GUARD_STEPS, solver: str = "lanczos",
                     matvecs: int | None = None,
                     pass_cost: PassCost | str | None = None) -> Eigenpairs:
    """The ``k`` largest eigenpairs of ``op``, warm-started from a previous measurement.

    Args:
        op: symmetric operator (``shape``, ``dtype``, ``device``, ``@``), e.g. a
            :class:`tinysubspace.HessianOperator` at the current parameters.
        k: number of eigenpairs wanted (the tracker asks for ``2 × k_top``: top and next).
        previous: the previous measurement (:class:`Eigenpairs`, or its ``(p, m0)`` vectors);
            ``None`` for a cold start (single-vector Lanczos from a random vector of ``seed``).
            Any number of columns works; fewer than ``skip + k`` are completed by the Krylov
            expansion.
        tol: relative residual tolerance: ``‖H v − λ v‖ ≤ tol · |λ_1|`` for every returned (and
            every skipped) pair (``tol_scale="pair"``: ``≤ tol · |λ|``, ARPACK's). The default
            ``1e-4`` resolves a 20-dimensional Hessian subspace whose edge sits in the bulk
            (``λ_20 − λ_21 ≈ 10⁻³ λ_1``) and is reachable in float32.
        seed: seed of any random directions (identical on every device).
        max_matvecs: stop (``converged=False``) after this many products.
        skip: leave out the ``skip`` largest pairs (computed all the same).
        block_size: directions added per pass. Default: 1, except :func:`warm_block_size` for a
            ``subspace`` warm start.
        basis_size: largest basis before a thick restart (see :func:`top_eigenpairs`).
        warm: ``"auto"`` (default), ``"subspace"`` or ``"krylov"``: how ``previous`` is used
            (module docstring).
        check_steps: products of the multiplicity check that ends every solve (see
            :func:`top_eigenpairs`); ``0`` skips it.
        tol_scale: ``"top"`` (default) or ``"pair"``: what ``tol`` is relative to
            (:mod:`tinysubspace.linalg.tolerance`); recorded in the result.
        check: ``"amortised"`` (the default, ``None``, with ``skip=0``): the full
            multiplicity check (``check_steps`` products) at the first measurement (``previous``
            without a guard state) and every ``check_every``-th after it, and ``guard_steps``
            products of a guard carried in ``previous.guard`` at the others (none with
            ``guard_steps=0``); a missed eigenvalue within the check's reach is found
            within ``check_every`` measurements (:mod:`tinysubspace.linalg.amortised` states the
            guarantee). ``"full"``: the full check at every measurement (the default with
            ``skip > 0``, which ``"amortised"`` refuses). Each result's ``certificate`` says
            which check it passed. Where a measured pass cost chooses the ``subspace`` start,
            the solve is the folded block solver unless ``check="amortised"`` is asked for.
        check_every: ``M`` of ``check="amortised"``.
        guard_steps: the guard's products per measurement with ``check="amortised"``
            (default 2; 0: no guard, the scheduled full check alone bounds a miss).
        solver: ``"lanczos"`` (default: solve to ``tol``), ``"folded"`` (solve to ``tol`` with
            the warm block solver whose multiplicity check rides in its passes,
            :func:`~tinysubspace.linalg.folded.folded_eigenpairs`; ``check`` is then ignored) or
            ``"budget"``: refine ``previous`` with exactly ``matvecs`` products (module
            docstring). Either is a cold solve to ``tol`` when ``previous`` is ``None``; both
            need ``skip=0``.
        matvecs: the budget's operator-vector products per measurement (``solver="budget"``
            only; ``≥ k``).
        pass_cost: the cost of a pass for ``warm="auto"`` (module docstring): a
            :class:`~tinysubspace.linalg.pass_cost.PassCost`, ``"measure"`` (time it now, on
            the previous vectors; ``2(1 + n)`` products, counted), or ``None`` (default:
            ``previous.pass_cost`` if it has one, else the device rule).

    Returns:
        :class:`Eigenpairs`: values descending, orthonormal vectors, exact residuals, the
        number of products used, whether every pair converged and whether the multiplicity
        check passed; with ``solver="budget"`` also ``subspace_error`` (``f_top_error``); the
        pass cost ``warm="auto"`` used, if any, in ``pass_cost``.

    Raises:
        TypeError: ``previous`` of an unusable kind.
        ValueError: an unknown ``solver``, ``matvecs`` missing, below ``k`` or given without
            ``solver="budget"``, ``previous`` of the wrong shape, an unknown ``warm`` or
            ``check``, a bad ``check_every`` or ``guard_steps``, ``skip > 0`` with
            ``check="amortised"`` or ``solver="budget"``, or a bad ``k``, ``skip``, ``tol``,
            ``tol_scale``, ``block_size``, ``basis_size`` or ``max_matvecs`` (see
            :func:`top_eigenpairs`).
    """
    _check_solver(solver, matvecs, skip, pass_cost)
    if solver == "budget" and previous is not None:
        return refine_eigenpairs(op, k, previous, matvecs, tol=tol, block_size=block_size,
                                 seed=seed, tol_scale=tol_scale)
    resolve_warm_start(warm, op.device)  # validates warm
    chosen = check
    check = default_check(skip) if check is None else check
    check_amortised_arguments(check, check_every, guard_steps, skip)
    init, b, extra = None, block_size or 1, 0
    if previous is not None:
        init = previous_block(previous, op.shape[0]).to(device=op.device,
                                                         dtype=working_dtype(op.dtype))
        if solver == "lanczos":
            warm, pass_cost, extra = _warm_choice(op, warm, previous, pass_cost, init, k + skip)
        if solver == "folded" or (pass_cost is not None and warm == "subspace" and not skip
                                  and chosen in (None, "full")):
            found = folded_eigenpairs(op, k, init, tol=tol, seed=seed, block_size=block_size,
                                      check_steps=check_steps, max_matvecs=max_matvecs,
                                      tol_scale=tol_scale)
            return dataclasses.replace(found, matvecs=found.matvecs + extra, pass_cost=pass_cost)
        if warm == "krylov":
            init = _krylov_start(init, seed, vector_space(op))
        else:
            b = block_size or warm_block_size(k + skip, init.shape[1])
    warm_init, budget = init, max_matvecs

    def solve(check_steps: int, init: torch.Tensor | None = warm_init,
              max_matvecs: int | None = budget) -> Eigenpairs:
        return top_eigenpairs(op, k, tol=tol, init=init, seed=seed, max_matvecs=max_matvecs,
                              skip=skip, block_size=b, basis_size=basis_size,
                              check_steps=check_steps, tol_scale=tol_scale)

    if check == "full":
        found = solve(check_steps)
    else:
        found = amortised_check(op, solve, previous, check_steps=check_steps,
                                check_every=check_every, guard_steps=guard_steps,
                                criterion=ConvergenceCriterion.for_operator(op, tol, tol_scale),
                                seed=seed, max_matvecs=max_matvecs)
    if pass_cost is None and not extra:
        return found
    return dataclasses.replace(found, matvecs=found.matvecs + extra, pass_cost=pass_cost)


def _check_solver(solver: object, matvecs: object, skip: int, pass_cost: object) -> None:
    """Raises ValueError for an unknown ``solver``, a ``matvecs`` that does not fit it, or a
    ``pass_cost`` that is neither a :class:`PassCost`, ``"measure"`` nor ``None``."""
    if not (pass_cost is None or pass_cost == "measure" or isinstance(pass_cost, PassCost)):
        raise ValueError(f"pass_cost must be a PassCost, 'measure' or None, got {pass_cost!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "budget" and matvecs is None:
        raise ValueError("solver='budget' needs matvecs=N (matvecs per measurement), got None")
    if solver != "budget" and matvecs is not None:
        raise ValueError(f"matvecs={matvecs!r} is the budget of solver='budget'; got "
                         f"solver={solver!r}")
    if solver in ("budget", "folded") and skip:
        raise ValueError(f"solver={solver!r} solves for the top k pairs (skip=0), got "
                         f"skip={skip}")


def _warm_choice(op, warm: str, previous: Eigenpairs | torch.Tensor,
                 pass_cost: PassCost | str | None, init: torch.Tensor,
                 n: int) -> tuple[str, PassCost | None, int]:
    """The warm start, the pass cost it was chosen by (``None``: not chosen by cost) and the
    products spent measuring it (module docstring)."""
    if warm != "auto":
        return warm, pass_cost, 0
    if pass_cost is None and isinstance(previous, Eigenpairs):
        pass_cost = previous.pass_cost
    extra, columns = 0, min(n, init.shape[1])
    if pass_cost == "measure":
        pass_cost = measure_pass_cost(op, init[:, :columns]) if columns >= 2 else None
        extra = 2 * (1 + columns) if columns >= 2 else 0
    if pass_cost is None:
        return resolve_warm_start("auto", op.device), None, 0
    return choose_warm_start(pass_cost, n), pass_cost, extra


def _krylov_start(block: torch.Tensor, seed: int, space: VectorSpace) -> torch.Tensor:
    """``Σ_i v_i / ‖·‖ + ρ g / ‖g‖`` (``ρ`` = :data:`KRYLOV_RANDOM_PART`) for an orthonormal
    basis ``v_i`` of ``block`` (``g`` Gaussian from ``seed``): every previous direction with
    equal weight, and some of every other direction (a random start's guarantee to see all of
    them). Inner products, norms and the draw of ``g`` go through the operator's ``space``, so a
    sharded operator starts from its rows of the single-process start vector."""
    g = space.random_block(1, block.dtype, block.device, torch.Generator().manual_seed(seed))[:, 0]
    basis = KrylovBasis(block.shape[0], block.dtype, block.device, block.shape[1], images=False,
                        space=space)
    block = basis.add_columns(block)
    if block.shape[1] == 0:  # previous vectors all zero: nothing to start from
        return g
    v = block.sum(dim=1)
    return v / space.norm(v) + KRYLOV_RANDOM_PART * g / space.norm(g)
