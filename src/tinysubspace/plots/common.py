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
    "MissingDataError",
    "RunLike",
    "as_run",
    "choose_steps",
    "finish",
    "new_figure",
    "plotted_data",
    "require_columns",
    "run_label",
    "series",
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
