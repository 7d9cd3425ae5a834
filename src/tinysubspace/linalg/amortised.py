"""The multiplicity check, amortised over a trajectory of measurements (issue 23).

Every solve of :func:`~tinysubspace.linalg.lanczos.top_eigenpairs` ends with the full check
(:mod:`tinysubspace.linalg.deflation`): ``c`` = ``check_steps`` (8) Lanczos products on
``H_⊥ = (I − VVᵀ) H (I − VVᵀ)`` from a fresh random start, which finds an eigenvalue the solve
missed — a second copy of a repeated one, or one that entered the top ``n`` orthogonally to the
previous subspace. Along a training run,
:func:`~tinysubspace.linalg.warm_start.track_eigenpairs` (``check="amortised"``, its default
since issue 23) spreads that cost:

* the **first** measurement (no guard state in ``previous``) and every ``M``-th after it
  (``M`` = ``check_every``, default 4) run the full check; so does a measurement whose guard
  proved a miss. Any ``M`` consecutive measurements therefore include a full check;
* every other measurement advances a **guard** (``s`` = ``guard_steps`` ≥ 1, default 2:
  ``certificate="guard"``) or runs no check (``s = 0``: ``certificate="scheduled"``). The guard:
  ``s`` Lanczos products on the current ``H_⊥``, started from the previous measurement's guard
  vector (projected onto the current ``V^⊥``), whose top Ritz vector becomes the next guard
  (:class:`GuardState`, carried in the result's ``guard`` and passed back in with ``previous``:
  no hidden cache). A Ritz value above ``θ_n`` + its bar there proves a miss: the solve is
  repeated from ``[V, guard]`` with the full check.

**Guarantee.** Let an eigenvalue ``λ*`` of ``H_t`` be missed at measurement ``t`` (it belongs to
the top ``n`` but is not returned), and let it stay within the full check's reach until
measurement ``t + M − 1`` (``λ*`` above ``θ_n`` by enough that ``c`` steps from a random start
find it, as for ``check="full"``: within 8–10 steps for a gap
``γ = (λ* − θ_n)/(θ_n − λ_min) ≳ 0.5`` and ``p ≤ 10⁶``, see
:mod:`tinysubspace.linalg.deflation`). Then it is found, and the result corrected, at
measurement ``t + M − 1`` at the latest — within ``M`` measurements — whatever the drift in
between and whatever ``s``, because a full check runs at one of ``t, …, t + M − 1``. The rows in
between carry ``certificate="scheduled"`` or ``"guard"``: their values may lack ``λ*`` (at most
``M − 1`` consecutive rows); every returned pair still meets ``tol``. A guard (``s ≥ 2``; one
step only evaluates its vector's Rayleigh quotient and never moves it) can find it earlier: for
a slowly drifting ``H`` it is a restarted Lanczos run of ``s`` steps per measurement, converging
to the top of ``H_⊥`` like the ``c``-step check after about ``c / s`` measurements (in the tests
below it finds a second copy of λ1 appearing at t = 5 at t = 6, where ``s = 0`` waits for the
full check at t = 8; an eigenvalue rising from the bulk both find at t = 4). Its ``s = 2``
products are about 10% of a warm top-10 solve and 2% of a top-20 one (docs/performance.md,
section 4): ``guard_steps=0`` saves them where the top-10 cost matters more than an early find.
The **last** measurement of a run should pass ``check="full"`` (the caller knows it is the last).
Cost per measurement: ``(c + (M − 1) s) / M`` products on average instead of ``c`` (3.5 instead
of 8 with the defaults ``M = 4``, ``s = 2``; 2 with ``s = 0``), and ``s`` at the rows between
full checks.

Tests (tests/test_amortised_check.py): a trajectory where a second copy of the top eigenvalue
appears mid-way, and one where an eigenvalue rises from the bulk edge into the top ``n``
orthogonally to an invariant previous subspace; both found within ``M`` measurements.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from tinysubspace.linalg.basis import working_dtype
from tinysubspace.linalg.deflation import GuardState, deflated_search, miss_bar
from tinysubspace.linalg.lanczos import Eigenpairs
from tinysubspace.linalg.tolerance import ConvergenceCriterion

__all__ = ["CHECKS", "CHECK_EVERY", "GUARD_STEPS", "GuardState", "amortised_check",
           "check_amortised_arguments"]

CHECKS = ("full", "amortised")
"""The multiplicity checks of :func:`~tinysubspace.linalg.warm_start.track_eigenpairs`."""

CHECK_EVERY = 4
"""Default ``M``: a full check every this many measurements (module docstring)."""

GUARD_STEPS = 2
"""Default ``s``: guard products at a measurement without a full check (0: no guard, the
scheduled full check alone bounds a miss; module docstring)."""

Solve = Callable[..., Eigenpairs]


def check_amortised_arguments(check: object, check_every: object, guard_steps: object,
                              skip: int) -> None:
    """Raise ``ValueError`` naming what was expected for a bad ``check``, ``check_every``,
    ``guard_steps``, or a ``skip > 0`` with ``check="amortised"`` (its guard deflates the
    returned vectors, which leave the skipped ones out)."""
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive integer, got {check_every!r}")
    if isinstance(guard_steps, bool) or not isinstance(guard_steps, int) or guard_steps < 0:
        raise ValueError(f"guard_steps must be a positive integer or 0 (no guard), got "
                         f"{guard_steps!r}")
    if check == "amortised" and skip:
        raise ValueError(f"check='amortised' needs skip=0 (its guard deflates the returned "
                         f"vectors only), got skip={skip}; use check='full'")


def amortised_check(op, solve: Solve, previous: object, *, check_steps: int, check_every: int,
                    guard_steps: int, criterion: ConvergenceCriterion, seed: int,
                    max_matvecs: int | None) -> Eigenpairs:
    """One measurement with the amortised check (module docstring).

    Args:
        op: the operator.
        solve: ``solve(check_steps=..., init=..., max_matvecs=...)`` runs this measurement's
            :func:`~tinysubspace.linalg.lanczos.top_eigenpairs` (``init`` and ``max_matvecs``
            optional: the warm start and budget of the measurement by default).
        previous: the previous result (its ``guard``, if it is :class:`Eigenpairs`).
        check_steps, check_every, guard_steps: ``c``, ``M``, ``s``.
        criterion: the solve's convergence criterion (for the bar of a miss).
        seed: seed of the guard's random start (when there is no guard vector).
        max_matvecs: the measurement's product budget (``None``: unbounded).
    """
    guard = previous.guard if isinstance(previous, Eigenpairs) else None
    if guard is None or guard.since_full + 1 >= check_every:
        return dataclasses.replace(solve(check_steps=check_steps), guard=GuardState(None, 0))
    found = solve(check_steps=0)
    later = GuardState(guard.vector, guard.since_full + 1)
    if guard_steps == 0:  # no guard: the scheduled full check alone bounds a miss
        return dataclasses.replace(found, guard=later,
                                   certificate="scheduled" if found.converged else "none")
    room = guard_steps if max_matvecs is None else min(guard_steps, max_matvecs - found.matvecs)
    if not found.converged or room < 1:
        return dataclasses.replace(found, guard=later)
    V = found.vectors.to(working_dtype(op.dtype))
    bar = miss_bar(found.values.to(V.dtype), criterion)
    search = deflated_search(op, V, bar, room, torch.Generator().manual_seed(seed),
                             start=guard.vector)
    used = found.matvecs + search.matvecs
    if search.top <= bar:
        return dataclasses.replace(found, matvecs=used, certificate="guard",
                                   guard=GuardState(search.ritz_vector, later.since_full))
    left = None if max_matvecs is None else max_matvecs - used
    if left is not None and left < V.shape[1] + 1:  # a proven miss and no budget to fix it
        return dataclasses.replace(found, matvecs=used, converged=False, guard=later)
    again = solve(check_steps=check_steps, init=torch.cat([V, search.ritz_vector[:, None]], 1),
                  max_matvecs=left)
    return dataclasses.replace(again, matvecs=used + again.matvecs, guard=GuardState(None, 0))
