"""The tracker's measurements against dense float64 references (eqs. 2, 3, 5, 12), on a test set
that is not the training set; a measurement in either mode leaves the model untouched."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

import tinysubspace as ts
from experiment_fixtures import tiny_config
from reference import FlatLoss, reference_gradient, reference_hessian
from tinysubspace.experiments.build import build_problem
from tinysubspace.experiments.config import TrackerConfig
from tinysubspace.experiments.tracker import Tracker, _gradient_metrics, measurement_steps


@pytest.fixture(scope="module")
def problem():
    return build_problem(tiny_config(data__test_set=True, data__n_test=50))


def _tracker(problem, **changes) -> Tracker:
    config = TrackerConfig(k=3, tol=1e-10, anchors=(0,), save_vectors_at=(0,), **changes)
    return Tracker(config, problem.loss_fn, problem.tensors("train"), problem.tensors("test"))


def _dense(model, loss_fn, X, Y):
    """Loss, gradient, Hessian (float64, torch.autograd.functional.hessian) and its eigenpairs,
    largest first."""
    f = FlatLoss(model, loss_fn, X, Y)
    H = reference_hessian(f)
    values, vectors = torch.linalg.eigh(H)
    return float(f(f.theta0)), reference_gradient(f), H, values.flip(0), vectors.flip(1)


def test_one_measurement_equals_the_dense_reference(problem):
    tracker = _tracker(problem)
    m = tracker.measure(problem.model, step=0)
    X, Y = problem.tensors("train")
    loss, g, dense, values, vectors = _dense(problem.model, problem.loss_fn, X, Y)
    values, vectors = values[:6], vectors[:, :6]
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
    # the test set (another split): its loss, gradient and Hessian, and f_top of its gradient in
    # the *training* Hessian's top-3 subspace
    Xt, Yt = problem.tensors("test")
    test_loss, g_test, H_test, _, _ = _dense(problem.model, problem.loss_fn, Xt, Yt)
    assert abs(test_loss - loss) > 1e-3  # really another data set
    assert row["test/loss"] == pytest.approx(test_loss, rel=1e-12)
    assert row["test/f_top"] == pytest.approx(ts.top_fraction(g_test, vectors[:, :3]), abs=1e-8)
    assert abs(row["test/f_top"] - row["hessian/f_top"]) > 1e-4
    assert row["test/overlap_g_Hg"] == pytest.approx(ts.gradient_overlap(g_test, H_test @ g_test),
                                                     rel=1e-9)
    assert row["test/accuracy"] == pytest.approx(
        (problem.model(Xt).argmax(1) == Yt).double().mean().item())
    assert row["hessian/residual_max"] <= 1e-10 and row["hessian/converged"] == 1.0
    assert set(row) <= set(tracker.columns())
    assert m.vectors_to_save["vectors"].shape == (g.shape[0], 6)


def test_anchor_overlaps_against_dense_eigenvectors_at_both_steps(problem):
    tracker = _tracker(problem)
    tracker.measure(problem.model, step=0)
    model = problem.model
    X, Y = problem.tensors("train")
    *_, V0 = _dense(model, problem.loss_fn, X, Y)
    saved = [p.detach().clone() for p in model.parameters()]
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        later = tracker.measure(model, step=5)
        *_, V5 = _dense(model, problem.loss_fn, X, Y)
    finally:
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved, strict=True):
                p.copy_(s)
    assert later.row["overlap/top/t1=0"] == pytest.approx(
        ts.subspace_overlap(V0[:, :3], V5[:, :3]), abs=1e-5)
    assert later.row["overlap/next/t1=0"] == pytest.approx(
        ts.subspace_overlap(V0[:, 3:6], V5[:, 3:6]), abs=1e-5)
    assert later.row["overlap/d=5/t1=0"] == pytest.approx(
        ts.subspace_overlap(V0[:, :5], V5[:, :5]), abs=1e-5)
    assert later.row["overlap/top/t1=0"] < 0.9999  # the perturbation did move the subspace


class _BatchNormDropout(nn.Module):
    def __init__(self, inputs: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(inputs, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                  nn.Dropout(0.5), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_measurement_leaves_the_model_and_random_streams_untouched(problem, mode):
    """Issue 12 item 4: in train mode the accuracy pass used to update the running statistics."""
    X, Y = problem.tensors("train")
    model = _BatchNormDropout(X.shape[1]).train()
    model(X)  # running statistics away from their initial values
    problem.loss_fn(model(X), Y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng, np_rng = torch.get_rng_state(), np.random.get_state()
    config = TrackerConfig(k=2, tol=1e-6, anchors=(), save_vectors_at=(), mode=mode)
    row = Tracker(config, problem.loss_fn, (X, Y), (X[:40], Y[:40])).measure(model, step=0).row
    assert 0 <= row["train/accuracy"] <= 1
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert torch.equal(rng, torch.get_rng_state())
    assert np.array_equal(np_rng[1], np.random.get_state()[1])


def test_schedule_is_dense_early_and_sparse_later():
    config = TrackerConfig(dense_until=20, dense_every=5, sparse_every=50, anchors=(0, 7),
                           save_vectors_at=(3,), extra_steps=(121,))
    assert measurement_steps(config, 130) == [0, 3, 5, 7, 10, 15, 20, 50, 100, 121, 130]


def test_zero_gradient_gives_nan_and_other_errors_are_raised():
    """Issue 12 item 5: only the undefined case (a zero gradient) is NaN."""
    zero = torch.zeros(10, dtype=torch.float64)
    V = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))[0]
    row = _gradient_metrics(zero, zero, V, 2)
    assert math.isnan(row["hessian/f_top"]) and math.isnan(row["hessian/c2_1"])
    assert math.isnan(row["hessian/overlap_g_Hg"])
    g = torch.ones(10, dtype=torch.float64)
    assert not math.isnan(_gradient_metrics(g, g, V, 2)["hessian/f_top"])
    with pytest.raises(ValueError, match="must be orthonormal"):
        _gradient_metrics(g, g, 2 * V, 2)
    longer = torch.ones(11, dtype=torch.float64)
    with pytest.raises(ValueError, match="g has length 11 but the basis has 10 rows"):
        _gradient_metrics(longer, longer, V, 2)


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
    with pytest.raises(ValueError,
                       match=r"tracker\.solver must be one of \['budget', 'cold', 'track'\]"):
        Tracker(TrackerConfig(solver="magic"), None, None)


def test_cost_seconds_counts_the_solve(problem, monkeypatch):
    """``cost/seconds`` is the whole measurement, the eigensolve included (a regression: the
    clock once started after the solve, so the column counted the groups alone)."""
    tracker = _tracker(problem)
    solve = type(tracker.solver).solve

    def slow_solve(*args, **kwargs):
        time.sleep(0.3)
        return solve(*args, **kwargs)

    monkeypatch.setattr(type(tracker.solver), "solve", slow_solve)  # settings are frozen
    row = tracker.measure(problem.model, step=0).row
    assert row["cost/seconds"] >= 0.3
