"""Projected SGD and low-rank Newton (tinysubspace.optim.subspace_sgd) against closed forms and
dense references.

Projections are checked as linear algebra (idempotent, complementary); one optimizer step on a
small network is checked against the dense float64 Hessian's eigenvectors and the reference
gradient; low-rank Newton against the minimiser of a quadratic restricted to its top subspace;
the refresh against a cold eigensolve (matvec counts); checkpoints by a round trip and by a
resumed training run.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import tinysubspace as ts
from cases import Case
from reference import FlatLoss, reference_gradient, reference_hessian
from tinysubspace.experiments.config import ExperimentConfig, apply_overrides
from tinysubspace.experiments.optimizers import OPTIMIZERS
from tinysubspace.optim import (
    BulkProjection,
    HessianSubspace,
    LowRankNewton,
    PlainGradient,
    Scaled,
    SubspaceBasis,
    SubspaceSGD,
    SwitchOnTopFraction,
    TopProjection,
    lowrank_newton_direction,
    project_bulk,
    project_top,
)

F64 = torch.float64


def orthonormal(p: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, k, generator=gen, dtype=F64))
    return Q


def spectrum_matrix(values: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = Q diag(values) Qᵀ`` with a random orthogonal ``Q`` (columns in the order given)."""
    Q = orthonormal(len(values), len(values), seed)
    A = (Q * torch.tensor(values, dtype=F64)) @ Q.T
    return (A + A.T) / 2, Q


def gaussian(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ------------------------------------------------------------------------------ projections
@pytest.mark.usefixtures("global_rng_untouched")
@pytest.mark.parametrize("k", [1, 3, 7])
def test_projections_are_idempotent_and_complementary(k):
    V, g = orthonormal(20, k), gaussian(20)
    top, rest = project_top(g, V), project_bulk(g, V)
    assert torch.allclose(project_top(top, V), top, atol=1e-12)
    assert torch.allclose(project_bulk(rest, V), rest, atol=1e-12)
    assert torch.allclose(top + rest, g, atol=1e-12)
    assert abs(float(top @ rest)) < 1e-12
    assert float(project_top(rest, V).norm()) < 1e-12 and float(project_bulk(top, V).norm()) < 1e-12
    # the projector as a matrix: P = V Vᵀ, symmetric, P² = P, trace k
    P = torch.stack([project_top(e, V) for e in torch.eye(20, dtype=F64)], 1)
    assert torch.allclose(P, P.T, atol=1e-12) and torch.allclose(P @ P, P, atol=1e-12)
    assert abs(float(torch.trace(P)) - k) < 1e-12


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_lowrank_newton_direction_is_the_pseudo_inverse_in_the_subspace(damping):
    V, g = orthonormal(15, 4), gaussian(15)
    values = torch.tensor([9.0, 4.0, 2.0, 1.0], dtype=F64)
    H_top = (V * (values + damping)) @ V.T
    expected = torch.linalg.pinv(H_top, hermitian=True) @ g
    assert torch.allclose(lowrank_newton_direction(g, values, V, damping), expected, atol=1e-10)


def test_lowrank_newton_guard_leaves_out_nonpositive_curvature():
    V, g = orthonormal(12, 3), gaussian(12)
    values = torch.tensor([5.0, 0.0, -2.0], dtype=F64)
    d = lowrank_newton_direction(g, values, V)
    coefficients = V.T @ d
    expected = torch.zeros(3, dtype=F64)
    expected[0] = (V[:, 0] @ g) / 5
    assert torch.allclose(coefficients, expected, atol=1e-12)
    # damping lifts -2 + 3 = 1 > 0 back in; 0 + 3 too
    lifted = V.T @ lowrank_newton_direction(g, values, V, damping=3.0)
    assert torch.allclose(lifted, (V.T @ g) / (values + 3.0), atol=1e-12)


def test_lowrank_newton_rejects_bad_arguments():
    V, g = orthonormal(6, 2), gaussian(6)
    with pytest.raises(ValueError, match="damping and rcond must be non-negative"):
        lowrank_newton_direction(g, torch.ones(2, dtype=F64), V, damping=-1.0)
    with pytest.raises(ValueError, match=r"values must have shape \(2,\)"):
        lowrank_newton_direction(g, torch.ones(3, dtype=F64), V)


# ------------------------------------------------------------------- one step on a real network
def network_step(direction, lr: float = 0.3, k: int = 3):
    """One :class:`SubspaceSGD` step on a small MLP with the full-batch gradient; returns the
    displacement (float64), the basis used, the dense reference Hessian and gradient."""
    problem = Case("mlp_softplus", "ce", "tuple").build()
    f = FlatLoss(problem.model, problem.loss_fn, problem.inputs, problem.targets)
    H, g = reference_hessian(f), reference_gradient(f)
    model = problem.model

    def gradient() -> torch.Tensor:
        return problem.operator(dtype=F64).loss_and_gradient()[1]

    subspace = HessianSubspace(lambda: problem.operator(dtype=F64), k=k, refresh_every=5,
                               tol=1e-10)
    optimizer = SubspaceSGD(model.parameters(), subspace, direction, lr=lr, gradient=gradient)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(F64)
    optimizer.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(F64)
    return after - before, subspace.basis, H, g


@pytest.mark.usefixtures("global_rng_untouched")
def test_dom_sgd_step_moves_only_inside_the_top_subspace():
    delta, basis, H, g = network_step(TopProjection())
    evals, evecs = torch.linalg.eigh(H)
    V_ref = evecs.flip(1)[:, :3]
    assert torch.allclose(basis.values, evals.flip(0)[:3], atol=1e-8)
    assert float((V_ref.T @ basis.vectors).square().sum()) == pytest.approx(3.0, abs=1e-8)
    assert float(delta.norm()) > 1e-4
    V = basis.vectors
    assert float(project_bulk(delta, V).norm()) < 1e-5 * float(delta.norm())
    assert torch.allclose(delta, -0.3 * V_ref @ (V_ref.T @ g), atol=1e-6)


@pytest.mark.usefixtures("global_rng_untouched")
def test_bulk_sgd_step_is_orthogonal_to_the_top_subspace():
    delta, basis, H, g = network_step(BulkProjection())
    V_ref = torch.linalg.eigh(H)[1].flip(1)[:, :3]
    assert float(delta.norm()) > 1e-4
    assert float((basis.vectors.T @ delta).norm()) < 1e-5 * float(delta.norm())
    assert torch.allclose(delta, -0.3 * (g - V_ref @ (V_ref.T @ g)), atol=1e-6)


def test_minibatch_gradient_is_read_from_grad():
    """Without ``gradient=``, the step uses ``p.grad`` (what the training loop computed)."""
    model = nn.Linear(3, 2).double()
    grads = [gaussian(*p.shape, seed=i) for i, p in enumerate(model.parameters())]
    for p, grad in zip(model.parameters(), grads, strict=True):
        p.grad = grad.clone()
    A, _ = spectrum_matrix([5.0, 4.0, 3.0, 1.0, 0.5, 0.1, 0.05, 0.01])
    subspace = HessianSubspace(lambda: ts.DenseOperator(A), k=2, refresh_every=3)
    optimizer = SubspaceSGD(model.parameters(), subspace, PlainGradient(), lr=0.5)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    optimizer.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(after - before, -0.5 * torch.cat([g.reshape(-1) for g in grads]))


# ---------------------------------------------------------------- low-rank Newton on a quadratic
class Quadratic(nn.Module):
    """``L(θ) = ½ θᵀAθ − bᵀθ`` with the gradient computed by hand (no autograd needed)."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, theta0: torch.Tensor) -> None:
        super().__init__()
        self.A, self.b = A, b
        self.theta = nn.Parameter(theta0.clone())

    def gradient(self) -> torch.Tensor:
        return self.A @ self.theta.detach() - self.b


@pytest.mark.usefixtures("global_rng_untouched")
def test_lowrank_newton_reaches_the_minimiser_of_the_top_subspace_in_one_step():
    A, Q = spectrum_matrix([10.0, 7.0, 5.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005])
    b, theta0 = gaussian(12, seed=2), gaussian(12, seed=3)
    quad = Quadratic(A, b, theta0)
    subspace = HessianSubspace(lambda: ts.DenseOperator(A), k=3, refresh_every=10, tol=1e-12)
    optimizer = SubspaceSGD(quad.parameters(), subspace, LowRankNewton(), lr=1.0,
                            gradient=quad.gradient)
    optimizer.step()
    theta1 = quad.theta.detach()
    # reference: minimise L over θ0 + span(U), U the known top eigenvectors, by a linear solve
    U = Q[:, :3]
    c = torch.linalg.solve(U.T @ A @ U, -U.T @ (A @ theta0 - b))
    assert torch.allclose(theta1, theta0 + U @ c, atol=1e-10)
    assert float((U.T @ quad.gradient()).norm()) < 1e-10  # stationary inside the subspace
    assert torch.allclose(Q[:, 3:].T @ theta1, Q[:, 3:].T @ theta0, atol=1e-10)  # bulk untouched


# -------------------------------------------------------------------------- refresh schedule
class Recorder:
    """A solver that records its ``init`` and forwards to ``top_eigenpairs``."""

    def __init__(self) -> None:
        self.inits: list[torch.Tensor | None] = []

    def __call__(self, op, k, init, tol, seed):
        self.inits.append(init)
        return ts.top_eigenpairs(op, k, tol=tol, init=init, seed=seed)


def drifting_matrix(t: int, size: int = 120, drift: float = 1e-6) -> torch.Tensor:
    """A 6-dimensional top subspace above a wide bulk, rotated a little more at every ``t``."""
    values = [10.0, 9.0, 8.0, 7.0, 6.5, 6.0, *torch.linspace(5.0, -1.0, size - 6).tolist()]
    A, _ = spectrum_matrix(values)
    S = gaussian(size, size, seed=7)
    R = torch.linalg.matrix_exp(drift * t * (S - S.T))  # a rotation close to I
    return R @ A @ R.T


@pytest.mark.usefixtures("global_rng_untouched")
def test_refresh_every_m_steps_is_warm_started_and_cheaper_than_cold():
    clock = {"t": 0}
    recorder = Recorder()
    subspace = HessianSubspace(lambda: ts.DenseOperator(drifting_matrix(clock["t"])), k=6,
                               refresh_every=3, tol=1e-4, solver=recorder)
    spent = []
    for step in range(7):
        clock["t"] = step
        before = subspace.matvecs
        subspace.update(step)
        spent.append(subspace.matvecs - before)
    assert subspace.refreshes == 3 and [i for i, s in enumerate(spent) if s] == [0, 3, 6]
    assert recorder.inits[0] is None
    assert recorder.inits[1] is not None and recorder.inits[1].shape == (120, 6)
    cold = ts.top_eigenpairs(ts.DenseOperator(drifting_matrix(6)), 6, tol=1e-4, seed=6)
    assert cold.converged and subspace.basis.converged
    assert spent[6] < cold.matvecs and spent[6] < spent[0]
    assert torch.allclose(subspace.basis.values, cold.values, rtol=1e-4)


def test_subspace_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k and refresh_every must be at least 1"):
        HessianSubspace(lambda: None, k=0, refresh_every=1)
    with pytest.raises(ValueError, match="tol must be positive"):
        HessianSubspace(lambda: None, k=1, refresh_every=1, tol=0.0)


# ------------------------------------------------------------------------------- the switch
def quadratic_optimizer(direction, lr: float = 0.05):
    A, Q = spectrum_matrix([10.0, 7.0, 5.0, 0.5, 0.4, 0.3, 0.2, 0.1])
    quad = Quadratic(A, gaussian(8, seed=2), gaussian(8, seed=3))
    subspace = HessianSubspace(lambda: ts.DenseOperator(A), k=3, refresh_every=2, tol=1e-10)
    return quad, SubspaceSGD(quad.parameters(), subspace, direction, lr=lr,
                             gradient=quad.gradient), Q[:, :3]


@pytest.mark.usefixtures("global_rng_untouched")
def test_switch_is_plain_sgd_until_the_moving_average_passes_the_threshold():
    switch = SwitchOnTopFraction(TopProjection(), threshold=0.0, window=3)
    quad, optimizer, U = quadratic_optimizer(switch)
    shares = []
    for step in range(4):
        g = quad.gradient()
        shares.append(float((U.T @ g).square().sum() / (g @ g)))
        before = quad.theta.detach().clone()
        optimizer.step()
        delta = quad.theta.detach() - before
        if step < 2:  # window not yet full: plain SGD
            assert torch.allclose(delta, -0.05 * g, atol=1e-12)
        else:
            assert torch.allclose(delta, -0.05 * U @ (U.T @ g), atol=1e-10)
    assert switch.switched_at == 2
    assert switch.history == pytest.approx(shares[:3], abs=1e-10)  # frozen after the switch


def test_switch_never_happens_below_the_threshold():
    switch = SwitchOnTopFraction(TopProjection(), threshold=1.0, window=2)
    quad, optimizer, _ = quadratic_optimizer(switch)
    g = quad.gradient()
    for _ in range(5):
        optimizer.step()
    assert switch.switched_at is None and switch.moving_average < 1.0
    assert len(switch.history) == 2
    del g


def test_scaled_direction_multiplies():
    basis = SubspaceBasis(torch.ones(1, dtype=F64), orthonormal(4, 1), 0)
    g = gaussian(4)
    scaled = Scaled(BulkProjection(), 3.0)(g, basis)
    assert torch.allclose(scaled, 3 * project_bulk(g, basis.vectors))


def test_switch_and_optimizer_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"threshold is a fraction of \|g\|², in \[0, 1\]"):
        SwitchOnTopFraction(TopProjection(), threshold=1.5, window=3)
    with pytest.raises(ValueError, match="window must be at least 1"):
        SwitchOnTopFraction(TopProjection(), threshold=0.5, window=0)
    subspace = HessianSubspace(lambda: None, k=1, refresh_every=1)
    with pytest.raises(ValueError, match="lr must be positive"):
        SubspaceSGD(nn.Linear(2, 2).parameters(), subspace, TopProjection(), lr=0.0)
    with pytest.raises(ValueError, match="momentum and weight_decay must be non-negative"):
        SubspaceSGD(nn.Linear(2, 2).parameters(), subspace, TopProjection(), lr=0.1,
                    momentum=-0.5)


# ----------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_continues_identically():
    """Save after 3 steps (mid-schedule, mid-window), load into a fresh optimizer: the next steps
    are the same, with no extra refresh; momentum buffer, basis and switch state survive."""
    def build():
        switch = SwitchOnTopFraction(LowRankNewton(damping=0.1), threshold=0.0, window=4)
        quad, optimizer, _ = quadratic_optimizer(switch)
        optimizer.param_groups[0]["momentum"] = 0.5
        return quad, optimizer, switch

    quad, optimizer, switch = build()
    for _ in range(3):
        optimizer.step()
    saved = optimizer.state_dict()
    theta_saved = quad.theta.detach().clone()
    for _ in range(4):
        optimizer.step()

    quad2, optimizer2, switch2 = build()
    with torch.no_grad():
        quad2.theta.copy_(theta_saved)
    optimizer2.load_state_dict(saved)
    assert optimizer2.steps == 3 and optimizer2.matvecs == saved["subspace_sgd"]["subspace"][
        "matvecs"]
    for _ in range(4):
        optimizer2.step()
    assert torch.allclose(quad2.theta, quad.theta, atol=1e-14)
    assert optimizer2.subspace.refreshes == optimizer.subspace.refreshes
    assert switch2.switched_at == switch.switched_at == 3


def test_load_state_dict_of_another_optimizer_is_refused():
    quad, optimizer, _ = quadratic_optimizer(TopProjection())
    plain = torch.optim.SGD(quad.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not saved by SubspaceSGD"):
        optimizer.load_state_dict(plain.state_dict())


# ------------------------------------------------------------------- through the training loop
def tiny_config(**optim) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), {
        "name": "test-projected",
        "data": {"name": "gaussian-mixture", "classes": 3, "dim": 6, "n": 60, "sigma": 0.5},
        "model": {"name": "softmax"},
        "optim": {"batch_size": 16, "k": 3, "refresh_every": 4, "lr": 0.2, **optim},
        "train": {"steps": 12, "checkpoint_every": 4},
        "tracker": {"k": 2, "dense_until": 12, "dense_every": 4, "anchors": (0,),
                    "save_vectors_at": (), "tol": 1e-6}})


def test_registry_has_the_documented_names():
    assert {"dom-sgd", "bulk-sgd", "lowrank-newton", "switch-dom-sgd",
            "switch-bulk-sgd"} <= set(OPTIMIZERS)


def common_settings(name: str) -> dict:
    """Settings under which every registered optimizer trains the tiny problem."""
    if name.startswith("switch-"):
        return {"name": name, "switch_threshold": 0.3, "switch_window": 3}
    return {"name": name}


COMMON_SUITE = [common_settings(name) for name in sorted(OPTIMIZERS)] + [
    {"name": "lowrank-newton", "project": "fullbatch", "lr": 1.0, "damping": 0.5,
     "refresh_subset": 40, "momentum": 0.5}]


@pytest.mark.parametrize("optim", COMMON_SUITE,
                         ids=[f"{o['name']}{'-fullbatch' if 'project' in o else ''}"
                              for o in COMMON_SUITE])
@pytest.mark.slow
def test_training_run_resumes_with_the_optimizer_state(tmp_path, optim):
    """The common suite: every registered optimizer trains (the loss falls), records its HVP
    cost, and a run stopped and resumed from its checkpoint reproduces the uninterrupted one."""
    from tinysubspace.experiments.training import run_experiment
    from tinysubspace.results.store import load_run

    config = tiny_config(**optim)
    whole = run_experiment(config, tmp_path / "whole")
    assert whole.state == "finished"
    stopped = run_experiment(config, tmp_path / "resumed", stop_after=6)
    assert stopped.state == "stopped"
    run_experiment(config, tmp_path / "resumed", resume=True)
    a, b = load_run(tmp_path / "whole"), load_run(tmp_path / "resumed")
    columns = ["step", "train/loss", "hessian/f_top"]
    assert a.metrics[columns].equals(b.metrics[columns])
    checkpoint = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    state = checkpoint["optimizer"]["subspace_sgd"]
    assert state["steps"] == 12 and state["subspace"]["refreshes"] == 3
    assert state["subspace"]["matvecs"] > 0
    if optim["name"].startswith("switch-"):
        assert state["direction"]["switched_at"] is not None
    assert float(a.metrics["train/loss"].iloc[-1]) < float(a.metrics["train/loss"].iloc[0])


@pytest.mark.parametrize(("optim", "message"), [
    ({"name": "dom-sgd", "project": "sometimes"}, "optim.project must be one of minibatch, "
                                                  "fullbatch"),
    ({"name": "bulk-sgd", "switch_threshold": 0.5}, "use 'switch-bulk-sgd'"),
    ({"name": "dom-sgd", "refresh_subset": 0}, "optim.refresh_subset must be at least 1"),
    ({"name": "switch-lowrank-newton", "switch_lr": -1.0}, "optim.switch_lr must be positive"),
])
def test_registry_rejects_bad_configs(optim, message):
    from tinysubspace.experiments.build import build_optimizer, build_problem
    from tinysubspace.experiments.tracker import Tracker

    # A value out of range is refused when the config is made (experiments.config.RANGES), one
    # that needs the optimizer's own rules when it is built; either way before any training.
    with pytest.raises(ValueError, match=message):
        config = tiny_config(**optim)
        problem = build_problem(config)
        tracker = Tracker(config.tracker, problem.loss_fn, problem.tensors("train"))
        build_optimizer(config.optim, problem.model, {"problem": problem, "tracker": tracker})


def test_experiment_files_name_known_optimizers():
    from tinysubspace.experiments.catalog import experiment_names, load_experiment

    names = [name for name in experiment_names() if name.startswith("projected-")]
    assert len(names) >= 12
    for name in names:
        config = load_experiment(name)
        assert config.optim.name in {"sgd", *OPTIMIZERS}, name
        assert dataclasses.asdict(config)["optim"]["k"] >= 1


# ---------------------------------------------------------------------- `tinysubspace compare`
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two finished tiny runs: plain SGD and a switching Dom-SGD."""
    from tinysubspace.experiments.training import run_experiment

    folder = tmp_path_factory.mktemp("compare")
    configs = {"projected-sgd-tiny": tiny_config(name="sgd"),
               "projected-dom-sgd-tiny": tiny_config(name="switch-dom-sgd",
                                                     switch_threshold=0.3, switch_window=3)}
    for name, config in configs.items():
        run_experiment(dataclasses.replace(config, name=name), folder / name)
    return [folder / name for name in configs]


def test_compare_table_reads_losses_steps_and_hvp_cost(tiny_runs):
    from tinysubspace.results.projected import compare_markdown, compare_table
    from tinysubspace.results.store import load_run

    sgd, dom = (load_run(path) for path in tiny_runs)
    target = float(sgd.metrics["train/loss"].iloc[2])  # SGD reaches it at its third measurement
    table, used = compare_table([sgd, dom], target_loss=target)
    assert used == target and list(table["label"]) == ["sgd", "dom-sgd"]
    assert table["final_loss"].tolist() == pytest.approx(
        [float(sgd.metrics["train/loss"].iloc[-1]), float(dom.metrics["train/loss"].iloc[-1])])
    assert int(table["steps_to_target"].iloc[0]) == int(sgd.metrics["step"].iloc[2])
    state = torch.load(tiny_runs[1] / "checkpoint.pt", weights_only=False)["optimizer"][
        "subspace_sgd"]
    assert table["hvp_optimizer"].tolist() == [0, state["subspace"]["matvecs"]]
    assert table["switched_at"].iloc[1] == state["direction"]["switched_at"]
    assert table["hvp_tracker"].iloc[0] == int(sgd.metrics["cost/matvecs"].sum())
    text = compare_markdown(table, target)
    assert "| sgd | sgd |" in text and "switch-dom-sgd" in text


def test_compare_default_target_is_twice_the_best_final_loss(tiny_runs):
    from tinysubspace.results.projected import compare_table

    table, target = compare_table(tiny_runs)
    assert target == pytest.approx(2 * table["final_loss"].min())
    assert table["steps_to_target"].notna().any()


def test_compare_figure_and_command(tiny_runs, tmp_path, capsys):
    import argparse

    from tinysubspace.cli import compare
    from tinysubspace.plots.common import plotted_data
    from tinysubspace.plots.projected import figure_compare

    data = plotted_data(figure_compare(tiny_runs))
    assert set(data) == {"sgd", "dom-sgd"} and len(data["sgd"]["minibatch_loss"]) == 12
    sub = argparse.ArgumentParser()
    compare.add_arguments(sub)
    args = sub.parse_args([*map(str, tiny_runs), "--out", str(tmp_path / "c.png")])
    assert compare.main(args) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert "steps to target" in capsys.readouterr().out
    bad = sub.parse_args([str(tmp_path)])
    assert compare.main(bad) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_short_labels_drop_shared_words():
    from tinysubspace.results.projected import short_labels

    assert short_labels(["projected-sgd-fashion", "projected-bulk-sgd-fashion"]) == [
        "sgd", "bulk-sgd"]
    assert short_labels(["a-x", "a-x"]) == ["a-x", "a-x"]  # not unique after shortening
    assert short_labels(["only-one"]) == ["only-one"]
