"""The tracker reaches linalg's tracking modes (issue 23): ``solver="budget"`` with
``budget_matvecs``, ``check="amortised"`` with its guard carried through a checkpoint, and a
measured pass cost; the ``hessian/f_top_error`` and ``hessian/certificate`` columns against a
dense float64 Hessian; the config keys and the CLI."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

import tinysubspace as ts
from experiment_fixtures import TINY
from reference import FlatLoss, reference_gradient, reference_hessian
from tiny_classifier import sgd_step, tiny_data, tiny_model
from tinysubspace.experiments.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    validate_config,
)
from tinysubspace.experiments.groups import CERTIFICATES
from tinysubspace.experiments.measurement import SolverSettings
from tinysubspace.linalg.pass_cost import PassCost
from tinysubspace.linalg.warm_state import WarmStart

K = 2


def _reload(state):
    """``state`` through ``torch.save`` / ``torch.load(weights_only=True)``: plain containers."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_a_budget_tracker_writes_f_top_within_its_error_of_the_dense_reference():
    """At every measurement of a short SGD run: ``|f_top − f_top(eigh)| ≤ hessian/f_top_error``
    with the dense float64 Hessian's top-k eigenvectors, ``converged`` iff the residuals meet
    ``tol``, ``certificate`` 0 for the budget solves (2 for the first, a solve to ``tol``)."""
    X, Y = tiny_data()
    model, tol = tiny_model(), 1e-10
    tracker = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=K, schedule=1, anchors=(),
                                 tol=tol, solver="budget", budget_matvecs=2 * K + 1)
    assert {"hessian/f_top_error", "hessian/certificate"} <= set(tracker.columns)
    errors = []
    for step in range(6):
        row = tracker.on_step(step)
        flat = FlatLoss(model, F.cross_entropy, X, Y)
        H, g = reference_hessian(flat), reference_gradient(flat)
        V = torch.linalg.eigh(H).eigenvectors.flip(1)[:, :K]
        dense = float((V.T @ g).pow(2).sum() / g.pow(2).sum())
        error = row["hessian/f_top_error"]
        if step == 0:  # no previous pairs: a cold solve to tol, fully checked
            assert math.isnan(error) and row["hessian/certificate"] == CERTIFICATES["full"]
            assert row["hessian/f_top"] == pytest.approx(dense, abs=1e-8)
        else:
            assert row["hessian/certificate"] == 0.0
            assert abs(row["hessian/f_top"] - dense) <= error + 1e-12, (step, error)
            errors.append(error)
        assert row["hessian/converged"] == float(row["hessian/residual_max"] <= tol)
        sgd_step(model, X, Y)
    assert min(errors) < 0.5  # the bound says something, not just 1
    assert any(e > 0 for e in errors)


def test_budget_converged_is_zero_when_the_residuals_miss_tol():
    """A budget below what ``tol`` needs: the row says not converged, and its residual_max is
    above ``tol`` (checked against the dense Hessian's residuals of the returned pairs)."""
    X, Y = tiny_data()
    model = tiny_model()
    tracker = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=K, schedule=1, anchors=(),
                                 tol=1e-14, solver="budget", budget_matvecs=2 * K + 1)
    tracker.on_step(0)
    sgd_step(model, X, Y, lr=2.0)
    m = tracker.engine.measure(model, 1)
    H = reference_hessian(FlatLoss(model, F.cross_entropy, X, Y))
    eig = m.eigenpairs
    dense = (H @ eig.vectors - eig.vectors * eig.values).norm(dim=0).max()
    assert eig.solver == "budget" and eig.matvecs == 2 * K + 1
    assert m.row["hessian/converged"] == 0.0
    assert m.row["hessian/residual_max"] == pytest.approx(
        float(dense) / float(eig.values.abs().max()), rel=1e-6)
    assert m.row["hessian/residual_max"] > 1e-14


def _amortised(model, X, Y):
    return ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=K, schedule=1, anchors=(),
                              tol=1e-9, check="amortised", check_every=3)


def test_the_amortised_guard_survives_a_checkpoint_and_the_resumed_rows_are_equal():
    X, Y = tiny_data()
    model = tiny_model()
    tracker = _amortised(model, X, Y)
    rows, certificates = [], []
    for step in range(6):
        if step == 2:
            state = _reload(tracker.state_dict())
            snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        rows.append(tracker.on_step(step))
        certificates.append(rows[-1]["hessian/certificate"])
        sgd_step(model, X, Y)
    assert certificates == [2.0, 1.0, 1.0, 2.0, 1.0, 1.0]  # full every check_every = 3
    carried = state["warm"]["_carried"]["hessian"]
    assert carried["since_full"] == 1 and carried["guard_vector"].ndim == 1
    resumed_model = tiny_model()
    resumed_model.load_state_dict(snapshot)
    resumed = _amortised(resumed_model, X, Y)
    resumed.load_state_dict(state)
    guard = resumed.engine.warm.previous("hessian").guard
    assert guard.since_full == 1 and torch.equal(guard.vector, carried["guard_vector"])
    for step in range(2, 6):
        row = resumed.on_step(step)
        for key, value in rows[step].items():
            if not (key.startswith("cost/") or key in ("wall_time",) or "seconds" in key):
                assert row[key] == value or (math.isnan(row[key]) and math.isnan(value)), key
        sgd_step(resumed_model, X, Y)


def test_a_measured_pass_cost_is_carried_and_restored():
    """``pass_cost="measure"``: timed once, at the first warm solve; the same cost afterwards
    (not timed again) and after a checkpoint round trip."""
    X, Y = tiny_data()
    model = tiny_model()
    tracker = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=K, schedule=1, anchors=(),
                                 tol=1e-9, pass_cost="measure", check="full")
    tracker.on_step(0)
    assert tracker.engine.warm.previous("hessian") is not None
    assert not isinstance(tracker.engine.warm.previous("hessian"), ts.Eigenpairs)  # cold: none
    sgd_step(model, X, Y)
    first = tracker.engine.measure(model, 1).eigenpairs.pass_cost
    assert isinstance(first, PassCost)
    sgd_step(model, X, Y)
    assert tracker.engine.measure(model, 2).eigenpairs.pass_cost == first
    warm = WarmStart.from_state_dict(_reload(tracker.engine.warm.state_dict()))
    assert warm.previous("hessian").pass_cost == first
    assert torch.equal(warm.get("hessian"), tracker.engine.warm.get("hessian"))


def test_the_default_tracker_runs_the_amortised_check():
    """Issue 23: without ``check=`` the tracker (and ``TrackerConfig``) runs the amortised
    check: a full check at the first warm-or-cold solve and every 4th, the guard in between,
    each row's ``hessian/certificate`` written, the guard carried in the warm start; the
    eigenvalues agree with the full check's tracker on the same parameters."""
    from tinysubspace.experiments.config import TrackerConfig

    assert TrackerConfig().check == "amortised" and SolverSettings().check == "amortised"
    X, Y = tiny_data()
    model = tiny_model()
    default = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=K, schedule=1, anchors=(),
                                 tol=1e-9)
    full = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=K, schedule=1, anchors=(),
                              tol=1e-9, check="full")
    assert "hessian/certificate" in default.columns
    certificates = []
    for step in range(6):
        row, reference = default.on_step(step), full.on_step(step)
        certificates.append(row["hessian/certificate"])
        for i in range(1, 2 * K + 1):
            assert row[f"hessian/eig_{i}"] == pytest.approx(reference[f"hessian/eig_{i}"],
                                                            rel=1e-7, abs=1e-9)
        sgd_step(model, X, Y)
    assert certificates == [2.0, 1.0, 1.0, 1.0, 2.0, 1.0]
    assert default.engine.warm.previous("hessian").guard.since_full == 1


def test_the_full_check_adds_no_column_and_carries_nothing():
    X, Y = tiny_data()
    tracker = ts.SubspaceTracker(tiny_model(), F.cross_entropy, (X, Y), k=K, schedule=1,
                                 anchors=(), check="full")
    assert "hessian/f_top_error" not in tracker.columns
    assert "hessian/certificate" not in tracker.columns
    tracker.on_step(0)
    tracker.on_step(1)
    assert "_carried" not in tracker.engine.warm.state_dict()


@pytest.mark.parametrize("options, message", [
    ({"solver": "budget"}, r"tracker.solver='budget' needs tracker.budget_matvecs, a positive "
                           r"integer \(products per measurement\), got None"),
    ({"budget_matvecs": 5}, r"tracker.budget_matvecs=5 is the budget of tracker.solver="
                            r"'budget'; got solver='track'"),
    ({"solver": "budget", "budget_matvecs": 0}, r"positive integer .*got 0"),
    ({"check": "sometimes"}, r"tracker.check must be one of \('full', 'amortised'\), got "
                             r"'sometimes'"),
    ({"check_every": 0}, r"tracker.check_every must be a positive integer, got 0"),
    ({"pass_cost": "guess"}, r"pass_cost must be one of \(None, 'measure'\), got 'guess'"),
])
def test_bad_solver_settings_say_what_was_expected(options, message):
    with pytest.raises(ValueError, match=message):
        SolverSettings(**options)


@pytest.mark.parametrize("overrides, message", [
    ({"tracker.solver": "budget"}, r"tracker.solver = budget needs tracker.budget_matvecs"),
    ({"tracker.budget_matvecs": "20"}, r"tracker.budget_matvecs is the budget of "
                                       r"tracker.solver = budget, got tracker.solver = 'track'"),
    ({"tracker.solver": "budget", "tracker.budget_matvecs": "5", "tracker.k": "3"},
     r"tracker.budget_matvecs must be more than 2 \* tracker.k = 6 .*got 5"),
    ({"tracker.solver": "budget", "tracker.budget_matvecs": "6", "tracker.k": "3"},
     r"tracker.budget_matvecs must be more than 2 \* tracker.k = 6 .*got 6"),
    ({"tracker.check": "never"}, r"tracker.check must be one of full, amortised, got 'never'"),
    ({"tracker.check_every": "0"}, r"tracker.check_every must be at least 1, got 0"),
    ({"tracker.solver": "lanczos"}, r"tracker.solver must be one of track, cold, budget"),
    ({"tracker.pass_cost": "guess"}, r"tracker.pass_cost must be unset or measure, got 'guess'"),
])
def test_the_config_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(apply_overrides(ExperimentConfig(), overrides))


def test_a_budget_that_cannot_move_the_2k_pairs_is_refused():
    """The tracker solves for 2k pairs: with budget_matvecs <= 2k Rayleigh-Ritz could only
    rotate the previous basis (seen: overlap 0.13 with the true subspace in 3 measurements)."""
    X, Y = tiny_data()
    with pytest.raises(ValueError, match=r"budget_matvecs must be more than 2 \* k = 4 \(the "
                                         r"solve refines the top 2k pairs.*got 4"):
        ts.SubspaceTracker(tiny_model(), F.cross_entropy, (X, Y), k=K, schedule=1, anchors=(),
                           solver="budget", budget_matvecs=2 * K)


def test_the_cli_runs_a_budget_tracker(tmp_path):
    from tinysubspace.cli.main import main
    from tinysubspace.results.store import load_run

    sets = {**TINY, "tracker.solver": "budget", "tracker.budget_matvecs": 20}
    argv = [a for key, value in sets.items() for a in ("--set", f"{key}={value}")]
    assert main(["run", *argv, "--out", str(tmp_path / "r")]) == 0
    run = load_run(tmp_path / "r")
    table = run.metrics
    errors = table["hessian/f_top_error"].tolist()
    assert math.isnan(errors[0]) and all(0 <= e <= 1 for e in errors[1:])
    assert table["hessian/certificate"].tolist() == [2.0] + [0.0] * (len(errors) - 1)
    assert (table["cost/matvecs"].iloc[1:] >= 20).all()


def test_the_cli_loop_resumes_an_amortised_run_with_its_guard(tmp_path):
    """``tracker.check = amortised`` through the loop: a run stopped between checkpoints and
    resumed writes the uninterrupted run's numbers (the guard travels in the checkpoint)."""
    from experiment_fixtures import tiny_config
    from tinysubspace.experiments.training import run_experiment
    from tinysubspace.results.store import load_run

    config = tiny_config(tracker__check="amortised", tracker__check_every=4)
    assert run_experiment(config, tmp_path / "whole").state == "finished"
    assert run_experiment(config, tmp_path / "cut", stop_after=13).state == "stopped"
    assert run_experiment(config, tmp_path / "cut", resume=True).state == "finished"
    whole, cut = (load_run(tmp_path / name).metrics.drop(columns=["wall_time", "cost/seconds"])
                  for name in ("whole", "cut"))
    assert whole["hessian/certificate"].tolist() == [2.0, 1.0, 1.0, 1.0, 2.0, 2.0]  # last: full
    assert whole.equals(cut)
