"""top_eigenpairs against torch.linalg.eigh of dense matrices and of small models' Hessians.

Every check recomputes what it relies on: residuals ``‖Hv − λv‖`` from the returned vectors,
orthonormality, and the reference spectrum from a dense ``eigh``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tinysubspace as ts
from cases import CASES, ten_class_problem
from reference import FlatLoss, reference_hessian
from tinysubspace.linalg.basis import random_block
from tinysubspace.linalg.tridiagonal import lanczos_tridiagonal

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64


def spectrum_matrix(values: list[float] | torch.Tensor, seed: int = 0,
                    dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = Q diag(values) Qᵀ`` with a random orthogonal ``Q``; returns ``(A, Q)`` (Q's columns
    are the eigenvectors, in the order of ``values``)."""
    values = torch.as_tensor(values, dtype=F64)
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=gen, dtype=F64))
    A = (Q * values) @ Q.T
    return ((A + A.T) / 2).to(dtype), Q.to(dtype)


def bulk(count: int, low: float, high: float, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(count, generator=gen, dtype=F64)


def overlap(V: torch.Tensor, W: torch.Tensor) -> float:
    """Subspace overlap (eq. 5) of two orthonormal bases, recomputed here."""
    return float((V.T @ W).square().sum()) / (V.shape[1] * W.shape[1]) ** 0.5


def check_pairs(result: ts.Eigenpairs, A: torch.Tensor, tol: float) -> None:
    """The returned pairs are honest: orthonormal vectors, residuals as stated and within
    ``tol · ‖A‖``, values equal to the Rayleigh quotients, sorted descending."""
    V, values = result.vectors.to(F64), result.values.to(F64)
    A = A.to(F64)
    k = values.shape[0]
    scale = float(torch.linalg.eigvalsh(A).abs().max())
    eps = torch.finfo(result.vectors.dtype).eps
    assert result.vectors.shape == (A.shape[0], k) and result.residuals.shape == (k,)
    assert float((V.T @ V - torch.eye(k, dtype=F64)).abs().max()) < 100 * eps * A.shape[0] ** 0.5
    residuals = (A @ V - V * values).norm(dim=0)
    assert torch.allclose(result.residuals.to(F64), residuals, rtol=0.05,
                          atol=50 * eps * scale * A.shape[0] ** 0.5)
    if result.converged:
        assert float(residuals.max()) <= 1.05 * tol * scale + 50 * eps * scale * A.shape[0] ** 0.5
    assert torch.all(values[:-1] >= values[1:])
    rayleigh = (V * (A @ V)).sum(0)
    assert torch.allclose(rayleigh, values, rtol=0, atol=10 * tol * scale + 100 * eps * scale)


def check_against_eigh(result: ts.Eigenpairs, A: torch.Tensor, start: int = 0,
                       need_gap: float = 1e-3) -> None:
    """Values to ``1e-8 |λ1|``; the subspace to overlap > 0.9999 when followed by a gap."""
    evals, evecs = torch.linalg.eigh(A.to(F64))
    evals, evecs = evals.flip(0), evecs.flip(1)
    k = result.values.shape[0]
    expected = evals[start:start + k]
    scale = float(evals.abs().max())
    assert float((result.values.to(F64) - expected).abs().max()) <= 1e-8 * scale
    gap_before = start == 0 or evals[start - 1] - evals[start] > need_gap * scale
    gap_after = evals[start + k - 1] - evals[start + k] > need_gap * scale
    if gap_before and gap_after:
        assert overlap(result.vectors.to(F64), evecs[:, start:start + k]) > 0.9999


# ------------------------------------------------------------------ dense test matrices
GAPPED = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0, 4.0], dtype=F64), bulk(55, -1.0, 2.0)])


@pytest.mark.parametrize("block_size", [1, 2, 5])
def test_dense_matrix_with_gap(block_size):
    A, _ = spectrum_matrix(GAPPED)
    op = ts.DenseOperator(A)
    result = ts.top_eigenpairs(op, k=5, tol=1e-10, block_size=block_size, seed=block_size)
    assert result.converged and result.skip == 0
    assert result.matvecs == op.matvecs
    check_pairs(result, A, 1e-10)
    check_against_eigh(result, A)


def test_negative_eigenvalue_of_larger_magnitude():
    """Largest *algebraic* eigenvalues, even when ``|λ_min| > λ_1``."""
    A, _ = spectrum_matrix(torch.cat([torch.tensor([3.0, 2.5, -20.0], dtype=F64),
                                      bulk(37, -1.0, 1.0)]))
    result = ts.top_eigenpairs(ts.DenseOperator(A), k=2, tol=1e-10)
    check_pairs(result, A, 1e-10)
    check_against_eigh(result, A)


def test_clustered_spectrum():
    cluster = [10.0, 10.0 - 1e-3, 10.0 - 2e-3, 10.0 - 3e-3]
    A, _ = spectrum_matrix(torch.cat([torch.tensor([*cluster, 5.0], dtype=F64),
                                      bulk(55, 0.0, 1.0)]))
    for k in (2, 4):
        result = ts.top_eigenpairs(ts.DenseOperator(A), k=k, tol=1e-10, block_size=2)
        assert result.converged
        check_pairs(result, A, 1e-10)
        check_against_eigh(result, A, need_gap=1e-5)


@pytest.mark.parametrize("block_size", [3, 4])
def test_exactly_degenerate_spectrum_finds_every_copy(block_size):
    A, Q = spectrum_matrix(torch.cat([torch.tensor([5.0, 5.0, 5.0, 3.0, 2.5], dtype=F64),
                                      bulk(45, 0.0, 1.0)]))
    result = ts.top_eigenpairs(ts.DenseOperator(A), k=4, tol=1e-10, block_size=block_size)
    assert result.converged
    assert torch.allclose(result.values, torch.tensor([5.0, 5.0, 5.0, 3.0], dtype=F64),
                          rtol=0, atol=1e-9)
    check_pairs(result, A, 1e-10)
    assert overlap(result.vectors[:, :3], Q[:, :3]) > 0.9999  # the whole 3-dim eigenspace
    assert overlap(result.vectors, Q[:, :4]) > 0.9999


def test_single_vector_start_finds_every_copy():
    """λ1 = λ2 = λ3: a single-vector Krylov space holds one vector of the eigenspace; the
    multiplicity check must find the other two (and say so), where the solver without it
    (``check_steps=0``) returned the wrong values with ``converged=True``."""
    A, Q = spectrum_matrix(torch.cat([torch.tensor([5.0, 5.0, 5.0, 3.0, 2.5], dtype=F64),
                                      bulk(45, 0.0, 1.0)]))
    result = ts.top_eigenpairs(ts.DenseOperator(A), k=4, tol=1e-10, block_size=1)
    assert result.converged and result.multiplicity_checked
    check_pairs(result, A, 1e-10)
    check_against_eigh(result, A)
    assert overlap(result.vectors[:, :3], Q[:, :3]) > 0.9999  # the whole 3-dim eigenspace
    unchecked = ts.top_eigenpairs(ts.DenseOperator(A), k=4, tol=1e-10, block_size=1,
                                  check_steps=0)
    assert not unchecked.multiplicity_checked
    assert float(unchecked.values[:3].min()) < 4.0  # a copy missed: what the check is for


@pytest.mark.parametrize("p", [60, 400])
def test_repeated_top_eigenvalue_of_the_toy_spectrum(p):
    """Issue 12: spectrum (1, 1, 0.6, bulk), k = 2 (the paper's toy model, eqs. 9 and 19). The
    cold solve and both warm starts from the wrong answer ``[v(1), v(0.6)]`` must return
    ``[1, 1]`` and the top-2 eigenspace."""
    A, Q = spectrum_matrix(torch.cat([torch.tensor([1.0, 1.0, 0.6], dtype=F64),
                                      bulk(p - 3, 0.0, 0.5)]), seed=p)
    op = ts.DenseOperator(A)
    wrong = Q[:, [0, 2]]
    results = [ts.top_eigenpairs(op, k=2, tol=1e-6),
               ts.top_eigenpairs(op, k=2, tol=1e-6, init=wrong),
               *(ts.track_eigenpairs(op, 2, wrong, tol=1e-6, warm=warm)
                 for warm in ("krylov", "subspace"))]
    for result in results:
        assert result.converged and result.multiplicity_checked
        check_pairs(result, A, 1e-6)
        assert torch.allclose(result.values, torch.ones(2, dtype=F64), rtol=0, atol=1e-6)
        assert overlap(result.vectors, Q[:, :2]) > 0.9999


def test_many_copies_are_found_one_check_at_a_time():
    """Four copies of the top eigenvalue, single start vector, k = 5: each check finds one
    more copy (or several), the solve goes on, and the last check finds none."""
    A, Q = spectrum_matrix(torch.cat([torch.tensor([4.0] * 4 + [3.0, 2.0], dtype=F64),
                                      bulk(74, 0.0, 1.0)]))
    result = ts.top_eigenpairs(ts.DenseOperator(A), k=5, tol=1e-10)
    assert result.converged and result.multiplicity_checked
    check_pairs(result, A, 1e-10)
    check_against_eigh(result, A)
    assert overlap(result.vectors[:, :4], Q[:, :4]) > 0.9999


@pytest.mark.parametrize("block_size", [1, 3])
def test_multiplicity_check_changes_nothing_when_nothing_is_missed(block_size):
    """A simple spectrum: the answer with the check is bit-identical to the one without, which
    costs exactly ``CHECK_STEPS`` products fewer and says it was not checked."""
    from tinysubspace.linalg.deflation import CHECK_STEPS

    A, _ = spectrum_matrix(GAPPED)
    plain = ts.top_eigenpairs(ts.DenseOperator(A), k=5, tol=1e-10, block_size=block_size,
                              check_steps=0)
    checked = ts.top_eigenpairs(ts.DenseOperator(A), k=5, tol=1e-10, block_size=block_size)
    assert checked.multiplicity_checked and not plain.multiplicity_checked
    assert checked.converged and plain.converged
    assert checked.matvecs == plain.matvecs + CHECK_STEPS
    for field in ("values", "vectors", "residuals"):
        assert torch.equal(getattr(checked, field), getattr(plain, field))


def test_deflated_search_bounds_the_missed_eigenvalue_from_below():
    """Lanczos on (I − VVᵀ)A(I − VVᵀ): orthonormal vectors ⊥ V, exact images, and Ritz values
    that are lower bounds (Cauchy interlacing) of the top eigenvalue of A on V^⊥ — above the bar
    when a copy is missing, below the largest remaining eigenvalue when none is."""
    from tinysubspace.linalg.deflation import deflated_search

    values = torch.cat([torch.tensor([1.0, 1.0, 0.6], dtype=F64), bulk(97, 0.0, 0.5)])
    A, Q = spectrum_matrix(values)
    op = ts.DenseOperator(A)
    gen = torch.Generator().manual_seed(0)
    missed = deflated_search(op, Q[:, [0, 2]], bar=0.6 + 1e-6, steps=30, gen=gen)
    assert 0.6 < missed.top <= 1.0 + 1e-12 and not missed.exact
    assert missed.matvecs == missed.basis.shape[1] < 30  # stopped as soon as it was sure
    B = missed.basis
    assert float((B.T @ B - torch.eye(B.shape[1], dtype=F64)).abs().max()) < 1e-12
    assert float((Q[:, [0, 2]].T @ B).abs().max()) < 1e-12
    assert torch.allclose(missed.images, A @ B, rtol=0, atol=1e-12)
    found = deflated_search(op, Q[:, :3], bar=0.6 + 1e-6, steps=10, gen=gen)
    assert found.matvecs == 10 and found.top <= float(values[3:].max()) + 1e-12
    exhausted = deflated_search(op, Q[:, :97], bar=10.0, steps=10, gen=gen)
    assert exhausted.exact and exhausted.matvecs == 3  # V^⊥ has dimension 3
    assert exhausted.top == pytest.approx(float(values[97:].max()), abs=1e-12)


def test_multiplicity_unchecked_when_the_budget_leaves_no_room():
    """Converged pairs, but no products left for the check: ``converged`` (the residuals are
    within tol) and ``multiplicity_checked=False``; a basis that fills the space is exact."""
    A, _ = spectrum_matrix(GAPPED)
    free = ts.top_eigenpairs(ts.DenseOperator(A), k=5, tol=1e-10, check_steps=0)
    tight = ts.top_eigenpairs(ts.DenseOperator(A), k=5, tol=1e-10, max_matvecs=free.matvecs + 3)
    assert tight.converged and not tight.multiplicity_checked
    assert tight.matvecs == free.matvecs + 3
    small, _ = spectrum_matrix(torch.tensor([3.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=F64))
    whole = ts.top_eigenpairs(ts.DenseOperator(small), k=2, tol=1e-10)
    assert whole.converged and whole.multiplicity_checked  # m = p: the basis is all of R^p
    assert torch.allclose(whole.values, torch.tensor([3.0, 3.0], dtype=F64), atol=1e-10)


@pytest.mark.parametrize("k", [3, 5])
def test_skip_returns_the_next_k(k):
    A, Q = spectrum_matrix(torch.cat([torch.tensor([10, 9, 8, 7, 6, 5, 4, 3, 2.5, 2.2],
                                                   dtype=F64), bulk(50, 0.0, 1.0)]))
    op = ts.DenseOperator(A)
    result = ts.top_eigenpairs(op, k=k, skip=k, tol=1e-10)
    assert result.skip == k and result.values.shape == (k,) and result.converged
    check_pairs(result, A, 1e-10)
    check_against_eigh(result, A, start=k)
    assert overlap(result.vectors, Q[:, k:2 * k]) > 0.9999
    assert overlap(result.vectors, Q[:, :k]) < 1e-8  # orthogonal to the top k


def test_seed_gives_reproducible_results():
    A, _ = spectrum_matrix(GAPPED)
    first = ts.top_eigenpairs(ts.DenseOperator(A), k=3, tol=1e-8, seed=7)
    again = ts.top_eigenpairs(ts.DenseOperator(A), k=3, tol=1e-8, seed=7)
    other = ts.top_eigenpairs(ts.DenseOperator(A), k=3, tol=1e-8, seed=8)
    assert torch.equal(first.values, again.values) and torch.equal(first.vectors, again.vectors)
    assert torch.allclose(first.values, other.values, rtol=0, atol=1e-7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.values = other.values  # type: ignore[misc]


# ------------------------------------------------------------------ the Krylov–Schur path (block 1)
def test_single_vector_ritz_values_equal_plain_lanczos():
    """Without restarts the single-vector solver's Ritz values after ``j`` products are the
    eigenvalues of the textbook Lanczos tridiagonal ``T_j`` from the same start vector."""
    A, _ = spectrum_matrix(torch.cat([torch.tensor([10.0, 9.99], dtype=F64), bulk(78, 0.0, 9.9)]))
    op = ts.DenseOperator(A)
    start = random_block(80, 1, F64, torch.device("cpu"), torch.Generator().manual_seed(4))
    steps = 12
    result = ts.top_eigenpairs(op, k=3, tol=1e-14, seed=4, max_matvecs=steps, basis_size=40)
    assert not result.converged and result.matvecs == steps
    ritz = torch.linalg.eigvalsh(lanczos_tridiagonal(op, start[:, 0], steps).matrix()).flip(0)
    assert torch.allclose(result.values, ritz[:3], rtol=0, atol=1e-12)
    check_pairs(result, A, 1e-14)  # stated residuals are the exact ones


@pytest.mark.parametrize("basis_size", [6, 9, 12])
def test_single_vector_thick_restarts_converge_to_eigh(basis_size):
    """Small bases force many thick restarts; the answer is still eigh's, and the residual
    estimates that decide when to stop do not stop it early or late."""
    A, _ = spectrum_matrix(GAPPED)
    op = ts.DenseOperator(A)
    result = ts.top_eigenpairs(op, k=5, tol=1e-10, basis_size=basis_size)
    assert result.converged and result.matvecs == op.matvecs
    assert result.matvecs > basis_size  # restarted
    check_pairs(result, A, 1e-10)
    check_against_eigh(result, A)
    # one more product than needed at most: a solve capped one short of the products before
    # the multiplicity check must not have converged; one capped inside the check has, unchecked
    from tinysubspace.linalg.deflation import CHECK_STEPS

    assert result.multiplicity_checked
    capped = ts.top_eigenpairs(ts.DenseOperator(A), k=5, tol=1e-10, basis_size=basis_size,
                               max_matvecs=result.matvecs - CHECK_STEPS - 1)
    assert not capped.converged and not capped.multiplicity_checked
    inside = ts.top_eigenpairs(ts.DenseOperator(A), k=5, tol=1e-10, basis_size=basis_size,
                               max_matvecs=result.matvecs - 1)
    assert inside.converged and not inside.multiplicity_checked


def test_single_vector_float32_with_restarts():
    A, Q = spectrum_matrix(GAPPED, dtype=torch.float32)
    result = ts.top_eigenpairs(ts.DenseOperator(A), k=5, tol=1e-4, basis_size=8)
    assert result.converged and result.matvecs > 8 and result.values.dtype == torch.float32
    check_pairs(result, A, 1e-4)
    assert torch.allclose(result.values.double(), GAPPED[:5], rtol=1e-5, atol=0)
    assert overlap(result.vectors.double(), Q[:, :5].double()) > 0.9999


@pytest.mark.parametrize("basis_size", [4, 20])
def test_single_vector_exactly_invariant_start_goes_on_at_random(basis_size, monkeypatch):
    """``H e_5 = 26 e_5`` exactly: the residual is zero after one product, and the solver must
    go on from random directions — with the smallest basis (n + 1 = 4: a restart every product
    from the fourth on) as with a roomy one."""
    from tinysubspace.linalg.basis import KrylovBasis

    calls = []
    original = KrylovBasis.random_direction
    monkeypatch.setattr(KrylovBasis, "random_direction",
                        lambda basis, gen: calls.append(basis.size) or original(basis, gen))
    A = torch.diag(torch.arange(30, 0, -1, dtype=F64))
    e5 = torch.zeros(30, dtype=F64)
    e5[4] = 1.0
    result = ts.top_eigenpairs(ts.DenseOperator(A), k=3, tol=1e-10, init=e5,
                               basis_size=basis_size)
    assert calls and calls[0] == 1  # continued at random right after the first product
    assert result.converged
    check_pairs(result, A, 1e-10)
    check_against_eigh(result, A)


def test_single_vector_rank_deficient_operator_returns_k_pairs():
    """A rank-3 operator: the Krylov space of any start is at most 4-dimensional (3 outliers and
    the null space's one direction); the solver must go on past it (from the rounding-level
    residual, or a random direction when that is exactly zero) to return k = 5 orthonormal pairs,
    the last two at 0."""
    A, Q = spectrum_matrix(torch.cat([torch.tensor([3.0, 2.0, 1.0], dtype=F64),
                                      torch.zeros(47, dtype=F64)]))
    result = ts.top_eigenpairs(ts.DenseOperator(A), k=5, tol=1e-10)
    assert result.converged
    check_pairs(result, A, 1e-10)
    assert torch.allclose(result.values, torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0], dtype=F64),
                          rtol=0, atol=1e-12)
    assert overlap(result.vectors[:, :3], Q[:, :3]) > 1 - 1e-12


# ------------------------------------------------------------------ warm starts and budgets
@pytest.mark.parametrize("extra", [0, 2])
def test_exact_warm_start_converges_in_the_first_iteration(extra):
    A, Q = spectrum_matrix(GAPPED)
    op = ts.DenseOperator(A)
    k = 4
    result = ts.top_eigenpairs(op, k=k, tol=1e-10, init=Q[:, : k + extra], check_steps=0)
    assert result.converged
    assert result.matvecs == k + extra == op.matvecs  # one Rayleigh–Ritz pass
    check_pairs(result, A, 1e-10)
    check_against_eigh(result, A)


class PassCounter(ts.DenseOperator):
    """A dense operator that counts its block products (for a Hessian: passes over the data)."""

    passes = 0

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        return super()._matmat(block)


def test_perturbed_warm_start_converges_in_fewer_passes():
    """A warm start (block size = its 5 columns) needs fewer passes over the data than a cold
    single-vector start — though more products (block Krylov spaces grow 5 vectors a pass)."""
    A, Q = spectrum_matrix(GAPPED)
    cold_op, warm_op = PassCounter(A), PassCounter(A)
    cold = ts.top_eigenpairs(cold_op, k=5, tol=1e-10)
    noise = torch.randn(60, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    warm = ts.top_eigenpairs(warm_op, k=5, tol=1e-10, init=Q[:, :5] + 1e-3 * noise)
    assert warm.converged and cold.converged
    assert warm_op.passes < cold_op.passes
    check_pairs(warm, A, 1e-10)
    check_against_eigh(warm, A)


def test_warm_start_with_fewer_columns_than_k():
    """A single exact eigenvector as ``init`` must not end the solve with one pair."""
    A, Q = spectrum_matrix(GAPPED)
    result = ts.top_eigenpairs(ts.DenseOperator(A), k=3, tol=1e-10, init=Q[:, 0])
    assert result.values.shape == (3,) and result.converged
    check_pairs(result, A, 1e-10)
    check_against_eigh(result, A)


def test_rank_deficient_warm_start_is_filled_up():
    A, Q = spectrum_matrix(GAPPED)
    init = torch.cat([Q[:, :2], Q[:, :2] @ torch.ones(2, 2, dtype=F64)], 1)  # rank 2 of 4
    result = ts.top_eigenpairs(ts.DenseOperator(A), k=4, tol=1e-10, init=init)
    assert result.converged
    check_against_eigh(result, A)


@pytest.mark.parametrize(("block_size", "budget"), [(1, 7), (3, 8), (2, 30)])
def test_max_matvecs_is_respected(block_size, budget):
    A, _ = spectrum_matrix(torch.cat([torch.tensor([10.0, 9.99], dtype=F64),
                                      bulk(58, 0.0, 9.9)]))
    op = ts.DenseOperator(A)
    result = ts.top_eigenpairs(op, k=5, tol=1e-12, max_matvecs=budget, block_size=block_size)
    assert not result.converged
    assert result.matvecs <= budget and op.matvecs == result.matvecs
    assert result.values.shape == (5,) and result.vectors.shape == (60, 5)
    check_pairs(result, A, 1e-12)  # unconverged, yet the residuals are stated honestly


# ------------------------------------------------------------------ Hessians of the cases
EIGEN_CASES = [case for case in CASES if case.data == "loader" and case.seed == 0]


@pytest.mark.parametrize("case", EIGEN_CASES, ids=str)
def test_hessian_top_eigenpairs_match_dense(case, reference_of):
    H, _, _ = reference_of(case)
    op = case.build().operator(dtype=F64)
    # block size 3: linear regression onto 3 outputs (softmax_regression-mse) has every
    # eigenvalue three times, and a single-vector Krylov space finds one copy of each
    result = ts.top_eigenpairs(op, k=3, tol=1e-10, block_size=3)
    assert result.converged and result.matvecs == op.matvecs
    check_pairs(result, H, 1e-10)
    check_against_eigh(result, H)


def test_ten_class_cross_entropy_with_lambda10_at_the_bulk_edge():
    problem = ten_class_problem()
    f = FlatLoss(problem.model, problem.loss_fn, problem.inputs, problem.targets)
    H = reference_hessian(f)
    evals = torch.linalg.eigvalsh(H).flip(0)
    assert 1.0 < evals[9] / evals[10] < 1.02  # the case is as hard as it says
    op = problem.operator(dtype=F64)
    for block_size in (1, 10):
        result = ts.top_eigenpairs(op, k=10, tol=1e-10, block_size=block_size)
        assert result.converged
        check_pairs(result, H, 1e-10)
        check_against_eigh(result, H, need_gap=1e-4)
        evecs = torch.linalg.eigh(H)[1].flip(1)
        assert overlap(result.vectors[:, :9], evecs[:, :9]) > 0.9999  # λ9/λ10 ≈ 1.1: a gap
    # the paper's tolerance: values still right to 1e-6 |λ1|, nothing skipped or repeated
    loose = ts.top_eigenpairs(op, k=10, tol=1e-6)
    check_pairs(loose, H, 1e-6)
    assert float((loose.values - evals[:10]).abs().max()) <= 1e-6 * float(evals[0])


# ------------------------------------------------------------------ float32
def test_float32_dense_operator():
    A, Q = spectrum_matrix(GAPPED, dtype=torch.float32)
    result = ts.top_eigenpairs(ts.DenseOperator(A), k=5, tol=1e-4)
    assert result.converged and result.values.dtype == torch.float32
    check_pairs(result, A, 1e-4)
    assert torch.allclose(result.values.double(), GAPPED[:5], rtol=1e-5, atol=0)
    assert overlap(result.vectors.double(), Q[:, :5].double()) > 0.9999


def test_float32_hessian_operator(reference_of):
    case = EIGEN_CASES[0]
    H, _, _ = reference_of(case)
    op = case.build().operator()
    assert op.dtype == torch.float32
    result = ts.top_eigenpairs(op, k=3, tol=1e-4)
    assert result.converged and result.values.dtype == torch.float32
    evals = torch.linalg.eigvalsh(H).flip(0)
    assert float((result.values.double() - evals[:3]).abs().max()) <= 1e-5 * float(evals[0])
