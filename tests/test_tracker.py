"""The tracker's measurements equal the core functions called directly (eqs. 2, 3, 5, 12)."""

from __future__ import annotations

import math

import pytest
import torch

import tinysubspace as ts
from experiment_fixtures import tiny_config
from tinysubspace.experiments.build import build_problem
from tinysubspace.experiments.config import TrackerConfig
from tinysubspace.experiments.tracker import Tracker, _gradient_metrics, measurement_steps


@pytest.fixture(scope="module")
def problem():
    return build_problem(tiny_config())


def _tracker(problem, **changes) -> Tracker:
    config = TrackerConfig(k=3, tol=1e-10, anchors=(0,), save_vectors_at=(0,), **changes)
    return Tracker(config, problem.loss_fn, problem.tensors("train"), problem.tensors("train"))


def test_one_measurement_equals_the_core_functions(problem):
    tracker = _tracker(problem)
    m = tracker.measure(problem.model, step=0)
    X, Y = problem.tensors("train")
    op = ts.HessianOperator(problem.model, problem.loss_fn, (X, Y), dtype=torch.float64)
    loss, g = op.loss_and_gradient()
    dense = op @ torch.eye(op.shape[0], dtype=torch.float64)
    values, vectors = torch.linalg.eigh(dense)
    values, vectors = values.flip(0)[:6], vectors.flip(1)[:, :6]
    row = m.row
    assert row["train/loss"] == pytest.approx(loss, rel=1e-12)
    assert row["train/grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
    for i in range(6):
        assert row[f"hessian/eig_{i + 1}"] == pytest.approx(float(values[i]), rel=1e-8)
    assert row["hessian/f_top"] == pytest.approx(ts.top_fraction(g, vectors[:, :3]), abs=1e-8)
    assert row["hessian/f_next"] == pytest.approx(ts.top_fraction(g, vectors[:, 3:]), abs=1e-8)
    assert row["hessian/overlap_g_Hg"] == pytest.approx(ts.gradient_overlap(g, dense @ g),
                                                        rel=1e-10)
    c2 = ts.eigenvector_overlaps(g, vectors)
    for i in range(6):
        assert row[f"hessian/c2_{i + 1}"] == pytest.approx(float(c2[i]), abs=1e-8)
    predicted = (problem.model(X).argmax(1) == Y).double().mean().item()
    assert row["train/accuracy"] == pytest.approx(predicted)
    assert row["overlap/top/t1=0"] == pytest.approx(1.0, abs=1e-6)  # the anchor itself
    assert row["test/overlap_g_Hg"] == pytest.approx(row["hessian/overlap_g_Hg"], rel=1e-9)
    assert row["hessian/residual_max"] <= 1e-10 and row["hessian/converged"] == 1.0
    assert set(row) <= set(tracker.columns())
    assert m.vectors_to_save["vectors"].shape == (op.shape[0], 6)


def test_anchor_overlaps_against_the_stored_basis(problem):
    tracker = _tracker(problem)
    first = tracker.measure(problem.model, step=0)
    model = problem.model
    saved = [p.detach().clone() for p in model.parameters()]
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        later = tracker.measure(model, step=5)
    finally:
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved, strict=True):
                p.copy_(s)
    V0, V5 = first.eigenpairs.vectors, later.eigenpairs.vectors
    assert later.row["overlap/top/t1=0"] == pytest.approx(
        ts.subspace_overlap(V0[:, :3], V5[:, :3]), abs=1e-5)
    assert later.row["overlap/next/t1=0"] == pytest.approx(
        ts.subspace_overlap(V0[:, 3:], V5[:, 3:]), abs=1e-5)
    assert later.row["overlap/d=5/t1=0"] == pytest.approx(
        ts.subspace_overlap(V0[:, :5], V5[:, :5]), abs=1e-5)
    assert later.row["overlap/top/t1=0"] < 0.9999  # the perturbation did move the subspace


def test_measurement_leaves_the_model_untouched(problem):
    model = problem.model
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _tracker(problem).measure(model, step=0)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_schedule_is_dense_early_and_sparse_later():
    config = TrackerConfig(dense_until=20, dense_every=5, sparse_every=50, anchors=(0, 7),
                           save_vectors_at=(3,), extra_steps=(121,))
    assert measurement_steps(config, 130) == [0, 3, 5, 7, 10, 15, 20, 50, 100, 121, 130]


def test_zero_gradient_gives_nan_not_a_crash():
    zero = torch.zeros(10, dtype=torch.float64)
    V = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))[0]
    row = _gradient_metrics(zero, zero, V, 2)
    assert math.isnan(row["hessian/f_top"]) and math.isnan(row["hessian/c2_1"])
    assert math.isnan(row["hessian/overlap_g_Hg"])


def test_bad_tracker_config():
    with pytest.raises(ValueError, match=r"tracker\.k must be at least 1"):
        Tracker(TrackerConfig(k=0), None, None)
    with pytest.raises(ValueError, match=r"tracker.dtype must be one of \['float32', 'float64'\]"):
        Tracker(TrackerConfig(dtype="half"), None, None)


def test_warm_tracking_agrees_with_cold_solves(problem):
    """The default (warm-started) solver returns the cold solver's subspace and eigenvalues."""
    warm, cold = _tracker(problem), _tracker(problem, solver="cold")
    model = problem.model
    saved = [p.detach().clone() for p in model.parameters()]
    try:
        for step in range(3):
            a, b = warm.measure(model, step), cold.measure(model, step)
            for i in range(1, 7):
                assert a.row[f"hessian/eig_{i}"] == pytest.approx(b.row[f"hessian/eig_{i}"],
                                                                 rel=1e-7)
            assert ts.subspace_overlap(a.eigenpairs.vectors[:, :3],
                                       b.eigenpairs.vectors[:, :3]) > 0.9999
            with torch.no_grad():
                gen = torch.Generator().manual_seed(step)
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=gen))
    finally:
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved, strict=True):
                p.copy_(s)
    with pytest.raises(ValueError, match=r"tracker\.solver must be one of \['cold', 'track'\]"):
        Tracker(TrackerConfig(solver="magic"), None, None)
