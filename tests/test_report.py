"""The HTML report and the plot / table1 / report commands, on hand-written run folders."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess

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


@pytest.mark.slow
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


def test_table1_command_notes_a_row_that_mixes_data_sets(tmp_path, capsys):
    root = tmp_path / "runs"
    for name, data in (("d", "digits"), ("f", "fashion-mnist")):
        path = write_run(root / name, table1_row="softmax-mnist", vectors=False, spectrum=False)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "data": {"name": data}}))
    assert cli(["table1", str(root), "--last", "100"]) == 0
    captured = capsys.readouterr()
    assert "row softmax-mnist averages runs on different data sets (digits, fashion-mnist)" \
        in captured.err
    assert "| 2 | 10 measurements | digits, fashion-mnist |" in captured.out
    assert cli(["table1", str(root / "d"), "--last", "100"]) == 0
    assert "different data sets" not in capsys.readouterr().err


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
    assert lines[-1].startswith("(4 of 31 measurements shown")  # issue 24: rows left out, said
    lines = lines[:-1]
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


# ------------------------------------------------------- issue 16: the page in a real browser
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run")
PROBE = """<script>window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete,
    width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().width}));
  const fetched = performance.getEntriesByType("resource").map(e => e.name);
  const probe = document.createElement("pre"); probe.id = "probe";
  probe.textContent = JSON.stringify({images, fetched});
  document.body.appendChild(probe);});</script>"""


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium on this machine: the browser test needs Debian's chromium "
                    "(apt-get install -y chromium; .ci/run installs it where apt-get works)")
    return found


def _open_in_chromium(page, tmp_path):
    """Load ``page`` (with the probe script added) in headless chromium; returns the DOM after
    load, the probe's JSON and the URLs requested on behalf of the page (from the net log)."""
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    net_log = tmp_path / "net.json"
    done = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           f"--log-net-log={net_log}", "--virtual-time-budget=10000",
                           "--window-size=1200,900", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=180, check=False)
    dom = done.stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"chromium rendered no probe (exit {done.returncode}): {done.stderr[-2000:]}"
    log = json.loads(net_log.read_text())
    kinds = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    page_requests = [e["params"]["url"] for e in log["events"]
                     if kinds.get(e["type"]) == "URL_REQUEST_START_JOB"
                     and str(e["params"].get("network_isolation_key", "")).startswith("file://")]
    return dom, json.loads(html.unescape(found.group(1))), page_requests


def _tables(dom, section):
    """The cells of each table inside ``<div id=section>`` of the dumped DOM (plain text)."""
    block = re.search(rf'<div id="{section}">(.*?)</div>', dom, re.S).group(1)
    return [[[html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in
              re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]
             for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
            for table in re.findall(r"<table>(.*?)</table>", block, re.S)]


def test_the_report_renders_in_a_real_browser_offline_with_table1_beside_the_paper(tmp_path):
    import numpy as np
    import pandas as pd

    from run_fixtures import write_run

    _chromium()  # skip first, before any work
    path = write_run(tmp_path / "run", table1_row="softmax-mnist")
    steps = np.arange(300)
    full = 0.9 + 0.05 * np.sin(steps / 7.0)
    pd.DataFrame({"step": steps, "full/overlap_g_Hg": full,
                  "full/test_overlap_g_Hg": full - 0.1}).to_csv(path / "full_overlap.csv",
                                                                 index=False)
    page = render_report(path, dpi=30)
    assert "<script" not in page  # the page itself runs nothing
    dom, probe, page_requests = _open_in_chromium(page, tmp_path)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(probe["images"]) == len(images) == 11
    for shown, encoded in zip(probe["images"], images, strict=True):
        png = base64.b64decode(encoded)
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert shown["complete"] and (shown["width"], shown["height"]) == (width, height), shown
        assert shown["shown"] > 100, shown  # laid out on the page, not only decoded
    assert probe["fetched"] == [] and page_requests == []  # nothing from the network
    header, row = _tables(dom, "table1")[0]
    cells = dict(zip(header, row, strict=True))
    assert cells["row"] == "softmax-mnist" and cells["paper"] == "0.96"
    minibatch = pd.read_csv(path / "minibatch.csv")["minibatch/overlap_g_Hg"]
    assert float(cells["ours: full data"]) == pytest.approx(full.mean(), abs=5e-5)
    assert float(cells["ours: test set"]) == pytest.approx(full.mean() - 0.1, abs=5e-5)
    assert float(cells["ours: mini-batch"]) == pytest.approx(minibatch.mean(), abs=5e-5)
    numbers = {line[0]: line[1:] for line in _tables(dom, "key-numbers")[0][1:]}
    table1_line = numbers["mean overlap(g, Hg), full training set, steps 0–299 (the whole run, "
                          "shorter than 1000 steps) (every step)"]  # a 300-step run (issue 24)
    assert table1_line[1:] == ["0.96", "Table 1"]
    metrics = pd.read_csv(path / "metrics.csv")
    f_top = numbers["f_top at the last measurement"]
    assert float(f_top[0]) == pytest.approx(metrics["hessian/f_top"].iloc[-1], rel=1e-3)
    assert "close to 1" in f_top[1]
    eq4 = numbers["eq. 4 with our top 3 eigenvalues"]
    top = metrics[["hessian/eig_1", "hessian/eig_2", "hessian/eig_3"]].iloc[-1].to_numpy()
    assert float(eq4[0]) == pytest.approx(top.sum() / np.sqrt(3 * (top ** 2).sum()), rel=1e-3)
    assert eq4[1] == "√(3/4) ≈ 0.87 for λ_i ∝ i"


def test_the_browser_check_catches_a_page_that_fetches(tmp_path):
    """The network check above can fail: a page with a remote image and style sheet."""
    page = ('<!DOCTYPE html><html><body><img alt=x src="http://example.invalid/x.png">'
            '<link rel=stylesheet href="https://fonts.example.invalid/a.css"></body></html>')
    _, probe, page_requests = _open_in_chromium(page, tmp_path)
    assert probe["images"][0]["width"] == 0  # a broken image is seen, too
    assert "http://example.invalid/x.png" in probe["fetched"]
    assert "http://example.invalid/x.png" in page_requests


def test_the_summary_ends_with_table1_when_every_step_was_measured(tmp_path):
    import pandas as pd

    from run_fixtures import write_run
    from tinysubspace.results.summary import table1_line

    path = write_run(tmp_path / "run", table1_row="fc-mnist-lr0.01", vectors=False,
                     spectrum=False)
    assert table1_line(load_run(path)) is None  # no full_overlap.csv: the table alone
    pd.DataFrame({"step": range(100), "full/overlap_g_Hg": [0.5, 0.7] * 50}).to_csv(
        path / "full_overlap.csv", index=False)
    minibatch = pd.read_csv(path / "minibatch.csv")["minibatch/overlap_g_Hg"].mean()
    test = pd.read_csv(path / "metrics.csv")["test/overlap_g_Hg"].mean()
    text = summary_table(load_run(path))
    # a 100-step run: the window reaches step 0, so the line says what it averaged (issue 24)
    assert text.splitlines()[-2] == (
        "Table 1 (mean over steps 0–99 (the whole run, shorter than 1000 steps)): full data "
        f"0.600 (every step), mini-batch {minibatch:.3f}, test {test:.3f}; paper 0.96 "
        "(fc-mnist-lr0.01)")
    assert text.splitlines()[-1].startswith("warning: the mean covers steps 0–99, the whole run")


def test_compare_and_table1_say_when_runs_used_different_thread_counts(tmp_path, capsys):
    """The default thread count is the free cores at launch (recorded as meta.threads), so one
    command launched twice may differ in the last digits: where runs are compared, say so."""
    from run_fixtures import write_run

    paths = []
    for name, threads in (("a", 1), ("b", 2), ("c", 2)):
        path = write_run(tmp_path / "runs" / name, table1_row="softmax-mnist", vectors=False,
                         spectrum=False)
        config = json.loads((path / "config.json").read_text())
        config["meta"]["threads"] = threads
        (path / "config.json").write_text(json.dumps(config))
        paths.append(path)
    a, b, c = map(str, paths)
    assert cli(["compare", a, b, "--out", str(tmp_path / "ab.png")]) == 0
    err = capsys.readouterr().err
    assert f"note: these runs used different torch thread counts ({a}: 1, {b}: 2; " in err
    assert "run each with the same --threads N" in err
    assert cli(["compare", b, c, "--out", str(tmp_path / "bc.png")]) == 0
    assert "thread counts" not in capsys.readouterr().err
    assert cli(["table1", str(tmp_path / "runs"), "--last", "100"]) == 0
    assert "different torch thread counts" in capsys.readouterr().err


def test_a_second_compare_keeps_the_first_figure(tmp_path, capsys):
    """Was: compare.png overwritten silently."""
    runs = [str(write_run(tmp_path / name, vectors=False, spectrum=False)) for name in "ab"]
    assert cli(["compare", *runs]) == 0
    assert capsys.readouterr().err.strip().endswith(f"figure: {tmp_path / 'compare.png'}")
    first = (tmp_path / "compare.png").read_bytes()
    assert cli(["compare", *runs, "--smooth", "3"]) == 0
    assert capsys.readouterr().err.strip().endswith(f"figure: {tmp_path / 'compare-2.png'}")
    assert (tmp_path / "compare.png").read_bytes() == first
    assert cli(["compare", *runs, "--out", str(tmp_path / "compare.png")]) == 0
    assert f"note: replacing {tmp_path / 'compare.png'}" in capsys.readouterr().err


def test_the_report_marks_missing_values_one_way(tmp_path):
    """Was: both NaN and — for values not measured."""
    import pandas as pd

    path = write_run(tmp_path / "run", table1_row="softmax-mnist", vectors=False,
                     spectrum=False)
    table = pd.read_csv(path / "metrics.csv").drop(columns=["hessian/f_top"])
    table.to_csv(path / "metrics.csv", index=False)
    page = render_report(path, figures=(), dpi=30)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", page)
    assert "NaN" not in cells and "nan" not in cells
    row = page[page.index("f_top at the last measurement"):]
    assert re.match(r"f_top at the last measurement</td><td class=n>—</td>", row)


def test_the_summary_says_when_it_leaves_rows_out(tmp_path):
    """Was: 30 of 61 rows shown without a word."""
    path = write_run(tmp_path / "run", vectors=False, spectrum=False, last_step=600)
    text = summary_table(load_run(path))
    body = [line for line in text.splitlines()[2:] if line.strip() and line[0] == " "]
    assert len(body) == 30
    assert f"(30 of 61 measurements shown, evenly spread; all are in {path / 'metrics.csv'})" \
        in text
    assert "measurements shown" not in summary_table(load_run(path), max_rows=100)
