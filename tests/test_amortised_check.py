"""Issue 23: the multiplicity check amortised over a trajectory (``check="amortised"``).

The guarantee (tinysubspace/linalg/amortised.py): a missed eigenvalue that is within the full
check's reach from measurement ``t`` on is found by measurement ``t + M − 1``. Each trajectory is
a sequence of dense operators ``Q diag(λ_t) Qᵀ`` with fixed eigenvectors, so that the previous
subspace stays exactly invariant and a ``subspace`` warm start cannot see the newcomer: only a
check can. The reference at every measurement is the sorted ``λ_t`` (dense ``eigh`` agrees).
"""

from __future__ import annotations

import pytest
import torch

import tinysubspace as ts

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64
P, K, M = 120, 4, 4
TOP = torch.tensor([3.0, 2.6, 2.2, 1.6], dtype=F64)
NEW = 10  # the eigenvector (column of Q) that becomes a top one


def _basis() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=gen, dtype=F64))
    return Q


def _bulk() -> torch.Tensor:
    return torch.rand(P - K, generator=torch.Generator().manual_seed(1), dtype=F64)  # [0, 1)


def trajectory(kind: str, steps: int = 12) -> list[torch.Tensor]:
    """Per measurement the spectrum ``λ_t`` (in the order of ``Q``'s columns): ``copy``: the
    eigenvalue of column ``NEW`` jumps to a second copy of the top one (3.0) at ``t = 5``;
    ``edge``: it rises from the bulk edge, ``1.0 + 0.25 t`` (top ``n`` from ``t = 3``)."""
    spectra = []
    for t in range(steps):
        values = torch.cat([TOP * (1 + 0.01 * t), _bulk()])  # the top drifts, 1% a step
        if kind == "copy" and t >= 5:
            values[NEW] = values[0]
        if kind == "edge":
            values[NEW] = 1.0 + 0.25 * t
        spectra.append(values)
    return spectra


def run(spectra: list[torch.Tensor], warm: str = "subspace",
        **options) -> tuple[list[bool], list[ts.Eigenpairs]]:
    """Track the top ``K`` along the trajectory; per measurement whether the values are right."""
    Q, results, right, previous = _basis(), [], [], None
    for values in spectra:
        A = (Q * values) @ Q.T
        op = ts.DenseOperator((A + A.T) / 2)
        previous = ts.track_eigenpairs(op, K, previous=previous, tol=1e-9, warm=warm,
                                       **options)
        assert previous.converged and previous.matvecs == op.matvecs
        expected = torch.sort(values, descending=True).values[:K]
        assert torch.allclose(torch.linalg.eigvalsh(op.matrix).flip(0)[:K], expected, atol=1e-12)
        right.append(bool(torch.allclose(previous.values, expected, rtol=0, atol=1e-7)))
        results.append(previous)
    return right, results


def first_right_from(right: list[bool], start: int) -> int:
    """The first measurement ``≥ start`` from which every value is right."""
    return next(t for t in range(start, len(right)) if all(right[t:]))


@pytest.mark.parametrize(("kind", "reach", "warm"), [("copy", 5, "subspace"),
                                                     ("edge", 6, "subspace"),
                                                     ("copy", 5, "krylov")])
def test_a_missed_eigenvalue_is_found_within_M_measurements(kind, reach, warm):
    """``copy``: a second copy of λ1 from t = 5 (γ = (3 − 1.6)/1.6 ≈ 0.9: in reach at once);
    ``edge``: a bulk eigenvalue crossing θ_4 = 1.6 at t = 3, in reach (γ ≥ 0.5: λ* ≥ 2.4) from
    t = 6. Without any check the newcomer is never found (the case is a real miss); the full
    check finds it when in reach; the amortised one within M measurements of that, with fewer
    products over the run, and each row's ``certificate`` says what was checked. (A ``krylov``
    warm start finds the rising ``edge`` eigenvalue by itself, through its random part: not a
    miss, so only its ``copy`` case is here.)"""
    spectra = trajectory(kind)
    unchecked, _ = run(spectra, warm, check="full", check_steps=0)
    assert all(unchecked[:3]) and not any(unchecked[reach:])  # never found without a check
    full, full_results = run(spectra, warm, check="full")
    assert all(full[:3]) and first_right_from(full, 0) <= reach
    amortised, results = run(spectra, warm, check="amortised", check_every=M, guard_steps=2)
    assert all(amortised[:3]) and first_right_from(amortised, 0) <= reach + M - 1
    certificates = [r.certificate for r in results]
    assert certificates[0] == "full" and set(certificates) <= {"full", "guard"}
    assert "guard" * M not in "".join(certificates)  # a full check within every M rows
    assert all(r.multiplicity_checked == (r.certificate == "full") for r in results)
    assert [r.guard.since_full for r in results][:M] == list(range(M))
    assert sum(r.matvecs for r in results) < sum(r.matvecs for r in full_results)


@pytest.mark.parametrize(("kind", "reach", "warm"), [("copy", 5, "subspace"),
                                                     ("edge", 6, "subspace"),
                                                     ("copy", 5, "krylov")])
def test_the_check_without_a_guard_finds_a_miss_within_M_measurements(kind, reach, warm):
    """``guard_steps=0`` (``check`` not given: the default, amortised with ``M = 4``): the same
    trajectories as above, each miss found by ``reach + M − 1`` (the full checks run at
    t = 0, 4, 8, …, so by 8 here in both cases), the rows between full checks certified
    ``"scheduled"`` and costing exactly an unchecked solve, and the whole run fewer products
    than with the default 2-product guard."""
    spectra = trajectory(kind)
    right, results = run(spectra, warm, guard_steps=0)
    assert all(right[:3]) and first_right_from(right, 0) <= reach + M - 1
    assert [r.certificate for r in results][:M + 1] == ["full"] + ["scheduled"] * (M - 1) + [
        "full"]
    assert [r.guard.since_full for r in results][:M + 1] == [*range(M), 0]
    assert all(r.multiplicity_checked == (r.certificate == "full") for r in results)
    _, unchecked = run(spectra, warm, check="full", check_steps=0)
    scheduled = [t for t, r in enumerate(results) if r.certificate == "scheduled"]
    assert scheduled and all(results[t].matvecs == unchecked[t].matvecs for t in scheduled
                             if all(right[: t + 1]))
    guarded_right, guarded = run(spectra, warm)  # the default: amortised, a 2-product guard
    assert {r.certificate for r in guarded} == {"full", "guard"}
    assert first_right_from(guarded_right, 0) <= reach + M - 1
    assert sum(r.matvecs for r in results) < sum(r.matvecs for r in guarded)


def test_a_static_trajectory_costs_the_guard_only():
    """Nothing missed: measurements 1 … M − 1 use ``guard_steps`` products beyond the solve,
    the M-th the full ``check_steps``; the guard vector is orthogonal to the found subspace and
    unit, carried in the result (``previous.guard``), and a plain tensor ``previous`` (no guard)
    makes the next measurement a full check."""
    Q = _basis()
    values = torch.cat([TOP, _bulk()])
    op = ts.DenseOperator((Q * values) @ Q.T)
    first = ts.track_eigenpairs(op, K, tol=1e-9, check="amortised")
    assert first.certificate == "full" and first.guard.since_full == 0
    plain = ts.track_eigenpairs(op, K, previous=first, tol=1e-9, warm="subspace",
                                check="full", check_steps=0)
    second = ts.track_eigenpairs(op, K, previous=first, tol=1e-9, warm="subspace",
                                 check="amortised", guard_steps=3)
    assert second.certificate == "guard" and second.matvecs == plain.matvecs + 3
    g = second.guard.vector
    assert abs(float(g.norm()) - 1) < 1e-12 and float((second.vectors.T @ g).abs().max()) < 1e-10
    anew = ts.track_eigenpairs(op, K, previous=second.vectors, tol=1e-9, warm="subspace",
                               check="amortised")
    assert anew.certificate == "full" and anew.multiplicity_checked


@pytest.mark.parametrize(("options", "message"), [
    ({"check": "sometimes"}, r"check must be one of \('full', 'amortised'\), got 'sometimes'"),
    ({"check": "amortised", "check_every": 0}, r"check_every must be a positive integer, got 0"),
    ({"check": "amortised", "guard_steps": 1.5}, r"guard_steps must be a positive integer"),
    ({"guard_steps": -1}, r"guard_steps must be a positive integer or 0 \(no guard\), got -1"),
    ({"check": "amortised", "skip": 1}, r"check='amortised' needs skip=0 .* got skip=1"),
])
def test_bad_check_arguments_are_named(options, message):
    op = ts.DenseOperator(torch.diag(torch.arange(20, 0, -1, dtype=F64)))
    with pytest.raises(ValueError, match=message):
        ts.track_eigenpairs(op, 3, **options)
