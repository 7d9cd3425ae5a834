"""The HTML report and the plot / table1 / report commands, on hand-written run folders."""

from __future__ import annotations

import base64
import io
import re

import pytest

from run_fixtures import write_run
from tinysubspace.cli.main import main as cli
from tinysubspace.experiments.progress import Progress
from tinysubspace.plots.report import flatten_config, metrics_summary, render_report
from tinysubspace.results.store import load_run
from tinysubspace.results.summary import summary_table


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
    assert capsys.readouterr().out.startswith("row,dataset,model,comment,paper,full,full_std")


def test_commands_reject_a_folder_that_is_no_run(tmp_path, capsys):
    assert cli(["report", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert cli(["plot", str(tmp_path)]) == 2


def test_plot_command_overlay_of_runs_without_f_top(tmp_path, capsys):
    bare = write_run(tmp_path / "bare", vectors=False, spectrum=False)
    (bare / "metrics.csv").write_text("step,train/loss\n0,2.3\n")
    assert cli(["plot", str(bare), "--overlay", "--out", str(tmp_path / "o")]) == 1
    assert "error: Fig. 12 (overlay): Fig. 1 (f_top) needs" in capsys.readouterr().err


def test_table1_command_without_runs(tmp_path, capsys):
    assert cli(["table1", str(tmp_path / "nothing")]) == 2
    assert "no run folders in" in capsys.readouterr().err


# ------------------------------------------------------------------ summary table, progress
def test_summary_table_shows_lambda_k_and_k_plus_1_of_the_run(run_dir):
    run = load_run(run_dir)  # tracker.k = K = 3
    lines = summary_table(run, max_rows=4).splitlines()
    assert lines[0].split() == ["step", "loss", "acc", "f_top", "overlap(g,Hg)", "λ1", "λ2",
                                "λ3", "λ4", "matvecs", "seconds"]
    steps = [int(line.split()[0]) for line in lines[2:]]
    assert steps == [0, 100, 200, 300]  # evenly spread, first and last included
    assert lines[-1].split()[7] == f"{run.metrics['hessian/eig_3'].iloc[-1]:.4g}"
    with pytest.raises(ValueError, match="max_rows must be at least 2"):
        summary_table(run, max_rows=1)


def test_progress_prints_what_a_measurement_has():
    stream = io.StringIO()
    progress = Progress(stream, every_seconds=0.0)
    progress.start(100)
    progress.measured({"step": 10, "train/loss": 0.5})  # a run without Hessian columns
    progress.measured({"step": 20, "train/loss": 0.25, "hessian/f_top": float("nan"),
                       "hessian/eig_1": None, "hessian/overlap_g_Hg": 0.75})
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[1].endswith("| step 10: loss 0.5000")
    assert lines[2].endswith("| step 20: loss 0.2500  f_top nan  overlap(g,Hg) 0.750")
