"""The column groups of a config's ``tracker.measure``: the standard groups, or one
experiment's (``"eos"``: :class:`~.edge_of_stability.EdgeOfStabilityGroup`, ``"outliers"``:
:class:`~.outliers.OutliersGroup`), each with its own ``metrics.csv`` schema (``step``,
``wall_time`` and the group's names) and schedule; and the step the training loop takes, for
replays."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tinysubspace.experiments.build import batch_indices
from tinysubspace.experiments.config import ExperimentConfig, TrackerConfig
from tinysubspace.experiments.edge_of_stability import EdgeOfStabilityGroup, eos_steps
from tinysubspace.experiments.outliers import OutliersGroup
from tinysubspace.experiments.schedules import measurement_steps

__all__ = ["MEASURES", "experiment_groups", "experiment_steps", "experiment_tracker",
           "train_step"]

MEASURES = ("standard", "eos", "outliers")


def experiment_steps(config: ExperimentConfig, total: int) -> list[int]:
    """The measurement steps: :func:`measurement_steps`, without anchors and saved vectors
    (:func:`eos_steps`) for an experiment's groups."""
    standard = config.tracker.measure == "standard"
    return (measurement_steps if standard else eos_steps)(config.tracker, total)


def experiment_tracker(config: ExperimentConfig) -> TrackerConfig:
    """``config.tracker``; for an experiment's groups without anchors and saved vectors (its
    groups keep no bases, and :func:`eos_steps` measures at neither)."""
    if config.tracker.measure == "standard":
        return config.tracker
    return dataclasses.replace(config.tracker, anchors=(), save_vectors_at=())


def experiment_groups(config: ExperimentConfig, problem: Any,
                      optimizer: torch.optim.Optimizer) -> list[Any] | None:
    """The groups of ``config.tracker.measure`` (``None``: the tracker's standard ones).

    Raises:
        ValueError: an unknown measure, or ``"outliers"`` on a data set without classes.
    """
    measure, k = config.tracker.measure, config.tracker.k
    if measure == "standard":
        return None
    if measure == "eos":
        return [EdgeOfStabilityGroup(k, optimizer)]
    if measure == "outliers":
        if not problem.classification:
            raise ValueError("the outliers experiment needs a classification data set "
                             "(class means)")
        return [OutliersGroup(k, problem.train.num_classes)]
    raise ValueError(f"tracker.measure must be one of {MEASURES}, got {measure!r}")


def train_step(problem: Any, optimizer: torch.optim.Optimizer, batch_size: int, seed: int,
               step: int) -> float:
    """The update the training loop takes at ``step`` (same batch: the whole set in order
    when ``batch_size ≥ n``, else :func:`batch_indices`), without measurements: for replaying
    a run."""
    X, Y = problem.tensors("train")
    if batch_size < len(X):
        index = batch_indices(len(X), batch_size, seed, step).to(X.device)
        X, Y = X[index], Y[index]
    model = problem.model
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = problem.loss_fn(model(X), Y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
