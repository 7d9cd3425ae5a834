"""The ``tinysubspace`` command: list, run (with its errors), and the read-only commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from experiment_fixtures import TINY
from tinysubspace.cli.main import COMMANDS, build_parser, main
from tinysubspace.results.store import load_run


def _sets(**extra: object) -> list[str]:
    return [arg for key, value in {**TINY, **extra}.items() for arg in ("--set", f"{key}={value}")]


def test_every_command_is_available():
    for name in COMMANDS:
        argv = [name, "x"] if name in ("plot", "report", "compare", "blocks") else [name]
        for parser in (build_parser(), build_parser(name)):
            args = parser.parse_args(argv)
            assert args.command == name and callable(args._main), name


def test_a_command_imports_only_its_own_module():
    """``tinysubspace list`` loads the list command, not the report's or the plots' modules."""
    code = ("import sys; from tinysubspace.cli.main import main; main(['list']); "
            "print(sorted(m for m in sys.modules if m.startswith('tinysubspace.cli.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    assert "tinysubspace.cli.list_experiments" in out
    for other in ("run", "report", "plot", "blocks", "compare", "toy"):
        assert f"'tinysubspace.cli.{other}'" not in out, out


def test_list_shows_the_default_and_descriptions(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "* fig1-fc-digits" in out and "table1-softmax-mnist" in out and "Table 1" in out


def test_unknown_experiment_is_an_error_listing_known_ones(capsys, tmp_path):
    assert main(["run", "nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nope'; known experiments:" in err and "fig1-fc-digits" in err
    assert not (tmp_path / "r").exists()


def test_a_misspelt_experiment_gets_did_you_mean(capsys, tmp_path):
    assert main(["run", "fig1-fc-digit", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'fig1-fc-digit'; did you mean fig1-fc-digits" in err
    assert "known experiments:" not in err  # not the whole list when a close name exists


def test_a_value_out_of_range_is_refused_before_the_folder_is_made(capsys, tmp_path):
    for key, value, message in [("train.steps", -5, "train.steps must be at least 0, got -5"),
                                ("optim.batch_size", 0, "optim.batch_size must be at least 1"),
                                ("train.checkpoint_every", 0, "train.checkpoint_every must be")]:
        assert main(["run", "--set", f"{key}={value}", "--out", str(tmp_path / "r")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "r").exists()


def test_unknown_key_is_an_error_listing_known_keys(capsys, tmp_path):
    assert main(["run", "--set", "optim.learning_rate=1", "--out", str(tmp_path / "r")]) == 2
    assert "unknown key 'optim.learning_rate'; known keys: optim.name, optim.lr" in (
        capsys.readouterr().err)
    assert main(["run", "--set", "optim.lrr=1", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip().endswith("did you mean optim.lr?")


def test_missing_data_is_an_error_saying_where_it_looked(capsys, tmp_path):
    code = main(["run", "table1-softmax-mnist", "--data-root", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err


def test_resume_needs_out(capsys):
    assert main(["run", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


@pytest.mark.slow
def test_run_then_plot_table_and_report(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["run", *_sets(), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "f_top" in printed and "overlap(g,Hg)" in printed and str(out) in printed
    assert load_run(out).status["state"] == "finished"
    assert main(["plot", str(out), "--figure", "1"]) == 0
    assert list((out / "figures").glob("*.png"))
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").stat().st_size > 1000


def test_rerun_into_an_existing_folder_is_refused(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["run", *_sets(**{"train.steps": 2}), "--out", str(out), "--quiet"]) == 0
    assert main(["run", *_sets(**{"train.steps": 2}), "--out", str(out), "--quiet"]) == 2
    assert "already holds a run; use --resume" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "tinysubspace" in capsys.readouterr().out


def test_run_help_says_how_to_see_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Every key and its default: `tinysubspace config EXPERIMENT`" in out
    assert "--threads N" in out and "TINYSUBSPACE_THREADS" in out


def test_no_arguments_prints_usage_and_starts_nothing(capsys, monkeypatch):
    import tinysubspace.cli.run as run_command

    monkeypatch.setattr(run_command, "run_experiment", lambda *a, **k: pytest.fail("trained"))
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tinysubspace") and "Start with `tinysubspace run`" in out


def test_version(capsys):
    from tinysubspace import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tinysubspace {__version__}"


def test_config_prints_every_key_with_its_value(capsys):
    from dataclasses import fields

    from tinysubspace.experiments.config import SECTIONS, ExperimentConfig

    assert main(["config", "table1-fc-lr0.01-digits", "--set", "tracker.k=7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    values = dict(line.split(" = ", 1) for line in lines[1:])
    expected = {f"{section}.{f.name}" for section in SECTIONS
                for f in fields(getattr(ExperimentConfig(), section))}
    assert expected <= set(values)
    assert values["tracker.k"] == "7  # default: 10"
    assert values["optim.lr"] == "0.01  # default: 0.1" and values["optim.batch_size"] == "64"
    assert main(["config", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["lr"] == 0.1


def test_config_of_a_run_folder_and_errors(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["run", *_sets(**{"train.steps": 2}), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["config", str(out)]) == 0
    assert "train.steps = 2  # default: 1500" in capsys.readouterr().out
    assert main(["config", "fig1-fc-digts"]) == 2
    assert "did you mean fig1-fc-digits" in capsys.readouterr().err
    assert main(["config", "--set", "optim.batch_size=0"]) == 2
    assert "optim.batch_size must be at least 1, got 0" in capsys.readouterr().err


def test_readme_starts_with_tinysubspace_run():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "&& tinysubspace run\n" in readme


# ------------------------------------------------------------------- issue 24, item 7
def test_a_tracker_k_too_large_for_the_model_is_refused_before_the_folder_exists(
        capsys, tmp_path):
    """Was: the folder made (status 'running', a header-only metrics.csv with 2k eigenvalue
    columns), then `k + skip = 200000` from the solver, and the same --out refused after."""
    from tinysubspace.cli.checks import check_tracker_k, parameter_count
    from tinysubspace.experiments.build import build_problem
    from tinysubspace.experiments.catalog import load_experiment
    from tinysubspace.experiments.config import ConfigError

    config = load_experiment("fig1-fc-digits", TINY)
    model = build_problem(config).model  # the reference: the model the run trains
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    assert parameter_count(config) == p == 64 * 12 + 12 + 12 * 10 + 10
    mixture = load_experiment("fig1-fc-digits", {**TINY, "data.name": "gaussian-mixture",
                                                 "data.dim": 7, "data.classes": 3,
                                                 "data.even_odd": True})
    assert parameter_count(mixture) == sum(
        q.numel() for q in build_problem(mixture).model.parameters()) == 7 * 12 + 12 + 12 * 2 + 2
    largest = (p - 1) // 2
    check_tracker_k(load_experiment("fig1-fc-digits", {**TINY, "tracker.k": largest}))
    with pytest.raises(ConfigError, match=rf"tracker.k={largest + 1} is too large .* next k "
                                          rf".* 2k = {2 * largest + 2}\), .* {p:,} trainable "
                                          rf"parameters; use --set tracker.k=N with N ≤ {largest}"):
        check_tracker_k(load_experiment("fig1-fc-digits", {**TINY, "tracker.k": largest + 1}))
    out = tmp_path / "x"
    assert main(["run", "--set", "tracker.k=100000", "--set", "train.steps=5", "--out", str(out),
                 "--quiet", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "tracker.k=100000 is too large" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["run", *_sets(**{"train.steps": 2}), "--out", str(out), "--quiet",
                 "--threads", "1"]) == 0  # the same --out is free afterwards


def test_missing_data_is_one_line_in_the_command_lines_words(capsys, tmp_path):
    """Was: 28 lines, one per path, ending `pass root=DIR` and `pass fallback_to_test=True`
    (the Python API's names)."""
    from tinysubspace.experiments.catalog import load_experiment

    nowhere = tmp_path / "nowhere"
    assert main(["run", "table1-softmax-mnist", "--data-root", str(nowhere), "--out",
                 str(tmp_path / "r"), "--quiet", "--threads", "1"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("tinysubspace run:")]
    assert len(lines) == 1
    message = lines[0]
    assert f"could not find the MNIST train files in {nowhere}, {nowhere / 'MNIST/raw'}" in message
    assert "pass --data-root DIR" in message and "add --set data.fallback_to_test=true" in message
    assert "root=DIR" not in message and "fallback_to_test=True" not in message
    assert not (tmp_path / "r").exists()
    # the advice given is accepted as given
    load_experiment("table1-softmax-mnist", {"data.fallback_to_test": "true"})


def test_blocks_on_a_run_measured_in_the_users_own_loop_says_what_it_needs(capsys, tmp_path):
    """Was: `unknown key 'source'` (the tracker's config.json is not an experiment's)."""
    import torch
    from torch import nn
    from torch.nn import functional

    import tinysubspace as ts

    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(20, 3, generator=gen), torch.randint(0, 2, (20,), generator=gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    out = tmp_path / "mine"
    tracker = ts.SubspaceTracker(model, functional.cross_entropy, (X, Y), k=1, out=out,
                                 anchors=())
    tracker.on_step(0)
    tracker.close()
    assert main(["blocks", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} was measured by SubspaceTracker in your own training loop" in err
    assert "experiment config, which this run does not have" in err
    assert "SubspaceTracker(..., blocks='auto')" in err and "block_spectra(" in err
    assert "unknown key" not in err and "Traceback" not in err
