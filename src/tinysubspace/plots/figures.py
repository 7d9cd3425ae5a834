"""The paper's figures, drawn from a saved run (PAPER.txt, Figs. 1–12).

Plots only read runs (docs/run-store.md): they never train and never compute a Hessian. Each
``figure_*`` function takes a run (a :class:`~tinysubspace.results.store.Run` or its folder) and
returns a
:class:`matplotlib.figure.Figure` built without pyplot (no global state; headless). The arrays it
drew are attached to the figure; :func:`plotted_data` returns them, so a test can compare them
with the run's metrics. Quantities are named as in the paper: ``f_top`` (eq. 2),
``overlap(g, Hg)`` (eq. 3), the subspace overlap (eq. 5), ``c_i²`` (eq. 12).

This module draws from the metrics tables (Figs. 1–3, 8–12 and Table 1's overlap);
:mod:`tinysubspace.plots.arrays` from the stored spectrum and eigenvectors (Figs. 4–7).
:data:`FIGURES` lists them all for the CLI and the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tinysubspace.plots.arrays import (
    figure_spectrum,
    figure_top_edge_density,
    figure_top_eigenvector,
    figure_top_layer_eigenvector,
)
from tinysubspace.plots.common import (
    SYMLOG_LINEAR_UNTIL,
    MissingDataError,
    RunLike,
    as_run,
    choose_steps,
    finish,
    interval_mean,
    new_figure,
    plotted_data,
    require_columns,
    run_label,
    series,
    step_scale,
    top_k,
)
from tinysubspace.plots.overlap import figure_overlap_g_Hg
from tinysubspace.results.store import Run

__all__ = [
    "DEFAULT_FIGURES",
    "FIGURES",
    "OVER_TIME",
    "FigureSpec",
    "MissingDataError",
    "as_run",
    "figure_c2",
    "figure_f_top",
    "figure_filename",
    "figure_lambda_max",
    "figure_overlap_by_dimension",
    "figure_overlap_g_Hg",
    "figure_overlap_vs_dimension",
    "figure_spectrum",
    "figure_subspace_overlap",
    "figure_top_edge_density",
    "figure_top_eigenvector",
    "figure_top_layer_eigenvector",
    "interval_mean",
    "plotted_data",
    "step_scale",
    "too_few_measurements",
]


def _anchors(run: Run, kind: str) -> list[int]:
    prefix = f"overlap/{kind}/t1="
    return sorted(int(c[len(prefix):]) for c in run.metrics.columns if str(c).startswith(prefix))


# ----------------------------------------------------------------------- Figs. 1 and 12
def figure_f_top(runs: RunLike | Sequence[RunLike], max_step: int | None = None,
                 labels: Sequence[str] | None = None, x_scale: str = "auto") -> Figure:
    """Fig. 1 / 12: ``f_top`` (eq. 2) and the training loss and accuracy over steps.

    One run gives the paper's panel pair (a, b); several runs are overlaid (variants, Fig. 12).
    Accuracy (dashed, right axis) is drawn where the run measured it (classification). The step
    axis is :func:`step_scale` of the last step drawn (``x_scale``: ``auto``, ``linear`` or
    ``symlog``).

    Data: ``{label: {"step", "hessian/f_top", "train/loss", "train/accuracy"}}``.
    """
    many = [as_run(r) for r in (runs if isinstance(runs, (list, tuple)) else [runs])]
    labels = list(labels) if labels is not None else [run_label(r) for r in many]
    figure, (ax_f, ax_loss) = new_figure(2)
    ax_acc = ax_loss.twinx()
    data: dict[str, Any] = {}
    for index, (run, label) in enumerate(zip(many, labels, strict=True)):
        require_columns(run, "Fig. 1 (f_top)", "hessian/f_top", "train/loss")
        table = run.metrics if max_step is None else run.metrics[run.metrics["step"] <= max_step]
        color = f"C{index}"
        curves = {c: table[c].to_numpy(dtype=float) for c in
                  ("step", "hessian/f_top", "train/loss", "train/accuracy") if c in table}
        ax_f.plot(curves["step"], curves["hessian/f_top"], "o-", ms=2.5, color=color, label=label)
        ax_loss.plot(curves["step"], curves["train/loss"], "-", color=color, label=label)
        if "train/accuracy" in curves and np.isfinite(curves["train/accuracy"]).any():
            ax_acc.plot(curves["step"], curves["train/accuracy"], "--", color=color)
        data[label] = curves
    ax_f.set(xlabel="step", ylabel=r"$f_{\mathrm{top}}$", ylim=(-0.02, 1.02),
             title=r"(a) fraction of $g$ in the top subspace, $f_{\mathrm{top}}$")
    ax_loss.set(xlabel="step", ylabel="training loss (solid)", title="(b) loss and accuracy")
    ax_acc.set(ylabel="training accuracy (dashed)", ylim=(-0.02, 1.02))
    last = max((float(np.nanmax(c["step"])) for c in data.values() if len(c["step"])),
               default=0.0)
    if step_scale(last, x_scale) == "symlog":
        for ax in (ax_f, ax_loss):
            ax.set_xscale("symlog", linthresh=SYMLOG_LINEAR_UNTIL, linscale=0.5)
            ax.set_xlim(left=0)
            ax.set_xlabel(f"step (linear to {SYMLOG_LINEAR_UNTIL}, then log)")
    if len(many) > 1:
        ax_f.legend(fontsize="small")
    return finish(figure, data)


# --------------------------------------------------------------------------- Fig. 2
def figure_subspace_overlap(run: RunLike, log_x: bool = False) -> Figure:
    """Fig. 2: overlap (eq. 5) of ``V_top(t1)`` with ``V_top(t2)`` over ``t2``, one curve per
    ``t1``, for the top-k subspace (a) and the subspace of the next k eigenvectors (b).

    Data: ``{"top": {t1: {"t2", "overlap"}}, "next": {t1: {...}}}``.
    """
    run = as_run(run)
    k = top_k(run)
    anchors = _anchors(run, "top")
    if not anchors:
        raise MissingDataError(f"Fig. 2 needs overlap/top/t1=* columns; {run.path} kept no "
                               "anchor bases (tracker.anchors)")
    figure, axes = new_figure(2)
    data: dict[str, Any] = {"top": {}, "next": {}}
    titles = {"top": f"(a) top {k} subspace",
              "next": f"(b) next {k} (eigenvectors {k + 1}–{2 * k})"}
    for ax, kind in zip(axes, ("top", "next"), strict=True):
        for index, t1 in enumerate(anchors):
            column = f"overlap/{kind}/t1={t1}"
            if column not in run.metrics:
                continue
            t2, values = series(run, column, since=t1)
            if not len(t2):  # an anchor the run never reached (t1 = 400 of a 250-step run)
                continue
            ax.plot(t2, values, "o-", ms=2, color=f"C{index}", label=f"$t_1$ = {t1}")
            data[kind][t1] = {"t2": t2, "overlap": values}
        ax.set(xlabel="$t_2$ (step)", ylim=(-0.02, 1.02), title=titles[kind],
               ylabel=r"overlap$(V^{(t_1)}, V^{(t_2)})$")
        if log_x:
            ax.set_xscale("symlog", linthresh=10)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right center",
                  fontsize="small")
    return finish(figure, data)


# ------------------------------------------------------------------ Figs. 3, 9 and 10
def _dimension_columns(run: Run) -> dict[int, list[int]]:
    """``{t1: [d, ...]}`` of the ``overlap/d=D/t1=T`` columns."""
    found: dict[int, list[int]] = {}
    for column in map(str, run.metrics.columns):
        if column.startswith("overlap/d="):
            d_part, t_part = column[len("overlap/d="):].split("/t1=")
            found.setdefault(int(t_part), []).append(int(d_part))
    return {t1: sorted(ds) for t1, ds in sorted(found.items())}


def figure_overlap_vs_dimension(run: RunLike, average: str = "interval") -> Figure:
    """Fig. 3: subspace overlap of the top-``d`` subspaces at ``t1`` and ``t2``, averaged over
    the interval ``t2 − t1`` (:func:`interval_mean`, the paper's average), against ``d``; one
    curve per ``t1``. ``average="measurements"``: the plain mean of the measurements at
    ``t2 > t1`` instead (weighted by the measurement schedule).

    Data: ``{t1: {"d", "overlap"}}``. The dotted line marks ``d = k``.

    Raises:
        ValueError: an unknown ``average``.
    """
    if average not in ("interval", "measurements"):
        raise ValueError(f"average must be interval or measurements, got {average!r}")
    run = as_run(run)
    columns = _dimension_columns(run)
    if not columns:
        raise MissingDataError(f"Fig. 3 needs overlap/d=*/t1=* columns; {run.path} has none")
    figure, (ax,) = new_figure(1, width=5.0, height=3.6)
    data: dict[int, Any] = {}
    for index, (t1, dims) in enumerate(columns.items()):
        later = run.metrics[run.metrics["step"] > t1]
        if average == "interval":
            means = np.array([interval_mean(*series(run, f"overlap/d={d}/t1={t1}", since=t1), t1)
                              for d in dims], dtype=float)
        else:
            means = np.array([later[f"overlap/d={d}/t1={t1}"].mean() for d in dims], dtype=float)
        if not np.isfinite(means).any():
            continue
        ax.plot(dims, means, "o-", ms=3, color=f"C{index}", label=f"$t_1$ = {t1}")
        data[t1] = {"d": np.array(dims, dtype=float), "overlap": means}
    ax.axvline(top_k(run), color="0.5", ls=":", label=f"d = k = {top_k(run)}")
    ylabel = (r"overlap averaged over $t_2 - t_1$" if average == "interval"
              else r"mean over measured $t_2 > t_1$")
    ax.set(xlabel="subspace dimension d", ylabel=ylabel,
           title="overlap of top-d subspaces vs. d", ylim=(-0.02, 1.02))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    return finish(figure, data)


def figure_overlap_by_dimension(run: RunLike,
                                dims: Sequence[int] = (2, 5, 9, 11, 15, 20)) -> Figure:
    """Figs. 9 / 10: overlap of the top-``d`` subspaces ``V(t1)``, ``V(t2)`` over ``t2``, one
    panel per ``d`` (the paper's 2, 5, 9, 11, 15, 20 where measured), one curve per ``t1``.

    Data: ``{d: {t1: {"t2", "overlap"}}}``.
    """
    run = as_run(run)
    columns = _dimension_columns(run)
    measured = sorted({d for ds in columns.values() for d in ds})
    chosen = [d for d in dims if d in measured] or measured[:6]
    if not chosen:
        raise MissingDataError(f"Figs. 9/10 need overlap/d=*/t1=* columns; {run.path} has none")
    figure, axes = new_figure(len(chosen), width=3.6, height=2.9, rows=2 if len(chosen) > 3 else 1)
    data: dict[int, Any] = {}
    for ax, d, letter in zip(axes, chosen, "abcdefghijkl", strict=False):
        data[d] = {}
        for index, t1 in enumerate(columns):
            column = f"overlap/d={d}/t1={t1}"
            t2, values = series(run, column, since=t1) if column in run.metrics else ((), ())
            if len(t2):  # (an anchor the run never reached has no curve, no legend entry)
                ax.plot(t2, values, "-", color=f"C{index}", label=f"$t_1$ = {t1}")
                data[d][t1] = {"t2": t2, "overlap": values}
        ax.set(xlabel="$t_2$ (step)", ylabel="overlap", ylim=(-0.02, 1.02),
               title=f"({letter}) top {d} subspace")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right center",
                  fontsize="small")
    return finish(figure, data)


# ---------------------------------------------------------------------------- Fig. 8
def figure_lambda_max(run: RunLike, log_y: bool = False) -> Figure:
    """Fig. 8: the largest Hessian eigenvalue ``λ_max`` over training (``log_y``: log axis).

    Data: ``{"step", "hessian/eig_1"}``.
    """
    run = as_run(run)
    require_columns(run, "Fig. 8 (λ_max)", "hessian/eig_1")
    steps, values = series(run, "hessian/eig_1")
    figure, (ax,) = new_figure(1, width=5.0, height=3.4)
    ax.plot(steps, values, "o-", ms=2.5)
    ax.set(xlabel="step", ylabel=r"$\lambda_{\max}$", title="largest Hessian eigenvalue")
    if log_y:
        ax.set_yscale("log")
    return finish(figure, {"step": steps, "hessian/eig_1": values})


# --------------------------------------------------------------------------- Fig. 11
def figure_c2(run: RunLike, steps: Sequence[int] = (0, 50, 100, 200)) -> Figure:
    """Fig. 11: ``c_i²`` (eq. 12) for ``i = 1 … 2k`` at chosen steps (nearest measured ones),
    with ``Σ_{i≤k} c_i²`` and ``Σ_{k<i≤2k} c_i²`` written on each panel.

    Data: ``{step: {"i", "c2", "sum_top", "sum_next"}}``.
    """
    run = as_run(run)
    k = top_k(run)
    names = [f"hessian/c2_{i}" for i in range(1, 2 * k + 1)]
    require_columns(run, "Fig. 11 (c_i²)", *names)
    chosen = choose_steps(run.metrics["step"].astype(int).tolist(), steps)
    figure, axes = new_figure(len(chosen), width=3.6, height=3.0, rows=2 if len(chosen) > 2 else 1)
    data: dict[int, Any] = {}
    index = np.arange(1, 2 * k + 1)
    for ax, step, letter in zip(axes, chosen, "abcdefgh", strict=False):
        row = run.metrics[run.metrics["step"] == step].iloc[-1]
        c2 = row[names].to_numpy(dtype=float)
        sum_top, sum_next = float(np.nansum(c2[:k])), float(np.nansum(c2[k:]))
        ax.bar(index[:k], c2[:k], color="C0", label=f"top {k}")
        ax.bar(index[k:], c2[k:], color="C1", label=f"next {k}")
        ax.text(0.97, 0.95, f"$\\Sigma_{{i=1}}^{{{k}}}\\, c_i^2$ = {sum_top:.2f}\n"
                f"$\\Sigma_{{i={k + 1}}}^{{{2 * k}}}\\, c_i^2$ = {sum_next:.2f}",
                transform=ax.transAxes, ha="right", va="top", fontsize="small")
        ax.set(xlabel="eigenvector index i", ylabel=r"$c_i^2$", title=f"({letter}) step {step}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        data[step] = {"i": index, "c2": c2, "sum_top": sum_top, "sum_next": sum_next}
    axes[0].legend(fontsize="small", loc="center right", bbox_to_anchor=(1.0, 0.45))
    return finish(figure, data)


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class FigureSpec:
    """A figure of the paper: key (``"1"`` … ``"12"``, ``"overlap"``), file stem, function."""

    key: str
    name: str
    draw: Callable[[Run], Figure]
    caption: str


_SPECS = (
    ("1", "f_top", figure_f_top, "Fig. 1: fraction of the gradient in the top subspace f_top "
     "(eq. 2), with training loss and accuracy."),
    ("2", "subspace_overlap", figure_subspace_overlap, "Fig. 2: overlap (eq. 5) of the top-k "
     "subspace at t1 with that at t2, and the same for the next k eigenvectors."),
    ("3", "overlap_vs_dimension", figure_overlap_vs_dimension, "Fig. 3: overlap of the top-d "
     "subspaces at t1 and t2, averaged over the interval t2 - t1, against the dimension d."),
    ("4", "spectrum", figure_spectrum, "Fig. 4: the full Hessian spectrum, top k eigenvalues "
     "numbered."),
    ("5", "top_edge_density", figure_top_edge_density, "Fig. 5: density of the top edge of the "
     "spectrum on a log-eigenvalue axis, averaged over realizations."),
    ("6", "top_eigenvector", figure_top_eigenvector, "Fig. 6: entries of the top eigenvector "
     "v_1, coloured by layer (weights, biases), at several steps."),
    ("7", "top_layer_eigenvector", figure_top_layer_eigenvector, "Fig. 7: the top eigenvector "
     "v_1 zoomed on the top layer's weights and biases."),
    ("8", "lambda_max", figure_lambda_max, "Fig. 8: the largest Hessian eigenvalue over "
     "training."),
    ("9", "overlap_by_dimension", figure_overlap_by_dimension, "Figs. 9/10: overlap of the "
     "top-d subspaces at t1 and t2 over t2, one panel per d."),
    ("10", "overlap_by_dimension", figure_overlap_by_dimension, "Figs. 9/10: overlap of the "
     "top-d subspaces at t1 and t2 over t2, one panel per d."),
    ("11", "c2", figure_c2, "Fig. 11: c_i² (eq. 12), the squared overlap of the gradient with "
     "each of the top 2k eigenvectors, at several steps."),
    ("12", "f_top", figure_f_top, "Fig. 12: f_top (eq. 2) over training (Fig. 1 for a variant; "
     "several runs are overlaid)."),
    ("overlap", "overlap_g_Hg", figure_overlap_g_Hg, "Table 1's quantity overlap(g, Hg) (eq. 3) "
     "over training, on mini-batches and the full data set."),
)
FIGURES: dict[str, FigureSpec] = {key: FigureSpec(key, name, draw, caption)
                                  for key, name, draw, caption in _SPECS}
# Every distinct figure of one run (10 and 12 draw the same as 9 and 1).
DEFAULT_FIGURES: tuple[str, ...] = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "11", "overlap")


# Figures drawn as curves of the measurements over training: empty panels for a run with fewer
# than 2 measurements (Table 1's overlap figure also draws minibatch.csv, a row per step).
OVER_TIME: frozenset[str] = frozenset({"1", "2", "3", "8", "9", "10", "12"})


def too_few_measurements(run: Run) -> str | None:
    """Why curves over training cannot be drawn for ``run`` (``None``: they can), for a run
    with 0 or 1 measurements (stopped, or still at its start)."""
    count = len(run.metrics)
    if count >= 2:
        return None
    status = run.status or {}
    measured = ("no measurements" if count == 0 or "step" not in run.metrics else
                f"one measurement (step {int(run.metrics['step'].iloc[0])})")
    return (f"{run.path} has {measured} in metrics.csv; curves over training need at least "
            f"two (status.json: '{status.get('state', 'unknown')}' at step "
            f"{status.get('step', '?')})")


def figure_filename(key: str) -> str:
    """``fig01_f_top`` and so on (``overlap_g_Hg`` for Table 1's companion figure)."""
    spec = FIGURES[key]
    return f"fig{int(key):02d}_{spec.name}" if key.isdigit() else spec.name
