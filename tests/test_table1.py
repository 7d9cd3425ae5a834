"""Table 1: the full-data overlap(g, Hg) at every step against dense float64 references and the
tracker's own column, in training (the default run unchanged, resume reproduced), and the
aggregation against hand computations on synthetic tables."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import torch

from cases import Case
from experiment_fixtures import tiny_config
from reference import (
    FlatLoss,
    finite_difference_hessian,
    reference_gradient,
    reference_hessian,
    relative_error,
)
from run_fixtures import write_run
from tinysubspace.experiments.full_overlap import FullOverlap, full_data_overlap, overlap_steps
from tinysubspace.experiments.training import run_experiment
from tinysubspace.results.store import load_run
from tinysubspace.results.table1 import (
    FULL_OVERLAP_COLUMNS,
    TABLE1_ROWS,
    full_data_steps,
    full_overlap_table,
    measured_functions,
    run_overlap,
    table1,
    table1_csv,
    table1_markdown,
    window_mean,
)

VOLATILE = ["wall_time", "cost/seconds"]  # the only metrics columns that differ between runs


def test_rows_are_the_papers_table_1():
    assert [r.row_id for r in TABLE1_ROWS] == [
        "softmax-mnist", "fc-mnist-softplus", "fc-mnist-lr0.01", "fc-mnist-batch256",
        "fc-mnist-random-labels", "convnet-cifar10-random-labels",
        "convnet-cifar10-dropout-bn-dense", "convnet-cifar10-adam", "fc-sine-regression"]
    assert [r.paper for r in TABLE1_ROWS] == [0.96, 0.96, 0.96, 0.97, 0.86, 0.86, 0.93, 0.89,
                                             0.99]


# ----------------------------------------------------------- the measurement, against references
def test_overlap_steps_are_the_last_steps_of_training():
    assert overlap_steps(1000, 1, 3000) == list(range(2000, 3000))
    assert overlap_steps(6, 3, 10) == [6, 9]  # the last training step (9) always measured
    assert overlap_steps(0, 1, 10) == []
    with pytest.raises(ValueError, match="every >= 1"):
        overlap_steps(10, 0, 100)


@pytest.mark.parametrize("case", [Case("mlp_layernorm", "ce", "tuple"),
                                  Case("cnn_batchnorm", "mse", "batches", seed=1),
                                  Case("softmax_regression", "ce", "loader")], ids=str)
def test_full_data_overlap_equals_the_dense_hessian_formula(case):
    """overlap(g, Hg) of the whole data set, with g and H from a dense float64 Hessian (itself
    checked against finite differences of the gradient), on the train and the test split."""
    problem = case.build()
    test = Case(case.model, case.loss, "tuple", seed=case.seed + 7).build()
    config = tiny_config(tracker__hvp_batch_size=9, tracker__overlap_last=5)
    model = problem.model
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    rng = torch.get_rng_state()
    row = FullOverlap(config, problem.loss_fn, problem.data, (test.inputs, test.targets)
                      ).measure(model, step=19)
    for split, inputs, targets, prefix in (("train", problem.inputs, problem.targets, "full/"),
                                           ("test", test.inputs, test.targets, "full/test_")):
        f = FlatLoss(model, problem.loss_fn, inputs, targets)
        H, g = reference_hessian(f), reference_gradient(f)
        assert relative_error(H, finite_difference_hessian(f)) < 1e-6, split
        Hg = H @ g
        expected = float(g @ Hg / (g.norm() * Hg.norm()))
        assert row[f"{prefix}overlap_g_Hg"] == pytest.approx(expected, abs=1e-10), split
        assert row[f"{prefix}loss"] == pytest.approx(float(f(f.theta0)), rel=1e-12), split
    assert row["full/grad_norm"] == pytest.approx(float(reference_gradient(
        FlatLoss(model, problem.loss_fn, problem.inputs, problem.targets)).norm()), rel=1e-10)
    assert row["step"] == 19
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_zero_gradient_gives_nan_not_an_error():
    class Flat:  # the minimum: a loss, a zero gradient and a product that must not be needed
        def loss_and_gradient(self):
            return 0.25, torch.zeros(3, dtype=torch.float64)

        def __matmul__(self, v):
            raise AssertionError("H·g computed for g = 0")

    loss, norm, overlap = full_data_overlap(Flat())
    assert (loss, norm) == (0.25, 0.0) and math.isnan(overlap)


# ------------------------------------------------------------------------ in the training loop
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny run (steps 0..23, measurements at 0, 4, 8, 12, 16, 24) with the test split,
    with and without the full-data overlap at every step."""
    root = tmp_path_factory.mktemp("full-overlap")
    on = run_experiment(tiny_config(tracker__overlap_last=24, data__test_set=True), root / "on")
    off = run_experiment(tiny_config(data__test_set=True), root / "off")
    assert on.state == off.state == "finished"
    return root / "on", root / "off"


@pytest.mark.slow
def test_every_step_is_measured_and_agrees_with_the_trackers_column(runs):
    on = load_run(runs[0])
    every = full_overlap_table(on)
    assert list(every.columns) == list(FULL_OVERLAP_COLUMNS)
    assert every["step"].tolist() == list(range(24))
    both = every.merge(on.metrics, on="step")
    assert both["step"].tolist() == [0, 4, 8, 12, 16]  # same θ_t: the same numbers
    np.testing.assert_allclose(both["full/overlap_g_Hg"], both["hessian/overlap_g_Hg"],
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(both["full/loss"], both["train/loss"], rtol=1e-12)
    np.testing.assert_allclose(both["full/grad_norm"], both["train/grad_norm"], rtol=1e-10)
    np.testing.assert_allclose(both["full/test_overlap_g_Hg"], both["test/overlap_g_Hg"],
                               rtol=0, atol=1e-12)


def test_the_option_changes_nothing_of_the_run(runs):
    on, off = load_run(runs[0]), load_run(runs[1])
    pd.testing.assert_frame_equal(on.metrics.drop(columns=VOLATILE),
                                  off.metrics.drop(columns=VOLATILE), check_exact=True)
    pd.testing.assert_frame_equal(on.minibatch, off.minibatch, check_exact=True)
    assert not (runs[1] / "full_overlap.csv").exists()  # off: no new file


def test_resume_reproduces_the_full_overlap_rows(runs, tmp_path):
    config = tiny_config(tracker__overlap_last=24, data__test_set=True)
    path = tmp_path / "crashed"
    assert run_experiment(config, path, stop_after=13).state == "stopped"  # checkpoint at 8
    assert full_overlap_table(load_run(path))["step"].max() == 12  # rows past the checkpoint
    assert run_experiment(config, path, resume=True).state == "finished"
    pd.testing.assert_frame_equal(full_overlap_table(load_run(path)),
                                  full_overlap_table(load_run(runs[0])), check_exact=True)


def test_table1_of_a_real_run_reads_every_step(runs):
    result = run_overlap(load_run(runs[0]), last_n=10)
    every = full_overlap_table(load_run(runs[0]))
    assert result.every_step and result.full.count == 10
    assert result.full.value == pytest.approx(every["full/overlap_g_Hg"].iloc[-10:].mean())
    assert result.test.value == pytest.approx(every["full/test_overlap_g_Hg"].iloc[-10:].mean())
    assert result.full.source == "full_overlap.csv:full/overlap_g_Hg"


# ------------------------------------------------------------------ aggregation (synthetic)
def test_window_mean_by_hand():
    table = pd.DataFrame({"step": [0, 2, 4, 6, 8, 10],
                          "x": [0.1, 0.2, 0.3, 0.4, math.nan, 0.6]})
    # the last 5 steps: 10 - 5 < step <= 10, i.e. rows 6, 8, 10; the NaN at 8 is skipped
    mean, first, last, count = window_mean(table, "x", last_n=5)
    assert (first, last, count) == (6, 10, 2)
    assert mean == pytest.approx((0.4 + 0.6) / 2)
    assert window_mean(table, "x", last_n=1000)[0] == pytest.approx((0.1 + 0.2 + 0.3 + 0.4
                                                                       + 0.6) / 5)
    with pytest.raises(ValueError, match="last_n must be at least 1"):
        window_mean(table, "x", last_n=0)


def _run(tmp_path, name, row, minibatch=None, full=None, test=None, every=None,
         every_test=None, model=None):
    path = write_run(tmp_path / name, name=name, table1_row=row, vectors=False,
                     spectrum=False, minibatch=False)
    if minibatch is not None:
        steps = np.arange(len(minibatch))
        pd.DataFrame({"step": steps, "minibatch/loss": 1.0,
                      "minibatch/overlap_g_Hg": minibatch}).to_csv(path / "minibatch.csv",
                                                                   index=False)
    metrics = pd.read_csv(path / "metrics.csv")
    if full is not None:
        metrics = metrics.iloc[: len(full)].assign(step=np.arange(len(full)) * 2)
        metrics["hessian/overlap_g_Hg"] = full
        metrics["test/overlap_g_Hg"] = test if test is not None else math.nan
    metrics.to_csv(path / "metrics.csv", index=False)
    if every is not None:
        table = pd.DataFrame({"step": np.arange(len(every)), "full/overlap_g_Hg": every})
        if every_test is not None:
            table["full/test_overlap_g_Hg"] = every_test
        table.to_csv(path / "full_overlap.csv", index=False)
    run = load_run(path)
    if model is not None:
        run = type(run)(run.path, {**run.config, "model": model}, run.metrics, run.minibatch,
                        run.status)
    return run


def test_table1_on_synthetic_runs_equals_hand_computation(tmp_path):
    # Two seeds of the softmax row: every-step full data (steps 0..5) and mini-batch tables.
    a = _run(tmp_path, "a", "softmax-mnist", minibatch=[0.0, 0.0, 0.0, 0.9, 0.8, 0.7],
             every=[0.0, 0.0, 0.0, 0.95, 0.97, 0.99], every_test=[0, 0, 0, 0.5, 0.6, 0.7])
    b = _run(tmp_path, "b", "softmax-mnist", minibatch=[0.0, 0.0, 0.0, 1.0, 1.0, 0.4],
             every=[0.0, 0.0, 0.0, 0.93, 0.93, 0.93])
    # One run of the regression row with neither: full batch at steps 0, 2, 4, 6 (metrics.csv).
    c = _run(tmp_path, "c", "fc-sine-regression", minibatch=None,
             full=[0.1, 0.5, 0.6, 0.9], test=[0.0, 0.3, 0.2, 0.4])
    assert run_overlap(a, last_n=3).full.value == pytest.approx(0.97)
    assert run_overlap(a, last_n=3).minibatch.value == pytest.approx(0.8)
    assert run_overlap(c, last_n=3).full.source == "metrics.csv:hessian/overlap_g_Hg"
    assert not run_overlap(c, last_n=3).every_step and run_overlap(c, last_n=3).minibatch is None
    t = table1([a, b, c], last_n=3).set_index("row")
    assert t.loc["softmax-mnist", "full"] == pytest.approx((0.97 + 0.93) / 2)
    assert t.loc["softmax-mnist", "full_std"] == pytest.approx(np.std([0.97, 0.93], ddof=1))
    assert t.loc["softmax-mnist", "minibatch"] == pytest.approx((0.8 + 0.8) / 2)
    # b has no every-step test column: its test value is metrics.csv's at step 300
    assert run_overlap(b, last_n=3).test.source == "metrics.csv:test/overlap_g_Hg"
    b_test = 0.4 + 0.4 * (1 - math.exp(-300 / 40))  # run_fixtures: 0.4 + 0.4 f_top
    assert t.loc["softmax-mnist", "test"] == pytest.approx((0.6 + b_test) / 2)
    assert t.loc["softmax-mnist", "runs"] == 2
    assert t.loc["softmax-mnist", "full_source"] == "every step"
    assert t.loc["softmax-mnist", "same_function"] == "yes"
    assert t.loc["softmax-mnist", "steps"] == ("full 3-5 (3), mini-batch 3-5 (3), test 3-5 (3); "
                                               "full 3-5 (3), mini-batch 3-5 (3), "
                                               "test 300-300 (1)")
    # window 6 - 3 < step <= 6: steps 4 and 6
    assert t.loc["fc-sine-regression", "full"] == pytest.approx((0.6 + 0.9) / 2)
    assert t.loc["fc-sine-regression", "test"] == pytest.approx((0.2 + 0.4) / 2)
    assert np.isnan(t.loc["fc-sine-regression", "minibatch"])
    assert t.loc["fc-sine-regression", "full_source"] == "2 measurements"
    assert np.isnan(t.loc["fc-mnist-softplus", "full"]) and t.loc["fc-mnist-softplus",
                                                                  "runs"] == 0
    assert t.loc["fc-sine-regression", "paper"] == 0.99

    text = table1_markdown(table1([a, b, c], last_n=3), last_n=3)
    assert "| MNIST | Softmax |  | 0.96 | 0.95 ± 0.03 | 0.80 ± 0.00 | 0.70 | 2 | every step |" \
        in text
    assert "| Regression | FC | Batch size 100 | 0.99 | 0.75 | — | 0.30 | 1 | 2 measurements |" \
        in text
    assert "last 3 steps" in text and "Full data (the paper's column)" in text
    back = pd.read_csv(io.StringIO(table1_csv(table1([a, b, c], last_n=3))))
    assert back.shape == (9, 16) and back["full"].iloc[0] == pytest.approx(0.95)  # + short
    assert back["data"].iloc[0] == "digits" and back["data"].isna().sum() == 7  # 7 rows: no run


def test_a_thinned_full_data_column_says_how_often_it_was_measured(tmp_path):
    """tracker.overlap_every = 5: 200 of the last 1,000 steps; the table, the end-of-run line and
    the report's key numbers say "every 5 steps", not "every step"."""
    from tinysubspace.results.key_numbers import key_numbers
    from tinysubspace.results.summary import table1_line

    run = _run(tmp_path, "thin", "softmax-mnist", minibatch=[0.5] * 10)
    steps = np.arange(4, 1000, 5)
    pd.DataFrame({"step": steps, "full/overlap_g_Hg": 0.9}).to_csv(run.path / "full_overlap.csv",
                                                                    index=False)
    ours = run_overlap(run, 1000)
    assert (ours.full.count, ours.full.first_step, ours.full.last_step) == (200, 4, 999)
    assert full_data_steps(ours) == "every 5 steps"
    assert table1([run]).set_index("row").loc["softmax-mnist", "full_source"] == "every 5 steps"
    assert "full data 0.900 (every 5 steps)" in table1_line(run)
    assert any("(every 5 steps)" in line.quantity for line in key_numbers(run))
    dense = _run(tmp_path, "dense", "softmax-mnist", every=[0.9, 0.8, 0.7])
    assert full_data_steps(run_overlap(dense, 1000)) == "every step"
    sparse = _run(tmp_path, "sparse", "softmax-mnist", full=[0.1, 0.5, 0.6])
    assert full_data_steps(run_overlap(sparse, 1000)) == "3 measurements"


def test_table1_says_which_data_set_filled_each_row(tmp_path):
    """A `…-digits` run fills an MNIST row of the paper: the table says digits, and a row that
    averages runs on two data sets names both."""
    digits = _run(tmp_path, "d", "softmax-mnist", every=[0.9, 0.7])
    fashion = _run(tmp_path, "f", "softmax-mnist", every=[0.5, 0.3])
    fashion = type(fashion)(fashion.path, {**fashion.config, "data": {"name": "fashion-mnist"}},
                            fashion.metrics, fashion.minibatch, fashion.status)
    alone = table1([digits], last_n=10).set_index("row")
    assert alone.loc["softmax-mnist", "data"] == "digits"
    assert alone.loc["fc-mnist-softplus", "data"] == ""
    mixed = table1([digits, fashion], last_n=10).set_index("row")
    assert mixed.loc["softmax-mnist", "data"] == "digits, fashion-mnist"
    assert mixed.loc["softmax-mnist", "full"] == pytest.approx((0.8 + 0.4) / 2)
    text = table1_markdown(table1([digits], last_n=10), last_n=10)
    assert "| 1 | every step | digits |" in text and "| 0 | — | — |" in text


def test_dropout_and_batch_norm_runs_say_which_function_each_column_measures(tmp_path):
    run = _run(tmp_path, "bn", "convnet-cifar10-dropout-bn-dense", minibatch=[0.5, 0.6],
               every=[0.9, 0.8], model={"name": "convnet", "dropout": True, "batchnorm": True})
    functions = measured_functions(run)
    assert functions["same"] == "no" and functions["random_parts"] == "dropout, batch norm"
    assert functions["full"].startswith("eval mode") and functions["minibatch"].startswith(
        "train mode")
    table = table1([run], last_n=10)
    assert table.set_index("row").loc["convnet-cifar10-dropout-bn-dense", "same_function"] == "no"
    assert "| 0.93 | 0.85 ‡ | 0.55 † |" in table1_markdown(table, 10)  # ‡: 2 steps < 10
    plain = _run(tmp_path, "plain", "softmax-mnist", minibatch=[0.5], model={"name": "softmax"})
    assert measured_functions(plain)["same"] == "yes"


def test_runs_without_a_known_row_are_rejected(tmp_path):
    plain = _run(tmp_path, "plain", None, minibatch=[0.5])
    with pytest.raises(ValueError, match="has no table1_row; known rows: softmax-mnist"):
        table1([plain])
    odd = _run(tmp_path, "odd", "fc-mnist-typo", minibatch=[0.5])
    with pytest.raises(ValueError, match="has table1_row 'fc-mnist-typo'"):
        table1([odd])


def test_a_run_without_any_overlap_is_rejected(tmp_path):
    run = _run(tmp_path, "none", "softmax-mnist", minibatch=None)
    metrics = run.metrics.drop(columns=["hessian/overlap_g_Hg"])
    empty = type(run)(run.path, run.config, metrics, run.minibatch, run.status)
    with pytest.raises(ValueError, match="has no overlap"):
        run_overlap(empty)


def test_a_damaged_full_overlap_file_is_a_clear_error(tmp_path):
    run = _run(tmp_path, "cut", "softmax-mnist", every=[0.9, 0.8])
    (run.path / "full_overlap.csv").write_text('step,full/overlap_g_Hg\n0,"0.9\n')
    with pytest.raises(ValueError, match="not a readable CSV table"):
        full_overlap_table(run)
    (run.path / "full_overlap.csv").write_text("step,full/overlap_g_Hg\n0,0.9\n1,0.")  # cut
    assert full_overlap_table(run)["step"].tolist() == [0]


def test_row_under_experiment_key_is_read(tmp_path):
    run = _run(tmp_path, "nested", None, minibatch=[0.2, 0.4])
    nested = type(run)(run.path, {"experiment": {"table1_row": "fc-mnist-adam-typo"}},
                       run.metrics, run.minibatch, run.status)
    with pytest.raises(ValueError, match="fc-mnist-adam-typo"):
        table1([nested])


def test_a_null_experiment_section_is_no_row(tmp_path):
    run = _run(tmp_path, "null", None, minibatch=[0.2])
    bare = type(run)(run.path, {"experiment": None}, run.metrics, run.minibatch, run.status)
    with pytest.raises(ValueError, match="has no table1_row"):
        table1([bare])


# ------------------------------------------------------------------ the experiments as data
def test_the_table1_experiments_measure_as_the_paper():
    from tinysubspace.experiments.catalog import experiment_names, load_experiment

    for name in (n for n in experiment_names() if n.startswith("table1-")):
        config = load_experiment(name)
        assert config.tracker.overlap_last == 1000 and config.tracker.overlap_every == 1, name
        assert config.data.test_set, name
    sine = load_experiment("table1-fc-sine-regression")  # Table 1: FC, SGD, batch 100, η 0.1
    assert (sine.model.name, sine.model.widths, sine.model.activation) == ("fc", (100, 100),
                                                                           "relu")
    assert (sine.optim.name, sine.optim.lr, sine.optim.batch_size) == ("sgd", 0.1, 100)
    for name in ("appB-even-odd-mnist", "appB-even-odd-digits"):
        assert load_experiment(name).tracker.k == 2  # two classes
    assert load_experiment("appB-fig5-density-fc256-cifar100").tracker.spectrum_top == 1000
    assert load_experiment("fig1-fc-digits").tracker.overlap_last == 0  # the default: off


def test_a_run_shorter_than_the_window_says_what_was_averaged_and_warns(tmp_path, capsys):
    """Issue 24: a 300-step run printed "last 1000 steps" (summary, table1, report, figure) and
    table1 put -0.32 beside the paper's 0.96 without a word. The window reached step 0, so the
    start of training was averaged in: every place now names the steps, and table1 warns."""
    from tinysubspace.cli.main import main
    from tinysubspace.plots.overlap import figure_overlap_g_Hg
    from tinysubspace.plots.report import render_report
    from tinysubspace.results.key_numbers import key_numbers
    from tinysubspace.results.summary import table1_line
    from tinysubspace.results.table1 import table1_warnings

    early = np.linspace(-0.9, 0.2, 150)  # the start of training, far from the late value
    short = _run(tmp_path, "short", "softmax-mnist", every=[*early, *[0.1] * 150])
    ours = run_overlap(short, 1000)
    expected = (early.sum() + 0.1 * 150) / 300  # by hand: every step 0..299
    assert (ours.full.first_step, ours.full.last_step, ours.full.count) == (0, 299, 300)
    assert ours.full.value == pytest.approx(expected)
    table = table1([short])
    assert table.set_index("row").loc["softmax-mnist", "short"] == 1
    text = table1_markdown(table, 1000)
    assert f"| 0.96 | {expected:.2f} ‡ |" in text and "‡: a run shorter than 1000 steps" in text
    (warning,) = table1_warnings(table, 1000)
    assert warning.startswith("row softmax-mnist: 1 of 1 runs are shorter than 1000 steps "
                              "(full 0-299 (300)")
    assert f"ours ({expected:.2f}) is not comparable with the paper's 0.96" in warning
    line = table1_line(short)
    assert line.startswith("Table 1 (mean over steps 0–299 (the whole run, shorter than 1000 "
                           "steps)): full data")
    assert "\nwarning: the mean covers steps 0–299, the whole run" in line
    assert key_numbers(short)[0].quantity.startswith(
        "mean overlap(g, Hg), full training set, steps 0–299 (the whole run")
    page = render_report(short, figures=(), dpi=30)
    assert "Table 1: mean overlap(g, Hg), steps 0–299 (the whole run" in page
    assert "<p class=warn>Warning: the mean covers steps 0–299" in page
    assert "overlap(g, Hg), last 1000 steps" not in page
    assert "full training set, last 1000 steps" not in page
    band = list(figure_overlap_g_Hg(short).axes[0].patches)
    assert band and "the whole run, shorter than 1000 (Table 1)" in band[0].get_label()
    assert main(["table1", str(short.path)]) == 0
    assert "warning: row softmax-mnist: 1 of 1 runs are shorter" in capsys.readouterr().err
    # a run longer than the window: the last 1000 steps, no mark, no warning
    long = _run(tmp_path, "long", "softmax-mnist", every=[*early, *[0.9] * 1850])
    table = table1([long])
    assert table.set_index("row").loc["softmax-mnist", "short"] == 0 and not table1_warnings(
        table, 1000)
    assert "‡" not in table1_markdown(table, 1000)
    assert table1_line(long).startswith("Table 1 (mean over the last 1000 steps)")
    assert "\n" not in table1_line(long)
    assert main(["table1", str(long.path)]) == 0
    assert "warning" not in capsys.readouterr().err
