"""ts.SubspaceTracker in one's own loop: rows against dense float64 references, every data kind,
nothing of the training changed (bit for bit), schedules and the budget, loggers, subsets,
resume, and bad input refused before training starts."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, TensorDataset

import tinysubspace as ts
from reference import FlatLoss, reference_gradient, reference_hessian
from tinysubspace.experiments import subspace_tracker as st
from tinysubspace.experiments.schedules import Budget, as_schedule
from tinysubspace.results.store import RunStoreError

N, D, C = 60, 5, 3


def _data(seed: int = 0, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D, generator=gen, dtype=torch.float64)
    return X, (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()


def _model(bn_dropout: bool = False, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(1)
    layers = [nn.Linear(D, 6)]
    if bn_dropout:
        layers += [nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3)]
    else:
        layers += [nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(6, C)).to(dtype)


def _dense(model: nn.Module, X, Y):
    f = FlatLoss(model, F.cross_entropy, X, Y)
    H = reference_hessian(f)
    values, vectors = torch.linalg.eigh(H)
    return H, reference_gradient(f), values.flip(0), vectors.flip(1), float(f(f.theta0))


# ----------------------------------------------------------------------------- the numbers
@pytest.mark.parametrize("kind", ["pair", "batches", "loader", "dicts"])
def test_a_row_equals_the_dense_reference_for_every_data_kind(kind):
    X, Y = _data()
    data = {"pair": (X, Y),
            "batches": [(X[i:i + 16], Y[i:i + 16]) for i in range(0, N, 16)],
            "loader": DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True),
            "dicts": [{"x": X[i:i + 25], "labels": Y[i:i + 25]} for i in range(0, N, 25)]}[kind]
    model = _model()
    forward = model.forward
    if kind == "dicts":  # keyword inputs: model(x=..., labels=...)
        model.forward = lambda x, labels=None: forward(x)
    tracker = ts.SubspaceTracker(model, F.cross_entropy, data, k=2, tol=1e-10, anchors=())
    row = tracker.on_step(0)
    H, g, values, vectors, loss = _dense(_model(), X, Y)
    assert row["train/loss"] == pytest.approx(loss, rel=1e-12)
    assert row["train/grad_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
    for i in range(4):
        assert row[f"hessian/eig_{i + 1}"] == pytest.approx(float(values[i]), rel=1e-8)
    assert row["hessian/f_top"] == pytest.approx(ts.top_fraction(g, vectors[:, :2]), abs=1e-8)
    assert row["hessian/overlap_g_Hg"] == pytest.approx(
        float(g @ H @ g) / float(g.norm() * (H @ g).norm()), rel=1e-9)
    predicted = (_model()(X).argmax(1) == Y).double().mean().item()
    assert row["train/accuracy"] == pytest.approx(predicted, abs=1e-12)
    assert row["cost/matvecs"] > 0 and 0 < row["cost/overhead"] <= 1


def _train(model, tracker_kwargs, steps=12, seed=0, loader_generator=False):
    """SGD with momentum on a shuffling DataLoader (the global RNG draws its order), numpy and
    ``random`` used by the loop, dropout; optionally a tracker measuring along."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    X, Y = _data()
    gen = torch.Generator().manual_seed(5) if loader_generator else None
    loader = DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=True, generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = None
    if tracker_kwargs is not None:
        tracker = ts.SubspaceTracker(model, F.cross_entropy, loader, k=2, schedule=2,
                                     **tracker_kwargs)
    batches = iter(loader)
    for step in range(steps):
        if tracker is not None:
            tracker.on_step(step)
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        noise = float(np.random.rand()) * 1e-3 + random.random() * 1e-3
        optimizer.zero_grad()
        (F.cross_entropy(model(x), y) + noise).backward()
        optimizer.step()
    return model, optimizer, (torch.get_rng_state(), np.random.rand(), random.random())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("loader_generator", [False, True])
def test_training_with_the_tracker_ends_bit_identical_to_training_without(mode, tmp_path,
                                                                           loader_generator):
    plain, opt_a, rng_a = _train(_model(bn_dropout=True), None, loader_generator=loader_generator)
    tracked, opt_b, rng_b = _train(_model(bn_dropout=True),
                                   {"mode": mode, "out": tmp_path / "run"},
                                   loader_generator=loader_generator)
    for (name, a), b in zip(plain.state_dict().items(), tracked.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name  # weights, BN running statistics, num_batches_tracked
    for a, b in zip(opt_a.state_dict()["state"].values(), opt_b.state_dict()["state"].values(),
                    strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert torch.equal(rng_a[0], rng_b[0]) and rng_a[1:] == rng_b[1:]
    assert len(ts.load_run(tmp_path / "run").metrics) == 6  # it did measure


def test_a_measurement_keeps_grads_flags_and_buffers():
    model = _model(bn_dropout=True)
    X, Y = _data()
    F.cross_entropy(model(X), Y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model[3].eval()  # a mixed state: dropout in eval, the rest in train
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=1, mode="train").on_step(0)
    assert model.training and not model[3].training
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ schedules and budget
def test_schedules():
    assert [s for s in range(13) if as_schedule(4)(s)] == [0, 4, 8, 12]
    assert [s for s in range(5) if as_schedule([1, 3])(s)] == [1, 3]
    assert [s for s in range(400) if as_schedule("paper")(s)] == [*range(0, 201, 10), 300]
    assert [s for s in range(9) if as_schedule(lambda s: s in (2, 7))(s)] == [2, 7]
    with pytest.raises(ValueError, match=r"negative steps \[-5, -1\]"):
        as_schedule([3, -1, -5])
    with pytest.raises(ValueError, match="n >= 1"):
        as_schedule(0)
    with pytest.raises(ValueError, match="schedule must be 'paper'"):
        as_schedule("dense")
    with pytest.raises(TypeError, match="integers"):
        as_schedule([1.5])


def test_the_budget_keeps_measuring_time_under_its_share(monkeypatch):
    """A fake clock: each training step costs 1 s, each measurement 3 s. With budget 0.2 the
    tracker measures exactly where s + c <= 0.2 (t + c) (simulated independently here), and the
    overhead after every measurement is at most 0.2."""
    now = [0.0]
    monkeypatch.setattr(st.time, "perf_counter", lambda: now[0])
    X, Y = _data()
    tracker = ts.SubspaceTracker(_model(), F.cross_entropy, (X, Y), k=1, schedule=1,
                                 budget=0.2, anchors=())
    engine_measure = tracker.engine.measure

    def slow_measure(*args, **kwargs):
        now[0] += 3.0
        return engine_measure(*args, **kwargs)

    monkeypatch.setattr(tracker.engine, "measure", slow_measure)
    measured, rows = [], []
    for step in range(60):
        row = tracker.on_step(step)
        if row is not None:
            measured.append(step)
            rows.append(row)
        now[0] += 1.0
    spent, t, expected = 0.0, 0.0, []
    for step in range(60):  # the rule, from the module docstring
        if spent + (3.0 if expected else 0.0) <= 0.2 * (t + (3.0 if expected else 0.0)):
            expected.append(step)
            spent += 3.0
            t += 3.0
        t += 1.0
    assert measured == expected and len(measured) > 3
    assert all(row["cost/overhead"] <= 0.2 + 1e-12 for row in rows[1:])
    assert tracker.skipped == 60 - len(measured)
    with pytest.raises(ValueError, match=r"budget must be a fraction of wall time in \(0, 1\]"):
        Budget(1.5)


# ------------------------------------------------------------------------------ loggers
def test_csv_tensorboard_and_callable_loggers_get_the_same_rows(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    X, Y = _data()
    seen = []
    tracker = ts.SubspaceTracker(_model(), F.cross_entropy, (X, Y), k=2, schedule=[0, 3],
                                 out=tmp_path / "run", anchors=(0,), save_vectors_at=(3,),
                                 loggers=("csv", "tensorboard", lambda r, s: seen.append((s, r))))
    rows = [tracker.on_step(s) for s in range(4)]
    tracker.close()
    rows = [r for r in rows if r is not None]
    assert [s for s, _ in seen] == [0, 3] and seen[1][1] == rows[1]
    run = ts.load_run(tmp_path / "run")
    assert run.status["state"] == "finished"
    assert run.metrics["step"].tolist() == [0, 3]
    assert run.eigenvector_steps == [0, 3]  # the anchor's basis and save_vectors_at
    for row, (_, saved) in zip(rows, run.metrics.iterrows(), strict=True):
        assert saved["hessian/f_top"] == row["hessian/f_top"]  # shortest repr: exact
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("hessian/eig_1")
    assert [e.step for e in scalars] == [0, 3]
    assert [e.value for e in scalars] == pytest.approx([r["hessian/eig_1"] for r in rows],
                                                       rel=1e-6)
    assert events.Scalars("overlap/top/t1=0")[-1].value == pytest.approx(
        rows[1]["overlap/top/t1=0"], rel=1e-6)


@pytest.mark.slow
def test_plot_report_and_table1_read_an_own_loop_run(tmp_path):
    from tinysubspace.cli.main import main

    X, Y = _data()
    tracker = ts.SubspaceTracker(_model(), F.cross_entropy, (X, Y), k=2, schedule=2,
                                 out=tmp_path / "run", anchors=(0, 2), save_vectors_at=(0, 4))
    model = tracker.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(7):
        tracker.on_step(step)
        optimizer.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        optimizer.step()
    tracker.close()
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert list((tmp_path / "run" / "figures").glob("*.png"))
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.html").exists()
    assert main(["table1", str(tmp_path / "run")]) == 0


# ------------------------------------------------------------------------------ subsets
def test_a_subset_is_seeded_recorded_and_compared_with_the_full_data(tmp_path):
    X, Y = _data()
    tracker = ts.SubspaceTracker(_model(), F.cross_entropy, (X, Y), k=2, subset=20, seed=3,
                                 out=tmp_path / "run", check_subset=True, tol=1e-10)
    row = tracker.on_step(0)
    index = torch.randperm(N, generator=torch.Generator().manual_seed(3))[:20].sort().values
    saved = ts.load_run(tmp_path / "run").config["tracker"]["subset"]
    assert saved["indices"] == index.tolist() and saved["n"] == 20 and saved["of"] == N
    _, _, values, vectors, _ = _dense(_model(), X[index], Y[index])
    assert row["hessian/eig_1"] == pytest.approx(float(values[0]), rel=1e-8)
    _, _, full_values, full_vectors, _ = _dense(_model(), X, Y)
    assert row["subset/eig_1_full"] == pytest.approx(float(full_values[0]), rel=1e-8)
    assert row["subset/overlap_top"] == pytest.approx(
        ts.subspace_overlap(vectors[:, :2], full_vectors[:, :2]), abs=1e-6)
    assert 0 < row["subset/overlap_top"] < 0.9999  # a subset's subspace is not the full one's
    assert "subset/overlap_top" not in (tracker.on_step(10) or {}) or math.isnan(
        tracker.on_step(10).get("subset/overlap_top", math.nan))
    batches = ts.SubspaceTracker(_model(), F.cross_entropy,
                                 [(X[i:i + 7], Y[i:i + 7]) for i in range(0, N, 7)], k=2,
                                 subset=20, seed=3, tol=1e-10).on_step(0)
    loader = ts.SubspaceTracker(_model(), F.cross_entropy,
                                DataLoader(TensorDataset(X, Y), batch_size=9, shuffle=True),
                                k=2, subset=20, seed=3, tol=1e-10).on_step(0)
    for other in (batches, loader):  # the same 20 examples, whatever the data kind
        assert other["train/loss"] == pytest.approx(row["train/loss"], rel=1e-12)
        assert other["hessian/eig_1"] == pytest.approx(row["hessian/eig_1"], rel=1e-8)


# ------------------------------------------------------------------------------- resume
def _loop(out, steps, start=0, state=None, resume=False, crash_at=None):
    X, Y = _data()
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    tracker = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=2, schedule=3, out=out,
                                 anchors=(0, 6), resume=resume, tol=1e-8)
    if state is not None:
        tracker.load_state_dict(state["tracker"])
    checkpoint = None
    for step in range(start, steps):
        if step == crash_at:
            return checkpoint
        tracker.on_step(step)
        optimizer.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        optimizer.step()
        if step == 7:  # the loop's own checkpoint, before the update of step 8
            checkpoint = {"step": 8, "model": {k: v.clone() for k, v in model.state_dict().items()},
                          "optimizer": optimizer.state_dict(), "tracker": tracker.state_dict()}
    tracker.on_step(steps, force=True)
    tracker.close()
    return checkpoint


VOLATILE = ["wall_time", "cost/seconds", "cost/overhead"]


def test_resume_from_the_loops_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    _loop(tmp_path / "whole", 14)
    checkpoint = _loop(tmp_path / "crashed", 14, crash_at=11)  # rows 9 written after it
    assert ts.load_run(tmp_path / "crashed").metrics["step"].tolist() == [0, 3, 6, 9]
    _loop(tmp_path / "crashed", 14, start=checkpoint["step"], state=checkpoint, resume=True)
    whole = ts.load_run(tmp_path / "whole").metrics.drop(columns=VOLATILE)
    resumed = ts.load_run(tmp_path / "crashed").metrics.drop(columns=VOLATILE)
    pd.testing.assert_frame_equal(resumed, whole, check_exact=True)
    assert ts.load_run(tmp_path / "crashed").status["state"] == "finished"


def test_resume_alone_continues_the_folder_with_its_anchors_and_warm_start(tmp_path):
    checkpoint = _loop(tmp_path / "run", 14, crash_at=11)
    model_state = {"model": checkpoint["model"], "optimizer": checkpoint["optimizer"]}
    X, Y = _data()
    model = _model()
    model.load_state_dict(model_state["model"])
    tracker = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=2, schedule=3,
                                 out=tmp_path / "run", anchors=(0, 6), resume=True, tol=1e-8)
    assert tracker.engine.warm.get("hessian") is not None  # step 9's warm start, tracker.pt
    assert sorted(tracker.engine.group("anchors").bases) == [0, 6]
    row = tracker.on_step(8)
    assert row is None  # not scheduled; rows at step >= 8 are dropped
    row = tracker.on_step(9)
    assert not math.isnan(row["overlap/top/t1=6"]) and not math.isnan(row["overlap/top/t1=0"])
    tracker.close()
    assert ts.load_run(tmp_path / "run").metrics["step"].tolist() == [0, 3, 6, 9]


# ---------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_training_starts(tmp_path):
    X, Y = _data()
    model = _model()

    def make(**kwargs):
        options = {"model": model, "loss_fn": F.cross_entropy, "data": (X, Y), "k": 2}
        options.update(kwargs)
        return ts.SubspaceTracker(**options)

    with pytest.raises(ValueError, match=r"mean over the batch \(reduction='mean'\).*x2"):
        make(loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="sum"))
    with pytest.raises(ValueError, match=r"must return a scalar tensor.*got \(8,\)"):
        make(loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"))
    with pytest.raises(ValueError, match="the model is on cpu but the data is on meta"):
        make(data=(X.to("meta"), Y.to("meta")))
    with pytest.raises(ValueError, match=r"negative steps \[-2\]"):
        make(schedule=[0, -2])
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        make(k=0)
    with pytest.raises(ValueError, match="subset=100 but the data has only 60 examples"):
        make(subset=100)
    with pytest.raises(ValueError, match="unknown logger 'wandb'"):
        make(out=tmp_path / "a", loggers=("wandb",))
    with pytest.raises(ValueError, match="writes into the run folder: pass out=DIR"):
        make(loggers=("csv",))
    with pytest.raises(ValueError, match=r"mode must be 'eval' or 'train'"):
        make(mode="test")
    make(out=tmp_path / "run").close()
    with pytest.raises(RunStoreError, match="already holds a run; pass resume=True"):
        make(out=tmp_path / "run")
    with pytest.raises(RunStoreError, match=r"other settings \(tracker.k differ\)"):
        make(out=tmp_path / "run", k=3, resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunStoreError, match="is a file, not a run folder"):
        make(out=tmp_path / "file")
    tracker = make()
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        tracker.on_step(-1)


def test_the_cli_run_folder_is_refused_as_another_run(tmp_path):
    from experiment_fixtures import tiny_config
    from tinysubspace.experiments.training import run_experiment

    run_experiment(tiny_config(train__steps=2), tmp_path / "cli")
    X, Y = _data()
    with pytest.raises(RunStoreError, match="other settings"):
        ts.SubspaceTracker(_model(), F.cross_entropy, (X, Y), k=3, out=tmp_path / "cli",
                           resume=True)


# ----------------------------------------------------------------------------- torchrun
def _distributed_worker(rank: int, world: int, folder) -> dict:
    """Each rank passes its shard; every rank gets the rows; rank 0 alone writes and logs."""
    X, Y = _data()
    part = ts.runtime.distributed.shard_slice(N)
    model = _model()
    calls = []
    tracker = ts.SubspaceTracker(model, F.cross_entropy, (X[part], Y[part]), k=2,
                                 schedule=[0, 2], out=folder / "run", budget=1.0, anchors=(0,),
                                 tol=1e-10, loggers=("csv", lambda row, step: calls.append(step)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    rows = []
    for step in range(3):
        rows.append(tracker.on_step(step))
        optimizer.zero_grad()
        F.cross_entropy(model(X), Y).backward()  # the same full-batch step on every rank
        optimizer.step()
    tracker.close()
    return {"rows": [r for r in rows if r is not None], "calls": calls}


@pytest.mark.distributed
@pytest.mark.skipif(not (torch.distributed.is_available()
                         and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.slow
def test_under_torchrun_every_rank_gets_the_single_process_rows_and_rank_0_writes(tmp_path):
    from distributed_workers import launch

    first, second = launch(_distributed_worker, tmp_path)
    assert "ok" in first and "ok" in second, (first, second)
    assert first["ok"]["calls"] == [0, 2] and second["ok"]["calls"] == []
    model = _model()
    X, Y = _data()
    single = ts.SubspaceTracker(model, F.cross_entropy, (X, Y), k=2, anchors=(0,), tol=1e-10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = []
    for step in range(3):
        if step in (0, 2):
            expected.append(single.on_step(step, force=True))
        optimizer.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        optimizer.step()
    for mine, theirs, reference in zip(first["ok"]["rows"], second["ok"]["rows"], expected,
                                       strict=True):
        for key in ("train/loss", "train/accuracy", "hessian/eig_1", "hessian/eig_4",
                    "hessian/f_top", "overlap/top/t1=0"):
            assert mine[key] == theirs[key], key  # bit-identical on both ranks
            assert mine[key] == pytest.approx(reference[key], rel=1e-9, abs=1e-12), key
    assert ts.load_run(tmp_path / "run").metrics["step"].tolist() == [0, 2]


def test_the_cli_measures_through_subspace_tracker_only(tmp_path, monkeypatch):
    """One code path: every row of a CLI run is a ``SubspaceTracker.measure`` row, and no module
    but ``subspace_tracker.py`` builds the measuring engine (``Tracker``) itself."""
    import re
    from pathlib import Path

    from experiment_fixtures import tiny_config
    from tinysubspace.experiments.training import run_experiment

    seen = []
    measure = st.SubspaceTracker.measure

    def spy(self, step, **kwargs):
        row = measure(self, step, **kwargs)
        seen.append((step, row["hessian/eig_1"]))
        return row

    monkeypatch.setattr(st.SubspaceTracker, "measure", spy)
    run_experiment(tiny_config(train__steps=9), tmp_path / "cli")
    metrics = ts.load_run(tmp_path / "cli").metrics
    assert [s for s, _ in seen] == metrics["step"].tolist()
    assert [v for _, v in seen] == metrics["hessian/eig_1"].tolist()
    source = Path(st.__file__).parents[1]
    builders = sorted(str(path.relative_to(source)) for path in source.rglob("*.py")
                      if re.search(r"(?<![\w.])Tracker\(", path.read_text()))
    assert builders == ["experiments/subspace_tracker.py"]
