"""Tiny experiment configs shared by the experiment-layer tests (seconds each on one core)."""

from __future__ import annotations

from tinysubspace.experiments.config import ExperimentConfig, apply_overrides

TINY = {
    "data.n_train": 120,
    "model.widths": "12",
    "optim.batch_size": 16,
    "train.steps": 24,
    "train.checkpoint_every": 8,
    "tracker.k": 3,
    "tracker.tol": 1e-9,
    "tracker.dense_until": 12,
    "tracker.dense_every": 4,
    "tracker.sparse_every": 8,
    "tracker.anchors": "0,8",
    "tracker.save_vectors_at": "0,8",
}


def tiny_config(**overrides: object) -> ExperimentConfig:
    """The default experiment (FC on digits), shrunk; ``overrides`` as ``{"optim.lr": 0.5}``."""
    return apply_overrides(ExperimentConfig(name="tiny"),
                           {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}})
