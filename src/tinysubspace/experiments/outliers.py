"""Where the outliers come from: the Hessian's top subspace next to the GGN's and the class means'.

A configuration of the one training loop (:mod:`~tinysubspace.experiments.training`): a config
with ``tracker.measure = "outliers"`` (``ggn-fc-digits``, ``ggn-fc-fashion``; ``tinysubspace run
ggn-fc-digits``) trains as ``config`` says and its tracker has one column group,
:class:`OutliersGroup`, which at every step of
:func:`~tinysubspace.experiments.edge_of_stability.eos_steps` measures on the whole training
set, with ``k = tracker.k`` (the number of classes, ``C``):

* ``hessian/eig_i``, ``ggn/eig_i`` (``i ≤ 2k``): top eigenvalues of ``H`` (the tracker's own
  warm-started solve, :attr:`Context.eig <tinysubspace.experiments.measurement.Context>`) and
  of the GGN ``G`` (warm-started Lanczos, ``tracker.tol``);
* ``overlap/hessian_ggn``: eq. 5 between the top-k subspaces of ``H`` and ``G``, and
  ``angles/hessian_ggn_i`` all their principal angles (radians);
* ``overlap/classmeans_{hessian,ggn}``: eq. 5 between ``span{δ_{c,c}}`` (the ``C`` class-mean
  gradients) and the top-k subspaces; ``overlap/papyan_{hessian,ggn}``: the same for the top-k
  eigenvectors of Papyan's class-mean matrix ``M`` (:mod:`tinysubspace.curvature.class_means`),
  whose eigenvalues are ``papyan/eig_i``;
* ``displacement/hessian_i``: how far each top eigenvector of ``H`` moved since the previous
  measurement (:func:`tinysubspace.metrics.eigenvector_displacement`);
* ``cost/*``: products and seconds of each.

At the end, when ``p ≤ EXACT_SPECTRUM_LIMIT``, the full spectra of ``H`` and ``G`` go to
``spectrum.npz`` (keys ``hessian``, ``ggn``; :meth:`OutliersGroup.final_spectra`).
``outlier_columns(k)`` is the run's ``metrics.csv`` header, which :mod:`tinysubspace.plots.ggn`
reads.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy
import torch

from tinysubspace.curvature.class_means import (
    class_gradient_means,
    class_mean_basis,
    papyan_basis,
)
from tinysubspace.curvature.ggn import GGNOperator
from tinysubspace.experiments.config import ExperimentConfig
from tinysubspace.experiments.groups import StatelessGroup, accuracy
from tinysubspace.experiments.measurement import Context, OperatorSettings
from tinysubspace.linalg.density import exact_spectrum
from tinysubspace.metrics import (
    eigenvector_displacement,
    principal_angles,
    subspace_overlap,
    top_fraction,
)

__all__ = ["EXACT_SPECTRUM_LIMIT", "OutliersGroup", "outlier_columns", "run_outliers"]

EXACT_SPECTRUM_LIMIT = 5000
"""Largest ``p`` for which the final full spectra are computed (two dense ``p × p`` matrices)."""


def outlier_columns(k: int) -> list[str]:
    """The ``metrics.csv`` columns of an outliers run with ``k`` classes."""
    cols = ["step", "wall_time", "train/loss", "train/accuracy", "train/grad_norm",
            "hessian/f_top"]
    cols += [f"{name}/eig_{i}" for name in ("hessian", "ggn") for i in range(1, 2 * k + 1)]
    cols += [f"papyan/eig_{i}" for i in range(1, k + 1)]
    cols += ["overlap/hessian_ggn", "overlap/classmeans_hessian", "overlap/classmeans_ggn",
             "overlap/papyan_hessian", "overlap/papyan_ggn", "classmeans/rank"]
    cols += [f"angles/hessian_ggn_{i}" for i in range(1, k + 1)]
    cols += [f"displacement/hessian_{i}" for i in range(1, k + 1)]
    cols += [f"cost/{name}_{what}" for name in ("hessian", "ggn", "classmeans")
             for what in ("products", "seconds")]
    return cols


class OutliersGroup(StatelessGroup):
    """The columns of :func:`outlier_columns` after ``step`` and ``wall_time`` (module
    docstring); ``classes`` is ``C``, the number of classes of the training set."""

    name = "outliers"

    def __init__(self, k: int, classes: int) -> None:
        self.k, self.classes = k, classes

    def names(self) -> list[str]:
        return outlier_columns(self.k)[2:]

    def measure(self, ctx: Context) -> dict[str, float]:
        k, g = self.k, ctx.g
        G = ctx.operators.build(GGNOperator, ctx.model, ctx.loss_fn, ctx.train)
        evaluation = dataclasses.replace(ctx.operators, mode="eval")
        row: dict[str, float] = {
            "train/loss": ctx.loss, "train/grad_norm": float(g.norm()),
            "train/accuracy": accuracy(ctx.model, ctx.train, evaluation, ctx.classification)}
        products, seconds = ctx.cost.get("hessian", [ctx.eig.matvecs, math.nan])
        row.update({"cost/hessian_products": int(products), "cost/hessian_seconds": seconds})
        started = time.perf_counter()
        ggn = ctx.solver.solve(G, 2 * k, ctx.warm, "ggn", ctx.seed)
        row.update({"cost/ggn_seconds": time.perf_counter() - started,
                    "cost/ggn_products": ggn.matvecs})
        bases = {"hessian": ctx.eig.vectors[:, :k], "ggn": ggn.vectors[:, :k]}
        for name, eig in (("hessian", ctx.eig), ("ggn", ggn)):
            row.update({f"{name}/eig_{i + 1}": float(v) for i, v in enumerate(eig.values)})
        if ctx.previous is not None:
            moved = eigenvector_displacement(ctx.previous[:, :k], bases["hessian"])
            row.update({f"displacement/hessian_{i + 1}": float(d) for i, d in enumerate(moved)})
        row["hessian/f_top"] = top_fraction(g, bases["hessian"]) if float(g.norm()) else math.nan
        row.update(self._class_means(G, bases))
        angles = principal_angles(bases["hessian"], bases["ggn"])
        row.update({f"angles/hessian_ggn_{i + 1}": float(a) for i, a in enumerate(angles)})
        row["overlap/hessian_ggn"] = subspace_overlap(bases["hessian"], bases["ggn"])
        return row

    def _class_means(self, G: GGNOperator, bases: dict[str, torch.Tensor]) -> dict[str, float]:
        started = time.perf_counter()
        means = class_gradient_means(G, self.classes)
        row: dict[str, float] = {"cost/classmeans_seconds": time.perf_counter() - started,
                                 "cost/classmeans_products": means.backward_passes}
        span = class_mean_basis(means)
        values, papyan = papyan_basis(means, self.k)
        row["classmeans/rank"] = span.shape[1]
        row.update({f"papyan/eig_{i + 1}": float(v) for i, v in enumerate(values)})
        for name, basis in bases.items():
            row[f"overlap/classmeans_{name}"] = subspace_overlap(span, basis)
            row[f"overlap/papyan_{name}"] = subspace_overlap(papyan, basis)
        return row

    def final_spectra(self, model: torch.nn.Module, loss_fn: Any, train: Any,
                      operators: OperatorSettings) -> dict[str, numpy.ndarray]:
        """``{"hessian", "ggn"}``: the full spectra at the end of training (``{}`` when ``p``
        is above :data:`EXACT_SPECTRUM_LIMIT`)."""
        H = operators.hessian(model, loss_fn, train)
        if H.shape[0] > EXACT_SPECTRUM_LIMIT:
            return {}
        G = operators.build(GGNOperator, model, loss_fn, train)
        return {"hessian": exact_spectrum(H).cpu().numpy(),
                "ggn": exact_spectrum(G).cpu().numpy()}


def run_outliers(config: ExperimentConfig, out: str | Path | None, *,
                 data_root: str | None = None) -> list[dict[str, float]]:
    """``config`` as an outliers run of the training loop (``tracker.measure =
    "outliers"``): :func:`~tinysubspace.experiments.training.run_experiment` with that setting.

    Returns:
        The rows written, in order.

    Raises:
        ValueError: a data set without classes (the class means need labels).
    """
    from tinysubspace.experiments.loggers import CallableLogger
    from tinysubspace.experiments.training import run_experiment

    config = dataclasses.replace(config, tracker=dataclasses.replace(config.tracker,
                                                                     measure="outliers"))
    rows: list[dict[str, float]] = []
    run_experiment(config, out, data_root=data_root,
                   loggers=[CallableLogger(lambda row, step: rows.append(row))])
    return rows
