"""Edge-of-stability figure: ``λ_max(t)`` against the optimizer's threshold, from run folders.

Reads what :mod:`tinysubspace.experiments.edge_of_stability` writes: ``sharpness/*`` (the
Hessian) and, for adaptive optimizers, ``preconditioned/*`` (``P^{-1/2} H P^{-1/2}``) columns of
``metrics.csv``; or what a tracker with ``optimizer=`` (``tracker.sharpness``) writes:
``sharpness/threshold`` with ``preconditioned/eig_*`` (``H``'s own values for SGD) and
``hessian/eig_*`` (:mod:`tinysubspace.experiments.tracker_curvature`). Never trains or computes
a Hessian.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tinysubspace.plots.common import finish, new_figure, series
from tinysubspace.results.store import MissingDataError, Run, RunLike, as_run, run_label

__all__ = ["figure_sharpness", "sharpness_prefix"]


def sharpness_prefix(run: Run) -> str:
    """``"preconditioned"`` where the run has a finite preconditioned threshold, else
    ``"sharpness"``: the quantity whose threshold is known.

    Raises:
        MissingDataError: the run has neither kind of column.
    """
    if _is_tracker_run(run):
        values = run.metrics[["preconditioned/eig_1", "hessian/eig_1"]].to_numpy(float)
        same = np.isnan(values[:, 0]) | (values[:, 0] == values[:, 1])
        return "sharpness" if same.all() else "preconditioned"
    for prefix in ("preconditioned", "sharpness"):
        column = f"{prefix}/threshold"
        if column in run.metrics and np.isfinite(run.metrics[column].to_numpy(float)).any():
            return prefix
    raise MissingDataError(f"{run.path} has no sharpness/threshold or preconditioned/threshold "
                           "column with values; run an edge-of-stability config "
                           "(tinysubspace run eos-gd-fc-digits)")


def figure_sharpness(runs: Sequence[RunLike] | RunLike, labels: Sequence[str] | None = None,
                     log_sharpness: bool = False) -> Figure:
    """Per run: training loss, and ``λ_1`` (and ``λ_2``) with the threshold as a dashed line.

    For an adaptive optimizer the thresholded quantity is the preconditioned sharpness; the raw
    Hessian's ``λ_1`` is drawn too (thin, right axis) to show how far it moves meanwhile.

    The threshold (``2/η`` for gradient descent, ``38/η`` for Adam's preconditioned sharpness)
    moves with a learning-rate schedule (a cosine schedule took it from 12,667 to 132,647): it is
    drawn over the steps it was recorded at, not as one flat line.

    Data: ``{label: {"prefix", "step", "lambda_1", "step2", "lambda_2", "threshold_step",
    "thresholds", "threshold", "loss_step", "loss", "raw_step", "raw_lambda_1"}}``
    (``threshold``: the last one; ``raw_*`` only for preconditioned runs).

    Raises:
        MissingDataError: a run without sharpness columns.
    """
    loaded = [as_run(r) for r in (runs if isinstance(runs, (list, tuple)) else [runs])]
    labels = list(labels) if labels is not None else [run_label(r) for r in loaded]
    figure, axes = new_figure(2 * len(loaded), width=4.6, rows=len(loaded))
    data: dict[str, Any] = {}
    for index, (run, label) in enumerate(zip(loaded, labels, strict=True)):
        ax_loss, ax_lam = axes[2 * index], axes[2 * index + 1]
        curves = _curves(run)
        ax_loss.plot(curves["loss_step"], curves["loss"], "-", color="C0")
        ax_loss.set(yscale="log", xlabel="step", ylabel="training loss", title=label)
        ax_lam.plot(curves["step"], curves["lambda_1"], "-", color="C1", label=r"$\lambda_1$")
        if len(curves["lambda_2"]):
            ax_lam.plot(curves["step2"], curves["lambda_2"], "-", color="C1", alpha=0.4, lw=0.8,
                        label=r"$\lambda_2$")
        ax_lam.plot(curves["threshold_step"], curves["thresholds"], "--", color="k", lw=1,
                    label=_threshold_label(curves["thresholds"]))
        name = "preconditioned sharpness" if curves["prefix"] == "preconditioned" else "sharpness"
        ax_lam.set(xlabel="step", ylabel=name, title=f"{name} and its threshold")
        if log_sharpness:
            ax_lam.set_yscale("log")
        if "raw_step" in curves:
            twin = ax_lam.twinx()
            twin.plot(curves["raw_step"], curves["raw_lambda_1"], "-", color="C2", lw=0.8)
            twin.set_ylabel(r"$\lambda_1(H)$ (green)", color="C2")
        ax_lam.legend(fontsize="small", loc="best")
        data[label] = curves
    return finish(figure, data)


def _threshold_label(thresholds: np.ndarray) -> str:
    """``threshold 40`` for a constant one, ``threshold 1.267e+04 → 1.326e+05`` for one that
    moved (first and last recorded values)."""
    first, last = float(thresholds[0]), float(thresholds[-1])
    if np.allclose(thresholds, last, rtol=1e-9, atol=0):
        return f"threshold {last:.4g}"
    return f"threshold {first:.4g} → {last:.4g}"


def _is_tracker_run(run: Run) -> bool:
    """A tracker run with ``optimizer=``: thresholds but no driver ``…/lambda_1`` columns."""
    columns = run.metrics.columns
    return ("sharpness/ratio" in columns and "preconditioned/eig_1" in columns
            and "sharpness/lambda_1" not in columns
            and np.isfinite(run.metrics["sharpness/threshold"].to_numpy(float)).any())


def _columns(run: Run, prefix: str) -> dict[str, str]:
    """Where λ₁, λ₂, the threshold and the raw λ₁(H) are stored in ``run``."""
    if _is_tracker_run(run):
        return {"lambda_1": "preconditioned/eig_1", "lambda_2": "preconditioned/eig_2",
                "threshold": "sharpness/threshold", "raw": "hessian/eig_1"}
    return {"lambda_1": f"{prefix}/lambda_1", "lambda_2": f"{prefix}/lambda_2",
            "threshold": f"{prefix}/threshold", "raw": "sharpness/lambda_1"}


def _curves(run: Run) -> dict[str, Any]:
    prefix = sharpness_prefix(run)
    names = _columns(run, prefix)
    step, lam1 = series(run, names["lambda_1"])
    step2, lam2 = (series(run, names["lambda_2"]) if names["lambda_2"] in run.metrics
                   else (np.empty(0), np.empty(0)))
    threshold_step, threshold = series(run, names["threshold"])
    loss_step, loss = series(run, "train/loss")
    curves: dict[str, Any] = {"prefix": prefix, "step": step, "lambda_1": lam1, "step2": step2,
                              "lambda_2": lam2, "threshold_step": threshold_step,
                              "thresholds": threshold, "threshold": float(threshold[-1]),
                              "loss_step": loss_step, "loss": loss}
    if prefix == "preconditioned":
        curves["raw_step"], curves["raw_lambda_1"] = series(run, names["raw"])
    return curves
