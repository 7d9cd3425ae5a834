"""The ``tinysubspace`` command: list, run (with its errors), and the read-only commands."""

from __future__ import annotations

import pytest

from experiment_fixtures import TINY
from tinysubspace.cli.main import COMMANDS, build_parser, main
from tinysubspace.results.store import load_run


def _sets(**extra: object) -> list[str]:
    return [arg for key, value in {**TINY, **extra}.items() for arg in ("--set", f"{key}={value}")]


def test_every_command_is_available():
    parser = build_parser()
    for name in COMMANDS:
        args = parser.parse_args([name, "x"] if name in ("plot", "report", "compare", "blocks")
                                 else [name])
        assert getattr(args, "_unavailable", None) is None, name


def test_list_shows_the_default_and_descriptions(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "* fig1-fc-digits" in out and "table1-softmax-mnist" in out and "Table 1" in out


def test_unknown_experiment_is_an_error_listing_known_ones(capsys, tmp_path):
    assert main(["run", "nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nope'; known experiments:" in err and "fig1-fc-digits" in err


def test_unknown_key_is_an_error_listing_known_keys(capsys, tmp_path):
    assert main(["run", "--set", "optim.learning_rate=1", "--out", str(tmp_path / "r")]) == 2
    assert "unknown key 'optim.learning_rate'; known keys: optim.name, optim.lr" in (
        capsys.readouterr().err)


def test_missing_data_is_an_error_saying_where_it_looked(capsys, tmp_path):
    code = main(["run", "table1-softmax-mnist", "--data-root", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err


def test_resume_needs_out(capsys):
    assert main(["run", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


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
