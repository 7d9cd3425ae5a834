"""The projected-training comparison's figure: loss, accuracy and ``f_top`` of several runs
(the table beside it is :func:`tinysubspace.results.projected.compare_table`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tinysubspace.plots.common import finish, new_figure
from tinysubspace.results.projected import optimizer_cost, short_labels
from tinysubspace.results.store import MissingDataError, Run, RunLike, as_run, run_label

__all__ = ["figure_compare"]


def figure_compare(runs: Sequence[RunLike], labels: Sequence[str] | None = None,
                   smooth: int = 25, log_loss: bool = True) -> Figure:
    """Training loss, training (and test) accuracy and ``f_top`` of several runs, one colour each.

    Loss: full-data ``train/loss`` (markers) over the moving average of the mini-batch loss
    (``smooth`` steps, thin); a dotted vertical line marks where a ``switch-*`` optimizer switched.

    Data: ``{label: {"step", "train/loss", "train/accuracy", "hessian/f_top", "minibatch_step",
    "minibatch_loss", "switched_at"}}``.

    Raises:
        MissingDataError: a run has no ``train/loss`` measurements.
    """
    loaded = [as_run(r) for r in runs]
    labels = list(labels) if labels is not None else short_labels([run_label(r) for r in loaded])
    figure, (ax_loss, ax_acc, ax_f) = new_figure(3, width=4.6)
    data: dict[str, Any] = {}
    tested = False  # a dashed test curve drawn
    for index, (run, label) in enumerate(zip(loaded, labels, strict=True)):
        if "train/loss" not in run.metrics or run.metrics["train/loss"].dropna().empty:
            raise MissingDataError(f"{run.path} has no train/loss measurements (metrics.csv)")
        color = f"C{index}"
        curves = {c: run.metrics[c].to_numpy(dtype=float) for c in
                  ("step", "train/loss", "train/accuracy", "test/accuracy", "hessian/f_top")
                  if c in run.metrics}
        curves.update(_minibatch_curve(run, smooth))
        curves["switched_at"] = optimizer_cost(run)["switched_at"]
        if len(curves.get("minibatch_step", [])):
            ax_loss.plot(curves["minibatch_step"], curves["minibatch_loss"], "-", lw=0.8,
                         alpha=0.45, color=color)
        ax_loss.plot(curves["step"], curves["train/loss"], "o-", ms=3, color=color, label=label)
        if "train/accuracy" in curves:
            ax_acc.plot(curves["step"], curves["train/accuracy"], "o-", ms=3, color=color,
                        label=label)
        if "test/accuracy" in curves and np.isfinite(curves["test/accuracy"]).any():
            ax_acc.plot(curves["step"], curves["test/accuracy"], "--", color=color)
            tested = True
        if "hessian/f_top" in curves:
            ax_f.plot(curves["step"], curves["hessian/f_top"], "o-", ms=3, color=color)
        if curves["switched_at"] is not None:
            for ax in (ax_loss, ax_acc, ax_f):
                ax.axvline(curves["switched_at"], color=color, ls=":", lw=1)
        data[label] = curves
    if log_loss:
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="step", ylabel="training loss",
                title=f"loss: full data (o), mini-batch ({smooth}-step mean)")
    ax_acc.set(xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02),
               title="training accuracy (test: dashed)" if tested else
               "training accuracy (no test set measured)")
    ax_f.set(xlabel="step", ylabel=r"$f_{\mathrm{top}}$", ylim=(-0.02, 1.02),
             title=r"$f_{\mathrm{top}}$ of the full-batch gradient (eq. 2)")
    ax_acc.legend(fontsize="small")
    return finish(figure, data)


def _minibatch_curve(run: Run, smooth: int) -> dict[str, np.ndarray]:
    table = run.minibatch
    if table.empty or "minibatch/loss" not in table:
        return {}
    loss = table["minibatch/loss"].rolling(max(smooth, 1), min_periods=1).mean()
    return {"minibatch_step": table["step"].to_numpy(dtype=float),
            "minibatch_loss": loss.to_numpy(dtype=float)}
