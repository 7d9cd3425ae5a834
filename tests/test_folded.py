"""The folded warm block solver (linalg/folded.py): the multiplicity check in the block passes.

Against dense ``torch.linalg.eigh`` (``test_tracking.check_against`` recomputes residuals,
eigenvalues and overlap in float64), on the same dense cases as the other warm starts.
"""

from __future__ import annotations

import pytest
import torch

import tinysubspace as ts
from test_tracking import (
    OUTLIERS,
    PassCounter,
    check_against,
    hessian_like_spectrum,
    invariant_previous_case,
    moving_sequence,
)
from tinysubspace.linalg.folded import folded_eigenpairs
from tinysubspace.linalg.pass_cost import PassCost
from tinysubspace.linalg.warm_start import track_eigenpairs

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64


@pytest.mark.parametrize("rate", [1e-3, 1e-2])
def test_folded_tracks_a_moving_spectrum_in_fewer_passes_than_subspace(rate):
    values = hessian_like_spectrum(300, OUTLIERS, edge_ratio=None, seed=0)
    matrices = moving_sequence(values, steps=4, rate=rate, seed=1)
    folded = subspace = ts.top_eigenpairs(ts.DenseOperator(matrices[0]), 10, tol=1e-8)
    passes = {"folded": 0, "subspace": 0}
    for A in matrices[1:]:
        one, two = PassCounter(ts.DenseOperator(A)), PassCounter(ts.DenseOperator(A))
        folded = track_eigenpairs(one, 10, folded, tol=1e-8, solver="folded")
        subspace = track_eigenpairs(two, 10, subspace, tol=1e-8, warm="subspace", check="full")
        check_against(folded, A, 10, 1e-8)
        assert folded.certificate == "folded" and folded.solver == "folded"
        assert folded.matvecs == one.matvecs
        passes["folded"] += one.passes
        passes["subspace"] += two.passes
    assert passes["folded"] < 0.85 * passes["subspace"]


@pytest.mark.parametrize("tol", [1e-4, 1e-9])
def test_folded_finds_an_eigenvector_orthogonal_to_an_invariant_previous_subspace(tol):
    """Issue 12's case: the previous basis is exactly invariant, the new tenth eigenvalue (1.2)
    lives orthogonal to it: no residual points to it, only the probe can."""
    for seed in range(4):
        A_new, V_old, u = invariant_previous_case(seed)
        result = folded_eigenpairs(ts.DenseOperator(A_new), 10, V_old, tol=tol, seed=seed)
        check_against(result, A_new, 10, tol)
        assert float(result.values[9]) == pytest.approx(1.2, abs=10 * tol)
        assert float((result.vectors.T @ u).norm()) > 0.999
        blind = folded_eigenpairs(ts.DenseOperator(A_new), 10, V_old, tol=tol, check_steps=0)
        assert blind.converged and float(blind.values[9]) < 1.1  # the probe's first pass only


def test_folded_finds_the_second_copy_of_a_repeated_eigenvalue():
    """λ1 = λ2 = 5: a previous basis holding one copy (and the rest of the top 4)."""
    p = 120
    values = torch.cat([torch.tensor([5.0, 5.0, 4.0, 3.0, 2.5], dtype=F64),
                        torch.linspace(1.0, 0.0, p - 5, dtype=F64)])
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(3),
                                       dtype=F64))
    A = (Q * values) @ Q.T
    A = (A + A.T) / 2
    previous = Q[:, [0, 2, 3, 4]]  # the second copy Q[:, 1] is missing
    result = folded_eigenpairs(ts.DenseOperator(A), 4, previous, tol=1e-9)
    check_against(result, A, 4, 1e-9)
    assert torch.allclose(result.values, torch.tensor([5.0, 5.0, 4.0, 3.0], dtype=F64),
                          atol=1e-8)


def test_auto_with_a_gpu_like_cost_runs_the_folded_solver():
    values = hessian_like_spectrum(200, OUTLIERS, edge_ratio=None, seed=0)
    first, second = moving_sequence(values, steps=2, rate=1e-3, seed=2)
    start = ts.top_eigenpairs(ts.DenseOperator(first), 10, tol=1e-9)
    cost = PassCost(1.0, 0.01)
    auto = track_eigenpairs(ts.DenseOperator(second), 10, start, tol=1e-9, pass_cost=cost)
    folded = track_eigenpairs(ts.DenseOperator(second), 10, start, tol=1e-9, solver="folded")
    assert auto.certificate == "folded" and auto.pass_cost == cost
    assert torch.equal(auto.values, folded.values) and auto.matvecs == folded.matvecs
    check_against(auto, second, 10, 1e-9)


def test_folded_rejects_bad_arguments():
    op = ts.DenseOperator(torch.diag(torch.arange(30, dtype=F64)))
    init = torch.eye(30, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"1 <= k < p - 1 = 29 \(the probe needs"):
        folded_eigenpairs(op, 29, init)
    with pytest.raises(ValueError, match=r"check_steps must be a non-negative integer, got -1"):
        folded_eigenpairs(op, 3, init, check_steps=-1)
    with pytest.raises(ValueError, match=r"block_size must be a positive integer or None"):
        folded_eigenpairs(op, 3, init, block_size=0)
    with pytest.raises(ValueError, match=r"solver='folded' solves for the top k pairs"):
        track_eigenpairs(op, 3, init, solver="folded", skip=1)
