"""The run store: append-and-flush tables, crash-cut rows, atomic files, resume checks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tinysubspace.results.store import (
    RunStore,
    RunStoreError,
    check_out_folder,
    config_differences,
    load_run,
)

COLUMNS = ["step", "train/loss", "hessian/f_top"]


def _store(tmp_path, config=None):
    store = RunStore(tmp_path / "run", COLUMNS)
    store.create(config or {"name": "x", "meta": {"started": "now"}})
    return store


def test_metrics_round_trip_with_full_precision(tmp_path):
    store = _store(tmp_path)
    store.append_metrics({"step": 0, "train/loss": 2.302585092994046, "hessian/f_top": 0.1})
    store.append_metrics({"step": 5, "train/loss": 1 / 3})  # f_top missing -> NaN
    run = load_run(tmp_path / "run")
    assert list(run.metrics.columns) == COLUMNS
    assert run.metrics["train/loss"].tolist() == [2.302585092994046, 1 / 3]
    assert run.metrics["hessian/f_top"].isna().tolist() == [False, True]
    assert run.status["state"] == "running"


def test_numpy_and_torch_scalars_are_written_as_numbers(tmp_path):
    store = _store(tmp_path)
    store.append_metrics({"step": np.int64(3), "train/loss": np.float64(0.1),
                          "hessian/f_top": torch.tensor(0.25, dtype=torch.float64)})
    store.append_metrics({"step": 4, "train/loss": np.float32("nan"), "hessian/f_top": True})
    text = (tmp_path / "run" / "metrics.csv").read_text()
    assert text.splitlines()[1:] == ["3,0.1,0.25", "4,,1.0"]
    metrics = load_run(tmp_path / "run").metrics
    assert metrics["step"].tolist() == [3, 4] and metrics["train/loss"].iloc[0] == 0.1


def test_rows_may_come_from_a_generator(tmp_path):
    store = _store(tmp_path)
    store.minibatch.append({"step": s, "minibatch/loss": 1.0 / (s + 1)} for s in range(3))
    assert load_run(tmp_path / "run").minibatch["step"].tolist() == [0, 1, 2]


def test_unknown_column_is_refused(tmp_path):
    with pytest.raises(RunStoreError, match=r"columns \['bogus'\] are not in metrics\.csv"):
        _store(tmp_path).append_metrics({"step": 0, "bogus": 1.0})


def test_a_row_cut_by_a_crash_is_ignored_on_read_and_dropped_on_resume(tmp_path):
    store = _store(tmp_path)
    store.append_metrics({"step": 0, "train/loss": 1.0, "hessian/f_top": 0.5})
    store.append_metrics({"step": 4, "train/loss": 0.9, "hessian/f_top": 0.6})
    with open(store.metrics.path, "a") as handle:
        handle.write("8,0.8")  # kill -9 in the middle of a write
    assert load_run(store.path).metrics["step"].tolist() == [0, 4]
    store.save_checkpoint({"step": 4})
    store.resume({"name": "x", "meta": {"started": "later"}})
    assert load_run(store.path).metrics["step"].tolist() == [0, 4]
    assert store.metrics.path.read_text().endswith("\n")


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
    store = _store(tmp_path)
    for step in (0, 4, 8, 12):
        store.append_metrics({"step": step, "train/loss": 1.0})
    store.append_minibatch([{"step": s, "minibatch/loss": 1.0} for s in range(12)])
    store.save_checkpoint({"step": 8})
    assert store.resume({"name": "x"})["step"] == 8
    run = load_run(store.path)
    assert run.metrics["step"].tolist() == [0, 4, 8]  # the measurement at 8 precedes the checkpoint
    assert run.minibatch["step"].tolist() == list(range(8))  # the update at 8 follows it


def test_resume_refuses_another_config_and_a_missing_run(tmp_path):
    store = _store(tmp_path, {"name": "x", "optim": {"lr": 0.1}})
    with pytest.raises(RunStoreError, match="was made with another config"):
        store.resume({"name": "x", "optim": {"lr": 0.2}})
    with pytest.raises(RunStoreError, match="nothing to resume"):
        RunStore(tmp_path / "empty", COLUMNS).resume({"name": "x"})


def test_create_refuses_to_overwrite_a_run(tmp_path):
    _store(tmp_path)
    with pytest.raises(RunStoreError, match="already holds a run; use --resume"):
        _store(tmp_path)


def test_checkpoint_and_arrays_are_written_atomically(tmp_path):
    store = _store(tmp_path)
    store.save_checkpoint({"step": 3, "w": torch.arange(4.0)})
    store.save_checkpoint({"step": 7, "w": torch.ones(2)})
    assert store.load_checkpoint()["step"] == 7
    assert not [p for p in store.path.iterdir() if p.name.endswith(".tmp")]
    store.save_eigenvectors(7, {"step": 7, "vectors": torch.eye(3)})
    run = load_run(store.path)
    assert run.eigenvector_steps == [7]
    assert torch.equal(run.eigenvectors(7)["vectors"], torch.eye(3))
    with pytest.raises(RunStoreError, match=r"no eigenvectors saved at step 5 .* \[7\]"):
        run.eigenvectors(5)


def test_config_is_saved_as_json(tmp_path):
    store = _store(tmp_path, {"name": "x", "model": {"widths": [1, 2]}})
    assert json.loads((store.path / "config.json").read_text())["model"]["widths"] == [1, 2]
    assert load_run(store.path).config["name"] == "x"


def test_load_run_of_a_non_run_folder(tmp_path):
    with pytest.raises(RunStoreError, match="is not a run folder"):
        load_run(tmp_path)


class _Payload:
    """Runs a shell command when unpickled without restrictions."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_eigenvector_files_load_tensors_only(tmp_path):
    store = _store(tmp_path)
    payload = {"step": 0, "values": torch.ones(2), "vectors": torch.eye(3, 2),
               "param_names": ["w"], "param_shapes": [[3]]}
    store.save_eigenvectors(0, payload)
    saved = load_run(tmp_path / "run").eigenvectors(0)
    assert torch.equal(saved["vectors"], payload["vectors"]) and saved["param_shapes"] == [[3]]
    marker = tmp_path / "pwned"
    store.save_eigenvectors(7, {"vectors": _Payload(marker)})
    with pytest.raises(RunStoreError, match=r"step_00000007\.pt holds more than tensors"):
        load_run(tmp_path / "run").eigenvectors(7)
    assert not marker.exists()


def test_run_folder_files_honour_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        store = _store(tmp_path)
        store.save_checkpoint({"step": 1, "w": torch.ones(2)})
        store.save_eigenvectors(1, {"vectors": torch.eye(2)})
        store.save_spectrum({"eigenvalues": np.ones(3)})
        store.metrics.keep(lambda s: True)  # rewritten atomically, as on --resume
        files = [p for p in store.path.rglob("*") if p.is_file()]
        assert len(files) == 7
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {
            p.name: "0o644" for p in files}
        os.umask(0o077)
        store.write_status("running", 2)
        assert oct((store.path / "status.json").stat().st_mode & 0o777) == "0o600"
    finally:
        os.umask(previous)


def test_a_crafted_checkpoint_is_refused_without_running_code(tmp_path):
    store = _store(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"step": 3, "x": _Payload(marker)}, store.path / "checkpoint.pt")
    with pytest.raises(RunStoreError, match=r"checkpoint\.pt holds more than tensors and plain "
                                            r"containers; refusing to load it \(.*posix\.system"
                       ) as error:
        store.load_checkpoint()
    assert "weights_only" not in str(error.value)
    with pytest.raises(RunStoreError, match="holds more than tensors"):
        store.resume({"name": "x"})
    assert not marker.exists()
    assert json.loads((store.path / "status.json").read_text())["state"] == "failed"


def test_a_checkpoint_that_resume_could_not_read_is_refused_when_written(tmp_path):
    with pytest.raises(RunStoreError, match=r"a checkpoint may hold only tensors and plain "
                                            r"containers: .*numpy"):
        _store(tmp_path).save_checkpoint({"step": 1, "rng": np.random.default_rng(0)})
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("content, message", [
    (b"", "damaged or incomplete"), (b"PK\x03\x04 cut", "damaged or incomplete"),
    (None, "damaged or incomplete"), (b"[1, 2]", "damaged or incomplete")])
def test_a_damaged_checkpoint_is_a_clear_error(tmp_path, content, message):
    store = _store(tmp_path)
    if content is None:  # a real checkpoint cut in half
        store.save_checkpoint({"step": 4, "w": torch.ones(1000)})
        data = (store.path / "checkpoint.pt").read_bytes()
        content = data[: len(data) // 2]
    (store.path / "checkpoint.pt").write_bytes(content)
    with pytest.raises(RunStoreError, match=message):
        store.load_checkpoint()


def test_config_differences_name_the_keys():
    saved = {"name": "x", "optim": {"lr": 0.1, "batch_size": 64}, "model": {"widths": [5]},
             "meta": {"started": "then"}}
    mine = {"name": "x", "optim": {"lr": 0.2, "batch_size": 64}, "model": {"widths": (5, 5)},
            "meta": {"started": "now"}, "tracker": {"new_key": 1}}
    assert config_differences(saved, mine) == ["model.widths: [5] in the run, [5, 5] now",
                                               "optim.lr: 0.1 in the run, 0.2 now"]
    assert config_differences(saved, saved) == []


def test_broken_json_files(tmp_path):
    store = _store(tmp_path)
    (store.path / "status.json").write_text("{")
    assert load_run(store.path).status["state"] == "unknown"  # still readable
    (store.path / "config.json").write_text('{"name": ')
    with pytest.raises(RunStoreError, match=r"config\.json is not valid JSON"):
        load_run(store.path)
    (store.path / "config.json").write_text("[1]")
    with pytest.raises(RunStoreError, match=r"must hold a JSON object .* got list"):
        load_run(store.path)


def test_check_out_folder(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunStoreError, match="is a file, not a folder"):
        check_out_folder(tmp_path / "file")
    with pytest.raises(RunStoreError, match="which is a file"):
        check_out_folder(tmp_path / "file" / "run")
    with pytest.raises(RunStoreError, match="nothing to resume"):
        check_out_folder(tmp_path / "new", resume=True)
    check_out_folder(tmp_path / "new" / "deeper")  # fine: nothing made
    assert not (tmp_path / "new").exists()
    from tinysubspace.results import folder

    monkeypatch.setattr(folder.os, "access", lambda path, mode: False)
    with pytest.raises(RunStoreError, match="cannot write in"):
        check_out_folder(tmp_path / "new")


def test_disk_full_status_is_written_in_place(tmp_path, monkeypatch):
    store = _store(tmp_path)
    from tinysubspace.results import store as store_module

    def full(path, payload):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(store_module, "atomic_write_bytes", full)
    with pytest.raises(OSError):
        store.write_status("failed", 3, "disk full")
    assert store.write_status("failed", 3, "disk full", best_effort=True)
    assert json.loads((store.path / "status.json").read_text())["message"] == "disk full"


def test_resume_refuses_tables_with_other_columns(tmp_path):
    store = _store(tmp_path)
    store.append_metrics({"step": 0, "train/loss": 1.0})
    other = RunStore(store.path, ["step", "train/loss", "hessian/f_top", "hessian/new"])
    with pytest.raises(RunStoreError, match=r"other columns .*new: \['hessian/new'\]"):
        other.resume({"name": "x"})
    assert load_run(store.path).metrics["step"].tolist() == [0]


def test_damaged_tables_and_foreign_checkpoints(tmp_path):
    store = _store(tmp_path)
    (store.path / "metrics.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RunStoreError, match=r"metrics\.csv is not a readable CSV table"):
        load_run(store.path)
    (store.path / "metrics.csv").write_text("")  # emptied: no rows, not an error
    assert load_run(store.path).metrics.empty
    torch.save([1, 2, 3], store.path / "checkpoint.pt")
    with pytest.raises(RunStoreError, match=r"is not a tinysubspace checkpoint \(no integer "
                                            r"'step'\)"):
        store.load_checkpoint()


# ------------------------------------------------------- damage found on reading (issue 24)
def _damage(path):
    """``load_run(path)`` and the RunDamageWarning messages it gave."""
    import warnings

    from tinysubspace.results.damage import RunDamageWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = load_run(path)
    notes = [str(w.message) for w in caught if issubclass(w.category, RunDamageWarning)]
    assert list(run.damage) == notes
    return run, notes


def test_damage_to_a_finished_run_is_said_not_hidden(tmp_path, capsys):
    """Was silent: a finished run's cut-short last row dropped (status step 300, data ending at
    290), duplicated rows accepted, a missing eigenvector file replaced by the nearest step."""
    from run_fixtures import write_run
    from tinysubspace.cli.main import main
    from tinysubspace.plots.arrays import figure_top_eigenvector

    path = write_run(tmp_path / "run")
    config = json.loads((path / "config.json").read_text())
    config["tracker"]["save_vectors_at"] = [0, 100, 200]
    (path / "config.json").write_text(json.dumps(config))
    clean, notes = _damage(path)
    assert notes == [] and clean.metrics["step"].iloc[-1] == 300
    text = (path / "metrics.csv").read_text()
    (path / "metrics.csv").write_text(text[: text.rfind("\n", 0, -1) + 12])  # row 300 cut
    run, notes = _damage(path)
    assert run.metrics["step"].iloc[-1] == 290
    assert len(notes) == 1 and "metrics.csv: its last row is cut short ('300," in notes[0]
    assert "status.json says the run finished at step 300; the data ends at step 290" in notes[0]
    assert main(["plot", str(path), "--figure", "1", "--out", str(tmp_path / "f")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "its last row is cut short" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    status = json.loads((path / "status.json").read_text())
    (path / "status.json").write_text(json.dumps({**status, "state": "running"}))
    assert _damage(path)[1] == []  # a running run's cut row: the expected mark of a crash
    (path / "status.json").write_text(json.dumps(status))
    (path / "metrics.csv").write_text(text)
    lines = text.splitlines(keepends=True)
    (path / "metrics.csv").write_text("".join(lines[:3] + lines[2:3] + lines[3:]))  # step 10 x2
    run, notes = _damage(path)
    assert run.metrics["step"].tolist() == clean.metrics["step"].tolist()
    assert notes == [f"{path / 'metrics.csv'}: steps 10 have more than one row (a run writes one "
                     "per measured step); the identical copies were left out"]
    other = lines[2].replace(lines[2].split(",")[3], "0.5", 1)
    (path / "metrics.csv").write_text("".join([*lines[:3], other, *lines[3:]]))
    run, notes = _damage(path)
    assert (run.metrics["step"] == 10).sum() == 2 and "rows of steps 10 differ" in notes[0]
    (path / "metrics.csv").write_text(text)
    (path / "eigenvectors" / "step_00000100.pt").unlink()
    run, notes = _damage(path)
    assert notes == [f"{path}/eigenvectors: step_00000100.pt missing (tracker.save_vectors_at "
                     "lists step 100, which was measured); figures of eigenvectors use the "
                     "saved steps [0, 200]"]
    figure = figure_top_eigenvector(run, steps=[100, 200])
    assert [ax.get_title() for ax in figure.axes[:2]] == ["(a) step 0 (none saved at 100)",
                                                          "(b) step 200"]
