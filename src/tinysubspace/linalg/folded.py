"""A warm block solver whose multiplicity check rides in its block passes.

Where a pass costs ``c0 + c1·b`` with ``c1 ≪ c0`` (a GPU), passes are the cost, and the
multiplicity check of :func:`~tinysubspace.linalg.lanczos.top_eigenpairs` — ``check_steps``
single-vector Lanczos steps after the solve — adds ``check_steps`` passes to a warm block solve
that itself often needs fewer. :func:`folded_eigenpairs` folds the check into the solve: every
pass carries, besides the ``b`` residual directions of the ``warm="subspace"`` iteration, one
more column, the *probe*: a seeded random unit vector ``q_1 ⊥`` the start block in the first
pass, and ``q_{j+1} = (I − QQᵀ) H q_j / ‖·‖`` (``Q`` the whole basis so far) after it — Lanczos
on the operator deflated by the growing basis, as the check runs Lanczos on ``(I − VVᵀ) H
(I − VVᵀ)``. The probe's vectors and images are part of the basis, so Rayleigh–Ritz sees them:
an eigenvalue the start block misses (a second copy of a repeated eigenvalue, one entering the
top ``n`` from a direction no residual points to) shows up as a Ritz value in the top ``n`` as
soon as the probe's component along it has grown enough — the same Chebyshev amplification as
the check's (:mod:`tinysubspace.linalg.deflation`), from the same kind of start.

The solve stops when every wanted residual meets its bar *and* the probe has taken at least
``check_steps`` steps (single-column passes finish the count when the solve converges sooner);
the result then has ``multiplicity_checked=True`` and ``certificate="folded"``. Cost: one
product per pass more than ``warm="subspace"``, and no separate check passes. The reach is that of
a ``check_steps``-step check when the basis is not restarted (it then holds the probe's whole
deflated Krylov sequence); a thick restart keeps the top Ritz vectors and the probe's last
direction only, like a restarted Lanczos.
"""

from __future__ import annotations

import torch

from tinysubspace.linalg.basis import KrylovBasis, apply_operator, working_dtype
from tinysubspace.linalg.deflation import CHECK_STEPS
from tinysubspace.linalg.lanczos import Eigenpairs
from tinysubspace.linalg.rayleigh_ritz import RitzBasis
from tinysubspace.linalg.tolerance import ConvergenceCriterion

__all__ = ["folded_eigenpairs"]


def folded_eigenpairs(op, k: int, init: torch.Tensor, tol: float = 1e-4, seed: int = 0,
                      block_size: int | None = None, check_steps: int = CHECK_STEPS,
                      max_matvecs: int | None = None, tol_scale: str = "top") -> Eigenpairs:
    """The ``k`` largest eigenpairs from a warm start ``init`` (``(p, m0)``), the multiplicity
    check folded into the block passes (module docstring).

    Args:
        op: symmetric operator (``shape``, ``dtype``, ``device``, ``@``).
        k: pairs wanted (``< p − 1``).
        init: the previous vectors; filled at random up to ``k`` columns.
        tol: residual bar (``tol · |θ_1|``, or ``tol · |θ_i|`` with ``tol_scale="pair"``).
        seed: seed of the probe and of any random fill.
        block_size: residual directions per pass (default ``⌈k/4⌉``), plus the probe.
        check_steps: probe steps required before the result counts as checked.
        max_matvecs: stop (``converged=False``) at this many products (default ``50 p``).
        tol_scale: ``"top"`` or ``"pair"``.

    Returns:
        :class:`Eigenpairs` (``certificate="folded"`` when converged and checked).

    Raises:
        ValueError: ``k + 1 ≥ p`` or a bad ``block_size``, ``check_steps``, ``tol``.
    """
    p = op.shape[0]
    _validate(k, p, tol, block_size, check_steps)
    criterion = ConvergenceCriterion.for_operator(op, tol, tol_scale)
    gen = torch.Generator().manual_seed(seed)
    work = working_dtype(op.dtype)
    start = KrylovBasis(p, work, op.device, k + 1, images=False)
    start.add_columns(init.reshape(p, -1).to(device=op.device, dtype=work))
    start.fill_random(max(k, start.size), gen)
    start.fill_random(start.size + 1, gen)  # the probe q_1, last
    b = block_size or max(1, -(-k // 4))
    first = start.Q.clone()
    m = min(p, max(2 * k + 2 * (b + 1), k + 20, first.shape[1] + b + 1))
    state = RitzBasis(first, capacity=m)
    state.extend(first, apply_operator(op, first, 0))
    used, steps, budget = first.shape[1], 1, max_matvecs or 50 * p
    probe_image = state.HQ[:, -1].clone()
    while True:
        theta, Y = state.ritz()
        V, R = state.Q @ Y[:, :k], state.HQ @ Y[:, :k] - state.Q @ (Y[:, :k] * theta[:k])
        res = R.norm(dim=0)
        scale = max(float(theta.abs().max()), float(torch.finfo(theta.dtype).tiny))
        bars = criterion.bars(theta[:k], scale)
        done = bool((res <= bars).all())
        full = state.size >= p
        if (done and steps >= check_steps) or full or used >= budget:
            break
        directions = R[:, :0] if done else _leading(R[:, res > bars], b)
        if state.size + directions.shape[1] + 1 > m:
            keep = min(k + b, m - b - 1)
            state.restart(Y[:, :keep], theta[:keep])
        block = _next_block(state, directions, probe_image, gen)[:, : budget - used]
        image = apply_operator(op, block, used)
        used, steps = used + block.shape[1], steps + 1
        state.extend(block, image)
        probe_image = image[:, -1].clone()
    checked = (done and steps >= check_steps) or full
    return Eigenpairs(theta[:k].to(op.dtype).clone(), V.to(op.dtype).clone(),
                      res.to(op.dtype).clone(), used, done or full, 0, checked, tol_scale,
                      "folded" if checked else "none", solver="folded")


def _validate(k: int, p: int, tol: float, block_size: int | None, check_steps: int) -> None:
    if not isinstance(k, int) or not 1 <= k < p - 1:
        raise ValueError(f"k must be an integer with 1 <= k < p - 1 = {p - 1} (the probe needs "
                         f"one more dimension), got {k!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
    if isinstance(check_steps, bool) or not isinstance(check_steps, int) or check_steps < 0:
        raise ValueError(f"check_steps must be a non-negative integer, got {check_steps!r}")


def _leading(R: torch.Tensor, b: int) -> torch.Tensor:
    """The ``b`` leading left singular directions of ``R`` (all of ``R`` if ``b`` or fewer)."""
    if R.shape[1] <= b:
        return R
    _, Z = torch.linalg.eigh(R.T @ R)
    return R @ Z[:, -b:].flip(1)


def _next_block(state: RitzBasis, directions: torch.Tensor, probe_image: torch.Tensor,
                gen: torch.Generator) -> torch.Tensor:
    """``directions`` and then the probe's next vector ``(I − QQᵀ) H q_j``, orthonormal to the
    basis; a random direction replaces a probe already spanned (an invariant subspace)."""
    scratch = KrylovBasis(state.p, state.dtype, state.device, directions.shape[1] + 1,
                          locked=state.Q, images=False)
    scratch.add_columns(directions)
    before = scratch.size
    scratch.add_columns(probe_image[:, None])
    if scratch.size == before:
        scratch.fill_random(before + 1, gen)
    return scratch.Q.clone()
