"""Failures a user meets (docs/reliability.md): each gives one line on stderr, a non-zero exit
status, no traceback, a ``status.json`` that says what happened, and loses nothing written.
Also the divergence check, the ETA and the thread count."""

from __future__ import annotations

import ast
import errno
import io
import json
import math
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from experiment_fixtures import TINY
from tinysubspace.cli.main import main
from tinysubspace.experiments import training
from tinysubspace.experiments.catalog import load_experiment
from tinysubspace.experiments.config import TrainConfig
from tinysubspace.experiments.health import RunHealth
from tinysubspace.experiments.progress import Progress
from tinysubspace.results import folder
from tinysubspace.results import store as store_module
from tinysubspace.results.store import load_run
from tinysubspace.runtime import threads

VOLATILE = ["wall_time", "cost/seconds"]


def _sets(**extra: object) -> list[str]:
    return [arg for key, value in {**TINY, **extra}.items() for arg in ("--set", f"{key}={value}")]


def _run(out, *more: str, **extra: object) -> int:
    return main(["run", *_sets(**extra), "--out", str(out), "--quiet", "--threads", "1", *more])


def _config(**extra: object):
    """The config ``tinysubspace run`` builds from :func:`_sets` (for runs made in-process)."""
    return load_experiment("fig1-fc-digits", {**TINY, **extra})


def _status(path) -> dict:
    return json.loads((path / "status.json").read_text())


def _numbers(path) -> tuple[pd.DataFrame, pd.DataFrame]:
    run = load_run(path)
    return run.metrics.drop(columns=VOLATILE), run.minibatch


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted tiny run through the CLI (the reference for resumed ones)."""
    path = tmp_path_factory.mktemp("runs") / "whole"
    assert _run(path) == 0
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------- --out unusable
def test_out_that_is_a_file_is_refused_before_anything_is_loaded(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    assert _run(target) == 2
    assert f"--out {target} is a file, not a folder" in _one_line_error(capsys)
    assert target.read_text() == "x"
    assert _run(target / "sub") == 2
    assert "which is a file" in _one_line_error(capsys)


def test_out_not_writable_is_refused(tmp_path, capsys, monkeypatch):
    """As access(2) answers for a read-only mount or an immutable folder (root included)."""
    monkeypatch.setattr(folder.os, "access", lambda path, mode: False)
    assert _run(tmp_path / "ro" / "run") == 2
    assert f"cannot write in {tmp_path}" in _one_line_error(capsys)
    assert not (tmp_path / "ro").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_out_in_a_read_only_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert _run(locked / "run") == 2
    assert "cannot write in" in _one_line_error(capsys)


def _immutable(path) -> bool:
    """Set the immutable attribute on ``path`` (``chattr +i``: binds root too); ``False``
    where that is not possible (not root, no chattr, a file system without it)."""
    import shutil
    import subprocess

    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def test_out_in_an_immutable_folder_is_refused(tmp_path, capsys):
    """A real immutable folder (no monkeypatching), as the parent of ``--out`` and as ``--out``
    itself: refused before anything is loaded, nothing created."""
    import subprocess

    parent, existing = tmp_path / "parent", tmp_path / "existing"
    parent.mkdir()
    existing.mkdir()
    if not (_immutable(parent) and _immutable(existing)):
        subprocess.run(["chattr", "-i", str(parent), str(existing)], capture_output=True)
        pytest.skip("cannot set the immutable attribute here (needs root and chattr)")
    try:
        assert _run(parent / "run") == 2
        assert f"--out {parent / 'run'}: cannot write in {parent}" in _one_line_error(capsys)
        assert _run(existing) == 2
        assert f"cannot write in {existing}" in _one_line_error(capsys)
        assert not any(parent.iterdir()) and not any(existing.iterdir())
    finally:
        subprocess.run(["chattr", "-i", str(parent), str(existing)], check=True)


def test_a_failed_creation_leaves_no_half_made_folder(tmp_path, monkeypatch, capsys):
    def no_room(path, payload):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(store_module, "atomic_write_bytes", no_room)
    out = tmp_path / "run"
    assert _run(out) == 2
    assert "the disk is full" in _one_line_error(capsys)
    assert not out.exists()  # so that the next try is not told "already holds a run"
    monkeypatch.undo()
    assert _run(out, **{"train.steps": 2}) == 0


# ------------------------------------------------------------------------------ resume
def test_resume_with_only_out_uses_the_runs_config(whole, tmp_path, capsys):
    path = tmp_path / "killed"
    outcome = training.run_experiment(_config(), path, stop_after=13)
    assert outcome.state == "stopped"
    assert main(["run", "--resume", "--out", str(path), "--quiet"]) == 0
    assert load_run(path).status["state"] == "finished"
    pd.testing.assert_frame_equal(_numbers(path)[0], _numbers(whole)[0], check_exact=True)
    pd.testing.assert_frame_equal(_numbers(path)[1], _numbers(whole)[1], check_exact=True)


def test_resume_with_an_edited_config_names_the_keys(whole, tmp_path, capsys):
    path = tmp_path / "edited"
    training.run_experiment(_config(), path, stop_after=5)
    before = (path / "metrics.csv").read_text()
    code = main(["run", *_sets(**{"optim.lr": 0.05, "tracker.k": 2}), "--out", str(path),
                 "--resume", "--quiet"])
    assert code == 2
    err = _one_line_error(capsys)
    assert "optim.lr: 0.1 in the run, 0.05 now" in err and "tracker.k: 3 in the run, 2 now" in err
    assert (path / "metrics.csv").read_text() == before


def test_resume_refuses_a_hand_edited_config_json_naming_the_key(tmp_path, capsys):
    """An edit of config.json after the checkpoint would be ignored (the checkpoint's optimizer
    holds the old learning rate): ``--resume --out`` alone refuses it, naming the key."""
    path = tmp_path / "hand"
    training.run_experiment(_config(), path, stop_after=13)
    config = json.loads((path / "config.json").read_text())
    config["optim"]["lr"] = 0.05
    (path / "config.json").write_text(json.dumps(config))
    before = (path / "metrics.csv").read_text()
    assert main(["run", "--resume", "--out", str(path), "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert "was changed after the last checkpoint" in err
    assert "optim.lr: 0.1 in the run, 0.05 now" in err
    assert (path / "metrics.csv").read_text() == before


def test_a_truncated_checkpoint_is_a_clear_error_and_keeps_the_measurements(tmp_path, capsys):
    path = tmp_path / "cut"
    training.run_experiment(_config(), path, stop_after=13)
    data = (path / "checkpoint.pt").read_bytes()
    (path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    before = (path / "metrics.csv").read_text()
    assert main(["run", "--resume", "--out", str(path), "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert "checkpoint.pt is damaged or incomplete" in err and "metrics.csv are intact" in err
    assert (path / "metrics.csv").read_text() == before
    status = _status(path)
    assert status["state"] == "failed" and "damaged" in status["message"]


class _Payload:
    """Creates a marker file when unpickled without restrictions."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_crafted_checkpoint_runs_no_code_on_resume_or_compare(tmp_path, capsys):
    path = tmp_path / "crafted"
    training.run_experiment(_config(), path, stop_after=9)
    marker = tmp_path / "pwned"
    state = torch.load(path / "checkpoint.pt", weights_only=True)
    state["optimizer"] = {"subspace_sgd": _Payload(marker)}
    torch.save(state, path / "checkpoint.pt")
    torch.load(path / "checkpoint.pt", weights_only=False)  # the payload works unrestricted ...
    assert marker.exists()
    marker.unlink()
    assert main(["run", "--resume", "--out", str(path), "--quiet"]) == 2  # ... not here
    err = _one_line_error(capsys)
    assert "holds more than tensors and plain containers" in err
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err
    assert main(["compare", str(path), "--out", str(tmp_path / "c.png")]) == 2
    assert "holds more than tensors" in _one_line_error(capsys)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["resume", "plot", "report", "table1", "compare"])
def test_a_broken_config_json_is_a_clear_error(command, whole, tmp_path, capsys):
    import shutil

    path = tmp_path / "broken"
    shutil.copytree(whole, path)
    (path / "config.json").write_text('{"name": "x", "optim": {')
    argv = {"resume": ["run", "--resume", "--out", str(path), "--quiet"],
            "plot": ["plot", str(path)], "report": ["report", str(path)],
            "table1": ["table1", str(path)], "compare": ["compare", str(path)]}[command]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "config.json is not valid JSON" in err
    assert (path / "metrics.csv").read_text() == (whole / "metrics.csv").read_text()


# ------------------------------------------------------------------ failures during a run
def test_disk_full_during_a_run_stops_with_a_message_and_resumes(whole, tmp_path, monkeypatch,
                                                                 capsys):
    path = tmp_path / "full"
    real_append = store_module._CsvTable.append
    calls = {"n": 0}

    def append(self, rows):
        calls["n"] += 1
        if calls["n"] > 6:  # the disk fills up after a few measurements
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real_append(self, rows)

    def no_new_files(path_, payload):  # nor can a new file be made
        raise OSError(errno.ENOSPC, "No space left on device", str(path_))

    monkeypatch.setattr(store_module._CsvTable, "append", append)
    real_atomic = store_module.atomic_write_bytes
    monkeypatch.setattr(store_module, "atomic_write_bytes",
                        lambda p, b: no_new_files(p, b) if calls["n"] > 6 else real_atomic(p, b))
    assert _run(path) == 1
    err = _one_line_error(capsys)
    assert "the disk is full" in err and f"--resume --out {path}" in err
    status = _status(path)  # written in place, in the file's own block
    assert status["state"] == "failed" and "the disk is full" in status["message"]
    kept = load_run(path).metrics["step"].tolist()
    assert kept and kept == load_run(whole).metrics["step"].tolist()[: len(kept)]
    monkeypatch.undo()
    assert main(["run", "--resume", "--out", str(path), "--quiet"]) == 0
    pd.testing.assert_frame_equal(_numbers(path)[0], _numbers(whole)[0], check_exact=True)


def test_ctrl_c_says_where_it_stopped_and_how_to_continue(whole, tmp_path, monkeypatch, capsys):
    path = tmp_path / "interrupted"
    real_step = training._Loop.train_step

    def train_step(self, step):
        if step == 10:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(training._Loop, "train_step", train_step)
    assert _run(path) == 130
    err = _one_line_error(capsys)
    assert "stopped by Ctrl-C at step 10" in err
    assert f"continue from the last checkpoint (step 8) with: tinysubspace run --resume " \
           f"--out {path}" in err
    status = _status(path)
    assert status["state"] == "interrupted" and status["step"] == 10
    assert load_run(path).metrics["step"].tolist() == [0, 4, 8]
    monkeypatch.undo()
    assert main(["run", "--resume", "--out", str(path), "--quiet"]) == 0
    pd.testing.assert_frame_equal(_numbers(path)[0], _numbers(whole)[0], check_exact=True)
    pd.testing.assert_frame_equal(_numbers(path)[1], _numbers(whole)[1], check_exact=True)


def test_status_is_current_at_each_checkpoint(tmp_path, monkeypatch):
    seen, real = [], store_module.RunStore.save_checkpoint

    def save_checkpoint(self, state):
        real(self, state)
        seen.append(_status(self.path))

    monkeypatch.setattr(store_module.RunStore, "save_checkpoint", save_checkpoint)
    training.run_experiment(_config(), tmp_path / "run")  # checkpoints every 8 steps
    assert {s["state"] for s in seen} == {"running"}
    assert sorted({s["step"] for s in seen}) == [8, 16, 24]
    assert {"updated", "host", "pid"} <= set(seen[0])
    assert _status(tmp_path / "run")["state"] == "finished"


def test_a_refused_cifar_pickle_names_the_file(tmp_path, capsys):
    import pickle

    root = tmp_path / "data" / "cifar-10-batches-py"
    root.mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return eval, ("1",)

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps({"data": Evil()}))
    code = main(["run", "fig1-convnet-cifar10", "--data-root", str(tmp_path / "data"),
                 "--out", str(tmp_path / "r"), "--quiet", "--threads", "1"])
    assert code == 2
    err = _one_line_error(capsys)
    assert "data_batch_1" in err and "refusing to load builtins.eval" in err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- divergence
def test_divergence_at_a_huge_learning_rate_is_marked_with_exit_1(tmp_path, capsys):
    path = tmp_path / "diverged"
    code = _run(path, **{"optim.lr": 100, "tracker.k": 1, "tracker.anchors": "0",
                         "tracker.save_vectors_at": "0", "tracker.tol": 1e-3})
    assert code == 1
    err = capsys.readouterr().err
    assert "diverged: the full-data training loss was above 10 × its initial" in err
    status, metrics = _status(path), load_run(path).metrics
    losses = metrics["train/loss"].tolist()
    assert status["state"] == "diverged" and status["step"] == metrics["step"].iloc[-1] < 24
    assert all(loss > 10 * losses[0] for loss in losses[-3:])  # 3 in a row, then it stopped
    assert not all(loss > 10 * losses[0] for loss in losses[-4:-1]) or len(losses) == 4


def test_health_rule_by_hand():
    health = RunHealth(TrainConfig(divergence_factor=10, divergence_patience=2))
    assert health.observe({"step": 0, "train/loss": 2.0}) is None
    assert health.observe({"step": 1, "train/loss": 25.0}) is None  # one spike
    assert health.observe({"step": 2, "train/loss": 1.0}) is None  # came back: count resets
    assert health.observe({"step": 3, "train/loss": 21.0}) is None
    assert "2 measurements in a row (30 at step 4)" in health.observe(
        {"step": 4, "train/loss": 30.0})
    again = RunHealth(TrainConfig(divergence_factor=10, divergence_patience=2))
    again.load_state_dict(json.loads(json.dumps(health.state_dict())))
    assert again.initial == 2.0 and again.above == 2
    assert "is nan at step 9" in RunHealth(TrainConfig()).observe({"step": 9,
                                                                   "train/loss": math.nan})
    off = RunHealth(TrainConfig(divergence_factor=0))
    assert all(off.observe({"step": s, "train/loss": 10.0 ** s}) is None for s in range(6))


# ---------------------------------------------------------------------------------- ETA
def test_eta_adds_steps_and_scheduled_measurements_at_their_costs():
    now = [0.0]
    progress = Progress(stream=io.StringIO(), clock=lambda: now[0])
    schedule = list(range(0, 201, 10)) + list(range(300, 1001, 100))  # 21 dense, 8 sparse
    progress.start(1000, 0, schedule)
    measure, step = 2.0, 0.01
    for s in range(0, 50):
        if s in schedule:
            now[0] += measure
            progress.measured({"step": s})
        now[0] += step
        progress.step(s + 1, 0.0)
    left_measurements = len([s for s in schedule if s >= 50])
    expected = (1000 - 50) * step + left_measurements * measure
    assert progress.eta() == pytest.approx(expected, rel=1e-9)
    elapsed = now[0]
    naive = elapsed / 0.05 * 0.95  # what elapsed / fraction said: several times too high
    assert naive > 3 * expected


def test_eta_of_a_resumed_run_and_before_costs_are_known():
    now = [0.0]
    progress = Progress(stream=io.StringIO(), clock=lambda: now[0])
    progress.start(100, 40, [0, 40, 80, 100])  # the measurement at 40 was made before
    assert math.isnan(progress.eta())
    now[0] += 0.5
    progress.step(41, 0.0)
    assert math.isnan(progress.eta())  # 2 measurements left, none timed yet
    now[0] += 3.0
    progress.measured({"step": 80})
    assert progress.eta() == pytest.approx(59 * 0.5 + 1 * 3.0)


# ------------------------------------------------------------------------------ threads
def test_thread_count_precedence():
    env = {"OMP_NUM_THREADS": "3"}
    assert threads.choose_threads(2, 5, {**env, threads.ENV_VAR: "4"}) == (2, "--threads")
    assert threads.choose_threads(None, 5, {**env, threads.ENV_VAR: "4"})[0] == 4
    assert threads.choose_threads(None, 5, env) == (5, "the run being resumed")
    assert threads.choose_threads(None, None, env) == (3, "OMP_NUM_THREADS")
    count, source = threads.choose_threads(None, None, {})
    assert source == "free cores" and 1 <= count <= threads.available_cores()
    with pytest.raises(threads.ThreadsError, match="TINYSUBSPACE_THREADS must be a positive "
                                                  "integer, got 'many'"):
        threads.choose_threads(None, None, {threads.ENV_VAR: "many"})
    with pytest.raises(threads.ThreadsError, match="--threads must be a positive integer"):
        threads.choose_threads(0, None, {})


def test_busy_cores_sees_a_busy_process():
    import subprocess
    import sys

    idle = threads.busy_cores(0.2)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        busy = threads.busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    # the spinner takes a core where it can run (the machine may be loaded already)
    assert busy >= min(idle + 0.5, len(threads._affinity()) - 0.5)


def test_bad_thread_count_on_the_command_line(tmp_path, capsys):
    assert main(["run", "--threads", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--threads must be a positive integer, got 0" in _one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_other_blas_pools_get_one_thread():
    import numpy  # noqa: F401  (loads numpy's OpenBLAS)
    from threadpoolctl import threadpool_info

    previous = torch.get_num_threads()
    try:
        threads.apply_threads(1)
        torch_dir = str(torch.__file__).rsplit("/", 1)[0]
        others = [p for p in threadpool_info()
                  if p["user_api"] == "blas" and not p["filepath"].startswith(torch_dir)]
        assert all(p["num_threads"] == 1 for p in others)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def test_ctrl_c_before_training_began(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "build_problem", interrupted)
    assert _run(tmp_path / "r") == 130
    assert "stopped by Ctrl-C before training began" in _one_line_error(capsys)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ the page itself
DOCS = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
NAMED_TEST = re.compile(r"\b(\w+?)(\.py)?::(test_\w+)")
BENCHMARK = re.compile(r"\bbenchmarks/\w+\.py\b")


def _test_functions(module: str) -> set[str]:
    """Names of the test functions defined in ``tests/<module>.py`` (read, not imported)."""
    path = Path(__file__).resolve().parent / f"{module}.py"
    if not path.is_file():
        return set()
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def _table_rows(text: str) -> list[list[str]]:
    """The body rows of every markdown table (header and ``|---|`` lines left out)."""
    rows, previous = [], ""
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line) \
                and previous.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
        previous = line if line.startswith("|") else ""
    return [row for row in rows if not set("".join(row)) <= set("-|: ")]


def test_every_test_named_in_reliability_md_exists():
    """docs/reliability.md cannot rot: every ``NAME::test_x`` it names is a function in
    ``tests/test_NAME.py`` (or ``tests/NAME.py`` for ``NAME.py::``), every benchmark it names
    exists, and every table row names a test or a benchmark in its last cell (``same``: the
    row above's)."""
    text = DOCS.read_text()
    missing = []
    for prefix, suffix, name in NAMED_TEST.findall(text):
        module = prefix if suffix else f"test_{prefix}"
        if name not in _test_functions(module):
            missing.append(f"{prefix}{suffix}::{name}")
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
    root = DOCS.parents[1]
    assert all((root / b).is_file() for b in BENCHMARK.findall(text))
    rows = _table_rows(text)
    assert len(rows) > 60  # the tables were found
    bare = [row[0] for row in rows
            if not (NAMED_TEST.search(row[-1]) or BENCHMARK.search(row[-1]) or row[-1] == "same")]
    assert not bare, f"rows of docs/reliability.md that name no test: {bare}"


def test_the_page_check_catches_a_misnamed_test():
    """The pattern the check above relies on finds both spellings, and an invented name is not
    found (so the check can fail)."""
    found = NAMED_TEST.findall("x | eigen::test_a, test_report.py::test_b |")
    assert found == [("eigen", "", "test_a"), ("test_report", ".py", "test_b")]
    assert "test_no_such_test_anywhere" not in _test_functions("test_eigen")
    assert "test_single_vector_start_finds_every_copy" in _test_functions("test_eigen")
    assert _table_rows("| a | b |\n|---|---|\n| c | d |\n\n| e |") == [["c", "d"]]
