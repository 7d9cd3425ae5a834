"""Table 1's companion figure: overlap(g, Hg) (eq. 3) over training, from every table of the run
that holds it — the mini-batch per step (``minibatch.csv``), the full training set and the test
split at every step of Table 1's window (``full_overlap.csv``, ``tracker.overlap_last``) and at
the tracker's measurements (``metrics.csv``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tinysubspace.plots.common import MissingDataError, RunLike, as_run, finish, new_figure
from tinysubspace.results.store import Run
from tinysubspace.results.table1 import full_overlap_table

__all__ = ["figure_overlap_g_Hg", "overlap_series"]

# name -> (table, column, line style, colour, legend label)
_SERIES = (
    ("minibatch", "minibatch", "minibatch/overlap_g_Hg", "-", "C0", "mini-batch"),
    ("full", "metrics", "hessian/overlap_g_Hg", "o", "C1", "full training set (measurements)"),
    ("full_every", "every", "full/overlap_g_Hg", "-", "C3", "full training set (every step)"),
    ("test", "metrics", "test/overlap_g_Hg", "s", "C2", "test set (measurements)"),
    ("test_every", "every", "full/test_overlap_g_Hg", "-", "C2", "test set (every step)"),
)


def overlap_series(run: Run) -> dict[str, dict[str, np.ndarray]]:
    """``{name: {"step", "overlap"}}`` for each series of :data:`_SERIES` the run has (``name``:
    ``minibatch``, ``full``, ``full_every``, ``test``, ``test_every``; NaN rows dropped)."""
    tables = {"minibatch": run.minibatch, "metrics": run.metrics,
              "every": full_overlap_table(run)}
    found = {}
    for name, table_name, column, *_ in _SERIES:
        table = tables[table_name]
        if table.empty or column not in table:
            continue
        rows = table[["step", column]].dropna()
        if not rows.empty:
            found[name] = {"step": rows["step"].to_numpy(float),
                           "overlap": rows[column].to_numpy(float)}
    return found


def figure_overlap_g_Hg(run: RunLike, last_n: int = 1000, smooth: int = 50) -> Figure:
    """Table 1's quantity over training: ``overlap(g, Hg)`` (eq. 3) on mini-batches (thin; bold:
    running mean over ``smooth`` rows), on the full training set and the test set (markers at
    the tracker's measurements, lines at every step of Table 1's window where measured); the
    shaded band is the last ``last_n`` steps that Table 1 averages.

    Data: :func:`overlap_series` (the series present).
    """
    run = as_run(run)
    data = overlap_series(run)
    if not data:
        raise MissingDataError("the overlap(g, Hg) figure needs minibatch.csv, "
                               "full_overlap.csv or the hessian/overlap_g_Hg column; "
                               f"{run.path} has none")
    figure, (ax,) = new_figure(1, width=6.0, height=3.6)
    for name, _, _, style, color, label in _SERIES:
        if name not in data:
            continue
        steps, values = data[name]["step"], data[name]["overlap"]
        if name == "minibatch":
            ax.plot(steps, values, "-", lw=0.4, color=color, alpha=0.4)
            values = pd.Series(values).rolling(smooth, min_periods=1).mean().to_numpy(float)
            label = f"{label} (mean of {smooth})"
        ax.plot(steps, values, style, ms=3, lw=1.0, color=color, label=label)
    last = max(float(d["step"].max()) for d in data.values())
    band = (f"last {last_n} steps (Table 1)" if last >= last_n else
            f"steps 0–{last:.0f}: the whole run, shorter than {last_n} (Table 1)")
    ax.axvspan(max(last - last_n, 0), last, color="0.9", zorder=0, label=band)
    ax.set(xlabel="step", ylabel=r"overlap$(g, Hg)$", ylim=(-1.02, 1.02),
           title=r"overlap$(g, Hg) = g^T H g / (\|g\|\,\|Hg\|)$")
    ax.legend(fontsize="small", loc="lower right")
    return finish(figure, data)
