"""What every figure of :mod:`tinysubspace.plots.figures` shares: reading a run, building a headless
figure, attaching the plotted arrays, choosing steps. (Parameter groups by layer:
:func:`tinysubspace.problems.models.anatomy.label_parameters`.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tinysubspace.results.store import MissingDataError, Run, RunLike, as_run, run_label

__all__ = [
    "SYMLOG_FROM",
    "SYMLOG_LINEAR_UNTIL",
    "MissingDataError",
    "RunLike",
    "as_run",
    "choose_steps",
    "finish",
    "interval_mean",
    "new_figure",
    "plotted_data",
    "require_columns",
    "run_label",
    "series",
    "step_scale",
    "top_k",
]


def plotted_data(figure: Figure) -> dict[Any, Any]:
    """The arrays a ``figure_*`` function drew (each function's docstring lists the keys)."""
    return figure.tinysubspace_data


def finish(figure: Figure, data: dict[Any, Any]) -> Figure:
    """Attach the plotted arrays to ``figure`` and return it."""
    figure.tinysubspace_data = data
    return figure


def new_figure(panels: int, width: float = 4.2, height: float = 3.2,
               rows: int = 1) -> tuple[Figure, list]:
    """A pyplot-free figure with ``panels`` axes on ``rows`` rows (unused cells hidden).

    Raises:
        ValueError: ``panels`` or ``rows`` below 1 (e.g. an empty list of steps to draw).
    """
    if panels < 1 or rows < 1:
        raise ValueError(f"a figure needs at least one panel and one row, got {panels} panels "
                         f"on {rows} rows")
    cols = -(-panels // rows)
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def top_k(run: Run) -> int:
    """``k`` of the run: ``tracker.k`` from the config, else half the ``hessian/eig_*`` columns.

    Raises:
        MissingDataError: neither is there.
    """
    k = (run.config.get("tracker") or {}).get("k")
    if k:
        return int(k)
    count = sum(1 for c in run.metrics.columns if str(c).startswith("hessian/eig_"))
    if count < 2:
        raise MissingDataError(f"cannot tell k for {run.path}: no tracker.k in config.json and "
                               "no hessian/eig_* columns in metrics.csv")
    return count // 2


def require_columns(run: Run, figure: str, *names: str) -> None:
    """Raise :class:`MissingDataError` unless ``metrics.csv`` has rows and ``names``."""
    missing = [n for n in names if n not in run.metrics.columns]
    if run.metrics.empty or missing:
        raise MissingDataError(f"{figure} needs the metrics.csv columns {missing or list(names)}; "
                               f"{run.path} has no such measurements")


def series(run: Run, column: str, since: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of a metrics column; NaN rows and rows before ``since`` dropped."""
    table = run.metrics[["step", column]].dropna()
    if since is not None:
        table = table[table["step"] >= since]
    return table["step"].to_numpy(dtype=float), table[column].to_numpy(dtype=float)


def choose_steps(available: Sequence[int], wanted: Sequence[int]) -> list[int]:
    """For each wanted step the nearest available one (ties: the earlier), duplicates dropped.

    >>> choose_steps([0, 10, 50, 120], [0, 50, 100, 200])
    [0, 50, 120]
    """
    pool = sorted(int(s) for s in available)
    chosen: list[int] = []
    for step in wanted if pool else ():
        best = min(pool, key=lambda s: (abs(s - step), s))
        if best not in chosen:
            chosen.append(best)
    return chosen


def step_scale(last_step: float, x_scale: str = "auto") -> str:
    """The step axis of Figs. 1 / 12: ``"linear"``, or ``"symlog"`` (linear up to step
    :data:`SYMLOG_LINEAR_UNTIL`, logarithmic after). ``"auto"``: symlog for runs longer than
    :data:`SYMLOG_FROM` steps, where the first 200 steps (where f_top rises) would be squeezed
    into a few percent of a linear axis.

    Raises:
        ValueError: an unknown ``x_scale``.

    >>> step_scale(1500), step_scale(300), step_scale(300, "symlog")
    ('symlog', 'linear', 'symlog')
    """
    if x_scale not in ("auto", "linear", "symlog"):
        raise ValueError(f"x_scale must be auto, linear or symlog, got {x_scale!r}")
    if x_scale != "auto":
        return x_scale
    return "symlog" if last_step > SYMLOG_FROM else "linear"


SYMLOG_FROM, SYMLOG_LINEAR_UNTIL = 1000, 10


def interval_mean(t2: np.ndarray, overlap: np.ndarray, t1: float) -> float:
    """The overlap averaged over the interval ``t2 − t1`` (PAPER.txt, Fig. 3), by the trapezoid
    rule over the measured ``t2 ≥ t1``:

    .. math::  \\bar o(t_1) = \\frac{1}{T - t_1} \\int_{t_1}^{T} o(t_1, t_2)\\, dt_2

    so each measurement weighs as much as the stretch of training it stands for, and the dense
    early schedule (every 10 steps to 200, then every 100) does not tilt the mean. NaN where fewer
    than two finite points span an interval.

    >>> interval_mean(np.array([0, 10, 100]), np.array([1.0, 1.0, 0.0]), 0)  # 1 to 10, then ramp
    0.55
    """
    keep = np.isfinite(overlap) & (t2 >= t1)
    x, y = np.asarray(t2, float)[keep], np.asarray(overlap, float)[keep]
    if x.size < 2 or x[-1] <= x[0]:
        return float("nan")
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2 / (x[-1] - x[0]))
