"""``tol_scale``: a pair converged relative to ``|θ_1|`` ("top") or to its own ``|θ_i|`` ("pair",
ARPACK's test), on every solver path, against dense float64 ``eigh`` references.

The matrices put the wanted eigenvalues over two decades, so that at the same ``tol`` the two
criteria give different answers: every test also checks that ``"top"`` leaves some pair above
``tol · |λ_i|`` (otherwise it could not tell whether the option was ignored).
"""

from __future__ import annotations

import pytest
import torch

import tinysubspace as ts
from cases import ten_class_problem
from reference import FlatLoss, reference_hessian
from tinysubspace.linalg.tolerance import TOL_SCALES, thresholds

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64
TOL = 1e-4


def spread_matrix(seed: int = 0) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` (p = 300): eight outliers from 100 down to 1, a bulk in [−0.5, 0.6]."""
    gen = torch.Generator().manual_seed(seed)
    top = torch.tensor([100.0, 60.0, 30.0, 12.0, 6.0, 3.0, 1.6, 1.0], dtype=F64)
    values = torch.cat([top, -0.5 + 1.1 * torch.rand(292, generator=gen, dtype=F64)])
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=F64))
    A = (Q * values) @ Q.T
    return (A + A.T) / 2


def relative_residuals(result: ts.Eigenpairs, A: torch.Tensor) -> torch.Tensor:
    """``‖A v_i − θ_i v_i‖ / |θ_i|`` recomputed from the returned pairs and the dense matrix."""
    V, theta = result.vectors.to(F64), result.values.to(F64)
    return (A @ V - V * theta).norm(dim=0) / theta.abs()


def check_pair_criterion(result: ts.Eigenpairs, A: torch.Tensor, tol: float) -> None:
    """Every returned pair within ``tol · |θ_i|`` (recomputed), its eigenvalue within that of
    the dense reference's ``λ_{skip+i}``, and the criterion recorded in the result."""
    exact = torch.linalg.eigvalsh(A).flip(0)[result.skip:result.skip + result.values.numel()]
    assert result.converged and result.tol_scale == "pair"
    assert float(relative_residuals(result, A).max()) <= tol * (1 + 1e-6)
    error = (result.values.to(F64) - exact).abs() / exact.abs()
    assert float(error.max()) <= tol


SOLVES = {
    "krylov-schur (cold)": lambda op, k, scale, prev: ts.top_eigenpairs(
        op, k, tol=TOL, tol_scale=scale),
    "block lanczos (cold, b = 2)": lambda op, k, scale, prev: ts.top_eigenpairs(
        op, k, tol=TOL, block_size=2, tol_scale=scale),
    "skip (next-k)": lambda op, k, scale, prev: ts.top_eigenpairs(
        op, k - 3, skip=3, tol=TOL, tol_scale=scale),
    "warm subspace": lambda op, k, scale, prev: ts.track_eigenpairs(
        op, k, prev, tol=TOL, warm="subspace", tol_scale=scale),
    "warm krylov": lambda op, k, scale, prev: ts.track_eigenpairs(
        op, k, prev, tol=TOL, warm="krylov", tol_scale=scale),
}


@pytest.mark.parametrize("path", list(SOLVES))
def test_pair_criterion_on_every_path(path):
    A = spread_matrix()
    op = ts.DenseOperator(A)
    # a warm start from a nearby matrix's answer (the next measurement of a run)
    previous = ts.top_eigenpairs(ts.DenseOperator(spread_matrix(seed=0) + 1e-3 * spread_matrix(
        seed=1)), 8, tol=1e-8)
    loose = SOLVES[path](op, 8, "top", previous)
    assert loose.converged and loose.tol_scale == "top"
    # the case discriminates: "top" stops with a small pair above tol · |θ_i|
    assert float(relative_residuals(loose, A).max()) > 3 * TOL
    strict = SOLVES[path](op, 8, "pair", previous)
    check_pair_criterion(strict, A, TOL)
    assert strict.matvecs > loose.matvecs


def test_pair_criterion_on_a_hessian():
    problem = ten_class_problem()
    H = reference_hessian(FlatLoss(problem.model, problem.loss_fn, problem.inputs,
                                   problem.targets))
    op = problem.operator(dtype=F64)
    loose = ts.top_eigenpairs(op, 10, tol=1e-3, tol_scale="top")
    assert float(relative_residuals(loose, H).max()) > 1.5e-3  # the case discriminates
    check_pair_criterion(ts.top_eigenpairs(op, 10, tol=1e-3, tol_scale="pair"), H, 1e-3)


def test_thresholds_closed_form_and_floor():
    theta = torch.tensor([10.0, -2.0, 0.0], dtype=F64)
    assert thresholds(theta, 10.0, 1e-3, "top", F64) == pytest.approx(1e-2)
    bar = thresholds(theta, 10.0, 1e-3, "pair", F64)
    floor = torch.finfo(F64).eps ** (2 / 3) * 10.0 * 1e-3
    assert torch.allclose(bar, torch.tensor([1e-2, 2e-3, floor], dtype=F64), rtol=1e-12)


def test_default_is_top_and_identical():
    op = ts.DenseOperator(spread_matrix())
    default, explicit = ts.top_eigenpairs(op, 5, tol=TOL), ts.top_eigenpairs(
        op, 5, tol=TOL, tol_scale="top")
    assert default.tol_scale == "top" and default.matvecs == explicit.matvecs
    assert torch.equal(default.values, explicit.values)


@pytest.mark.parametrize("bad", ["relative", "Pair", None, 1])
def test_bad_tol_scale_is_refused(bad):
    op = ts.DenseOperator(spread_matrix())
    message = r"tol_scale must be one of \('top', 'pair'\).*got " + repr(bad).replace("(", r"\(")
    with pytest.raises(ValueError, match=message):
        ts.top_eigenpairs(op, 3, tol_scale=bad)
    with pytest.raises(ValueError, match=message):
        ts.track_eigenpairs(op, 3, None, tol_scale=bad)
    with pytest.raises(ValueError, match=message):
        ts.track_eigenpairs(op, 3, torch.eye(300, 3, dtype=F64), tol_scale=bad)
    assert TOL_SCALES == ("top", "pair")


# ------------------------------------------------------------------------ the tracker and runs
def _tracker(problem, **changes):
    from tinysubspace.experiments.config import TrackerConfig
    from tinysubspace.experiments.tracker import Tracker

    config = TrackerConfig(k=3, tol=1e-3, anchors=(0,), save_vectors_at=(), **changes)
    return Tracker(config, problem.loss_fn, problem.tensors("train"))


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["track", "cold"])
def test_tracker_measures_with_its_tol_scale(solver):
    from experiment_fixtures import tiny_config
    from tinysubspace.experiments.build import build_problem

    problem = build_problem(tiny_config())
    X, Y = problem.tensors("train")
    H = reference_hessian(FlatLoss(problem.model, problem.loss_fn, X, Y))
    top = _tracker(problem, solver=solver).measure(problem.model, step=0).eigenpairs
    pair = _tracker(problem, solver=solver, tol_scale="pair")
    for step in range(2):  # the second measurement is warm-started for "track"
        eig = pair.measure(problem.model, step=step).eigenpairs
        check_pair_criterion(eig, H, 1e-3)
    assert top.tol_scale == "top" and float(relative_residuals(top, H).max()) > 1e-3


def test_tracker_and_config_refuse_a_bad_tol_scale():
    from tinysubspace.experiments.config import (
        ConfigError,
        ExperimentConfig,
        TrackerConfig,
        apply_overrides,
        validate_config,
    )
    from tinysubspace.experiments.tracker import Tracker

    with pytest.raises(ValueError, match=r"tracker\.tol_scale must be one of \('top', 'pair'\), "
                                         r"got 'ARPACK'"):
        Tracker(TrackerConfig(tol_scale="ARPACK"), None, None)
    with pytest.raises(ConfigError, match=r"tracker\.tol_scale must be one of top, pair, got "
                                          r"'per-pair'"):
        apply_overrides(ExperimentConfig(), {"tracker.tol_scale": "per-pair"})
    with pytest.raises(ConfigError, match=r"tracker\.tol_scale must be one of top, pair"):
        validate_config(ExperimentConfig(tracker=TrackerConfig(tol_scale="Pair")))
    assert apply_overrides(ExperimentConfig(), {"tracker.tol_scale": "pair"}).tracker.tol_scale \
        == "pair"


def test_tol_scale_is_recorded_in_the_run_config(tmp_path):
    import json

    from torch import nn

    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 5, generator=gen, dtype=F64), torch.arange(64) % 3
    with torch.random.fork_rng():
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    tracker = ts.SubspaceTracker(model, nn.CrossEntropyLoss(), (X, Y), k=2, schedule=[0],
                                 out=tmp_path / "run", tol=1e-3, tol_scale="pair", anchors=())
    tracker.measure(0)
    tracker.close()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["tracker"]["tol_scale"] == "pair"
