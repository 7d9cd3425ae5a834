"""The HTML report and the plot / table1 / report commands, on hand-written run folders."""

from __future__ import annotations

import base64
import re

import pytest

from run_fixtures import write_run
from tinysubspace.cli import main as cli
from tinysubspace.report import flatten_config, metrics_summary, render_report
from tinysubspace.store import load_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("runs") / "fixture", table1_row="softmax-mnist")


def test_report_is_one_offline_page_with_every_figure(run_dir):
    page = render_report(run_dir, dpi=30)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 11  # Figs. 1-9, 11 and the overlap(g, Hg) figure
    assert all(base64.b64decode(image)[:4] == b"\x89PNG" for image in images)
    assert not re.search(r'(src|href)="(http|//)', page)  # nothing loaded from outside
    assert "<td>optim.lr</td><td class=n>0.1</td>" in page
    assert "softmax-mnist" in page and "<h2>Table 1: mean overlap(g, Hg)" in page


def test_report_lists_figures_without_data(tmp_path):
    bare = write_run(tmp_path / "bare", vectors=False, spectrum=False)
    page = render_report(bare, figures=("6", "8"), dpi=30)
    assert page.count("data:image/png;base64,") == 1
    assert "not drawn: Figs. 6/7 need eigenvectors" in page
    assert "(none: no table1_row)" in page


def test_metrics_summary_and_flat_config(run_dir):
    run = load_run(run_dir)
    summary = {row["quantity"]: row for row in metrics_summary(run)}
    assert summary["hessian/f_top"]["last"] == run.metrics["hessian/f_top"].iloc[-1]
    assert summary["hessian/eig_1"]["max"] == run.metrics["hessian/eig_1"].max()
    assert flatten_config({"a": {"b": 1, "c": {"d": [2]}}, "e": None}) == {
        "a.b": 1, "a.c.d": [2], "e": None}


def test_report_command_writes_into_the_run(tmp_path, capsys):
    run_dir = write_run(tmp_path / "r", vectors=False, spectrum=False)
    (run_dir / "metrics.csv").write_text("step,train/loss\n0,2.3\n")  # few figures: fast
    assert cli(["report", str(run_dir), "--dpi", "30"]) == 0
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1  # the overlap(g, Hg) figure
    assert capsys.readouterr().out.strip().endswith("report.html")


def test_plot_command_writes_png_and_pdf(tmp_path, capsys):
    run_dir = write_run(tmp_path / "r", vectors=False)
    assert cli(["plot", str(run_dir), "--figure", "8", "--figure", "4", "--pdf",
                "--dpi", "30"]) == 0
    names = sorted(p.name for p in (run_dir / "figures").iterdir())
    assert names == ["fig04_spectrum.pdf", "fig04_spectrum.png", "fig08_lambda_max.pdf",
                     "fig08_lambda_max.png"]
    # all figures: those without data are skipped (status 0); asked for explicitly: status 1
    bare = write_run(tmp_path / "bare", vectors=False, spectrum=False, minibatch=False)
    (bare / "metrics.csv").write_text("step,train/loss\n0,2.3\n")
    assert cli(["plot", str(bare), "--dpi", "30"]) == 0
    err = capsys.readouterr().err
    assert "skipped: Fig. 6" in err and "skipped: Fig. 1" in err
    assert not (bare / "figures").exists()
    assert cli(["plot", str(run_dir), "--figure", "6"]) == 1
    assert "error: Fig. 6" in capsys.readouterr().err


def test_plot_command_overlay(tmp_path):
    a = write_run(tmp_path / "a", name="a", vectors=False, spectrum=False)
    b = write_run(tmp_path / "b", name="b", vectors=False, spectrum=False, seed=1)
    assert cli(["plot", str(a), str(b), "--overlay", "--out", str(tmp_path / "o"),
                "--dpi", "30"]) == 0
    assert (tmp_path / "o" / "fig12_f_top_overlay.png").exists()


def test_table1_command(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root / "one", table1_row="fc-mnist-lr0.01", vectors=False, spectrum=False)
    write_run(root / "two", vectors=False, spectrum=False)
    assert cli(["table1", str(root), "--last", "100"]) == 0
    captured = capsys.readouterr()
    assert "| MNIST | FC | η = 0.01 | 0.96 |" in captured.out
    assert "1 of 2 runs have no table1_row" in captured.err
    assert cli(["table1", str(root / "one"), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("row,dataset,model,comment,paper,train")


def test_commands_reject_a_folder_that_is_no_run(tmp_path, capsys):
    assert cli(["report", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert cli(["plot", str(tmp_path)]) == 2
