"""What every figure of :mod:`tinysubspace.plots` shares: reading a run, building a headless
figure, attaching the plotted arrays, choosing steps. (Parameter groups by layer:
:func:`tinysubspace.models.label_parameters`.)"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .store import Run, load_run

__all__ = [
    "MissingDataError",
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

RunLike = Run | str | Path


class MissingDataError(ValueError):
    """The run holds nothing of what a figure needs (says what is missing and how to get it)."""


def as_run(run: RunLike) -> Run:
    """A loaded run: ``run`` itself, or :func:`~tinysubspace.store.load_run` of a folder."""
    return load_run(run) if isinstance(run, (str, Path)) else run


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


def run_label(run: Run) -> str:
    """The experiment's name from the config, else the folder's name."""
    config = run.config
    name = config.get("name") or (config.get("experiment") or {}).get("name")
    return str(name) if name else Path(run.path).name


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
