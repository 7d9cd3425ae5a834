"""Table 1 of the paper: the mean overlap(g, Hg) (eq. 3) over the last steps of training, per
setting, next to the published value.

.. math::  \\overline{\\mathrm{overlap}} = \\frac{1}{|W|} \\sum_{t \\in W}
           \\frac{g_t^T H_t g_t}{\\|g_t\\|\\,\\|H_t g_t\\|},
           \\qquad W = \\{t : t_{\\mathrm{last}} - N < t \\le t_{\\mathrm{last}}\\}

The paper's column (PAPER.txt, section 2 and Table 1): ``g`` and ``H`` of the *entire* training
set, "the mean over the last 1,000 steps of training". Three columns of ours:

- **full data** (the paper's): ``full/overlap_g_Hg`` of ``full_overlap.csv``, measured at every
  step of the window (``tracker.overlap_last = 1000``, :mod:`tinysubspace.experiments.
  full_overlap`); a run without that file falls back to the tracker's ``hessian/overlap_g_Hg``
  of ``metrics.csv`` at its (fewer) measurements, and the ``full_source`` column says so;
- **mini-batch**: ``minibatch/overlap_g_Hg`` of ``minibatch.csv``, ``g`` and ``H`` of each step's
  training mini-batch — a noisier, different quantity (lower on digits: 0.92 against 0.96);
- **test**: ``full/test_overlap_g_Hg`` (every step, the whole test split) where measured, else
  ``test/overlap_g_Hg`` of ``metrics.csv``.

Which function each column measures: full data and test in the tracker's mode (``eval`` by
default: dropout off, batch norm on its running statistics), the mini-batch in train mode (a
dropout mask per step, batch norm on the batch's statistics). Without dropout and batch norm the
two modes are the same function; :func:`measured_functions` says which holds for a run.

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
from tinysubspace.results.window import covers_start

__all__ = [
    "FULL_OVERLAP_COLUMNS",
    "FULL_OVERLAP_FILE",
    "MINIBATCH_COLUMN",
    "TABLE1_ROWS",
    "RunOverlap",
    "Table1Row",
    "WindowMean",
    "full_data_steps",
    "full_overlap_table",
    "measured_functions",
    "run_data",
    "run_overlap",
    "table1",
    "table1_csv",
    "table1_markdown",
    "table1_row_id",
    "table1_warnings",
    "window_mean",
]

FULL_OVERLAP_FILE = "full_overlap.csv"
FULL_OVERLAP_COLUMNS = ("step", "full/loss", "full/grad_norm", "full/overlap_g_Hg",
                        "full/test_loss", "full/test_overlap_g_Hg")
MINIBATCH_COLUMN = "minibatch/overlap_g_Hg"
FULL_COLUMN, FULL_TEST_COLUMN = "full/overlap_g_Hg", "full/test_overlap_g_Hg"
MEASURED_COLUMN, MEASURED_TEST_COLUMN = "hessian/overlap_g_Hg", "test/overlap_g_Hg"


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
class WindowMean:
    """The mean of one column over a window of steps.

    Attributes:
        value: the mean of the finite values (NaN if there are none).
        first_step, last_step: the steps actually covered.
        count: how many values were averaged.
        source: ``file:column`` averaged.
    """

    value: float
    first_step: int
    last_step: int
    count: int
    source: str


@dataclass(frozen=True)
class RunOverlap:
    """Table 1's means of one run over its last ``N`` steps.

    Attributes:
        path: the run folder.
        row_id: its Table 1 row.
        full: the paper's column, full training set (``None``: not measured).
        minibatch: the mini-batch overlap (``None``: no mini-batch table).
        test: the whole test split (``None``: not measured).
        every_step: ``full`` was measured at every step of the window (``full_overlap.csv``),
            not only at the tracker's measurements.
        functions: :func:`measured_functions` of the run.
        data: the data set the run trained on (``data.name`` of its config; ``""`` unknown).
    """

    path: str
    row_id: str | None
    full: WindowMean | None
    minibatch: WindowMean | None
    test: WindowMean | None
    every_step: bool
    functions: dict[str, str]
    data: str = ""


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


def full_overlap_table(run: Run) -> pd.DataFrame:
    """``full_overlap.csv`` of the run (empty if absent; a row cut short by a crash dropped).

    Raises:
        ValueError: the file is not a readable CSV table.
    """
    path = run.path / FULL_OVERLAP_FILE
    if not path.exists():
        return pd.DataFrame()
    text = path.read_text(encoding="utf-8")
    text = text[: text.rfind("\n") + 1]
    try:
        return pd.read_csv(io.StringIO(text)) if text.strip() else pd.DataFrame()
    except pd.errors.ParserError as error:
        raise ValueError(f"{path} is not a readable CSV table ({error})") from None


def measured_functions(run: Run) -> dict[str, str]:
    """Which function each column measures: ``{"full", "minibatch", "same"}`` (``same`` is
    ``"yes"`` when the model has neither dropout nor batch norm, so both modes agree)."""
    mode = (run.config.get("tracker") or {}).get("mode") or "eval"
    model = run.config.get("model") or {}
    random_parts = [name for name, key in (("dropout", "dropout"), ("batch norm", "batchnorm"))
                    if model.get(key)]
    if mode == "eval":
        full = "eval mode: dropout off, batch norm on running statistics"
    else:
        full = "train mode: dropout on, batch norm on each chunk's statistics"
    return {"full": full, "minibatch": "train mode: a dropout mask per step, batch norm on "
            "the mini-batch's statistics", "same": "no" if random_parts else "yes",
            "random_parts": ", ".join(random_parts)}


def _has_values(table: pd.DataFrame, column: str) -> bool:
    return not table.empty and column in table and bool(table[column].notna().any())


def _first_mean(candidates: list[tuple[str, pd.DataFrame, str]],
                last_n: int) -> WindowMean | None:
    """The window mean of the first ``(file, table, column)`` that has values."""
    for name, table, column in candidates:
        if _has_values(table, column):
            return WindowMean(*window_mean(table, column, last_n), f"{name}:{column}")
    return None


def run_overlap(run: Run, last_n: int = 1000) -> RunOverlap:
    """Table 1's means of one run over its last ``last_n`` steps.

    Raises:
        ValueError: the run has no overlap(g, Hg) values at all (none of ``full_overlap.csv``,
            ``metrics.csv`` and ``minibatch.csv`` holds one).
    """
    every = full_overlap_table(run)
    full = _first_mean([(FULL_OVERLAP_FILE, every, FULL_COLUMN),
                        ("metrics.csv", run.metrics, MEASURED_COLUMN)], last_n)
    minibatch = _first_mean([("minibatch.csv", run.minibatch, MINIBATCH_COLUMN)], last_n)
    if full is None and minibatch is None:
        raise ValueError(f"{run.path} has no overlap(g, Hg) values: neither {FULL_COLUMN} in "
                         f"{FULL_OVERLAP_FILE}, {MEASURED_COLUMN} in metrics.csv nor "
                         f"{MINIBATCH_COLUMN} in minibatch.csv")
    test = _first_mean([(FULL_OVERLAP_FILE, every, FULL_TEST_COLUMN),
                        ("metrics.csv", run.metrics, MEASURED_TEST_COLUMN)], last_n)
    return RunOverlap(str(run.path), table1_row_id(run), full, minibatch, test,
                      full is not None and full.source.startswith(FULL_OVERLAP_FILE),
                      measured_functions(run), run_data(run))


def run_data(run: Run) -> str:
    """The data set a run trained on: ``data.name`` of its config (``""`` where absent) — a
    ``…-digits`` variant fills an MNIST row of the paper with scikit-learn's digits."""
    return str((run.config.get("data") or {}).get("name") or "")


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if np.isfinite(v)]
    mean = float(np.mean(finite)) if finite else math.nan
    return mean, float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def _value(mean: WindowMean | None) -> float:
    return math.nan if mean is None else mean.value


def full_data_steps(overlap: RunOverlap) -> str:
    """How the full-data column was sampled: ``every step`` or ``every N steps`` (from
    ``full_overlap.csv``; ``tracker.overlap_every = N``), ``M measurements`` (the tracker's, in
    metrics.csv) or ``not measured``.

    >>> w = WindowMean(0.9, 4, 999, 200, "full_overlap.csv:full/overlap_g_Hg")
    >>> full_data_steps(RunOverlap("r", None, w, None, None, True, {}))
    'every 5 steps'
    """
    full = overlap.full
    if full is None:
        return "not measured"
    if not overlap.every_step:
        return f"{full.count} measurements"
    stride = round((full.last_step - full.first_step) / (full.count - 1)) if full.count > 1 else 1
    return "every step" if stride <= 1 else f"every {stride} steps"


def _full_source(results: list[RunOverlap]) -> str:
    return ", ".join(dict.fromkeys(full_data_steps(r) for r in results))


def _steps(r: RunOverlap) -> str:
    parts = [f"{name} {m.first_step}-{m.last_step} ({m.count})"
             for name, m in (("full", r.full), ("mini-batch", r.minibatch), ("test", r.test))
             if m is not None]
    return ", ".join(parts)


def table1(runs: Iterable[Run], last_n: int = 1000) -> pd.DataFrame:
    """Table 1: one row per paper row, in the paper's order, with our means over its runs.

    Columns: ``row``, ``dataset``, ``model``, ``comment``, ``paper``; ``full`` (the paper's
    column: mean over runs of each run's full-data window mean), ``full_std`` (over runs; NaN
    for one run), ``minibatch``, ``minibatch_std``, ``test``, ``runs``, ``full_source``
    (:func:`full_data_steps`), ``same_function`` (``yes``: no dropout or batch
    norm, so the mini-batch column measures the same function; ``no``), ``steps`` (the windows
    averaged, per run), ``data`` (the data sets the runs trained on, e.g. ``digits`` for an
    MNIST row filled by ``…-digits`` runs; more than one name: the row averages different data
    sets), ``short`` (how many runs are shorter than the window: their mean starts at step 0,
    :func:`~tinysubspace.results.window.covers_start`).

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
        full, full_std = _mean_std([_value(r.full) for r in results])
        minibatch, minibatch_std = _mean_std([_value(r.minibatch) for r in results])
        records.append({
            "row": row.row_id, "dataset": row.dataset, "model": row.model,
            "comment": row.comment, "paper": row.paper, "full": full, "full_std": full_std,
            "minibatch": minibatch, "minibatch_std": minibatch_std,
            "test": _mean_std([_value(r.test) for r in results])[0], "runs": len(results),
            "full_source": _full_source(results),
            "same_function": ", ".join(dict.fromkeys(r.functions["same"] for r in results)),
            "steps": "; ".join(_steps(r) for r in results),
            "short": sum(covers_start(r.full or r.minibatch, last_n) for r in results),
            "data": ", ".join(dict.fromkeys(r.data or "?" for r in results))})
    return pd.DataFrame.from_records(records)


def _cell(value: float, std: float = math.nan, mark: str = "") -> str:
    if not np.isfinite(value):
        return "—"
    text = f"{value:.2f} ± {std:.2f}" if np.isfinite(std) else f"{value:.2f}"
    return text + mark


def table1_markdown(table: pd.DataFrame, last_n: int = 1000) -> str:
    """Table 1 as a markdown table, with notes on what each column measured."""
    lines = ["| Dataset | Model | Comment | Paper | Ours: full data | Ours: mini-batch | "
             "Ours: test set | Runs | Full data at | Ours: trained on |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        mark = " †" if "no" in str(r.same_function).split(", ") else ""
        short = " ‡" if getattr(r, "short", 0) else ""
        lines.append(f"| {r.dataset} | {r.model} | {r.comment} | {r.paper:.2f} | "
                     f"{_cell(r.full, r.full_std, short)} | "
                     f"{_cell(r.minibatch, r.minibatch_std, mark)} | {_cell(r.test)} | "
                     f"{r.runs} | {r.full_source or '—'} | "
                     f"{r.data or '—'} |")
    lines += ["", f"Mean overlap(g, Hg) (eq. 3) over the last {last_n} steps of each run. "
              "Full data (the paper's column): g and H of the whole training set (PAPER.txt, "
              f"section 2), at every step ({FULL_OVERLAP_FILE}, tracker.overlap_last) or, "
              "where a run lacks it, at the tracker's measurements in metrics.csv ('Full data "
              "at' says which). Mini-batch: g and H of each step's training mini-batch "
              "(minibatch.csv). Test set: g and H of the whole test split. Full data and test "
              "set are measured in the tracker's mode (eval: dropout off, batch norm on running "
              "statistics), the mini-batch in train mode (dropout on, batch norm on the "
              "batch's statistics): the same function unless the model has dropout or batch "
              "norm (†: a different function). ± is the standard deviation over runs; the "
              "paper reports training-set values only; — : no run or not measured. Trained on: "
              "the data set of the row's runs (an MNIST row filled by `…-digits` runs says "
              "digits; two names: runs on different data sets averaged together)."]
    if "short" in table and table["short"].sum() > 0:
        lines.append(f"‡: a run shorter than {last_n} steps: its mean covers the whole run from "
                     "step 0, so the start of training is averaged in; not comparable with the "
                     "paper's (the last 1000 steps of a long run).")
    return "\n".join(lines)


def table1_warnings(table: pd.DataFrame, last_n: int = 1000) -> list[str]:
    """One warning per row that averages a run shorter than the window (:func:`table1`'s
    ``short`` column): what was averaged, ours beside the paper's."""
    warnings = []
    for r in table.itertuples(index=False):
        if getattr(r, "short", 0):
            ours = "—" if not np.isfinite(r.full) else f"{r.full:.2f}"
            warnings.append(f"row {r.row}: {r.short} of {r.runs} runs are shorter than "
                            f"{last_n} steps ({r.steps}); their mean averages in the start of "
                            f"training, so ours ({ours}) is not comparable with the paper's "
                            f"{r.paper:.2f}; train longer or pass --last N")
    return warnings


def table1_csv(table: pd.DataFrame) -> str:
    """Table 1 as CSV (every column of :func:`table1`)."""
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    return buffer.getvalue()
