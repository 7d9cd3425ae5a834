"""Data as a re-iterable sequence of ``(inputs, targets)`` batches, each with its size.

The Hessian operator accepts a ``DataLoader``, any re-iterable of ``(inputs, targets)`` pairs,
or a tuple ``(X, Y)`` of tensors (split into chunks). This module turns each into one thing:
a :class:`BatchSource` whose iteration yields :class:`Batch` objects on the right device and dtype.

A batch's *size* ``n_j`` weights its mean loss ``ℓ_j`` in the data-set mean
``L = Σ_j n_j ℓ_j / Σ_j n_j``. By default it is the batch dimension (examples). When ``ℓ_j`` is
a mean over something else — tokens of a language model, non-padding labels — say so with the
size hook: yield :class:`Batch` objects whose ``size`` is that count (e.g.
:func:`count_tokens` of the labels); then ``L`` is the mean over all tokens of the data set.
Items that are dicts (a Hugging Face style ``DataLoader``) are keyword inputs with their
``"labels"`` as targets.

Every forward pass goes through :func:`call_model`, which runs attention by its exact,
twice-differentiable kernel (:mod:`tinysubspace.curvature.attention`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from tinysubspace.curvature.attention import exact_attention

__all__ = [
    "Batch",
    "BatchSource",
    "NonFiniteError",
    "call_model",
    "check_mean_loss",
    "check_operator_loss",
    "checked_loss",
    "chunk_size_argument",
    "count_tokens",
    "mean_check_tolerance",
]


@dataclass(frozen=True)
class Batch:
    """One batch: model inputs, targets and its size ``n_j``, the number of terms its mean loss
    averages (examples by default; tokens for a language model — the size hook, see the module
    docstring). A data set may yield :class:`Batch` objects directly to set ``size``."""

    inputs: Any
    targets: Any
    size: int


def count_tokens(labels: torch.Tensor, ignore_index: int = -100, shift: bool = False) -> int:
    """The number of labels a token-level mean cross-entropy averages: entries of ``labels``
    other than ``ignore_index``; with ``shift`` (Hugging Face causal LMs, which predict
    ``labels[..., 1:]`` from the positions before) the first position of each row is left out.

    >>> count_tokens(torch.tensor([[5, 6, -100], [7, 8, 9]]))
    5
    >>> count_tokens(torch.tensor([[5, 6, -100], [7, 8, 9]]), shift=True)
    3
    """
    if shift:
        labels = labels[..., 1:]
    return int((labels != ignore_index).sum())


def _leading_size(obj: Any) -> int | None:
    """The batch dimension of a tensor, or of the first tensor inside a tuple/list/dict."""
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.ndim > 0 else None
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, Sequence) and not isinstance(obj, str):
        for item in obj:
            size = _leading_size(item)
            if size is not None:
                return size
    return None


def _convert(obj: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Move tensors to ``device``; cast floating tensors to ``dtype`` (integers are kept)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device=device)
    if isinstance(obj, Mapping):
        return {key: _convert(value, device, dtype) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_convert(item, device, dtype) for item in obj)
    return obj


def call_model(model: torch.nn.Module | Any, inputs: Any) -> Any:
    """``model(inputs)``; a tuple/list is spread as positional and a dict as keyword arguments.

    Attention (``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``) runs by its math
    kernel during the call, so that double backprop and ``torch.func.jvp`` work through it; the
    caller's kernel choice is restored afterwards (:func:`~tinysubspace.curvature.attention.
    exact_attention`).

    Raises:
        TypeError: a dict batch whose keys the model's ``forward`` does not take (the message
            says how dict batches are called and how to adapt the model or the data).
    """
    with exact_attention():
        if isinstance(inputs, Mapping):
            try:
                return model(**inputs)
            except TypeError as error:
                if "keyword argument" not in str(error) and "positional argument" not in str(error):
                    raise
                raise TypeError(_dict_batch_advice(model, inputs, error)) from error
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)


def _dict_batch_advice(model: Any, inputs: Mapping, error: TypeError) -> str:
    """Why ``model(**batch)`` failed for a dict batch, and how to adapt the model or the data."""
    keys = ", ".join(repr(key) for key in inputs)
    return (f"a batch that is a dict is called as model(**batch), its keys ({keys}) as keyword "
            f"arguments, with batch['labels'] as the targets; the model does not "
            f"take them ({error}). Give the model a forward that takes these keywords (e.g. "
            "forward(self, image, labels=None)), or give the data as (inputs, targets) pairs, "
            "e.g. [(b['image'], b['labels']) for b in loader]")


def chunk_size_argument(chunk_size: int | None, batch_size: int | None) -> int | None:
    """The chunk size given as ``chunk_size=`` or by its old name ``batch_size=`` (kept so that
    code written before the rename runs unchanged; the SGD mini-batch is another thing).

    Raises:
        TypeError: both names given.
    """
    if batch_size is None:
        return chunk_size
    if chunk_size is not None:
        raise TypeError(f"give the chunk size once: chunk_size={chunk_size!r} and its old name "
                        f"batch_size={batch_size!r} both arrived; use chunk_size")
    return batch_size


class BatchSource:
    """A re-iterable source of :class:`Batch` es covering a whole data set.

    Args:
        data: a ``torch.utils.data.DataLoader``, a re-iterable of ``(inputs, targets)`` pairs
            (e.g. a list of batches), of :class:`Batch` objects (their ``size`` is kept: the
            size hook) or of dicts (keyword inputs; targets ``item["labels"]``), or a tuple
            ``(X, Y)`` of tensors with equal first dimension.
        device: where batches are moved.
        dtype: floating inputs and targets are cast to this dtype (``None``: kept).
        chunk_size: how many examples of an ``(X, Y)`` tuple go into one pass (``None``: all
            in one chunk).
        batch_size: the old name of ``chunk_size`` (:func:`chunk_size_argument`).

    Raises:
        TypeError: ``data`` is a one-shot iterator (a generator), or not iterable; both
            ``chunk_size`` and ``batch_size``.
        ValueError: ``(X, Y)`` have different lengths, or ``chunk_size`` is not positive.
    """

    def __init__(self, data: Any, device: torch.device, dtype: torch.dtype | None = None,
                 chunk_size: int | None = None, *, batch_size: int | None = None) -> None:
        name = "chunk_size" if batch_size is None else "batch_size"  # as the caller said it
        chunk_size = chunk_size_argument(chunk_size, batch_size)
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"{name} must be a positive integer, got {chunk_size}")
        self.chunk_size = chunk_size
        if _is_tensor_pair(data):
            inputs, targets = data
            if inputs.shape[0] != targets.shape[0]:
                raise ValueError(f"(X, Y) must have the same number of examples, got "
                                 f"{inputs.shape[0]} inputs and {targets.shape[0]} targets")
            chunk = chunk_size or max(int(inputs.shape[0]), 1)
            data = list(zip(inputs.split(chunk), targets.split(chunk), strict=True))
        elif not isinstance(data, Iterable):
            raise TypeError(f"data must be a DataLoader, a re-iterable of (inputs, targets) "
                            f"batches or a tuple (X, Y) of tensors, got {type(data).__name__}")
        elif iter(data) is data:
            raise TypeError("data is a one-shot iterator (e.g. a generator), but the Hessian needs "
                            "a pass over the data for every product; pass a DataLoader, a list of "
                            "batches or a tuple (X, Y) of tensors")
        self.data = data
        self.device = torch.device(device)
        self.dtype = dtype

    def __iter__(self) -> Iterator[Batch]:
        for index, item in enumerate(self.data):
            inputs, targets, size = _unpack(item, index)
            if size == 0:
                continue
            yield Batch(_convert(inputs, self.device, self.dtype),
                        _convert(targets, self.device, self.dtype), size)

    def describe_randomness(self) -> list[str]:
        """Reasons why two passes over this data might differ (for the determinism check)."""
        reasons = []
        sampler = getattr(self.data, "sampler", None)
        if isinstance(sampler, torch.utils.data.RandomSampler) and getattr(
            self.data, "drop_last", False
        ):
            reasons.append("the DataLoader shuffles with drop_last=True, so each pass drops "
                           "different examples")
        dataset = getattr(self.data, "dataset", None)
        if any(hasattr(dataset, name) for name in ("transform", "transforms")) and (
            getattr(dataset, "transform", None) or getattr(dataset, "transforms", None)
        ):
            reasons.append("the dataset applies a transform (random augmentation changes the data "
                           "between passes)")
        return reasons


def _unpack(item: Any, index: int) -> tuple[Any, Any, int]:
    """``(inputs, targets, size)`` of one item of the data (a pair, a Batch or a dict)."""
    if isinstance(item, Batch):
        size = item.size
        if isinstance(size, torch.Tensor) and size.numel() == 1:
            size = int(size)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise TypeError(f"batch {index}: Batch.size must be a non-negative integer (the "
                            f"number of terms its mean loss averages), got {size!r}")
        return item.inputs, item.targets, size
    if isinstance(item, Mapping):
        inputs, targets = item, item.get("labels")
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        inputs, targets = item
    else:
        raise TypeError(f"batch {index} of data is not an (inputs, targets) pair "
                        f"(got {type(item).__name__}); wrap inputs and targets as a pair, or "
                        "yield Batch(inputs, targets, size) objects")
    size = _leading_size(targets) or _leading_size(inputs)
    if size is None:
        raise TypeError(f"batch {index}: cannot tell its size; inputs or targets must be "
                        "tensors with a batch dimension")
    return inputs, targets, size


def _is_tensor_pair(data: Any) -> bool:
    return (isinstance(data, tuple) and len(data) == 2
            and all(isinstance(item, torch.Tensor) for item in data))


class NonFiniteError(FloatingPointError):
    """A loss, gradient or Hessian-vector product came out NaN or infinite."""


def checked_loss(loss: Any, index: int) -> torch.Tensor:
    """``loss`` if it is a finite scalar tensor (a mean-reduced loss of batch ``index``).

    Raises:
        ValueError: not a scalar tensor (e.g. ``reduction='none'``).
        NonFiniteError: not finite.
    """
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar (mean-reduced) tensor, got {shape}; "
                         "use reduction='mean'")
    if not torch.isfinite(loss):
        raise NonFiniteError(f"the loss of batch {index} is {loss.item()} (not finite)")
    return loss


# ----------------------------------------------------------------- the mean-loss check
MEAN_CHECK_ROWS = 8  # rows of the first batch the mean-loss check runs on


def mean_check_tolerance(*dtypes: torch.dtype) -> float:
    """Relative tolerance of :func:`check_mean_loss` for losses computed in ``dtypes``:
    ``32 ε`` of the coarsest floating dtype, at least ``1e-3``, at most ``0.25``.

    A mean-reduced loss of the batch repeated twice equals the loss of the batch up to rounding
    (a model's kernels may add in another order for a longer batch: bfloat16 losses 2.34375 and
    2.32812 differ by 0.67%, under one ``ε = 2⁻⁷``); a sum doubles (relative change 1).

    >>> mean_check_tolerance(torch.float64), mean_check_tolerance(torch.bfloat16)
    (0.001, 0.25)
    """
    eps = max((torch.finfo(d).eps for d in dtypes if d.is_floating_point), default=0.0)
    return min(0.25, max(1e-3, 32 * eps))


def check_mean_loss(loss_fn: Callable[[Any, Any], Any], outputs_of: Callable[[Any], Any],
                    batch: Batch, loss: Any = None) -> None:
    """Raise when ``loss_fn`` is not a mean over the batch: the loss of the batch repeated twice
    (every tensor whose first dimension is the batch's, concatenated with itself) must equal the
    loss of the batch within :func:`mean_check_tolerance` of the dtypes involved (a mean does
    not change, a sum doubles). A loss that is not a finite scalar, and a model or loss that
    raises, are left to the passes that name them (:func:`checked_loss`).

    Args:
        loss_fn: ``loss_fn(outputs, targets)``.
        outputs_of: ``inputs ↦ outputs`` (the model, without a graph).
        batch: the batch (a few rows suffice).
        loss: ``loss_fn`` on ``batch`` if already computed.

    Raises:
        ValueError: the loss changes with the batch's length (e.g. ``reduction="sum"``).
    """
    rows = _leading_size(batch.targets) or _leading_size(batch.inputs)
    if rows is None:
        return
    try:  # an error here is raised, with its context, by the pass that meets it
        if loss is None:
            loss = loss_fn(outputs_of(batch.inputs), batch.targets)
        outputs = outputs_of(_repeat_rows(batch.inputs, rows))
        twice = loss_fn(outputs, _repeat_rows(batch.targets, rows))
    except Exception:
        return
    if not (_finite_scalar(loss) and _finite_scalar(twice)):
        return
    once, doubled = float(loss), float(twice)
    tol = mean_check_tolerance(loss.dtype, twice.dtype,
                               *(t.dtype for t in _floating_tensors(outputs)))
    if abs(once) > 1e-12 and abs(doubled / once - 1) > tol:
        raise ValueError(f"loss_fn must return the mean over the batch (reduction='mean'): "
                         f"the same batch repeated twice gives {doubled:.6g} instead of "
                         f"{once:.6g} (x{doubled / once:.3g}); a sum grows with the batch size")


def check_operator_loss(model: torch.nn.Module, loss_fn: Callable[[Any, Any], Any],
                        batches: Iterable[Batch], *states: Mapping[str, torch.Tensor]) -> None:
    """:func:`check_mean_loss` on the first :data:`MEAN_CHECK_ROWS` rows of the first batch,
    the model called in eval mode with the parameters and buffers of ``states`` (merged: an
    operator's snapshot; the model's own tensors and flags are left as they were), no graph.

    Raises:
        ValueError: ``loss_fn`` is not a mean over the batch (e.g. ``reduction="sum"``).
    """
    state = {name: t for mapping in states for name, t in mapping.items()}
    batch = next(iter(batches), None)
    if batch is None:
        return
    rows = _leading_size(batch.targets) or _leading_size(batch.inputs)
    keep = min(rows or 0, MEAN_CHECK_ROWS)
    if rows is not None and keep < rows:
        batch = Batch(_first_rows(batch.inputs, rows, keep), _first_rows(batch.targets, rows,
                                                                         keep), keep)

    def outputs_of(inputs: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, state, args, kwargs)

        with torch.no_grad(), _eval_mode(model):
            return call_model(forward, inputs)

    check_mean_loss(loss_fn, outputs_of, batch)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every submodule in eval mode; each one's own flag restored on exit."""
    saved = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in saved:
            module.training = flag


def _finite_scalar(loss: Any) -> bool:
    return isinstance(loss, torch.Tensor) and loss.ndim == 0 and math.isfinite(float(loss))


def _floating_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _floating_tensors(item)]
    return []


def _map_rows(obj: Any, rows: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor in ``obj`` whose first dimension is ``rows``."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.ndim > 0 and obj.shape[0] == rows else obj
    if isinstance(obj, Mapping):
        return {key: _map_rows(value, rows, fn) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_rows(value, rows, fn) for value in obj)
    return obj


def _repeat_rows(obj: Any, rows: int) -> Any:
    """The batch twice: every tensor of ``rows`` rows concatenated with itself."""
    return _map_rows(obj, rows, lambda t: torch.cat([t, t]))


def _first_rows(obj: Any, rows: int, keep: int) -> Any:
    return _map_rows(obj, rows, lambda t: t[:keep])
