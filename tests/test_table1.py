"""Table 1 aggregation against hand computations on synthetic tables."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest

from run_fixtures import write_run
from tinysubspace.results.store import load_run
from tinysubspace.results.table1 import (
    TABLE1_ROWS,
    run_overlap,
    table1,
    table1_csv,
    table1_markdown,
    window_mean,
)


def test_rows_are_the_papers_table_1():
    assert [r.row_id for r in TABLE1_ROWS] == [
        "softmax-mnist", "fc-mnist-softplus", "fc-mnist-lr0.01", "fc-mnist-batch256",
        "fc-mnist-random-labels", "convnet-cifar10-random-labels",
        "convnet-cifar10-dropout-bn-dense", "convnet-cifar10-adam", "fc-sine-regression"]
    assert [r.paper for r in TABLE1_ROWS] == [0.96, 0.96, 0.96, 0.97, 0.86, 0.86, 0.93, 0.89,
                                             0.99]


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


def _run(tmp_path, name, row, minibatch=None, full=None, test=None):
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
    return load_run(path)


def test_table1_on_synthetic_runs_equals_hand_computation(tmp_path):
    # Two seeds of the softmax row, with mini-batch tables (steps 0..5, last 3 steps: 3, 4, 5).
    a = _run(tmp_path, "a", "softmax-mnist", minibatch=[0.0, 0.0, 0.0, 0.9, 0.8, 0.7])
    b = _run(tmp_path, "b", "softmax-mnist", minibatch=[0.0, 0.0, 0.0, 1.0, 1.0, 0.4])
    # One run of the regression row without a mini-batch table: full batch at steps 0, 2, 4, 6.
    c = _run(tmp_path, "c", "fc-sine-regression", minibatch=None,
             full=[0.1, 0.5, 0.6, 0.9], test=[0.0, 0.3, 0.2, 0.4])
    assert run_overlap(a, last_n=3).train == pytest.approx(0.8)
    assert run_overlap(c, last_n=3).source == "hessian/overlap_g_Hg"
    t = table1([a, b, c], last_n=3).set_index("row")
    assert t.loc["softmax-mnist", "train"] == pytest.approx((0.8 + 0.8) / 2)
    assert t.loc["softmax-mnist", "train_std"] == pytest.approx(0.0, abs=1e-12)
    assert t.loc["softmax-mnist", "runs"] == 2
    assert t.loc["softmax-mnist", "source"] == "mini-batch"
    assert t.loc["softmax-mnist", "steps"] == "3-5 (3 rows); 3-5 (3 rows)"
    # window 6 - 3 < step <= 6: steps 4 and 6
    assert t.loc["fc-sine-regression", "train"] == pytest.approx((0.6 + 0.9) / 2)
    assert t.loc["fc-sine-regression", "test"] == pytest.approx((0.2 + 0.4) / 2)
    assert t.loc["fc-sine-regression", "source"] == "full batch"
    assert np.isnan(t.loc["fc-mnist-softplus", "train"]) and t.loc["fc-mnist-softplus",
                                                                   "runs"] == 0
    assert t.loc["fc-sine-regression", "paper"] == 0.99

    text = table1_markdown(table1([a, b, c], last_n=3), last_n=3)
    assert "| MNIST | Softmax |  | 0.96 | 0.80 ± 0.00 | — | 2 | mini-batch |" in text
    assert "| Regression | FC | Batch size 100 | 0.99 | 0.75 | 0.30 | 1 | full batch |" in text
    assert "last 3 steps" in text
    back = pd.read_csv(io.StringIO(table1_csv(table1([a, b, c], last_n=3))))
    assert back.shape == (9, 11) and back["train"].iloc[0] == pytest.approx(0.8)


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
