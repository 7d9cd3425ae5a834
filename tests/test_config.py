"""Experiment configs: overrides, type coercion, unknown keys, the experiment registry."""

from __future__ import annotations

import json

import pytest

from tinysubspace.experiments.catalog import DEFAULT_EXPERIMENT, experiment_names, load_experiment
from tinysubspace.experiments.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    parse_assignment,
)


def test_overrides_coerce_strings_to_field_types():
    config = apply_overrides(ExperimentConfig(), {
        "optim.lr": "0.01", "optim.batch_size": "256", "model.widths": "32,32",
        "data.root": "none", "data.random_labels": "true", "tracker.anchors": "[0, 7]"})
    assert config.optim.lr == 0.01 and config.optim.batch_size == 256
    assert config.model.widths == (32, 32) and config.data.root is None
    assert config.data.random_labels is True and config.tracker.anchors == (0, 7)


def test_nested_overrides_as_from_toml():
    config = apply_overrides(ExperimentConfig(), {"optim": {"lr": 0.5}, "description": "x"})
    assert config.optim.lr == 0.5 and config.description == "x"


@pytest.mark.parametrize("update, message", [
    ({"optim.lrr": 1}, r"unknown key 'optim\.lrr'; known keys: optim\.name, optim\.lr"),
    ({"optimizer.lr": 1}, r"unknown section 'optimizer' in 'optimizer\.lr'; known sections"),
    ({"optim.batch_size": "many"}, r"optim\.batch_size must be int, got 'many'"),
    ({"optim.batch_size": 2.5}, r"optim\.batch_size must be an integer"),
    ({"data.random_labels": "maybe"}, r"data\.random_labels must be true or false"),
    ({"optim": 3}, r"'optim' is a section; set its keys as optim\.KEY=VALUE"),
    ({"optim.lr": "nan"}, r"optim\.lr must be a finite number, got 'nan'"),
    ({"optim.lr": float("inf")}, r"optim\.lr must be a finite number, got inf"),
    ({"optim.batch_size": True}, r"optim\.batch_size must be int, got True"),
    ({"colour": "red"}, r"unknown key 'colour'"),
])
def test_bad_overrides_are_rejected_with_the_known_keys(update, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(ExperimentConfig(), update)


def test_parse_assignment():
    assert parse_assignment("optim.lr=0.01") == ("optim.lr", "0.01")
    assert parse_assignment(" a = b=c ") == ("a", "b=c")
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        parse_assignment("optim.lr")


def test_config_round_trips_through_json():
    config = load_experiment("table1-fc-sine-regression")
    again = config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    assert again == config


@pytest.mark.parametrize("name", experiment_names())
def test_every_experiment_resolves(name):
    config = load_experiment(name)
    assert config.name == name and config.description
    assert config.train.steps > 0 and config.tracker.k >= 1


def test_registry_holds_the_paper_settings_and_local_variants():
    names = set(experiment_names())
    assert DEFAULT_EXPERIMENT == "fig1-fc-digits" and DEFAULT_EXPERIMENT in names
    for row in ("table1-softmax-mnist", "table1-fc-sine-regression", "fig1-resnet18-cifar10",
                "table1-convnet-adam-cifar10", "appB-even-odd-mnist"):
        assert row in names
    assert "table1-softmax-digits" in names and "table1-softmax-fashion" in names
    assert "table1-convnet-adam-fashion" in names
    assert "table1-convnet-adam-digits" not in names  # the ConvNet needs images of 10×10 or more


def test_every_table1_row_is_a_row_of_the_papers_table():
    """`tinysubspace table1 runs/` refuses a run whose table1_row is unknown: no experiment may
    carry one (Fig. 1's settings are no Table 1 row)."""
    from tinysubspace.results.table1 import TABLE1_ROWS

    known = {row.row_id for row in TABLE1_ROWS}
    wrong = {name: load_experiment(name).table1_row for name in experiment_names()}
    wrong = {name: row for name, row in wrong.items() if row is not None and row not in known}
    assert wrong == {}
    rows = {load_experiment(name).table1_row for name in experiment_names()}
    assert known <= rows  # every row of the paper has an experiment


def test_variants_change_only_the_data():
    base, variant = load_experiment("table1-fc-lr0.01-mnist"), load_experiment(
        "table1-fc-lr0.01-fashion")
    assert variant.data.name == "fashion-mnist" and base.data.name == "mnist"
    assert variant.optim == base.optim and variant.model == base.model
    assert variant.table1_row == base.table1_row == "fc-mnist-lr0.01"


def test_unknown_experiment_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown experiment 'fig99'; known experiments: .*"
                                          r"fig1-fc-digits"):
        load_experiment("fig99")


@pytest.mark.parametrize("update, message", [
    ({"train.steps": -5}, r"train\.steps must be at least 0, got -5"),
    ({"optim.batch_size": 0}, r"optim\.batch_size must be at least 1, got 0"),
    ({"train.checkpoint_every": 0}, r"train\.checkpoint_every must be at least 1, got 0"),
    ({"optim.lr": 0}, r"optim\.lr must be positive, got 0\.0"),
    ({"optim.lr": -0.1}, r"optim\.lr must be positive, got -0\.1"),
    ({"optim.momentum": 1.5}, r"optim\.momentum must be in \[0, 1\], got 1\.5"),
    ({"optim.beta2": 1}, r"optim\.beta2 must be in \[0, 1\), got 1\.0"),
    ({"tracker.tol": 0}, r"tracker\.tol must be in \(0, 1\), got 0\.0"),
    ({"tracker.k": 0}, r"tracker\.k must be at least 1, got 0"),
    ({"tracker.dense_every": 0}, r"tracker\.dense_every must be at least 1"),
    ({"tracker.anchors": "0,-50"}, r"tracker\.anchors must be at least 0, got \(0, -50\)"),
    ({"model.widths": "100,0"}, r"model\.widths must be at least 1, got \(100, 0\)"),
    ({"data.n_train": 0}, r"data\.n_train must be at least 1, got 0"),
    ({"train.epochs": 0}, r"train\.epochs must be positive, got 0\.0"),
    ({"tracker.spectrum": "full"}, r"tracker\.spectrum must be one of none, exact, slq, got "
                                   r"'full'"),
    ({"tracker.mode": "training"}, r"tracker\.mode must be one of eval, train"),
    ({"train.divergence_factor": 0.5}, r"train\.divergence_factor must be 0 \(no check\) or at "
                                       r"least 1, got 0\.5"),
])
def test_values_out_of_range_are_refused_when_the_config_is_built(update, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(ExperimentConfig(), update)
    with pytest.raises(ConfigError, match=message):  # also from an experiment's name
        load_experiment(DEFAULT_EXPERIMENT, {k: str(v) for k, v in update.items()})


def test_values_at_the_edges_of_their_ranges_are_accepted():
    config = apply_overrides(ExperimentConfig(), {
        "train.steps": 0, "optim.batch_size": 1, "optim.momentum": 1.0, "tracker.k": 1,
        "data.n_train": None, "train.divergence_factor": 0, "tracker.minibatch_every": 0})
    assert config.train.steps == 0 and config.data.n_train is None


def test_every_range_names_a_field():
    from dataclasses import fields

    from tinysubspace.experiments.config import CHOICES, RANGES, SECTIONS

    known = {f"{section}.{f.name}" for section in SECTIONS
             for f in fields(getattr(ExperimentConfig(), section))}
    assert set(RANGES) <= known and set(CHOICES) <= known
    assert {"train.steps", "optim.batch_size", "train.checkpoint_every", "optim.lr",
            "tracker.k", "tracker.tol"} <= set(RANGES)


def test_a_misspelt_key_gets_did_you_mean():
    with pytest.raises(ConfigError, match=r"; did you mean optim\.batch_size\?$"):
        apply_overrides(ExperimentConfig(), {"optim.batchsize": 3})
    with pytest.raises(ConfigError, match=r"unknown experiment 'fig1-fc-digts'; did you mean "
                                          r"fig1-fc-digits"):
        load_experiment("fig1-fc-digts")


# ---------------------------------------------------------------- renamed keys (issue 22)
def test_the_old_chunk_key_works_from_set_toml_and_an_old_config_json():
    """``tracker.hvp_batch_size`` is the old name of ``tracker.chunk_size`` (RENAMED_KEYS)."""
    import tomllib

    from tinysubspace.experiments.config import RENAMED_KEYS
    assert RENAMED_KEYS["tracker.hvp_batch_size"] == "tracker.chunk_size"
    key, value = parse_assignment("tracker.hvp_batch_size=77")  # --set
    assert load_experiment(DEFAULT_EXPERIMENT, {key: value}).tracker.chunk_size == 77
    toml = tomllib.loads("[tracker]\nhvp_batch_size = 33\n[optim]\nbatch_size = 8\n")
    config = apply_overrides(ExperimentConfig(), toml)
    assert config.tracker.chunk_size == 33 and config.optim.batch_size == 8  # not a chunk
    saved = config_to_dict(ExperimentConfig())  # config.json of a run made before the rename
    saved["tracker"]["hvp_batch_size"] = 123
    del saved["tracker"]["chunk_size"]
    assert config_from_dict(json.loads(json.dumps(saved))).tracker.chunk_size == 123
    assert load_experiment("fig1-fc-mnist").tracker.chunk_size == 10000  # shipped TOML: new key


def test_the_old_and_new_chunk_key_together_are_refused():
    with pytest.raises(ConfigError, match=r"tracker\.hvp_batch_size is the old name of "
                                          r"tracker\.chunk_size; give only tracker\.chunk_size"):
        apply_overrides(ExperimentConfig(), {"tracker": {"hvp_batch_size": 5, "chunk_size": 6}})
    with pytest.raises(ConfigError, match=r"tracker\.chunk_size must be at least 1, got 0"):
        apply_overrides(ExperimentConfig(), {"tracker.hvp_batch_size": 0})  # checked as new


def test_an_old_run_folder_resumes_with_the_renamed_key(tmp_path):
    """``config_differences`` compares an old ``hvp_batch_size`` under its new name: the same
    value resumes, another value is reported (before the rename it was silently skipped)."""
    from tinysubspace.experiments.config import RENAMED_KEYS
    from tinysubspace.results.store import RunStore, RunStoreError, config_differences
    new = config_to_dict(apply_overrides(ExperimentConfig(), {"tracker.chunk_size": 64}))
    old = json.loads(json.dumps(new))
    old["tracker"]["hvp_batch_size"] = old["tracker"].pop("chunk_size")
    assert config_differences(old, new, RENAMED_KEYS) == []
    other = config_to_dict(apply_overrides(ExperimentConfig(), {"tracker.chunk_size": 32}))
    assert config_differences(old, other, RENAMED_KEYS) == [
        "tracker.chunk_size: 64 in the run, 32 now"]
    store = RunStore(tmp_path / "run", ["step"])
    store.create(old)
    assert store.resume(new, RENAMED_KEYS) is None  # no checkpoint yet: from step 0
    with pytest.raises(RunStoreError, match=r"tracker\.chunk_size: 64 in the run, 32 now"):
        store.resume(other, RENAMED_KEYS)
