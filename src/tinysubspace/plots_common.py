"""What every figure of :mod:`tinysubspace.plots` shares: reading a run, building a headless
figure, attaching the plotted arrays, choosing steps, naming parameter groups by layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .store import Run, load_run

__all__ = [
    "MissingDataError",
    "ParameterGroup",
    "as_run",
    "choose_steps",
    "finish",
    "new_figure",
    "parameter_groups",
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
    """A pyplot-free figure with ``panels`` axes on ``rows`` rows (unused cells hidden)."""
    cols = -(-panels // rows)
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def run_label(run: Run) -> str:
    """The experiment's name from the config, else the folder's name."""
    config = run.config
    name = config.get("name") or config.get("experiment", {}).get("name")
    return str(name) if name else Path(run.path).name


def top_k(run: Run) -> int:
    """``k`` of the run: ``tracker.k`` from the config, else half the ``hessian/eig_*`` columns.

    Raises:
        MissingDataError: neither is there.
    """
    k = run.config.get("tracker", {}).get("k")
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


@dataclass(frozen=True)
class ParameterGroup:
    """A contiguous range ``[start, stop)`` of the flat parameter vector and its label."""

    label: str
    start: int
    stop: int


_KINDS = {"weight": "weights", "bias": "biases"}


def parameter_groups(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> list[ParameterGroup]:
    """Label each parameter by layer: ``"layer i weights"``, ``"layer i biases"``; the last
    module holding parameters is the ``"top layer"`` (Fig. 6's colouring).

    Layer ``i`` is the ``i``-th module (1-based, in ``named_parameters()`` order) that holds
    parameters, so a batch-norm or convolution counts as a layer of its own.

    >>> [g.label for g in parameter_groups(
    ...     ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"],
    ...     [[3, 2], [3], [1, 3], [1]])]
    ['layer 1 weights', 'layer 1 biases', 'top layer weights', 'top layer biases']
    """
    if len(names) != len(shapes):
        raise ValueError(f"{len(names)} parameter names but {len(shapes)} shapes")
    modules = [name.rsplit(".", 1)[0] if "." in name else "" for name in names]
    order = list(dict.fromkeys(modules))
    groups, start = [], 0
    for name, module, shape in zip(names, modules, shapes, strict=True):
        kind = name.rsplit(".", 1)[-1]
        layer = "top layer" if module == order[-1] else f"layer {order.index(module) + 1}"
        size = int(np.prod(shape)) if len(shape) else 1
        groups.append(ParameterGroup(f"{layer} {_KINDS.get(kind, kind)}", start, start + size))
        start += size
    return groups
