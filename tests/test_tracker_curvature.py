"""ts.SubspaceTracker's curvature options (issue 15): GGN next to the Hessian, the class-mean
span, principal angles and eigenvector displacement between measurements, the optimizer's
threshold, preconditioned top-k and the update's share — every column against dense float64
references built here at the parameters of each measurement (uneven batches), training left
bit-identical, and bad options refused before training starts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import tinysubspace as ts
from reference import FlatLoss, reference_gradient, reference_hessian
from reference_outputs import per_example_gradients, reference_ggn
from tinysubspace.results.store import RunStoreError

N, D, C, K = 46, 4, 3, 2
TOL = 1e-10


def _data():
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(N, D, generator=gen, dtype=torch.float64)
    return X, (X[:, 0] > 0).long() + (X[:, 1] > 0.4).long()


def _batches(X, Y, sizes=(20, 9, 17)):  # uneven batches, weighted by size
    out, start = [], 0
    for size in sizes:
        out.append((X[start:start + size], Y[start:start + size]))
        start += size
    assert start == len(X)
    return out


def _model():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()


def _top(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(matrix)
    return values.flip(0)[:k], vectors.flip(1)[:, :k]


def _theta(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _train(optimizer_name: str, options: dict | None, steps: int = 5, lr: float = 0.3):
    """Full-batch training; the tracker (if any) measures at every step. Returns the model,
    the optimizer, the rows, and per step the parameters and a copy of the optimizer state."""
    X, Y = _data()
    model = _model()
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=lr),
            "adam": lambda p: torch.optim.Adam(p, lr=0.05),
            "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
            "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01)}[optimizer_name]
    optimizer = make(model.parameters())
    tracker = None
    if options is not None:
        tracker = ts.SubspaceTracker(model, F.cross_entropy, _batches(X, Y), k=K, schedule=1,
                                     tol=TOL, anchors=(), **{"optimizer": optimizer, **options})
    rows, thetas, states = [], [], []
    for step in range(steps):
        thetas.append(_theta(model))
        states.append({i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                       for i, s in enumerate(optimizer.state.values())})
        if tracker is not None:
            rows.append(tracker.on_step(step))
        optimizer.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        optimizer.step()
    return model, optimizer, rows, thetas, states


def _flat_loss(theta):
    model = _model()
    torch.nn.utils.vector_to_parameters(theta, model.parameters())
    X, Y = _data()
    return FlatLoss(model, F.cross_entropy, X, Y)


# --------------------------------------------------------------------- GGN and geometry
def test_ggn_class_means_and_geometry_columns_match_dense_references():
    _, _, rows, thetas, _ = _train("sgd", {"ggn": True, "class_means": True, "geometry": True,
                                           "optimizer": None}, steps=3)
    previous = None
    for row, theta in zip(rows, thetas, strict=True):
        f = _flat_loss(theta)
        H, G = reference_hessian(f), reference_ggn(f, "cross_entropy")
        h_values, V = _top(H, K)
        g_values, W = _top(G, 2 * K)
        assert row["hessian/eig_1"] == pytest.approx(float(h_values[0]), rel=1e-9)
        for i in range(2 * K):
            assert row[f"ggn/eig_{i + 1}"] == pytest.approx(float(g_values[i]), rel=1e-8)
        W = W[:, :K]
        assert row["overlap/hessian_ggn"] == pytest.approx(float((V.T @ W).square().sum() / K),
                                                           abs=1e-8)
        cosines = torch.linalg.svdvals(V.T @ W).clamp(max=1)
        for i in range(K):
            assert row[f"angles/hessian_ggn_{i + 1}"] == pytest.approx(
                float(torch.arccos(cosines[i])), abs=1e-6)
        # class means of per-example gradients, by hand: their span against the top-k
        labels = _data()[1]
        grads = per_example_gradients(f)
        means = torch.stack([grads[labels.eq(c)].mean(0) for c in range(C)], 1)
        Q = torch.linalg.qr(means).Q
        expected = float((Q.T @ V).square().sum()) / math.sqrt(C * K)  # eq. 5, unequal dims
        assert row["overlap/classmeans_hessian"] == pytest.approx(expected, abs=1e-8)
        assert row["overlap/classmeans_ggn"] == pytest.approx(
            float((Q.T @ W).square().sum()) / math.sqrt(C * K), abs=1e-8)
        assert row["classmeans/rank"] == C
        g = reference_gradient(f)  # the span holds the gradient (a check of the reference)
        assert float((Q @ (Q.T @ g) - g).norm()) < 1e-10 * float(g.norm())
        if previous is None:
            assert "angles/previous_1" not in row
        else:
            expected = torch.arccos(torch.linalg.svdvals(previous.T @ V).clamp(max=1))
            for i in range(K):
                assert row[f"angles/previous_{i + 1}"] == pytest.approx(float(expected[i]),
                                                                        abs=1e-6)
                dot = abs(float(previous[:, i] @ V[:, i]))
                assert row[f"displacement/hessian_{i + 1}"] == pytest.approx(
                    math.sqrt(max(2 - 2 * dot, 0)), abs=1e-6)
        previous = V
        assert row["cost/curvature_matvecs"] > 0


def test_geometry_accepts_float32_bases_orthonormal_to_float32_rounding():
    """A 10⁶-parameter float32 model's eigenvectors are orthonormal to ~√p·ε₃₂, not to 1e-4:
    the columns use the metrics' own rule (``default_basis_atol``), as the tracker's anchor
    overlaps do. A fixed ``atol=1e-4`` refused these bases."""
    from tinysubspace.experiments.tracker_curvature import _geometry
    from tinysubspace.metrics import default_basis_atol, orthonormality_error

    gen = torch.Generator().manual_seed(0)
    p = 1_000_000
    before = torch.linalg.qr(torch.randn(p, 3, generator=gen)).Q
    now = torch.linalg.qr(before + 0.1 * torch.randn(p, 3, generator=gen)).Q
    before = (before * (1 + 2e-4)).float()  # off by 4e-4: float32 rounding of long columns
    assert 1e-4 < orthonormality_error(before) <= default_basis_atol(before)
    row = _geometry(before, now.float())
    expected = torch.arccos(torch.linalg.svdvals(before.double().T @ now.double()).clamp(max=1))
    for i in range(3):
        assert row[f"angles/previous_{i + 1}"] == pytest.approx(float(expected[i]), abs=1e-3)
    with pytest.raises(ValueError, match="orthonormal"):  # the rule still refuses a bad basis
        _geometry(before * 1.01, now.float())


# ----------------------------------------------------------- optimizer, preconditioning
def test_sgd_threshold_ratio_and_update_share_match_dense_references():
    lr = 0.3
    _, _, rows, thetas, _ = _train("sgd", {}, steps=4, lr=lr)
    for step, (row, theta) in enumerate(zip(rows, thetas, strict=True)):
        H = reference_hessian(_flat_loss(theta))
        values, V = _top(H, K)
        assert row["sharpness/threshold"] == pytest.approx(2 / lr, rel=1e-15)
        assert row["sharpness/ratio"] == pytest.approx(float(values[0]) * lr / 2, rel=1e-9)
        assert row["preconditioned/eig_1"] == row["hessian/eig_1"]  # P = 1
        if step == 0:
            assert math.isnan(row["preconditioned/update_share"])  # no update seen yet
            continue
        delta = theta - thetas[step - 1]
        share = float((V.T @ delta).square().sum() / delta.square().sum())
        assert row["preconditioned/update_share"] == pytest.approx(share, abs=1e-8)
        assert row["cost/curvature_matvecs"] == 0  # SGD reuses the Hessian's pairs


def _adam_diagonal(optimizer, state_per_param: dict) -> torch.Tensor:
    group = optimizer.param_groups[0]
    parts = []
    for i, _ in enumerate(group["params"]):
        s = state_per_param[i]
        t = float(s["step"])
        if "exp_avg_sq" in s:
            beta1, beta2 = group["betas"]
            diag = (s["exp_avg_sq"] / (1 - beta2**t)).sqrt() + group["eps"]
            diag = diag * (1 - beta1**t)  # Cohen et al.'s P_t (first-moment correction)
        else:  # RMSprop
            diag = s["square_avg"].sqrt() + group["eps"]
        parts.append(diag.reshape(-1))
    return torch.cat(parts)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop"])
def test_adaptive_preconditioned_top_k_and_update_share_match_dense(name):
    _, optimizer, rows, thetas, states = _train(name, {}, steps=4)
    assert math.isnan(rows[0]["sharpness/ratio"])  # no second moments before the first step
    assert math.isnan(rows[0]["preconditioned/eig_1"])
    for step in range(1, 4):
        row, theta = rows[step], thetas[step]
        P = _adam_diagonal(optimizer, states[step])  # the state the next step divides by
        H = reference_hessian(_flat_loss(theta))
        Hp = H / P.sqrt()[:, None] / P.sqrt()[None, :]
        values, V = _top(Hp, K)
        for i in range(K):
            assert row[f"preconditioned/eig_{i + 1}"] == pytest.approx(float(values[i]),
                                                                       rel=1e-8)
        lr = optimizer.param_groups[0]["lr"]
        threshold = 38 / lr if name != "rmsprop" else 2 / lr
        assert row["sharpness/threshold"] == pytest.approx(threshold, rel=1e-12)
        assert row["sharpness/ratio"] == pytest.approx(float(values[0]) / threshold, rel=1e-8)
        step_p = P.sqrt() * (theta - thetas[step - 1])
        share = float((V.T @ step_p).square().sum() / step_p.square().sum())
        assert row["preconditioned/update_share"] == pytest.approx(share, abs=1e-8)
        assert row["preconditioned/eig_1"] != pytest.approx(row["hessian/eig_1"], rel=1e-3)


def test_the_threshold_follows_a_learning_rate_scheduler():
    X, Y = _data()
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    tracker = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=1, schedule=1, anchors=(),
                                 optimizer=optimizer)
    for step in range(3):
        row = tracker.on_step(step)
        lr = 0.4 * 0.5**step
        assert row["sharpness/threshold"] == pytest.approx((2 + 2 * 0.5) / lr, rel=1e-12)
        optimizer.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_training_with_every_option_ends_bit_identical(name, tmp_path):
    plain, opt_a, _, _, _ = _train(name, None)
    tracked, opt_b, rows, _, _ = _train(name, {"ggn": True, "class_means": True,
                                               "geometry": True, "out": tmp_path / "run"})
    for a, b in zip(plain.parameters(), tracked.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(opt_a.state.values(), opt_b.state.values(), strict=True):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    run = ts.load_run(tmp_path / "run")
    assert run.config["tracker"]["curvature"] == {"ggn": True, "class_means": True,
                                                   "geometry": True,
                                                   "optimizer": type(opt_b).__name__}
    for column in ("ggn/eig_1", "overlap/classmeans_hessian", "angles/previous_1",
                   "displacement/hessian_2", "sharpness/ratio", "preconditioned/update_share"):
        assert column in run.metrics.columns
        assert run.metrics[column].tolist()[-1] == pytest.approx(rows[-1][column], rel=1e-12)


def test_resume_keeps_the_warm_starts_of_the_extra_operators(tmp_path):
    X, Y = _data()
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    options = {"k": K, "schedule": 1, "anchors": (), "tol": 1e-8, "ggn": True,
               "optimizer": optimizer, "out": tmp_path / "run"}
    tracker = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), **options)
    for step in range(3):
        tracker.on_step(step)
        optimizer.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        optimizer.step()
    saved = tracker.state_dict()["warm"]
    resumed = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), resume=True, **options)
    for key in ("ggn", "preconditioned"):
        assert torch.equal(resumed.engine.warm.get(key), saved[key])
    with pytest.raises(RunStoreError, match=r"other settings \(tracker\.curvature\.ggn differ\)"):
        ts.SubspaceTracker(model, F.cross_entropy, (X, Y), resume=True,
                           **{**options, "ggn": False})


# ------------------------------------------------------------------------- bad input
def test_bad_curvature_options_are_refused_before_training():
    X, Y = _data()
    model = _model()

    def make(**kwargs):
        options = {"model": model, "loss_fn": F.cross_entropy, "data": (X, Y), "k": 1}
        return ts.SubspaceTracker(**{**options, **kwargs})

    with pytest.raises(ValueError, match="class_means=True assumes softmax cross-entropy"):
        make(loss_fn=lambda z, y: F.cross_entropy(z, y, label_smoothing=0.2), class_means=True)
    onehot = F.one_hot(Y, C).double()
    with pytest.raises(ValueError, match=r"needs \(n, C\) class scores and n integer labels"):
        make(loss_fn=F.mse_loss, data=(X, onehot), class_means=True)

    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def forward(self, x):
            return {"logits": self.net(x)}

    with pytest.raises(ValueError, match="need a model that returns a tensor of outputs, got "
                                         "dict"):
        make(model=Dict(), loss_fn=lambda out, y: F.cross_entropy(out["logits"], y), ggn=True)
    with pytest.raises(ValueError, match=r"optimizer= supports torch\.optim SGD, Adam"):
        make(optimizer=torch.optim.LBFGS(model.parameters()))
    partial = torch.optim.SGD(list(model.parameters())[:2], lr=0.1)
    with pytest.raises(ValueError, match=r"does not update parameters the tracker measures: "
                                         r"\['2.weight', '2.bias'\]"):
        make(optimizer=partial)
    groups = torch.optim.SGD([{"params": list(model.parameters())[:2], "lr": 0.1},
                              {"params": list(model.parameters())[2:], "lr": 0.2}])
    with pytest.raises(ValueError, match="different thresholds"):
        make(optimizer=groups)


# ------------------------------------------------------------------------------- the CLI
def test_the_cli_measures_the_options_through_the_same_tracker(tmp_path):
    """``tracker.ggn/class_means/geometry/sharpness`` in a CLI run: the columns are in
    ``metrics.csv``, every other column is bit-identical to the run without them, and the
    preconditioned λ₁ at the last step is Adam's P^{-1/2} H P^{-1/2} of the saved model."""
    from experiment_fixtures import tiny_config
    from tinysubspace.experiments.build import build_problem
    from tinysubspace.experiments.training import run_experiment

    base = {"optim__name": "adam", "optim__lr": 0.01, "train__steps": 9}
    run_experiment(tiny_config(**base), tmp_path / "plain")
    options = {"tracker__ggn": True, "tracker__class_means": True, "tracker__geometry": True,
               "tracker__sharpness": True}
    run_experiment(tiny_config(**base, **options), tmp_path / "extra")
    plain, extra = ts.load_run(tmp_path / "plain"), ts.load_run(tmp_path / "extra")
    shared = [c for c in plain.metrics.columns if c not in ("wall_time", "cost/seconds")]
    assert plain.metrics[shared].equals(extra.metrics[shared])
    last = extra.metrics.iloc[-1]
    assert last["sharpness/threshold"] == pytest.approx(38 / 0.01, rel=1e-12)
    for column in ("ggn/eig_1", "overlap/hessian_ggn", "overlap/classmeans_hessian",
                   "angles/previous_1", "displacement/hessian_3", "preconditioned/eig_3",
                   "preconditioned/update_share", "sharpness/ratio"):
        assert math.isfinite(last[column]), column
    assert math.isnan(extra.metrics.iloc[0]["preconditioned/eig_1"])  # before Adam's 1st step
    # the final model and optimizer from the checkpoint: a dense reference of the last row
    config = tiny_config(**base, **options)
    problem = build_problem(config)
    checkpoint = torch.load(tmp_path / "extra" / "checkpoint.pt", weights_only=False)
    problem.model.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.Adam(problem.model.parameters(), lr=0.01)
    optimizer.load_state_dict(checkpoint["optimizer"])
    P = torch.cat([_p(optimizer, p) for p in problem.model.parameters()]).double()
    X, Y = problem.tensors("train")
    H = reference_hessian(FlatLoss(problem.model, problem.loss_fn, X, Y))
    values, _ = _top(H / P.sqrt()[:, None] / P.sqrt()[None, :], 1)
    assert last["step"] == 9 and checkpoint["step"] == 9
    assert last["preconditioned/eig_1"] == pytest.approx(float(values[0]), rel=1e-6)


def _p(optimizer, param):
    s, group = optimizer.state[param], optimizer.param_groups[0]
    t, (beta1, beta2) = float(s["step"]), group["betas"]
    diag = (s["exp_avg_sq"].double() / (1 - beta2**t)).sqrt() + group["eps"]
    return (diag * (1 - beta1**t)).reshape(-1)


def test_cli_options_that_cannot_work_are_refused_at_config_time():
    from experiment_fixtures import tiny_config
    from tinysubspace.experiments.config import ConfigError

    with pytest.raises(ConfigError, match=r"tracker\.sharpness needs optim\.name sgd or adam"):
        tiny_config(tracker__sharpness=True, optim__name="dom-sgd")
    with pytest.raises(ConfigError, match=r"tracker\.class_means needs train\.loss cross_entropy"):
        tiny_config(tracker__class_means=True, train__loss="mse")


def test_a_learning_rate_of_zero_gives_no_threshold_but_keeps_measuring():
    X, Y = _data()
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(step, 1))  # lr 0, η, η
    tracker = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=1, schedule=1, anchors=(),
                                 optimizer=optimizer)
    rows = []
    for step in range(3):
        rows.append(tracker.on_step(step))
        optimizer.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        optimizer.step()
        warmup.step()
    assert math.isnan(rows[0]["sharpness/threshold"]) and math.isnan(rows[0]["sharpness/ratio"])
    assert rows[1]["preconditioned/eig_1"] > 0  # P exists after the (lr = 0) first step
    for row in rows[1:]:
        assert row["sharpness/threshold"] == pytest.approx(38 / 0.05, rel=1e-12)
        assert row["sharpness/ratio"] == pytest.approx(row["preconditioned/eig_1"] / (38 / 0.05),
                                                       rel=1e-12)
    assert math.isnan(rows[1]["preconditioned/update_share"])  # the lr = 0 step did not move


# ----------------------------------------------------------------------------- torchrun
def _distributed_worker(rank: int, world: int, folder) -> list:
    """Each rank passes its shard; every option on; the same full-batch step on every rank."""
    from tinysubspace.runtime.distributed import shard_slice

    X, Y = _data()
    part = shard_slice(N)
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    tracker = ts.SubspaceTracker(model, F.cross_entropy, (X[part], Y[part]), k=K, schedule=1,
                                 anchors=(), tol=TOL, ggn=True, class_means=True,
                                 geometry=True, optimizer=optimizer)
    rows = []
    for step in range(3):
        rows.append(tracker.on_step(step))
        optimizer.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        optimizer.step()
    return rows


@pytest.mark.distributed
@pytest.mark.skipif(not (torch.distributed.is_available()
                         and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.slow
def test_under_torchrun_the_options_give_the_single_process_rows(tmp_path):
    from distributed_workers import launch

    results = launch(_distributed_worker, tmp_path)
    assert all("ok" in r for r in results), results
    _, _, single, _, _ = _train("adam", {"ggn": True, "class_means": True, "geometry": True},
                                steps=3)
    columns = ["ggn/eig_1", "ggn/eig_4", "overlap/hessian_ggn", "angles/hessian_ggn_2",
               "overlap/classmeans_hessian", "overlap/classmeans_ggn", "preconditioned/eig_1",
               "sharpness/ratio", "preconditioned/update_share", "displacement/hessian_1"]
    for step in (1, 2):
        first, second = results[0]["ok"][step], results[1]["ok"][step]
        for column in columns:
            assert first[column] == second[column], column
            assert first[column] == pytest.approx(single[step][column], rel=1e-7, abs=1e-9), \
                column
