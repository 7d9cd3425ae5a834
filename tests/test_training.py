"""Training with the tracker: runs, resume after a crash (also kill -9), divergence."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from experiment_fixtures import TINY, tiny_config
from tinysubspace.experiments.build import batch_indices, build_problem
from tinysubspace.experiments.training import minibatch_step, run_experiment
from tinysubspace.results.store import load_run

VOLATILE = ["wall_time", "cost/seconds"]  # the only columns allowed to differ between runs


def _numbers(path) -> tuple[pd.DataFrame, pd.DataFrame]:
    run = load_run(path)
    return run.metrics.drop(columns=VOLATILE), run.minibatch


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "whole"
    outcome = run_experiment(tiny_config(), path)
    assert outcome.state == "finished" and outcome.step == 24
    return path


def test_a_run_writes_every_measurement_and_the_minibatch_table(uninterrupted):
    run = load_run(uninterrupted)
    assert run.metrics["step"].tolist() == [0, 4, 8, 12, 16, 24]
    assert run.minibatch["step"].tolist() == list(range(24))
    assert run.status["state"] == "finished"
    assert run.eigenvector_steps == [0, 8]
    assert run.config["meta"]["versions"]["torch"] == torch.__version__
    assert (run.metrics["hessian/converged"] == 1).all()
    assert run.metrics["train/loss"].iloc[-1] < run.metrics["train/loss"].iloc[0]
    assert ((run.metrics["hessian/f_top"] >= 0) & (run.metrics["hessian/f_top"] <= 1)).all()


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    path = tmp_path / "crashed"
    first = run_experiment(tiny_config(), path, stop_after=13)  # dies between checkpoints 8 and 16
    assert first.state == "stopped"
    assert load_run(path).metrics["step"].max() == 12  # rows after the checkpoint exist on disk
    again = run_experiment(tiny_config(), path, resume=True)
    assert again.state == "finished"
    whole, resumed = _numbers(uninterrupted), _numbers(path)
    pd.testing.assert_frame_equal(resumed[0], whole[0], check_exact=True)
    pd.testing.assert_frame_equal(resumed[1], whole[1], check_exact=True)


@pytest.mark.slow
def test_resume_after_kill_9_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    path = tmp_path / "killed"
    sets = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    sets += ["--set", "train.checkpoint_every=4", "--set", "train.steps=24"]
    command = [sys.executable, "-m", "tinysubspace", "run", "fig1-fc-digits", "--out", str(path),
               "--quiet", *sets]
    # the same torch thread count as this process: reductions then add in the same order
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (path / "checkpoint.pt").exists() and len(load_run(path).metrics) >= 3:
            break
        time.sleep(0.02)
    if process.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert load_run(path).status["state"] == "running"
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    expected = run_experiment(tiny_config(train__checkpoint_every=4, name="fig1-fc-digits"),
                              tmp_path / "reference")
    assert expected.state == "finished"
    pd.testing.assert_frame_equal(_numbers(path)[0], _numbers(tmp_path / "reference")[0],
                                  check_exact=True)
    pd.testing.assert_frame_equal(_numbers(path)[1], _numbers(tmp_path / "reference")[1],
                                  check_exact=True)


def test_divergence_stops_with_a_message_and_keeps_measurements(tmp_path):
    config = tiny_config(data__name="sine", data__n=200, model__activation="linear",
                         train__loss="mse", optim__lr=50.0, tracker__k=1,
                         tracker__anchors="0", tracker__save_vectors_at="0")
    outcome = run_experiment(config, tmp_path / "diverged")
    assert outcome.state == "diverged"
    assert "diverged" in outcome.message or "non-finite" in outcome.message
    run = load_run(tmp_path / "diverged")
    assert run.status["state"] == "diverged" and len(run.metrics) >= 1
    assert run.metrics["step"].iloc[0] == 0


def test_minibatch_overlap_is_eq_3_on_the_minibatch():
    problem = build_problem(tiny_config())
    X, Y = problem.tensors("train")
    index = batch_indices(len(X), 16, seed=0, step=3)
    model = problem.model
    loss, overlap = minibatch_step(model, problem.loss_fn, X[index], Y[index], with_overlap=True)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    from tinysubspace import HessianOperator, gradient_overlap

    op = HessianOperator(model, problem.loss_fn, (X[index], Y[index]), dtype=torch.float64)
    op_loss, g = op.loss_and_gradient()
    assert loss == pytest.approx(op_loss, rel=1e-5)
    assert torch.allclose(grads, g, rtol=1e-4, atol=1e-7)
    assert overlap == pytest.approx(gradient_overlap(g, op @ g), abs=1e-4)
    _, no_overlap = minibatch_step(model, problem.loss_fn, X[index], Y[index], with_overlap=False)
    assert math.isnan(no_overlap)


def test_batches_cover_each_epoch_once():
    seen = torch.cat([batch_indices(50, 16, seed=3, step=s) for s in range(4)])
    assert sorted(seen.tolist()) == list(range(50))
    assert not torch.equal(batch_indices(50, 16, 3, 0), batch_indices(50, 16, 3, 4))


def test_run_without_a_folder_and_training_leaves_global_rng(tmp_path):
    state = torch.get_rng_state()
    outcome = run_experiment(tiny_config(train__steps=4), None)
    assert outcome.state == "finished"
    assert torch.equal(state, torch.get_rng_state())


def test_epochs_set_the_number_of_steps():
    from tinysubspace.experiments.build import with_steps_from_epochs

    config = tiny_config(train__epochs=2.5)  # 120 examples, batches of 16: 7.5 steps an epoch
    assert with_steps_from_epochs(config, 120).train.steps == 19
    assert with_steps_from_epochs(tiny_config(), 120).train.steps == 24  # epochs unset
    with pytest.raises(ValueError, match=r"train\.epochs must be positive"):
        with_steps_from_epochs(tiny_config(train__epochs=0), 120)
