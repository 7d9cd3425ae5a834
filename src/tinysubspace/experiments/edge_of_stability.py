"""Edge-of-stability runs: the sharpness every few steps against the optimizer's threshold.

A configuration of the one training loop (:mod:`~tinysubspace.experiments.training`): a config
with ``tracker.measure = "eos"`` (``eos-gd-fc-digits``, ``eos-adam-fc-digits``; ``tinysubspace
run eos-gd-fc-digits``) trains as ``config`` says (full batch when ``optim.batch_size ≥ n``) and
its tracker has one column group, :class:`EdgeOfStabilityGroup`, which at every step of
:func:`eos_steps` measures on the whole training set

* ``sharpness/lambda_1 … lambda_k``: the top ``k = tracker.k`` eigenvalues of the Hessian
  (warm-started from the previous measurement's vectors, ``start="subspace"``, to
  ``tracker.tol``), with ``sharpness/threshold`` = ``2/η`` (SGD/GD; NaN for adaptive
  optimizers) and their ratio (:func:`~tinysubspace.optim.stability.stability_row`);
* for Adam, AdamW, RMSprop, Adagrad: ``preconditioned/lambda_i`` of ``P^{-1/2} H P^{-1/2}``
  (``P`` the optimizer's diagonal with the first-moment correction, Cohen et al. 2022's
  ``P_t``) and ``preconditioned/threshold`` (``38/η`` for Adam with ``β₁ = 0.9``);
* ``…/step_share``: the share of the step taken right *after* the measurement in the measured
  top-``k`` subspace, eq. 2 applied to the step,

  .. math::  s_t = \\frac{\\|V_t^\\top u_t\\|^2}{\\|u_t\\|^2}, \\qquad
             u_t = \\Delta\\theta_t = \\theta_{t+1} - \\theta_t \\ (\\text{GD}), \\quad
             u_t = P_t^{1/2} \\Delta\\theta_t \\ (\\text{preconditioned}),

  a *deferred* column: the loop calls :meth:`EdgeOfStabilityGroup.after_update` once step
  ``t``'s update is taken, and writes the row then (NaN at the last step, which has no update).

``eos_columns(k, adaptive)`` is the run's ``metrics.csv`` header (``step``, ``wall_time`` and
the group's :meth:`~EdgeOfStabilityGroup.names`), which :mod:`tinysubspace.plots.eos` reads.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from tinysubspace.curvature.preconditioned import PreconditionedOperator
from tinysubspace.experiments.config import ExperimentConfig
from tinysubspace.experiments.groups import accuracy
from tinysubspace.experiments.measurement import Context
from tinysubspace.experiments.schedules import measurement_steps
from tinysubspace.experiments.tracker_curvature import flat_parameters
from tinysubspace.metrics import top_fraction
from tinysubspace.optim.stability import sharpness_threshold, stability_row

__all__ = ["ADAPTIVE", "EdgeOfStabilityGroup", "eos_columns", "eos_steps",
           "run_edge_of_stability"]

ADAPTIVE = ("Adam", "AdamW", "RMSprop", "Adagrad")


def eos_steps(tracker: Any, total: int) -> list[int]:
    """Every ``tracker.dense_every`` steps up to ``tracker.dense_until``, then every
    ``tracker.sparse_every``, plus ``tracker.extra_steps`` and the last step: the tracker's
    :func:`~tinysubspace.experiments.schedules.measurement_steps` without anchors and saved
    vectors."""
    return measurement_steps(dataclasses.replace(tracker, anchors=(), save_vectors_at=()), total)


def eos_columns(k: int, preconditioned: bool) -> list[str]:
    """The ``metrics.csv`` columns of an edge-of-stability run."""
    cols = ["step", "wall_time", "train/loss", "train/accuracy", "train/grad_norm"]
    prefixes = ["sharpness"] + (["preconditioned"] if preconditioned else [])
    for prefix in prefixes:
        cols += [f"{prefix}/lambda_{i}" for i in range(1, k + 1)]
        cols += [f"{prefix}/{name}" for name in ("threshold", "ratio", "residual",
                                                 "step_share", "matvecs")]
    return cols


class EdgeOfStabilityGroup:
    """The columns of :func:`eos_columns` after ``step`` and ``wall_time`` (module docstring).

    Args:
        k: top eigenvalues of each solve.
        optimizer: the run's optimizer (its threshold, and ``P`` for the adaptive ones).

    Raises:
        TypeError, ValueError: an optimizer without a stability threshold
            (:func:`~tinysubspace.optim.stability.sharpness_threshold`).
    """

    name = "edge_of_stability"
    uses_hessian_solve = False  # its own top-k solves; the tracker's top-2k is not needed

    def __init__(self, k: int, optimizer: torch.optim.Optimizer) -> None:
        self.k, self.optimizer = k, optimizer
        self.adaptive = type(optimizer).__name__ in ADAPTIVE
        self.threshold = sharpness_threshold(optimizer)
        self.pending: dict[str, Any] | None = None  # θ_t and the bases of the last row

    def names(self) -> list[str]:
        return eos_columns(self.k, self.adaptive)[2:]

    def measure(self, ctx: Context) -> dict[str, float]:
        H = ctx.op
        evaluation = dataclasses.replace(ctx.operators, mode="eval")
        row = {"train/loss": ctx.loss, "train/grad_norm": float(ctx.g.norm()),
               "train/accuracy": accuracy(ctx.model, ctx.train, evaluation, ctx.classification)}
        operators: dict[str, Any] = {"sharpness": H}
        if self.adaptive and self.optimizer.state:
            operators["preconditioned"] = PreconditionedOperator(H, self.optimizer,
                                                                 first_moment_correction=True)
        bases = {}
        for prefix, op in operators.items():
            before = op.matvecs
            eig = ctx.solver.solve(op, self.k, ctx.warm, prefix, ctx.seed, start="subspace")
            threshold = self.threshold if (prefix == "preconditioned") == self.adaptive \
                else math.nan
            row.update(stability_row(eig, threshold, prefix))
            row[f"{prefix}/matvecs"] = op.matvecs - before
            scale = op.diagonal.sqrt() if isinstance(op, PreconditionedOperator) else None
            bases[prefix] = (scale, eig.vectors)
        self.pending = {"theta": flat_parameters(ctx.model), "bases": bases}
        return row

    def after_update(self, model: torch.nn.Module) -> dict[str, float]:
        """``…/step_share`` of the last measurement's row: the share of ``Δθ = θ_now − θ_t``
        (``P_t^{1/2} Δθ`` for the preconditioned operator) in its top-k subspaces; ``{}``
        when no measurement waits."""
        if self.pending is None:
            return {}
        delta = flat_parameters(model) - self.pending["theta"]
        row = {}
        for prefix, (scale, vectors) in self.pending["bases"].items():
            step = delta.to(device=vectors.device, dtype=vectors.dtype)
            if scale is not None:
                step = scale * step
            row[f"{prefix}/step_share"] = (top_fraction(step, vectors)
                                           if float(step.norm()) > 0 else math.nan)
        self.pending = None
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = state.get("pending")


def run_edge_of_stability(config: ExperimentConfig, out: str | Path | None, *,
                          data_root: str | None = None) -> list[dict[str, float]]:
    """``config`` as an edge-of-stability run of the training loop (``tracker.measure =
    "eos"``): :func:`~tinysubspace.experiments.training.run_experiment` with that setting.

    Returns:
        The rows written, in order (each with its ``step_share``).

    Raises:
        TypeError, ValueError: an optimizer without a stability threshold, or a bad config.
    """
    from tinysubspace.experiments.loggers import CallableLogger
    from tinysubspace.experiments.training import run_experiment

    config = dataclasses.replace(config, tracker=dataclasses.replace(config.tracker,
                                                                     measure="eos"))
    rows: list[dict[str, float]] = []
    run_experiment(config, out, data_root=data_root,
                   loggers=[CallableLogger(lambda row, step: rows.append(row))])
    return rows
