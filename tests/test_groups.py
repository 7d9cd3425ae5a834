"""The measurement engine: column groups, their one context, the settings every solve gets, the
warm-start object, and a group added in one file (``ResidualsGroup``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import tinysubspace as ts
from reference import FlatLoss, reference_hessian
from tinysubspace.curvature.ggn import GGNOperator
from tinysubspace.curvature.hessian import HessianOperator
from tinysubspace.experiments import measurement
from tinysubspace.experiments.measurement import (
    MeasurementSettings,
    OperatorSettings,
    SolverSettings,
)
from tinysubspace.experiments.residuals import ResidualsGroup
from tinysubspace.experiments.tracker import Tracker
from tinysubspace.linalg.warm_state import WarmStart

N, D, C, K = 40, 4, 3, 2


def _data():
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(N, D, generator=gen, dtype=torch.float64)
    return X, (X[:, 0] > 0).long() + (X[:, 1] > 0.4).long()


def _model():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()


# ------------------------------------------------------------------ every setting, every solve
class _Spy:
    """Records, per group being measured, the ``hvp_method`` of every operator built and the
    ``tol_scale`` of every solve."""

    def __init__(self, monkeypatch, tracker) -> None:
        self.current, self.operators, self.solves = "core", [], []
        for kind in (HessianOperator, GGNOperator):
            self._wrap_operator(monkeypatch, kind)
        for name in ("track_eigenpairs", "top_eigenpairs"):
            solve = getattr(measurement, name)
            monkeypatch.setattr(measurement, name, self._recorder(solve))
        for group in tracker.engine.groups:
            group.measure = self._marked(group.name, group.measure)

    def _wrap_operator(self, monkeypatch, kind) -> None:
        init = kind.__init__

        def spy(op, *args, **kwargs):
            init(op, *args, **kwargs)
            if type(op) is kind:
                self.operators.append((self.current, op.hvp_method))

        monkeypatch.setattr(kind, "__init__", spy)

    def _recorder(self, solve):
        def spy(op, n, *args, **kwargs):
            self.solves.append((self.current, kwargs.get("tol_scale")))
            return solve(op, n, *args, **kwargs)

        return spy

    def _marked(self, name, measure):
        def marked(ctx):
            self.current = name
            try:
                return measure(ctx)
            finally:
                self.current = "core"

        return marked


BUILDS = {"core": (True, True), "test": (True, False), "blocks": (True, False),
          "ggn": (True, True), "sharpness": (True, True), "subset": (True, True)}
"""Group -> (builds an operator, runs a solve of the tracker's) at a measurement; the other
groups only read the context (``class_means`` reuses the GGN group's operator: its own build is
checked in :func:`test_the_class_means_group_alone_builds_its_ggn_with_the_settings`)."""


@pytest.fixture(scope="module")
def spied(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    X, Y = _data()
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    tracker = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=K, schedule=1, anchors=(0,),
                                 tol=1e-8, tol_scale="pair", hvp_method="loop",
                                 test=(X[:15], Y[:15]), subset=30, check_subset=True,
                                 blocks="layers", block_options={"steps": 4, "probes": 2},
                                 ggn=True, class_means=True, geometry=True,
                                 optimizer=optimizer, groups=[ResidualsGroup(K)])
    spy = _Spy(monkeypatch, tracker)
    try:
        for step in range(2):
            tracker.on_step(step)
            optimizer.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            optimizer.step()
    finally:
        monkeypatch.undo()
    return tracker, spy


def test_the_groups_are_an_ordered_named_list(spied):
    tracker, _ = spied
    names = [g.name for g in tracker.engine.groups]
    assert names == ["train", "hessian", "anchors", "cost", "test", "blocks", "overhead",
                     "subset", "residuals", "geometry", "ggn", "class_means", "sharpness",
                     "cost_curvature"]
    columns = tracker.columns
    assert columns[:3] == ["step", "epoch", "wall_time"]
    assert columns[3:] == [c for g in tracker.engine.groups for c in g.names()]
    assert len(set(columns)) == len(columns)


@pytest.mark.parametrize("group", ["core", "train", "hessian", "anchors", "cost", "test",
                                   "blocks", "overhead", "subset", "residuals", "geometry",
                                   "ggn", "class_means", "sharpness", "cost_curvature"])
def test_tol_scale_and_the_hvp_method_reach_every_groups_operators_and_solves(spied, group):
    """A tracker asked for ``tol_scale="pair"`` and ``hvp_method="loop"``: every operator any
    group builds has the method, every solve of the tracker's solver has the scale; the groups
    that should build operators or solve do, the others only read the context."""
    _, spy = spied
    built = [method for name, method in spy.operators if name == group]
    solved = [scale for name, scale in spy.solves if name == group]
    assert set(built) <= {"loop"} and set(solved) <= {"pair"}
    operator, solve = BUILDS.get(group, (False, False))
    assert bool(built) == operator
    assert bool(solved) == solve


def test_the_class_means_group_alone_builds_its_ggn_with_the_settings(monkeypatch):
    X, Y = _data()
    tracker = ts.SubspaceTracker(_model(), F.cross_entropy, (X, Y), k=K, schedule=1, anchors=(),
                                 hvp_method="loop", class_means=True)
    spy = _Spy(monkeypatch, tracker)
    row = tracker.on_step(0)
    assert [method for name, method in spy.operators if name == "class_means"] == ["loop"]
    assert 0 < row["overlap/classmeans_hessian"] <= 1


def test_the_blocks_solve_gets_the_solver_settings_tol_scale(monkeypatch):
    """The blocks group's Lanczos solves (blocks above ``exact_size`` = 64 parameters) get the
    tracker's ``tol`` and ``tol_scale``, and their eigenvalues are the dense block's."""
    from tinysubspace.linalg import blocks

    seen = []
    solve = blocks.top_eigenpairs

    def spy(op, n, *args, **kwargs):
        seen.append((op.shape[0], kwargs.get("tol"), kwargs.get("tol_scale")))
        return solve(op, n, *args, **kwargs)

    monkeypatch.setattr(blocks, "top_eigenpairs", spy)
    X, Y = _data()
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(D, 20), nn.Tanh(), nn.Linear(20, C)).double()
    tracker = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=K, schedule=1, anchors=(),
                                 tol=1e-9, tol_scale="pair", blocks="layers",
                                 block_options={"k": K, "steps": 4, "probes": 2})
    row = tracker.on_step(0)
    assert seen == [(100, 1e-9, "pair")]  # layer 0 (4·20 + 20) solved; layer 1 (63) formed
    H = reference_hessian(FlatLoss(model, F.cross_entropy, X, Y))[:100, :100]
    exact = torch.linalg.eigvalsh(H).flip(0)[:K]
    (first, *_), = [g.block_names for g in tracker.engine.groups if g.name == "blocks"]
    measured = [row[f"block/{first}/eig_{i}"] for i in range(1, K + 1)]
    assert measured == pytest.approx(exact.tolist(), rel=1e-7)


def test_block_spectrum_refuses_an_unknown_tol_scale():
    from tinysubspace.linalg.blocks import block_spectrum

    op = ts.DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"tol_scale must be one of .* got 'row'"):
        block_spectrum(op, tol_scale="row")


# ------------------------------------------------------------------ the added group
def test_residuals_group_matches_the_dense_hessian():
    """``hessian/res_i`` against ``‖H v_i − λ_i v_i‖ / max|λ|`` with the dense float64 Hessian
    (``torch.autograd.functional.hessian``) and the measurement's own pairs."""
    X, Y = _data()
    model = _model()
    tracker = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=K, schedule=[0], anchors=(),
                                 tol=1e-6, groups=[ResidualsGroup(K)])
    assert tracker.columns[-(2 * K + 1):] == ["hessian/multiplicity_checked",
                                              *(f"hessian/res_{i}" for i in range(1, 2 * K + 1))]
    m = tracker.engine.measure(model, 0)
    row, eig = m.row, m.eigenpairs
    H = reference_hessian(FlatLoss(model, F.cross_entropy, X, Y))
    exact = torch.linalg.eigvalsh(H).flip(0)[:2 * K]
    assert torch.allclose(eig.values, exact, rtol=1e-6)
    V = eig.vectors
    dense = (H @ V - V * eig.values).norm(dim=0) / float(eig.values.abs().max())
    residuals = [row[f"hessian/res_{i}"] for i in range(1, 2 * K + 1)]
    assert residuals == pytest.approx(dense.tolist(), rel=1e-6, abs=1e-10)
    assert max(residuals) == pytest.approx(row["hessian/residual_max"], rel=1e-12)
    assert max(residuals) <= 1e-6
    assert row["hessian/multiplicity_checked"] == float(eig.multiplicity_checked)
    with pytest.raises(ValueError, match=r"ResidualsGroup needs the tracker's k, an integer "
                                         r">= 1, got 0"):
        ResidualsGroup(0)


def test_a_group_of_another_k_is_refused_at_the_measurement():
    X, Y = _data()
    tracker = ts.SubspaceTracker(_model(), F.cross_entropy, (X, Y), k=K, anchors=(),
                                 groups=[ResidualsGroup(K + 1)])
    with pytest.raises(ValueError, match=r"expects the 2k = 6 pairs of the tracker's solve, "
                                         r"got 4"):
        tracker.on_step(0)


def test_groups_need_distinct_names():
    settings = MeasurementSettings(1, OperatorSettings(), SolverSettings())
    with pytest.raises(ValueError, match=r"column groups need distinct names, got "
                                         r"\['residuals', 'residuals'\]"):
        Tracker(settings, F.cross_entropy, _data(), groups=[ResidualsGroup(1), ResidualsGroup(1)])


def test_bad_solver_settings_are_refused():
    with pytest.raises(ValueError, match=r"tracker\.tol_scale must be one of \('top', 'pair'\), "
                                         r"got 'ARPACK'"):
        SolverSettings(tol_scale="ARPACK")
    with pytest.raises(ValueError, match=r"warm must be one of \('auto', 'subspace', 'krylov'\)"):
        SolverSettings(warm="hot")
    with pytest.raises(ValueError, match=r"k must be an integer >= 1, got 0"):
        MeasurementSettings(0, OperatorSettings(), SolverSettings())


# ------------------------------------------------------------------ the warm-start object
def test_warm_start_keeps_solves_apart_and_round_trips():
    warm = WarmStart()
    A = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(0)))[0]
    warm.update("hessian", A)
    A.mul_(2)  # a copy is kept, not the caller's tensor
    assert torch.allclose(warm.get("hessian").T @ warm.get("hessian"), torch.eye(2), atol=1e-6)
    assert warm.get("ggn") is None
    again = WarmStart.from_state_dict(warm.state_dict())
    assert again.names() == ["hessian"] and torch.equal(again.get("hessian"), warm.get("hessian"))
    warm.update("hessian", None)
    assert warm.get("hessian") is None
    with pytest.raises(ValueError, match=r"a warm start is a \(p, m\) tensor of eigenvectors, "
                                         r"got \(6,\) for 'ggn'"):
        warm.update("ggn", torch.zeros(6))


def test_a_warm_started_solve_from_the_object_matches_eigh():
    gen = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(50, 50, generator=gen, dtype=torch.float64))[0]
    values = torch.linspace(-1, 1, 50, dtype=torch.float64)
    values[-3:] = torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64)
    A = Q @ torch.diag(values) @ Q.T
    warm, solver = WarmStart(), SolverSettings(tol=1e-10)
    first = solver.solve(ts.DenseOperator(A), 3, warm, "a", seed=0)
    B = A + 1e-3 * (Q[:, :1] @ Q[:, :1].T)
    second = solver.solve(ts.DenseOperator(B), 3, warm, "a", seed=1)
    assert torch.allclose(first.values, torch.tensor([7.0, 6.0, 5.0], dtype=torch.float64))
    assert torch.allclose(second.values, torch.linalg.eigvalsh(B).flip(0)[:3], rtol=1e-9)
    assert torch.equal(warm.get("a"), second.vectors)
    assert second.matvecs < first.matvecs


def test_a_checkpoint_of_the_old_layout_resumes_its_warm_start_and_anchors():
    """A tracker state saved before the column groups (``previous``, ``anchors``,
    ``curvature.previous``) restores the same warm starts and anchor bases."""
    X, Y = _data()
    tracker = ts.SubspaceTracker(_model(), F.cross_entropy, (X, Y), k=1, anchors=(0,), ggn=True)
    V, W = torch.eye(23, 2, dtype=torch.float64), torch.eye(23, 2, dtype=torch.float32)
    tracker.load_state_dict({"previous": V, "anchors": {0: W}, "last_step": 0,
                             "curvature": {"previous": {"ggn": 2 * V, "preconditioned": None}}})
    assert torch.equal(tracker.engine.warm.get("hessian"), V)
    assert torch.equal(tracker.engine.warm.get("ggn"), 2 * V)
    assert tracker.engine.warm.get("preconditioned") is None
    assert list(tracker.engine.group("anchors").bases) == [0]
    assert tracker.last_step == 0 and not math.isnan(tracker.clock["spent"])


def test_the_blocks_groups_names_are_the_columns_it_fills():
    from tinysubspace.problems.block_curvature import block_columns, block_measurements
    from tinysubspace.problems.models.blocks import parameter_blocks

    X, Y = _data()
    model = _model()
    row = block_measurements(model, F.cross_entropy, (X, Y), "layers", k=2, steps=4, probes=2)
    assert list(row) == block_columns(parameter_blocks(model, "layers"), 2)
