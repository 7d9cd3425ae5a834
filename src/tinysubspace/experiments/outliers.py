"""Where the outliers come from: the Hessian's top subspace next to the GGN's and the class means'.

A small driver of its own (like :mod:`~tinysubspace.experiments.edge_of_stability`; operators,
solver settings, warm starts, accuracy and schedule are the tracker's): train as
``config`` says and at every step of :func:`~tinysubspace.experiments.edge_of_stability.eos_steps`
measure on the whole training set, with ``k = tracker.k`` (the number of classes, ``C``):

* ``hessian/eig_i``, ``ggn/eig_i`` (``i ≤ 2k``): top eigenvalues of ``H`` and of the GGN ``G``
  (warm-started Lanczos, ``tracker.tol``);
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
``spectrum.npz`` (keys ``hessian``, ``ggn``). ``python -m tinysubspace.experiments.outliers
ggn-fc-digits --out runs/ggn-digits`` runs one from the catalog.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tinysubspace.curvature.class_means import (
    class_gradient_means,
    class_mean_basis,
    papyan_basis,
)
from tinysubspace.curvature.ggn import GGNOperator
from tinysubspace.curvature.hessian import HessianOperator
from tinysubspace.experiments.build import build_optimizer, build_problem
from tinysubspace.experiments.config import ExperimentConfig, config_to_dict
from tinysubspace.experiments.edge_of_stability import eos_steps, train_step
from tinysubspace.experiments.groups import accuracy
from tinysubspace.experiments.tracker import settings_of
from tinysubspace.linalg.density import exact_spectrum
from tinysubspace.linalg.warm_state import WarmStart
from tinysubspace.metrics import (
    eigenvector_displacement,
    principal_angles,
    subspace_overlap,
    top_fraction,
)
from tinysubspace.results.store import RunStore

__all__ = ["EXACT_SPECTRUM_LIMIT", "outlier_columns", "run_outliers"]

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


class _Measurer:
    def __init__(self, config: ExperimentConfig, problem: Any) -> None:
        self.config, self.problem = config, problem
        self.settings = settings_of(config.tracker, distributed=False)
        self.warm = WarmStart()

    def operators(self) -> tuple[HessianOperator, GGNOperator]:
        data, ops = self.problem.tensors("train"), self.settings.operators
        return (ops.hessian(self.problem.model, self.problem.loss_fn, data),
                ops.build(GGNOperator, self.problem.model, self.problem.loss_fn, data))

    def measure(self, step: int) -> dict[str, float]:
        k = self.config.tracker.k
        H, G = self.operators()
        loss, g = H.loss_and_gradient()
        row: dict[str, float] = {"step": step, "train/loss": loss,
                                 "train/grad_norm": float(g.norm())}
        bases = {}
        for name, op in (("hessian", H), ("ggn", G)):
            started, previous = time.perf_counter(), self.warm.get(name)
            eig = self.settings.solver.solve(op, 2 * k, self.warm, name,
                                             self.config.train.seed + step)
            row[f"cost/{name}_seconds"] = time.perf_counter() - started
            row[f"cost/{name}_products"] = eig.matvecs
            row.update({f"{name}/eig_{i + 1}": float(v) for i, v in enumerate(eig.values)})
            bases[name] = eig.vectors[:, :k]
            if name == "hessian" and previous is not None:
                moved = eigenvector_displacement(previous[:, :k], bases[name])
                row.update({f"displacement/hessian_{i + 1}": float(d)
                            for i, d in enumerate(moved)})
        row["hessian/f_top"] = top_fraction(g, bases["hessian"]) if float(g.norm()) else math.nan
        row.update(self._class_means(G, bases, k))
        angles = principal_angles(bases["hessian"], bases["ggn"])
        row.update({f"angles/hessian_ggn_{i + 1}": float(a) for i, a in enumerate(angles)})
        row["overlap/hessian_ggn"] = subspace_overlap(bases["hessian"], bases["ggn"])
        return row

    def _class_means(self, G: GGNOperator, bases: dict[str, torch.Tensor],
                     k: int) -> dict[str, float]:
        started = time.perf_counter()
        means = class_gradient_means(G, self.problem.train.num_classes)
        row: dict[str, float] = {"cost/classmeans_seconds": time.perf_counter() - started,
                                 "cost/classmeans_products": means.backward_passes}
        span = class_mean_basis(means)
        values, papyan = papyan_basis(means, k)
        row["classmeans/rank"] = span.shape[1]
        row.update({f"papyan/eig_{i + 1}": float(v) for i, v in enumerate(values)})
        for name, basis in bases.items():
            row[f"overlap/classmeans_{name}"] = subspace_overlap(span, basis)
            row[f"overlap/papyan_{name}"] = subspace_overlap(papyan, basis)
        return row


def _accuracy(problem: Any, settings: Any) -> float:
    """Training accuracy in eval mode (the tracker's :func:`~.groups.accuracy`)."""
    evaluation = dataclasses.replace(settings.operators, mode="eval")
    return accuracy(problem.model, problem.tensors("train"), evaluation)


def run_outliers(config: ExperimentConfig, out: str | Path | None, *,
                 data_root: str | None = None,
                 log: Callable[[dict[str, float]], None] | None = None) -> list[dict]:
    """Train ``config`` and measure ``H``, ``G`` and the class means at the tracker's steps.

    Returns:
        The rows written, in order.

    Raises:
        ValueError: a data set without classes (the class means need labels).
    """
    problem = build_problem(config, data_root)
    if not problem.classification:
        raise ValueError("the outliers experiment needs a classification data set (class means)")
    store = None
    if out is not None:
        store = RunStore(out, outlier_columns(config.tracker.k))
        store.create({**config_to_dict(config), "meta": {"driver": __name__}})
    measurer, rows, started = _Measurer(config, problem), [], time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(config.train.seed)
        optimizer = build_optimizer(config.optim, problem.model, {"problem": problem})
        schedule = set(eos_steps(config.tracker, config.train.steps))
        for step in range(config.train.steps + 1):
            if step in schedule:
                row = measurer.measure(step)
                row["train/accuracy"] = _accuracy(problem, measurer.settings)
                row["wall_time"] = time.perf_counter() - started
                rows.append(row)
                if store is not None:
                    store.append_metrics(row)
                if log is not None:
                    log(row)
            if step < config.train.steps:
                train_step(problem, optimizer, config.optim.batch_size, config.train.seed, step)
    if store is not None:
        _save_spectra(measurer, store)
        store.write_status("finished", config.train.steps)
    return rows


def _save_spectra(measurer: _Measurer, store: RunStore) -> None:
    H, G = measurer.operators()
    if H.shape[0] <= EXACT_SPECTRUM_LIMIT:
        store.save_spectrum({"hessian": exact_spectrum(H).cpu().numpy(),
                             "ggn": exact_spectrum(G).cpu().numpy()})


def main(argv: list[str] | None = None) -> None:
    """``python -m tinysubspace.experiments.outliers NAME --out DIR [--set k=v ...]``."""
    from tinysubspace.experiments.catalog import load_experiment
    from tinysubspace.experiments.config import parse_assignment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    config = load_experiment(args.experiment, dict(parse_assignment(s) for s in args.set))

    def show(row: dict[str, float]) -> None:
        print(f"step {row['step']:6d}  loss {row['train/loss']:.4f}  "
              f"λ1(H) {row['hessian/eig_1']:.4g}  λ1(G) {row['ggn/eig_1']:.4g}  "
              f"ov(H,G) {row['overlap/hessian_ggn']:.3f}  "
              f"ov(means,H) {row['overlap/classmeans_hessian']:.3f}  "
              f"ov(papyan,H) {row['overlap/papyan_hessian']:.3f}", flush=True)

    run_outliers(config, args.out, log=show)


if __name__ == "__main__":
    main()
