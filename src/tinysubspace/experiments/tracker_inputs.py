"""What a :class:`~tinysubspace.experiments.subspace_tracker.SubspaceTracker` measures on,
checked before training starts: the training data (after an optional seeded subset), the test
data, the first batch's outputs (the curvature options' probe) and whether accuracy is defined.

Under ``torchrun`` each rank passes its shard: the subset is drawn from the rank's shard (its
share of ``subset`` examples, seeded by ``seed + rank``), and whether the task is a
classification is rank 0's answer (a rank may hold no examples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tinysubspace.experiments.tracker_data import (
    check_data_device,
    check_mean_loss,
    count_examples,
    first_batch,
    is_classification,
    measurement_view,
    subset_indices,
    take_subset,
)
from tinysubspace.runtime import distributed as tsdist

__all__ = ["TrackerInputs", "prepare_inputs"]


@dataclass(frozen=True)
class TrackerInputs:
    """The data a tracker measures on.

    Attributes:
        train: the data measured on (a subset of ``full`` with ``subset``).
        full: the data as passed (its measurement view).
        test: the test data's measurement view, or ``None``.
        classification: whether ``train/accuracy`` is defined.
        total_examples: examples of ``full`` (this rank's, under ``torchrun``).
        subset: ``{"n", "seed", "of", "indices"}`` of the subset, or ``None``.
        check_subset: whether the subset's top-k is compared once with the full data's.
        probe: ``(outputs, targets)`` of the first batch (``(None, None)`` on a rank without
            examples).
    """

    train: Any
    full: Any
    test: Any
    classification: bool
    total_examples: int
    subset: dict[str, Any] | None
    check_subset: bool
    probe: tuple[Any, Any]


def prepare_inputs(model: torch.nn.Module, loss_fn: Any, data: Any, test: Any, *,
                   subset: int | None, check_subset: bool, classification: bool | None,
                   shared: bool, seed: int) -> TrackerInputs:
    """The tracker's :class:`TrackerInputs`; checks the data's device and that the loss is a
    scalar mean (one forward pass of the first batch; ``shared``: the data are this rank's
    shard).

    Raises:
        ValueError: data on another device than the model, an empty data set (one process),
            or a loss that is not a scalar mean.
    """
    full = measurement_view(data)
    check_data_device(full, model)
    total = count_examples(full)
    train, record = full, None
    if subset is not None:
        part = tsdist.shard_slice(int(subset)) if tsdist.is_distributed() else None
        n = len(range(int(subset))[part]) if part is not None else subset
        index = subset_indices(total, n, seed + tsdist.rank())
        train = take_subset(full, index)
        record = {"n": int(subset), "seed": seed, "of": total, "indices": index.tolist()}
    batch = first_batch(train, next(model.parameters()).device)
    if batch is None and not shared:  # under torchrun a rank may hold no examples
        raise ValueError("the data set is empty: nothing to measure on")
    outputs = None if batch is None else check_mean_loss(model, loss_fn, batch)
    if classification is None:
        classification = batch is not None and is_classification(outputs, batch.targets)
        if shared:
            classification = tsdist.broadcast_object(classification)
    return TrackerInputs(train, full, None if test is None else measurement_view(test),
                         bool(classification), total, record,
                         bool(check_subset and subset is not None),
                         (outputs, None if batch is None else batch.targets))
