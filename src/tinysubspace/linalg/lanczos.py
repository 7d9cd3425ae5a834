"""Top eigenpairs of a symmetric operator: thick-restart (block) Lanczos, full reorthogonalisation.

The solver keeps an orthonormal basis ``Q`` (``p × m``) together with ``HQ = op @ Q`` and the
projected matrix ``T = Qᵀ H Q``. Each iteration

1. takes the Rayleigh–Ritz pairs ``(θ_i, y_i)`` of ``T``: Ritz vectors ``v_i = Q y_i`` with exact
   residuals ``r_i = HQ y_i − θ_i v_i`` (no extra products);
2. stops when the ``n = skip + k`` largest pairs satisfy ``‖r_i‖ ≤ tol · |θ_1|``
   (``tol_scale="top"``, the default) or ``‖r_i‖ ≤ tol · |θ_i|`` (``"pair"``, ARPACK's test;
   :mod:`tinysubspace.linalg.tolerance`);
3. otherwise extends ``Q`` by the residuals of up to ``b`` unconverged wanted pairs,
   orthogonalised against ``Q`` (for a Krylov basis all residuals lie in the next Krylov
   block, so this *is* block Lanczos, with block size ``b``; ``b = 1`` is plain Lanczos);
4. when ``Q`` is full, restarts thick: keeps the best Ritz vectors (and their ``HQ``) only.

With block size 1 and a one-vector start (every cold solve by default) the same iteration runs
in Krylov–Schur form (:mod:`tinysubspace.linalg.krylov_schur`): the basis is a Krylov basis, so the
residual norms come from the Krylov relation and each step reads the basis half as often.

Memory is ``2 m`` vectors of length ``p`` (``m`` = ``basis_size``), whatever ``p`` is.
A warm start ``init`` (``p × m0``) is the first block: with the previous step's eigenvectors the
first Rayleigh–Ritz already holds nearly converged pairs.

A Krylov space from ``s`` start vectors holds at most ``s`` vectors of each eigenspace, so a
converged solve is followed by a multiplicity check (:mod:`tinysubspace.linalg.deflation`): a few
Lanczos steps on ``(I − VVᵀ) H (I − VVᵀ)`` from a fresh random start. A missed eigenvalue above
``θ_n`` found there joins the basis, the iteration goes on, and the check is repeated.
A tolerance below the precision floor is detected (:mod:`tinysubspace.linalg.stagnation`).

Every path (cold, warm, block, multiplicity check; SLQ in :mod:`tinysubspace.linalg.tridiagonal`)
grows the same :class:`~tinysubspace.linalg.basis.KrylovBasis` and decides convergence with one
:class:`~tinysubspace.linalg.tolerance.ConvergenceCriterion` (``tol``, ``tol_scale``, the dtype's
floor and the operator's ``product_error``). Half-precision operators are solved in float32 (only
the products run in half precision) and their results returned in the operator's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tinysubspace.linalg.basis import KrylovBasis, apply_operator, working_dtype
from tinysubspace.linalg.deflation import CHECK_STEPS, GuardState, deflated_search, miss_bar
from tinysubspace.linalg.krylov_schur import KrylovResult, krylov_schur
from tinysubspace.linalg.rayleigh_ritz import RitzBasis
from tinysubspace.linalg.solve_plan import SolvePlan, validate_solve
from tinysubspace.linalg.stagnation import ProgressWatch, stagnation_message, unreachable_tolerance
from tinysubspace.linalg.tolerance import ConvergenceCriterion
from tinysubspace.operator import vector_space

__all__ = ["Eigenpairs", "in_operator_space", "top_eigenpairs"]


@dataclass(frozen=True)
class Eigenpairs:
    """Eigenpairs of a symmetric operator, largest algebraic first.

    Attributes:
        values: ``(k,)`` eigenvalues, descending.
        vectors: ``(p, k)`` orthonormal eigenvectors (columns).
        residuals: ``(k,)`` ``‖H v_i − λ_i v_i‖`` (absolute).
        matvecs: operator-vector products this solve used (the multiplicity check included).
        converged: whether every residual is within its bar (``tol · |λ_1|``, or
            ``tol · |λ_i|`` for ``tol_scale="pair"``) and no eigenvalue above
            ``values[-1]`` was found missing; ``False`` also when the budget ran out or the
            residuals stagnated at the precision floor.
        skip: how many larger eigenpairs were found and left out (``values[0]`` is ``λ_{skip+1}``).
        multiplicity_checked: whether the multiplicity check ran to the end and found no missed
            eigenvalue (:mod:`tinysubspace.linalg.deflation`), or the basis filled the whole
            space. ``False``: not checked (``check_steps=0``, no budget left, not converged, or
            a result made elsewhere); a missed copy of a repeated eigenvalue is then possible.
        tol_scale: what the solve's ``tol`` was relative to: ``"top"`` (``‖r_i‖ ≤ tol·|θ_1|``)
            or ``"pair"`` (``‖r_i‖ ≤ tol·|θ_i|``, ARPACK's); :mod:`tinysubspace.linalg.tolerance`.
        certificate: what this result's multiplicity was certified by: ``"full"`` (the full
            check passed: ``multiplicity_checked``), ``"guard"`` (only the amortised check's
            guard advanced) or ``"scheduled"`` (no check at this row; the next full check
            is due within ``check_every`` rows), both from
            :func:`~tinysubspace.linalg.warm_start.track_eigenpairs` with ``check="amortised"``
            (a miss is found within its stated number of measurements),
            ``"folded"`` (the check rode in the block passes,
            :mod:`tinysubspace.linalg.folded`), or ``"none"``.
        guard: the amortised check's state to pass on with this result (``None`` unless
            ``check="amortised"``).
        solver: ``"lanczos"`` (solved to ``tol``), ``"folded"`` (solved to ``tol`` by
            :func:`~tinysubspace.linalg.folded.folded_eigenpairs`) or ``"budget"`` (a fixed
            number of products, :func:`~tinysubspace.linalg.budget.refine_eigenpairs`).
        subspace_error: for ``solver="budget"``, the estimate of ``sin θ_max`` between
            ``span(vectors)`` and the true top-``k`` eigenvectors (Davis–Kahan,
            :mod:`tinysubspace.linalg.budget`); it bounds ``|Δ f_top|`` (:attr:`f_top_error`).
            ``None`` for a solve to ``tol``.
        pass_cost: the measured cost of a data pass that ``warm="auto"`` chose by
            (:class:`~tinysubspace.linalg.pass_cost.PassCost`), to pass on; ``None`` otherwise.
        space: the inner product of ``vectors``: the operator's ``vector_space`` when its
            vectors are shards over ranks (an FSDP2 model's), so that the metrics sum over ranks
            without being told (:mod:`tinysubspace.metrics`); ``None``: plain local tensors.
            Set by :func:`top_eigenpairs` and :func:`~tinysubspace.track_eigenpairs`
            (:func:`in_operator_space`); not compared, not saved with a warm start.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    matvecs: int
    converged: bool
    skip: int = 0
    multiplicity_checked: bool = False
    tol_scale: str = "top"
    certificate: str = "none"
    guard: GuardState | None = None
    solver: str = "lanczos"
    subspace_error: float | None = None
    pass_cost: object | None = None
    space: object | None = field(default=None, compare=False, repr=False)

    @property
    def f_top_error(self) -> float | None:
        """Bound on ``|f_top(V) − f_top(V*)|`` (eq. 2) for every gradient: ``subspace_error``
        (``|gᵀ(VVᵀ − V*V*ᵀ)g| ≤ ‖VVᵀ − V*V*ᵀ‖₂ ‖g‖²``); ``None`` for a solve to ``tol``."""
        return self.subspace_error


def in_operator_space(solve: Callable[..., Eigenpairs]) -> Callable[..., Eigenpairs]:
    """``solve(op, ...)`` whose :class:`Eigenpairs` carry ``op``'s ``vector_space`` (if the
    operator declares one) as their ``space``."""

    @functools.wraps(solve)
    def solve_in_space(op, *args, **kwargs) -> Eigenpairs:
        found = solve(op, *args, **kwargs)
        space = getattr(op, "vector_space", None)
        if space is None or found.space is space:
            return found
        return dataclasses.replace(found, space=space)

    return solve_in_space


@in_operator_space
def top_eigenpairs(op, k: int, tol: float = 1e-6, init: torch.Tensor | None = None,
                   seed: int = 0, max_matvecs: int | None = None, skip: int = 0,
                   block_size: int | None = None, basis_size: int | None = None,
                   check_steps: int = CHECK_STEPS, tol_scale: str = "top") -> Eigenpairs:
    """The ``k`` largest (algebraic) eigenpairs of a symmetric operator.

    Convergence: every returned pair (and every skipped one) satisfies
    ``‖H v − λ v‖ ≤ tol · |λ_1|`` (``tol_scale="top"``), with ``|λ_1|`` estimated by the
    largest ``|θ|`` among the current Ritz values (``≈ ‖H‖``; equal to ``|λ_1|`` for a Hessian
    whose largest-magnitude eigenvalue is its top one), or ``‖H v − λ v‖ ≤ tol · |λ|``
    (``tol_scale="pair"``, ARPACK's test, stricter for small pairs by ``|λ_1/λ|``; with a
    floor of ``ε^{2/3}|λ_1|`` for ``λ ≈ 0``, :mod:`tinysubspace.linalg.tolerance`); then a
    multiplicity check (:mod:`tinysubspace.linalg.deflation`, ``check_steps`` products of
    Lanczos on ``(I − VVᵀ) H (I − VVᵀ)`` from a fresh random start) looks for an eigenvalue
    above ``λ_{skip+k}`` that the solve missed (a second copy of a repeated eigenvalue is
    invisible to a single start vector). If it finds one, the solve goes on with it and
    checks again.

    A ``tol`` near or below the precision floor of the operator's dtype, or below its declared
    relative product error ``op.product_error`` (e.g. a finite-difference ``H·v``), is detected
    (:mod:`tinysubspace.linalg.stagnation`): when the residuals stop decreasing the solve stops
    with ``converged=False`` and a ``RuntimeWarning`` naming the tolerance that is reachable.
    A float16 / bfloat16 operator is solved in float32 (its products in its own dtype) and its
    results returned in its dtype.

    Args:
        op: symmetric operator with ``shape``, ``dtype`` (real floating point), ``device`` and
            ``@`` returning products in that dtype and device.
        k: number of eigenpairs wanted.
        tol: relative residual tolerance (> 0).
        init: ``(p,)`` or ``(p, m0)`` real start block (e.g. the previous measurement's
            vectors); it need not be orthonormal, and is converted to the operator's dtype and
            device (a float32 block on a float64 operator is fine). ``None``: a random block
            from ``seed``.
        seed: seed of the random start, of any random fill and of the multiplicity check's
            start vector (identical on every device).
        max_matvecs: stop (``converged=False``) once this many products are used; never
            exceeded (at least ``k + skip`` and at least the columns of ``init``). The
            multiplicity check counts: with no room left for it, ``multiplicity_checked`` is
            ``False``.
        skip: leave out the ``skip`` largest pairs and return ``λ_{skip+1} … λ_{skip+k}`` (the
            paper's "next k" subspace is ``skip=k``). They are computed all the same.
        block_size: vectors added per iteration (one data pass each). Default 1 for a cold
            start, and ``min(n, m0)`` for a warm start with ``m0`` columns (fewest passes; for
            fewest products use :func:`tinysubspace.linalg.warm_start.track_eigenpairs`).
        basis_size: largest basis before a thick restart (default ``max(2n + 2b, n + 20)``,
            at most ``p``).
        check_steps: products of the multiplicity check (default
            :data:`tinysubspace.linalg.deflation.CHECK_STEPS`); ``0``
            skips it (``multiplicity_checked=False``).
        tol_scale: ``"top"`` (default) or ``"pair"``: what ``tol`` is relative to (above);
            recorded in the result.

    Returns:
        :class:`Eigenpairs` with the ``k`` pairs, descending.

    Raises:
        FloatingPointError: the operator returned NaN or infinity.
        RuntimeError: no random direction outside the basis could be drawn (never expected:
            :meth:`~tinysubspace.linalg.basis.KrylovBasis.fill_random`).
        TypeError: ``init`` is not a tensor.
        ValueError: ``k + skip ≥ p``, ``tol ≤ 0``, ``init`` of the wrong shape, complex or not
            finite, ``max_matvecs`` below ``k + skip`` or below the number of columns of
            ``init``, a negative ``check_steps``, a ``tol_scale`` other than ``"top"`` or
            ``"pair"``, an ``op.product_error`` outside ``[0, 1)``, an operator whose dtype is
            not real floating point, or products of another shape, dtype or device than the
            operator declares.
    """
    validate_solve(op, k=k, skip=skip, tol=tol, init=init, block_size=block_size,
                   basis_size=basis_size, max_matvecs=max_matvecs, check_steps=check_steps,
                   tol_scale=tol_scale)
    criterion = ConvergenceCriterion.for_operator(op, tol, tol_scale)
    n, space = k + skip, vector_space(op)
    p = space.dim  # the global dimension (the local rows of a sharded operator are fewer)
    gen = torch.Generator().manual_seed(seed)
    start = _start_block(op, init, n, block_size, gen)
    b = block_size or (1 if init is None else max(1, min(n, start.shape[1])))
    m = min(p, max(basis_size or max(2 * n + 2 * b, n + 20), n + b))
    plan = SolvePlan(n, b, m, max_matvecs if max_matvecs is not None else 50 * p, check_steps)
    watch = criterion.watch(window=max(3 * m, 100))
    if b == 1 and start.shape[1] == 1:  # a Krylov basis: Krylov–Schur, residuals for free
        found = krylov_schur(op, start, n, criterion, basis_size=m, budget=plan.budget,
                             gen=gen, watch=watch)
    else:
        state = RitzBasis(start, capacity=m, space=space)
        state.extend(start, apply_operator(op, start, 0))
        found = _block_solve(op, state, plan, criterion, used=start.shape[1], gen=gen,
                             watch=watch)
    found, checked = _check_multiplicity(op, found, plan, criterion, gen=gen, watch=watch)
    if watch.stalled and not found.converged:
        scale = max(float(found.values.abs().max()), float(torch.finfo(op.dtype).tiny))
        reached = criterion.relative(found.residuals, criterion.bars(found.values, scale), scale)
        warnings.warn(stagnation_message(tol, op.dtype, reached, watch.window, found.matvecs,
                                         criterion.product_error), RuntimeWarning, stacklevel=2)
    if found.converged and (message := unreachable_tolerance(op, tol)):
        found = found._replace(converged=False)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return Eigenpairs(*(t[..., skip:].to(op.dtype).clone() for t in
                        (found.values, found.vectors, found.residuals)),
                      found.matvecs, found.converged, skip, checked, tol_scale,
                      "full" if checked else "none")


def _block_solve(op, state: RitzBasis, plan: SolvePlan, criterion: ConvergenceCriterion, *,
                 used: int, gen: torch.Generator, watch: ProgressWatch) -> KrylovResult:
    """The general iteration (module docstring) from a basis ``state`` that already holds its
    first vectors and their images (``used`` products so far)."""
    p, n, b, m, budget = state.dim, plan.n, plan.block, plan.basis_size, plan.budget
    while True:
        theta, Y = state.ritz()
        scale = max(float(theta.abs().max()), float(torch.finfo(theta.dtype).tiny))
        threshold = criterion.bars(theta[:n], scale)
        # residual norms from the small Gram matrix first: p-sized work only where needed
        estimate = state.residual_gram(theta[:n], Y[:, :n]).diagonal().clamp_min(0).sqrt()
        floor = criterion.estimate_slack(max(scale, float(state.G.diagonal().max()) ** 0.5))
        enough = state.Q.shape[1] >= n
        maybe = enough and bool((estimate <= threshold + floor).all())
        full = state.Q.shape[1] >= p
        if not (maybe or full or used >= budget) and enough:
            # stalled: stop
            maybe = watch.update(criterion.relative(estimate, threshold, scale), used)
        if maybe or full or used >= budget:
            V, HV = state.Q @ Y[:, :n], state.HQ @ Y[:, :n]
            R = HV - V * theta[:n]
            res = state.space.norm(R)
            # fewer than n basis vectors give fewer than n Ritz pairs: never "converged" then
            done = (enough and bool((res <= threshold).all())) or full
            stalled = not done and (watch.stalled or watch.update(
                criterion.relative(res, threshold, scale), used))
            if done or stalled or used >= budget:
                return KrylovResult(theta[:n], V, HV, res, used, done, full)
            directions = _next_block(R, res, threshold, b, state.space)
        else:  # some pair is certainly unconverged: its residual direction, without R
            active = estimate > threshold
            if not bool(active.any()):
                active = estimate == estimate.max()
            directions = state.residual_directions(theta[:n][active], Y[:, :n][:, active], b)
        if state.Q.shape[1] + b > m:
            keep = min(max(n + b, (m + n) // 2), m - b)
            state.restart(Y[:, :keep], theta[:keep])
        block = _orthonormal_fill(directions, state, b, gen)[:, : budget - used]
        image = apply_operator(op, block, used)
        used += block.shape[1]
        state.extend(block, image)


def _check_multiplicity(op, found: KrylovResult, plan: SolvePlan,
                        criterion: ConvergenceCriterion, *, gen: torch.Generator,
                        watch: ProgressWatch) -> tuple[KrylovResult, bool]:
    """The multiplicity check after a converged solve, and whether it was complete.

    A Ritz value of ``(I − VVᵀ) H (I − VVᵀ)`` above ``θ_n`` plus its residual bar
    (``tol·|θ_1|``, or ``tol·|θ_n|`` for ``tol_scale="pair"``) is a missed eigenvalue:
    the check's Lanczos vectors (and their images: no product is repeated) join ``V`` as the
    basis of a continued solve, which is checked again. A full basis is exact (checked).
    """
    n, steps = plan.n, plan.check_steps
    while found.converged and not found.full and steps > 0:
        room = plan.budget - found.matvecs
        if room < 1:
            return found, False
        bar = miss_bar(found.values[:n], criterion)
        search = deflated_search(op, found.vectors, bar, min(steps, room), gen)
        used = found.matvecs + search.matvecs
        if search.top <= bar:
            return found._replace(matvecs=used), search.exact or search.matvecs == steps
        state = RitzBasis(found.vectors, capacity=max(plan.basis_size,
                                                      n + search.matvecs + plan.block),
                          space=vector_space(op))
        state.extend(found.vectors, found.images)
        state.extend(search.basis, search.images)
        found = _block_solve(op, state, plan, criterion, used=used, gen=gen, watch=watch)
    return found, found.full


def _start_block(op, init: torch.Tensor | None, n: int, block_size: int | None,
                 gen: torch.Generator) -> torch.Tensor:
    """Orthonormal first block in the working dtype: ``init`` (rank-revealed), filled up at
    random if needed."""
    p, work = op.shape[0], working_dtype(op.dtype)
    want = block_size or 1
    columns = KrylovBasis(p, work, op.device, want, images=False, space=vector_space(op))
    if init is not None:
        block = init.reshape(p, -1)
        columns.add_columns(block.to(device=op.device, dtype=work))
        want = block_size or max(1, min(n, block.shape[1]))
    return columns.fill_random(max(want, columns.size), gen).clone()


def _next_block(R: torch.Tensor, res: torch.Tensor, threshold: float | torch.Tensor,
                b: int, space) -> torch.Tensor:
    """Up to ``b`` directions that carry most of the unconverged wanted residuals ``R``.

    With at most ``b`` unconverged pairs these are their residuals (for a Krylov basis all
    residuals lie in the next Krylov block, so this *is* block Lanczos). With more (a warm start),
    they are the ``b`` leading left singular vectors of ``[r_i]`` (each ``r_i ⊥ Q``): the
    ``b``-dimensional subspace closest to all residuals, instead of the ``b`` largest ones (fewer
    products for the same accuracy, measured in docs/performance.md).
    """
    active = res > threshold
    if not bool(active.any()):
        active = res == res.max()
    block = R[:, active]
    if block.shape[1] > b:  # Rayleigh–Ritz residuals are already orthogonal to Q
        _, Z = torch.linalg.eigh(space.gram(block, block))  # thin SVD through the small Gram matrix
        block = block @ Z[:, -b:].flip(1)
    return block


def _orthonormal_fill(block: torch.Tensor, state: KrylovBasis, b: int,
                      gen: torch.Generator) -> torch.Tensor:
    """``block`` made orthonormal to the basis ``state``; random directions replace any already
    spanned (up to ``b`` columns, as many as there is room for)."""
    scratch = KrylovBasis(state.p, state.dtype, state.device, b, locked=state.Q, images=False,
                          space=state.space)
    scratch.add_columns(block)
    return scratch.fill_random(max(scratch.size, min(b, scratch.room + scratch.size)), gen)
