"""The data a :class:`~tinysubspace.experiments.subspace_tracker.SubspaceTracker` measures on,
and the checks it makes before training starts.

A ``DataLoader`` is measured through a *sequential copy* (same dataset, batch size and
``collate_fn``; no shuffling, no workers, no ``drop_last``): every pass sees the same batches,
and a measurement never advances the user's sampler, its generator or its workers, so the
training data order is untouched. ``subset=n`` keeps a seeded, fixed subset of ``n`` examples:
indices ``sort(randperm(N, seed)[:n])`` of the ``N`` examples in data order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.func import functional_call
from torch.utils.data import DataLoader, IterableDataset, Subset

from tinysubspace.curvature.data import Batch, BatchSource, call_model
from tinysubspace.curvature.data import check_mean_loss as mean_loss_rule
from tinysubspace.curvature.hessian import module_mode
from tinysubspace.experiments.tracker import DTYPES, output_logits, preserved_state

__all__ = ["check_data_device", "check_mean_loss", "check_steps", "count_examples",
           "is_classification", "measurement_dtype", "measurement_view", "subset_indices",
           "take_subset"]


def measurement_view(data: Any) -> Any:
    """``data`` itself, or for a map-style ``DataLoader`` its sequential copy (module
    docstring)."""
    if not isinstance(data, DataLoader) or isinstance(data.dataset, IterableDataset):
        return data
    batch_size = data.batch_size or getattr(data.batch_sampler, "batch_size", None)
    if batch_size is None:
        return data
    return DataLoader(data.dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                      collate_fn=data.collate_fn, drop_last=False)


def count_examples(data: Any) -> int:
    """The number of examples (``len(X)``, ``len(dataset)`` of a ``DataLoader``, else one pass
    over the batches, which are not moved)."""
    if _is_pair(data):
        return int(data[0].shape[0])
    if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
        return len(data.dataset)
    BatchSource(data, device=torch.device("cpu"))  # the same TypeErrors as the operator
    return sum(_item_size(item) for item in data)


def subset_indices(total: int, n: int, seed: int) -> torch.Tensor:
    """``sort(randperm(total, seed)[:n])``.

    Raises:
        ValueError: ``n`` below 1 or above ``total``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"subset must be a number of examples >= 1 (or None), got {n!r}")
    if n > total:
        raise ValueError(f"subset={n} but the data has only {total} examples")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(total, generator=generator)[:n].sort().values


def take_subset(data: Any, index: torch.Tensor) -> Any:
    """The examples ``index`` (global positions in data order) of ``data``, in the same kind:
    a tensor pair, a ``DataLoader`` over ``Subset(dataset, index)``, or a list of batches."""
    if _is_pair(data):
        X, Y = data
        return X[index.to(X.device)], Y[index.to(Y.device)]
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            raise ValueError("subset= needs a map-style dataset (an IterableDataset cannot be "
                             "indexed); pass a list of batches or (X, Y) instead")
        return DataLoader(Subset(data.dataset, index.tolist()), batch_size=data.batch_size or 1,
                          shuffle=False, num_workers=0, collate_fn=data.collate_fn)
    wanted, batches, offset = index.tolist(), [], 0
    for item in data:
        size = _item_size(item)
        rows = [i - offset for i in wanted if offset <= i < offset + size]
        if rows:
            batches.append(_rows(item, torch.tensor(rows), size))
        offset += size
    return batches


def _is_pair(data: Any) -> bool:
    return (isinstance(data, tuple) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data))


def _item_size(item: Any) -> int:
    """The number of examples of one batch (as the operator counts them)."""
    if isinstance(item, Batch):
        return int(item.size)
    if isinstance(item, Mapping):
        tensors = _tensors(item.get("labels")) or _tensors(item)
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        tensors = _tensors(item[1]) or _tensors(item[0])
    else:
        raise TypeError(f"a batch of data is not an (inputs, targets) pair (got "
                        f"{type(item).__name__})")
    sized = [t for t in tensors if t.ndim > 0]
    if not sized:
        raise TypeError("cannot tell a batch's size; inputs or targets must be tensors with a "
                        "batch dimension")
    return int(sized[0].shape[0])


def _rows(obj: Any, rows: torch.Tensor, size: int) -> Any:
    """Rows ``rows`` of every tensor in ``obj`` whose first dimension is ``size``."""
    if isinstance(obj, Batch):
        return Batch(_rows(obj.inputs, rows, size), _rows(obj.targets, rows, size), len(rows))
    if isinstance(obj, torch.Tensor):
        return obj[rows.to(obj.device)] if obj.ndim > 0 and obj.shape[0] == size else obj
    if isinstance(obj, Mapping):
        return {key: _rows(value, rows, size) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_rows(value, rows, size) for value in obj)
    return obj


def first_batch(data: Any, device: torch.device, rows: int = 8) -> Batch | None:
    """The first ``rows`` examples of the first non-empty batch, on ``device``."""
    if _is_pair(data):
        data = (data[0][:rows], data[1][:rows])
    for batch in BatchSource(data, device=device):
        n = min(rows, batch.size)
        index = torch.arange(n)
        return Batch(_rows(batch.inputs, index, batch.size), _rows(batch.targets, index,
                                                                     batch.size), n)
    return None


def check_data_device(data: Any, model: torch.nn.Module) -> None:
    """Raise ``ValueError`` when the data's tensors sit on another device than the model's
    parameters (data on the CPU is allowed: batches are copied to the model's device)."""
    device = next(model.parameters()).device
    for item in _first_item(data):
        for tensor in _tensors(item):
            if tensor.device != device and tensor.device.type != "cpu":
                raise ValueError(f"the model is on {device} but the data is on {tensor.device}; "
                                 f"move one of them (model.to(...) or the data's tensors)")


def _first_item(data: Any) -> list[Any]:
    if _is_pair(data):
        return [data]
    for item in data:
        return [item]
    return []


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, Batch):
        return _tensors(obj.inputs) + _tensors(obj.targets)
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for value in obj.values() for t in _tensors(value)]
    if isinstance(obj, (tuple, list)):
        return [t for value in obj for t in _tensors(value)]
    return []


def _eval_outputs(model: torch.nn.Module, inputs: Any) -> Any:
    """``model(inputs)`` in eval mode on copies of the buffers, without a graph."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}

    def forward(*args: Any, **kwargs: Any) -> Any:
        return functional_call(model, buffers, args, kwargs)

    with torch.no_grad(), module_mode(model, train=False):
        return call_model(forward, inputs)


def check_mean_loss(model: torch.nn.Module, loss_fn: Any, batch: Batch) -> Any:
    """Check that ``loss_fn`` returns a scalar *mean* on ``batch`` (the operators' rule,
    :func:`tinysubspace.curvature.data.check_mean_loss`: the batch repeated twice gives the same
    loss, within a tolerance that follows the dtype). Returns the model's outputs on ``batch``.

    Raises:
        ValueError: the loss is not a scalar tensor, or it changes with the batch's length.
    """
    with preserved_state(model):
        outputs = _eval_outputs(model, batch.inputs)
        loss = loss_fn(outputs, batch.targets)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor, the mean loss of the batch, "
                             f"got {shape}; use reduction='mean'")
        mean_loss_rule(loss_fn, lambda inputs: _eval_outputs(model, inputs), batch, loss=loss)
    return outputs


def is_classification(outputs: Any, targets: Any) -> bool:
    """Whether accuracy is defined: ``(n, C)`` class scores (C >= 2) and ``n`` integer
    labels."""
    try:
        logits = output_logits(outputs)
    except TypeError:
        return False
    return (isinstance(targets, torch.Tensor) and logits.ndim == 2 and logits.shape[1] >= 2
            and targets.ndim == 1 and not targets.is_floating_point()
            and targets.shape[0] == logits.shape[0])


def check_steps(what: str, steps: Sequence[int]) -> frozenset[int]:
    """``steps`` as a set, checked to be integers >= 0 (``ValueError`` naming ``what``)."""
    steps = list(steps)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
        raise ValueError(f"{what} must be steps >= 0, got {steps}")
    return frozenset(steps)


def measurement_dtype(dtype: torch.dtype | str | None, model: torch.nn.Module) -> torch.dtype:
    """The measurement dtype: ``dtype`` (a ``torch.dtype`` or a name in ``DTYPES``), or the
    parameters' dtype for ``None``; ``ValueError`` for anything else."""
    if dtype is None:
        return next(model.parameters()).dtype
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got "
                             f"{dtype!r}")
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype
