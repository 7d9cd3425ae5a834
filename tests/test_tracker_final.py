"""Issue 23: the amortised multiplicity check runs in full at a run's last measurement.

A config-built tracker knows its schedule and sets ``Tracker.final_step`` to its last step; a
user's own loop sets ``tracker.engine.final_step``. The last row's ``hessian/certificate`` then
says ``full`` where the amortised schedule alone would have left a guard, and its eigenvalues
are the dense float64 Hessian's.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

import tinysubspace as ts
from reference import FlatLoss, reference_hessian
from tiny_classifier import sgd_step, tiny_data, tiny_model
from tinysubspace.experiments.config import TrackerConfig
from tinysubspace.experiments.groups import CERTIFICATES
from tinysubspace.experiments.subspace_tracker import SubspaceTracker

K = 2
FULL, GUARD = CERTIFICATES["full"], CERTIFICATES["guard"]


def _run(tracker, model, X, Y, steps):
    rows = []
    for step in range(steps):
        rows.append(tracker.on_step(step))
        sgd_step(model, X, Y)
    return rows


def test_an_own_loop_marks_its_last_step_and_gets_a_full_check():
    """Six rows, ``M = 4``: the amortised schedule alone certifies ``full, guard, guard, guard,
    full, guard``; with ``final_step = 5`` the last row is ``full`` too, and its top ``2k``
    eigenvalues are the dense Hessian's."""
    X, Y = tiny_data()
    plain_model, final_model = tiny_model(), tiny_model()
    options = {"k": K, "schedule": 1, "anchors": (), "tol": 1e-9}
    plain = ts.SubspaceTracker(plain_model, F.cross_entropy, (X, Y), **options)
    final = ts.SubspaceTracker(final_model, F.cross_entropy, (X, Y), **options)
    assert final.engine.final_step is None
    final.engine.final_step = 5
    plain_rows = _run(plain, plain_model, X, Y, 5)
    final_rows = _run(final, final_model, X, Y, 5)
    plain_rows.append(plain.on_step(5))
    final_rows.append(final.on_step(5))
    certificates = [row["hessian/certificate"] for row in plain_rows]
    assert certificates == [FULL, GUARD, GUARD, GUARD, FULL, GUARD]
    assert [row["hessian/certificate"] for row in final_rows] == [*certificates[:-1], FULL]
    assert final_rows[-1]["cost/matvecs"] > plain_rows[-1]["cost/matvecs"]  # the check's
    H = reference_hessian(FlatLoss(final_model, F.cross_entropy, X, Y))
    expected = torch.linalg.eigvalsh(H).flip(0)[:2 * K]
    for i in range(2 * K):
        assert final_rows[-1][f"hessian/eig_{i + 1}"] == pytest.approx(float(expected[i]),
                                                                      rel=1e-7, abs=1e-9)


def test_a_config_built_tracker_checks_its_schedules_last_step_in_full():
    """``SubspaceTracker.from_config`` (the CLI loop's tracker) sets ``final_step`` to the last
    of its steps: the last row is certified in full; a step before it keeps its guard."""
    X, Y = tiny_data()
    model = tiny_model()
    config = TrackerConfig(k=K, tol=1e-9, anchors=(), check="amortised", check_every=4)
    tracker = SubspaceTracker.from_config(config, model, F.cross_entropy, (X, Y),
                                          steps=[0, 1, 2, 3])
    assert tracker.engine.final_step == 3
    rows = _run(tracker, model, X, Y, 4)
    assert [row["hessian/certificate"] for row in rows] == [FULL, GUARD, GUARD, FULL]
    assert tracker.engine.solver_at(2).check == "amortised"
    assert tracker.engine.solver_at(3).check == "full"
