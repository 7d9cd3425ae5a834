"""Edge of stability: thresholds against simulated optimizers on quadratics, the warm-started
sharpness against ``eigvalsh``, and the driver's columns against a replayed run's dense Hessian.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import tinysubspace as ts
from reference import FlatLoss, reference_gradient, reference_hessian
from tinysubspace.experiments.build import build_optimizer, build_problem
from tinysubspace.experiments.catalog import load_experiment
from tinysubspace.experiments.config import apply_overrides
from tinysubspace.experiments.edge_of_stability import eos_columns, run_edge_of_stability
from tinysubspace.optim.stability import sharpness, sharpness_threshold, stability_row
from tinysubspace.results.store import load_run

F64 = torch.float64


def _weight() -> list[torch.Tensor]:
    return [torch.zeros(1, dtype=F64, requires_grad=True)]


# ------------------------------------------------------------------ thresholds
@pytest.mark.parametrize(("make", "expected"), [
    (lambda w: torch.optim.SGD(w, lr=0.01), 200.0),
    (lambda w: torch.optim.SGD(w, lr=0.1, momentum=0.9), 38.0),
    (lambda w: torch.optim.SGD(w, lr=0.1, momentum=0.5, dampening=0.5), 3 / 0.05),
    (lambda w: torch.optim.SGD(w, lr=0.1, momentum=0.9, nesterov=True), 3.8 / 0.28),
    (lambda w: torch.optim.SGD(w, lr=0.1, weight_decay=0.5), 19.5),
    (lambda w: torch.optim.Adam(w, lr=1e-3), 38_000.0),
    (lambda w: torch.optim.AdamW(w, lr=1e-2, betas=(0.5, 0.99)), 600.0),
    (lambda w: torch.optim.RMSprop(w, lr=1e-2, momentum=0.5), 300.0),
    (lambda w: torch.optim.Adagrad(w, lr=0.5), 4.0),
])
def test_threshold_closed_forms(make, expected):
    assert sharpness_threshold(make(_weight())) == pytest.approx(expected, rel=1e-12)


def _simulate(make, curvature: float, steps: int = 3000) -> float:
    """|x| after ``steps`` of the optimizer on ``f(x) = curvature · x² / 2`` from ``x = 1``."""
    x = torch.ones(1, dtype=F64, requires_grad=True)
    optimizer = make([x])
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * curvature * x.square().sum()).backward()
        optimizer.step()
    return float(x.detach().abs())


@pytest.mark.parametrize("make", [
    lambda w: torch.optim.SGD(w, lr=0.1),
    lambda w: torch.optim.SGD(w, lr=0.1, momentum=0.9),
    lambda w: torch.optim.SGD(w, lr=0.1, momentum=0.6, dampening=0.3),
    lambda w: torch.optim.SGD(w, lr=0.1, momentum=0.9, nesterov=True),
], ids=["gd", "heavy-ball", "dampened", "nesterov"])
@pytest.mark.slow
def test_sgd_thresholds_separate_convergence_from_divergence(make):
    """The independent reference: torch's own optimizer on a quadratic just below and above."""
    threshold = sharpness_threshold(make(_weight()))
    assert _simulate(make, 0.98 * threshold) < 1e-3
    assert _simulate(make, 1.02 * threshold) > 1e3


def _frozen_adam(beta1: float, lr: float, P: float, curvature: float) -> float:
    """|x| after Adam's recurrence with a frozen ``P`` on ``λ x²/2``, ``λ = curvature · P``."""
    x, m = 1.0, 0.0
    for _ in range(4000):
        m = beta1 * m + (1 - beta1) * curvature * P * x
        x -= lr * m / P
        if abs(x) > 1e6:  # diverged (stop before overflow)
            break
    return abs(x)


def test_adam_threshold_is_the_frozen_preconditioner_recurrence():
    """Adam with a frozen ``P``: ``m ← β₁ m + (1 − β₁) g``, ``x ← x − η m / P``; the threshold
    is on the preconditioned curvature ``λ / P``."""
    for beta1, lr, P in ((0.9, 1e-3, 0.2), (0.5, 1e-2, 3.0)):
        threshold = sharpness_threshold(torch.optim.Adam(_weight(), lr=lr, betas=(beta1, 0.999)))
        assert _frozen_adam(beta1, lr, P, 0.98 * threshold) < 1e-3
        assert _frozen_adam(beta1, lr, P, 1.02 * threshold) > 1e3


def test_adagrad_threshold_follows_the_decayed_rate():
    x = _weight()
    optimizer = torch.optim.Adagrad(x, lr=0.5, lr_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        x[0].square().sum().backward()
        optimizer.step()
    assert sharpness_threshold(optimizer) == pytest.approx(2 * (1 + 3 * 0.1) / 0.5)


def test_bad_optimizers_are_refused():
    a, b = _weight(), _weight()
    mixed = torch.optim.SGD([{"params": a, "lr": 0.1}, {"params": b, "lr": 0.2}])
    with pytest.raises(ValueError, match="parameter groups have different thresholds"):
        sharpness_threshold(mixed)
    with pytest.raises(TypeError, match="supports SGD, Adam, AdamW, RMSprop, Adagrad, got LBFGS"):
        sharpness_threshold(torch.optim.LBFGS(a))
    with pytest.raises(ValueError, match="learning rate must be positive"):
        sharpness_threshold(torch.optim.SGD(a, lr=0.0))


# ------------------------------------------------------------------ the cheap sharpness
def _symmetric(p: int, seed: int, top: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=F64))[0]
    values = torch.linspace(-1.0, 1.0, p, dtype=F64)
    values[-1], values[-2] = top, 0.8 * top
    return Q @ torch.diag(values) @ Q.T


def test_warm_started_sharpness_matches_eigvalsh():
    A = _symmetric(300, 0, 10.0)
    first = sharpness(ts.DenseOperator(A), k=2, tol=1e-8)
    assert torch.allclose(first.values, torch.linalg.eigvalsh(A).flip(0)[:2], rtol=1e-10)
    B = A + 0.01 * _symmetric(300, 1, 1.0)  # the next measurement: a little changed
    warm = sharpness(ts.DenseOperator(B), previous=first, k=2, tol=1e-8)
    assert torch.allclose(warm.values, torch.linalg.eigvalsh(B).flip(0)[:2], rtol=1e-10)
    cold = sharpness(ts.DenseOperator(B), k=2, tol=1e-8)
    assert warm.matvecs < cold.matvecs


def test_stability_row_columns():
    eig = sharpness(ts.DenseOperator(_symmetric(20, 2, 4.0)), k=2, tol=1e-10)
    row = stability_row(eig, threshold=5.0, prefix="p")
    assert set(row) == {"p/lambda_1", "p/lambda_2", "p/threshold", "p/ratio", "p/residual"}
    assert row["p/ratio"] == pytest.approx(4.0 / 5.0, rel=1e-9)


# ------------------------------------------------------------------ the driver
TINY = {"data.name": "gaussian-mixture", "data.classes": 3, "data.dim": 4, "data.n": 40,
        "data.sigma": 1.0, "model.widths": "6", "optim.batch_size": 40, "train.steps": 12,
        "tracker.tol": 1e-10, "tracker.dense_until": 12, "tracker.dense_every": 4}


def _replay(config, steps: int):
    """The same run replayed by hand: model and optimizer after ``steps`` full-batch steps."""
    problem = build_problem(config)
    with torch.random.fork_rng():
        optimizer = build_optimizer(config.optim, problem.model, {})
    X, Y = problem.tensors("train")
    for _ in range(steps):
        optimizer.zero_grad()
        problem.loss_fn(problem.model(X), Y).backward()
        optimizer.step()
    return problem, optimizer, X, Y


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_driver_rows_match_a_replayed_dense_hessian(tmp_path, optimizer):
    overrides = {**TINY, "optim.name": optimizer, "optim.lr": 0.5 if optimizer == "sgd" else 0.01}
    config = apply_overrides(load_experiment("eos-gd-fc-digits"), overrides)
    rows = run_edge_of_stability(config, tmp_path / "run")
    assert [row["step"] for row in rows] == [0, 4, 8, 12]
    run = load_run(tmp_path / "run")
    assert list(run.metrics.columns) == eos_columns(2, optimizer == "adam")
    assert run.status["state"] == "finished"
    problem, opt, X, Y = _replay(config, 8)
    f = FlatLoss(problem.model, problem.loss_fn, X, Y)
    H = reference_hessian(f)
    values, vectors = torch.linalg.eigh(H)
    row = rows[2]
    assert row["sharpness/lambda_1"] == pytest.approx(float(values[-1]), rel=1e-8)
    assert row["sharpness/lambda_2"] == pytest.approx(float(values[-2]), rel=1e-8)
    if optimizer == "sgd":
        assert row["sharpness/threshold"] == pytest.approx(2 / 0.5)
        g = reference_gradient(f)  # GD's step is −η g: its share is f_top of g (eq. 2)
        V = vectors[:, -2:]
        expected = float((V.T @ g).square().sum() / g.square().sum())
        assert row["sharpness/step_share"] == pytest.approx(expected, rel=1e-4)  # float32 step
    else:
        assert np.isnan(row["sharpness/threshold"])
        P = ts.preconditioner_diagonal(opt, ts.HessianOperator(problem.model, problem.loss_fn,
                                                               (X, Y)),
                                       first_moment_correction=True).double()
        top = torch.linalg.eigvalsh(torch.diag(P.rsqrt()) @ H @ torch.diag(P.rsqrt()))[-1]
        assert row["preconditioned/lambda_1"] == pytest.approx(float(top), rel=1e-6)
        assert row["preconditioned/threshold"] == pytest.approx(38 / 0.01)
        assert np.isnan(run.metrics["preconditioned/lambda_1"].iloc[0])  # no state at step 0


def test_the_edge_of_stability_experiments_resolve():
    gd, adam = load_experiment("eos-gd-fc-digits"), load_experiment("eos-adam-fc-digits")
    assert gd.optim.name == "sgd" and gd.optim.batch_size == 1437  # the digits training split
    assert adam.optim.name == "adam" and adam.optim.beta1 == 0.9
    assert dataclasses.replace(gd.tracker).k == 2 and gd.tracker.dense_every == 10


# ------------------------------------------------------------------ the figure
def _synthetic_run(path, preconditioned: bool):
    from tinysubspace.results.store import RunStore

    store = RunStore(path, eos_columns(2, preconditioned))
    store.create({"name": "synthetic", "tracker": {"k": 2}})
    prefix = "preconditioned" if preconditioned else "sharpness"
    for step in range(0, 50, 10):
        row = {"step": step, "train/loss": 2.0 / (1 + step), f"{prefix}/lambda_1": 1.0 + step,
               f"{prefix}/lambda_2": 0.5 + step, f"{prefix}/threshold": 40.0}
        if preconditioned:
            row.update({"sharpness/lambda_1": 0.1 * step, "sharpness/threshold": float("nan")})
        store.append_metrics(row)
    return path


@pytest.mark.parametrize("preconditioned", [False, True])
def test_figure_draws_the_stored_numbers(tmp_path, preconditioned):
    from tinysubspace.plots.common import plotted_data
    from tinysubspace.plots.eos import figure_sharpness

    run = _synthetic_run(tmp_path / "run", preconditioned)
    figure = figure_sharpness(run, labels=["x"])
    data = plotted_data(figure)["x"]
    assert data["prefix"] == ("preconditioned" if preconditioned else "sharpness")
    np.testing.assert_array_equal(data["step"], [0, 10, 20, 30, 40])
    np.testing.assert_array_equal(data["lambda_1"], [1, 11, 21, 31, 41])
    assert data["threshold"] == 40.0
    line = figure.axes[1].get_lines()[0]
    np.testing.assert_array_equal(line.get_ydata(), data["lambda_1"])
    assert ("raw_lambda_1" in data) == preconditioned
    figure.savefig(tmp_path / "eos.png", dpi=40)
    assert (tmp_path / "eos.png").read_bytes()[:4] == b"\x89PNG"


def test_figure_of_a_run_without_sharpness_is_a_clear_error(tmp_path):
    from tinysubspace.plots.eos import figure_sharpness
    from tinysubspace.results.store import MissingDataError, RunStore

    store = RunStore(tmp_path / "plain", ["step", "train/loss"])
    store.create({"name": "plain"})
    store.append_metrics({"step": 0, "train/loss": 1.0})
    with pytest.raises(MissingDataError, match="no sharpness/threshold or preconditioned"):
        figure_sharpness(tmp_path / "plain")


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_figure_reads_a_tracker_run_with_optimizer(tmp_path, name):
    """``SubspaceTracker(optimizer=...)`` writes ``preconditioned/eig_*`` and
    ``sharpness/threshold``: the figure draws those numbers (and λ₁(H) beside Adam's)."""
    from torch.nn import functional as F  # noqa: N812

    from tinysubspace.plots.common import plotted_data
    from tinysubspace.plots.eos import figure_sharpness

    torch.manual_seed(0)
    X = torch.randn(40, 3, dtype=torch.float64)
    Y = (X[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2)).double()
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.5) if name == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=0.02))
    tracker = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=2, schedule=2, anchors=(),
                                 out=tmp_path / "run", optimizer=optimizer)
    for step in range(7):
        tracker.on_step(step)
        optimizer.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        optimizer.step()
    tracker.close()
    metrics = load_run(tmp_path / "run").metrics
    data = plotted_data(figure_sharpness(tmp_path / "run", labels=["x"]))["x"]
    assert data["prefix"] == ("sharpness" if name == "sgd" else "preconditioned")
    finite = metrics.dropna(subset=["preconditioned/eig_1"])
    np.testing.assert_array_equal(data["step"], finite["step"])
    np.testing.assert_array_equal(data["lambda_1"], finite["preconditioned/eig_1"])
    assert data["threshold"] == (2 / 0.5 if name == "sgd" else pytest.approx(38 / 0.02))
    assert ("raw_lambda_1" in data) == (name == "adam")
    if name == "adam":
        np.testing.assert_array_equal(data["raw_lambda_1"], metrics["hessian/eig_1"])
    from tinysubspace.cli.main import main

    assert main(["plot", str(tmp_path / "run"), "--dpi", "40"]) == 0  # drawn by default
    assert (tmp_path / "run" / "figures" / "sharpness.png").exists()
    assert not (tmp_path / "run" / "figures" / "outliers.png").exists()  # no ggn= columns


def test_a_resumed_run_writes_the_held_row_with_its_step_share(tmp_path):
    """The row measured at a checkpoint step waits for that step's update (its deferred
    ``step_share``): it goes into the checkpoint, and a run stopped after the checkpoint and
    resumed writes the same rows as an uninterrupted one."""
    from tinysubspace.experiments.training import run_experiment

    overrides = {**TINY, "optim.name": "adam", "optim.lr": 0.01, "train.checkpoint_every": 4}
    config = apply_overrides(load_experiment("eos-gd-fc-digits"), overrides)
    assert run_experiment(config, tmp_path / "whole").state == "finished"
    assert run_experiment(config, tmp_path / "cut", stop_after=4).state == "stopped"  # at 4
    assert run_experiment(config, tmp_path / "cut", resume=True).state == "finished"
    whole, cut = (load_run(tmp_path / name).metrics.drop(columns="wall_time")
                  for name in ("whole", "cut"))
    assert list(cut["step"]) == [0, 4, 8, 12]
    assert np.isfinite(cut["preconditioned/step_share"].iloc[1:3]).all()
    assert np.isnan(cut["sharpness/step_share"].iloc[-1])  # the last step has no update
    np.testing.assert_array_equal(whole.to_numpy(float), cut.to_numpy(float))


def test_the_eos_group_alone_skips_the_trackers_hessian_solve():
    """A tracker whose only group is the edge-of-stability group finds no top-2k pairs and no
    ``H g`` (the group solves for its own top k); its λ's are the dense Hessian's, and its
    deferred step share is eq. 2 of the update taken after the measurement."""
    from torch.nn import functional as F  # noqa: N812

    from tinysubspace.experiments.edge_of_stability import EdgeOfStabilityGroup

    torch.manual_seed(0)
    X = torch.randn(30, 3, dtype=F64)
    Y = (X[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=2, anchors=(), tol=1e-10)
    assert tracker.engine.solves_hessian  # the standard groups read the top 2k
    group = EdgeOfStabilityGroup(2, optimizer)
    tracker.engine.groups = [group]
    assert not tracker.engine.solves_hessian
    measured = tracker.engine.measure(model, 0)
    assert measured.eigenpairs is None
    f = FlatLoss(model, F.cross_entropy, X, Y)
    values, vectors = torch.linalg.eigh(reference_hessian(f))
    lambdas = [measured.row["sharpness/lambda_1"], measured.row["sharpness/lambda_2"]]
    assert lambdas == pytest.approx(values.flip(0)[:2].tolist(), rel=1e-8)
    g = reference_gradient(f)
    optimizer.zero_grad()
    F.cross_entropy(model(X), Y).backward()
    optimizer.step()
    V = vectors[:, -2:]
    share = float((V.T @ g).square().sum() / g.square().sum())  # GD's step is −η g
    assert group.after_update(model)["sharpness/step_share"] == pytest.approx(share, rel=1e-8)
    assert group.after_update(model) == {}  # nothing waits any more
