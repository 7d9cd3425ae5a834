"""Table 1 of the paper: the mean overlap(g, Hg) (eq. 3) over the last steps of training, per
setting, next to the published value.

.. math::  \\overline{\\mathrm{overlap}} = \\frac{1}{|W|} \\sum_{t \\in W}
           \\frac{g_t^T H_t g_t}{\\|g_t\\|\\,\\|H_t g_t\\|},
           \\qquad W = \\{t : t_{\\mathrm{last}} - N < t \\le t_{\\mathrm{last}}\\}

"the reported overlap is the mean over the last 1,000 steps of training" (PAPER.txt, Table 1),
with ``g`` and ``H`` of the training mini-batch at each step. We average
``minibatch/overlap_g_Hg`` (``minibatch.csv``) over the rows in ``W``; a run without a mini-batch
table falls back to the full-batch ``hessian/overlap_g_Hg`` column, and the output says so. The
test-set column averages ``test/overlap_g_Hg`` over the same window, where measured.

A run belongs to a row through ``table1_row`` in its config (top level, or under
``"experiment"``), one of the slugs of :data:`TABLE1_ROWS`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tinysubspace.results.store import Run

__all__ = [
    "MINIBATCH_COLUMN",
    "TABLE1_ROWS",
    "RunOverlap",
    "Table1Row",
    "run_overlap",
    "table1",
    "table1_csv",
    "table1_markdown",
    "table1_row_id",
    "window_mean",
]

MINIBATCH_COLUMN, FULL_COLUMN, TEST_COLUMN = ("minibatch/overlap_g_Hg", "hessian/overlap_g_Hg",
                                              "test/overlap_g_Hg")


@dataclass(frozen=True)
class Table1Row:
    """One row of the paper's Table 1 and its published mean overlap (PAPER.txt gives one value
    per row, on the training data; the paper reports no test-set numbers)."""

    row_id: str
    dataset: str
    model: str
    comment: str
    paper: float


TABLE1_ROWS: tuple[Table1Row, ...] = (
    Table1Row("softmax-mnist", "MNIST", "Softmax", "", 0.96),
    Table1Row("fc-mnist-softplus", "MNIST", "FC", "Softplus activation", 0.96),
    Table1Row("fc-mnist-lr0.01", "MNIST", "FC", "η = 0.01", 0.96),
    Table1Row("fc-mnist-batch256", "MNIST", "FC", "Batch size 256", 0.97),
    Table1Row("fc-mnist-random-labels", "MNIST", "FC", "Random labels", 0.86),
    Table1Row("convnet-cifar10-random-labels", "CIFAR10", "ConvNet", "Random labels", 0.86),
    Table1Row("convnet-cifar10-dropout-bn-dense", "CIFAR10", "ConvNet",
              "Dropout, batch-norm, and extra dense layer", 0.93),
    Table1Row("convnet-cifar10-adam", "CIFAR10", "ConvNet", "Optimized using Adam", 0.89),
    Table1Row("fc-sine-regression", "Regression", "FC", "Batch size 100", 0.99),
)
_BY_ID = {row.row_id: row for row in TABLE1_ROWS}


@dataclass(frozen=True)
class RunOverlap:
    """The mean overlap(g, Hg) of one run over its last ``N`` steps.

    Attributes:
        path: the run folder.
        row_id: its Table 1 row.
        train: mean of ``source`` over the window (NaN if no finite value there).
        test: mean of ``test/overlap_g_Hg`` over the window, ``None`` if not measured.
        source: the column averaged: ``minibatch/overlap_g_Hg`` or ``hessian/overlap_g_Hg``.
        first_step, last_step: the window ``(last − N, last]`` actually covered.
        count: number of rows averaged.
    """

    path: str
    row_id: str | None
    train: float
    test: float | None
    source: str
    first_step: int
    last_step: int
    count: int


def window_mean(table: pd.DataFrame, column: str, last_n: int,
                last_step: int | None = None) -> tuple[float, int, int, int]:
    """Mean of the finite values of ``column`` over the rows with ``last − N < step ≤ last``.

    Returns:
        ``(mean, first_step, last_step, count)``; ``mean`` is NaN when ``count`` is 0.

    Raises:
        ValueError: ``last_n < 1``.

    >>> t = pd.DataFrame({"step": [0, 1, 2, 3], "x": [9.0, 1.0, 2.0, float("nan")]})
    >>> window_mean(t, "x", last_n=3)   # steps 1, 2, 3; the NaN is skipped
    (1.5, 1, 2, 2)
    """
    if last_n < 1:
        raise ValueError(f"last_n must be at least 1 step, got {last_n}")
    last = int(table["step"].max()) if last_step is None else int(last_step)
    rows = table[(table["step"] > last - last_n) & (table["step"] <= last)]
    values = rows[column].to_numpy(dtype=float)
    finite = np.isfinite(values)
    if not finite.any():
        return math.nan, last, last, 0
    steps = rows["step"].to_numpy()[finite]
    return float(values[finite].mean()), int(steps.min()), int(steps.max()), int(finite.sum())


def table1_row_id(run: Run) -> str | None:
    """The run's ``table1_row`` (top level of config.json, or under ``"experiment"``)."""
    config = run.config
    return config.get("table1_row") or (config.get("experiment") or {}).get("table1_row")


def _has_values(table: pd.DataFrame, column: str) -> bool:
    return not table.empty and column in table and bool(table[column].notna().any())


def run_overlap(run: Run, last_n: int = 1000) -> RunOverlap:
    """Table 1's mean overlap of one run over its last ``last_n`` steps.

    Raises:
        ValueError: the run has neither mini-batch nor full-batch overlap(g, Hg) values.
    """
    if _has_values(run.minibatch, MINIBATCH_COLUMN):
        table, source = run.minibatch, MINIBATCH_COLUMN
    elif _has_values(run.metrics, FULL_COLUMN):
        table, source = run.metrics, FULL_COLUMN
    else:
        raise ValueError(f"{run.path} has no overlap(g, Hg) values: neither {MINIBATCH_COLUMN} "
                         f"in minibatch.csv nor {FULL_COLUMN} in metrics.csv")
    train, first, last, count = window_mean(table, source, last_n)
    test = None
    if _has_values(run.metrics, TEST_COLUMN):
        test = window_mean(run.metrics, TEST_COLUMN, last_n, last_step=last)[0]
    return RunOverlap(str(run.path), table1_row_id(run), train, test, source, first, last, count)


def table1(runs: Iterable[Run], last_n: int = 1000) -> pd.DataFrame:
    """Table 1: one row per paper row, in the paper's order, with our mean over the runs of it.

    Columns: ``row``, ``dataset``, ``model``, ``comment``, ``paper``, ``train`` (mean over runs
    of each run's window mean), ``train_std`` (over runs; NaN for one run), ``test``, ``runs``,
    ``source`` (``mini-batch`` or ``full batch``), ``steps`` (the window(s) averaged).

    Raises:
        ValueError: a run without ``table1_row`` or with an unknown one (the known are listed).
    """
    found: dict[str, list[RunOverlap]] = {}
    for run in runs:
        row_id = table1_row_id(run)
        if row_id not in _BY_ID:
            what = "has no table1_row" if row_id is None else f"has table1_row {row_id!r}"
            raise ValueError(f"{run.path} {what}; known rows: {', '.join(_BY_ID)}")
        found.setdefault(row_id, []).append(run_overlap(run, last_n))
    records = []
    for row in TABLE1_ROWS:
        results = found.get(row.row_id, [])
        train = [r.train for r in results]
        tests = [r.test for r in results if r.test is not None]
        sources = sorted({"mini-batch" if r.source == MINIBATCH_COLUMN else "full batch"
                          for r in results})
        records.append({
            "row": row.row_id, "dataset": row.dataset, "model": row.model,
            "comment": row.comment, "paper": row.paper,
            "train": float(np.mean(train)) if train else math.nan,
            "train_std": float(np.std(train, ddof=1)) if len(train) > 1 else math.nan,
            "test": float(np.mean(tests)) if tests else math.nan,
            "runs": len(results), "source": ", ".join(sources),
            "steps": "; ".join(f"{r.first_step}-{r.last_step} ({r.count} rows)"
                               for r in results)})
    return pd.DataFrame.from_records(records)


def _cell(value: float, std: float = math.nan) -> str:
    if not np.isfinite(value):
        return "—"
    return f"{value:.2f} ± {std:.2f}" if np.isfinite(std) else f"{value:.2f}"


def table1_markdown(table: pd.DataFrame, last_n: int = 1000) -> str:
    """Table 1 as a markdown table, with a note on what was averaged."""
    lines = ["| Dataset | Model | Comment | Paper | Ours (train) | Ours (test) | Runs | Source |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.dataset} | {r.model} | {r.comment} | {r.paper:.2f} | "
                     f"{_cell(r.train, r.train_std)} | {_cell(r.test)} | {r.runs} | "
                     f"{r.source or '—'} |")
    lines.append("")
    lines.append(f"Mean overlap(g, Hg) (eq. 3) over the last {last_n} steps of each run "
                 "(mini-batch: minibatch.csv, at every logged step; full batch: metrics.csv, "
                 "used where a run has no mini-batch table); ± is the standard deviation over "
                 "runs. The paper reports training-set values only; — : no run or not measured.")
    return "\n".join(lines)


def table1_csv(table: pd.DataFrame) -> str:
    """Table 1 as CSV (every column of :func:`table1`)."""
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    return buffer.getvalue()
