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
