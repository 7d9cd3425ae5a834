"""The base of every curvature operator over a whole data set: snapshot, data loop, weighting.

For a data set split into batches :math:`B_j` of sizes :math:`n_j` (:math:`N = \\sum_j n_j`) and a
mean-reduced loss :math:`\\ell_j(\\theta)` on each batch, the loss measured is

.. math::  L(\\theta) = \\frac{1}{N} \\sum_j n_j\\, \\ell_j(\\theta),

exactly the mean over all examples, and an operator over the data set is the same weighted mean
of per-batch matrices :math:`A_j` (the Hessian :math:`\\nabla^2 \\ell_j`, the Gauss–Newton
matrix :math:`G_j`, a Fisher matrix :math:`F_j`, …):

.. math::  A\\, V = \\frac{1}{N} \\sum_j n_j\\, A_j V.

:class:`DataSetOperator` owns everything but :math:`A_j V`: the snapshot of the model (copies of
the measured parameters, ``leaves``; of the other parameters and the buffers), the pass over the
data, the weighting by :math:`n_j`, the sum over ranks (:meth:`DataSetOperator.sum_over_data`,
the one place where sums over the data meet), the finiteness checks, the mean loss and gradient,
and the determinism check. An operator supplies only
:meth:`DataSetOperator.batch_product` (curvlinops' ``_matmat_batch``). The public pieces a
product may use (``leaves``, ``layout``, ``batch_loss``, ``functional_loss``, ``batch_outputs``,
``output_loss``) are what the H·V strategies (:mod:`tinysubspace.curvature.hvp`) and the
linearised products (:mod:`tinysubspace.curvature.linearized`) see.

A batch product may be approximate (finite differences): a
:class:`~tinysubspace.curvature.finite_difference.ProductEstimate`, whose per-column error is
weighted and summed like the product (:attr:`DataSetOperator.last_product_error`).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from tinysubspace.curvature import collectives as tsdist
from tinysubspace.curvature.data import (
    Batch,
    BatchSource,
    NonFiniteError,
    call_model,
    check_operator_loss,
    checked_loss,
    chunk_size_argument,
)
from tinysubspace.curvature.hvp import (
    ProductEstimate,
    accumulation_dtype,
    check_functional_mode,
    hvp_strategy,
)
from tinysubspace.curvature.layout import ParameterLayout, select_parameters
from tinysubspace.curvature.snapshot import Bound, module_mode, snapshot
from tinysubspace.operator import SymmetricOperator

__all__ = ["DataSetOperator", "LossFn", "NonDeterministicError", "module_mode"]

LossFn = Callable[[Any, Any], torch.Tensor]


class NonDeterministicError(RuntimeError):
    """Two evaluations of the same quantity at the same point disagreed."""


class DataSetOperator(SymmetricOperator):
    """A symmetric operator ``(1/N) Σ_j n_j A_j`` over a data set, at a snapshot of the model.

    Parameters and buffers are copied when the operator is built, so later training of ``model``
    does not change it, and nothing of ``model`` is modified (its train/eval flags are set only
    during a pass and restored afterwards). Subclasses implement :meth:`batch_product`.

    Args:
        model: any ``nn.Module``; called as ``model(inputs)`` (a tuple of inputs is spread, a dict
            passed as keywords).
        loss_fn: ``loss_fn(outputs, targets)`` returning the *mean* loss of a batch (a scalar).
        data: a ``DataLoader``, a re-iterable of ``(inputs, targets)`` batches, or ``(X, Y)``.
        params: ``None`` (every parameter that requires grad), or names / parameter tensors: the
            operator then acts on that subspace only.
        dtype: dtype of the measurement (the model itself is not touched); ``None``: the
            parameters' dtype.
        device: device of the measurement; ``None``: the parameters' device.
        mode: ``"eval"`` (default: dropout off, batch norm on running statistics) or ``"train"``.
        chunk_size: how many examples of an ``(X, Y)`` tuple go into one pass (``None``: one
            chunk); ``batch_size`` is its old name (both: ``TypeError``).
        distributed: ``data`` is this process's shard and sums over the data are all-reduced
            (:mod:`tinysubspace.curvature.collectives`); ``None``: on iff ``torch.distributed``
            runs more than one process. Every rank must then call each method together.
        hvp_method: how a Hessian-vector product ``∇²ℓ_j V`` is computed where the operator needs
            one (:mod:`tinysubspace.curvature.hvp`).

    Raises:
        ValueError: bad ``mode`` or ``hvp_method``, an empty data set, a bad parameter selection.
        TypeError: ``data`` of an unusable kind.
    """

    product_name = "product"
    """What a product is called in error messages (e.g. ``"Hessian-vector product"``)."""

    uses_hvp = False
    """Whether products use ``hvp_method`` (then :attr:`product_error` is its error floor)."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, data: Any,
                 params: Iterable[str | torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 mode: str = "eval", chunk_size: int | None = None,
                 distributed: bool | None = None, hvp_method: str = "auto", *,
                 batch_size: int | None = None) -> None:
        chunk_size_argument(chunk_size, batch_size)  # both names: refused before any work
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        hvp_strategy(hvp_method, torch.device(device or "cpu"), mode)  # validate early
        check_functional_mode(model, hvp_method, mode)
        if distributed and not (torch.distributed.is_available()
                                and torch.distributed.is_initialized()):
            raise ValueError("distributed=True needs torch.distributed initialised "
                             "(torch.distributed.init_process_group, or run under torchrun)")
        self.distributed = tsdist.is_distributed() if distributed is None else bool(distributed)
        chosen = select_parameters(model, params)
        dtype = dtype or chosen[0][1].dtype
        device = torch.device(device) if device is not None else chosen[0][1].device
        self.model, self.loss_fn, self.mode, self.hvp_method = model, loss_fn, mode, hvp_method
        self.layout = ParameterLayout(tuple(name for name, _ in chosen),
                                      tuple(p.shape for _, p in chosen))
        self.batches = BatchSource(data, device=device, dtype=dtype, chunk_size=chunk_size,
                                   batch_size=batch_size)
        super().__init__(self.layout.numel, dtype, device)
        self._leaves = tuple(p.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
                             for _, p in chosen)
        measured = set(self.layout.names)
        self._fixed = {name: snapshot(t, device, dtype) for name, t in model.named_parameters()
                       if name not in measured}
        self._buffers = {name: snapshot(t, device, dtype) for name, t in model.named_buffers()}
        self._fresh = False  # True: every pass recomputes everything (check_deterministic)
        self._strategies: dict[tuple[str, str, str], Any] = {}  # resolved per (method, device)
        self._last_error, self._largest_error = 0.0, 0.0
        self._num_examples = self._count_examples()
        check_operator_loss(model, loss_fn, self.batches, self._fixed, self._buffers, dict(
            zip(self.layout.names, self._leaves, strict=True)))  # loss_fn is a mean (data.py)

    # ------------------------------------------------------------- the snapshot
    @property
    def num_examples(self) -> int:
        """``N``, the number of examples in the data set (all shards together)."""
        return self._num_examples

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        """The measured parameters' copies (``requires_grad``), in ``layout`` order: the point
        ``θ``. Differentiate through them; never modify them in place."""
        return self._leaves

    @property
    def parameters_vector(self) -> torch.Tensor:
        """The point ``θ`` (flat, ``(p,)``) at which this operator measures."""
        return torch.cat([leaf.detach().reshape(-1) for leaf in self._leaves])

    # ------------------------------------------------------- what a batch sees
    @abc.abstractmethod
    def batch_product(self, batch: Batch, index: int,
                      block: torch.Tensor) -> torch.Tensor | ProductEstimate:
        """``A_j V`` for batch ``index`` (``(p, b)``), or an estimate with its error bound."""

    def batch_loss(self, batch: Batch, index: int,
                   leaves: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """``ℓ_j`` at the measured parameters (or at ``leaves``, the same shapes), with its graph
        when grad mode is on; checked scalar and finite.

        Raises:
            ValueError: the loss is not a scalar, or (grad mode on) depends on no measured
                parameter.
            NonFiniteError: the loss is not finite.
        """
        loss = self.output_loss(self._forward(batch, leaves), batch, index)
        if torch.is_grad_enabled() and not loss.requires_grad:
            raise ValueError(f"the loss does not depend on any measured parameter "
                             f"({', '.join(self.layout.names)}): the forward pass does not use "
                             "them, so their Hessian is zero; pass params= naming parameters the "
                             "model's forward uses (or None for every trainable one)")
        return loss

    def functional_loss(self, batch: Batch) -> Callable[..., torch.Tensor]:
        """``ℓ_j`` as a function of the measured parameters (one tensor each, ``layout`` order),
        for ``torch.func`` transforms (buffers are read, never written)."""
        names = self.layout.names

        def loss_of(*leaves: torch.Tensor) -> torch.Tensor:
            state = {**self._fixed, **self._buffers, **dict(zip(names, leaves, strict=True))}
            with module_mode(self.model, train=self.mode == "train"):
                outputs = call_model(Bound(self.model, state), batch.inputs)
            return self.loss_fn(outputs, batch.targets)

        return loss_of

    def batch_outputs(self, batch: Batch,
                      leaves: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The model's outputs ``z`` on ``batch`` (at ``leaves``; default the measured point),
        with their graph in grad mode.

        Raises:
            TypeError: the model does not return a tensor with a batch dimension.
        """
        outputs = self._forward(batch, leaves)
        if not isinstance(outputs, torch.Tensor) or outputs.ndim == 0:
            kind = type(outputs).__name__ if not isinstance(outputs, torch.Tensor) else "a scalar"
            raise TypeError(f"{type(self).__name__} needs a model that returns a tensor with a "
                            f"batch dimension, got {kind}")
        return outputs

    def output_loss(self, outputs: Any, batch: Batch, index: int,
                    targets: Any = None) -> torch.Tensor:
        """``loss_fn(outputs, targets)`` (default: the batch's targets), checked to be a finite
        scalar (:func:`~tinysubspace.curvature.data.checked_loss`)."""
        return checked_loss(self.loss_fn(outputs, batch.targets if targets is None else targets),
                            index)

    def batch_gradient(self, batch: Batch,
                       index: int) -> tuple[torch.Tensor, Sequence[torch.Tensor | None]]:
        """``(ℓ_j, ∇ℓ_j)`` of one batch, detached (``None``: a parameter the loss ignores)."""
        with torch.enable_grad():
            loss = self.batch_loss(batch, index)
            grads = torch.autograd.grad(loss, self._leaves, allow_unused=True)
        return loss.detach(), grads

    # ----------------------------------------------------------- over the data
    def sum_over_data(self, local_sum: Callable[[], torch.Tensor],
                      **agree: torch.Tensor) -> torch.Tensor:
        """The one place where sums over the data meet: ``local_sum()`` in one process; under
        ``distributed`` its all-reduce over ranks, which must all hold the same parameters and
        ``agree`` tensors (an exception on any rank is raised on every rank)."""
        if not self.distributed:
            return local_sum()
        return tsdist.sum_across_ranks(
            local_sum, self.device, agree={"parameters": self.parameters_vector, **agree},
            propagate=(NonFiniteError, ValueError, TypeError))

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """Mean loss ``L`` and its gradient ``(p,)`` over the whole data set, in one pass.

        Raises:
            NonFiniteError: the loss or gradient of a batch is not finite (the batch and
                parameter are named).
        """
        def local_sums() -> torch.Tensor:  # [Σ n_j ℓ_j, Σ n_j ∇ℓ_j] over this process's data
            total = torch.zeros(1 + self.shape[0], dtype=accumulation_dtype(self.dtype),
                                device=self.device)  # float32 sums for a half-precision model
            for index, batch in self._local_batches():
                loss, grads = self.batch_gradient(batch, index)
                flat = self.layout.flatten(grads, like=total[1:])
                self._check_finite(flat, "gradient", index)
                total[0] += batch.size * loss
                total[1:] += batch.size * flat
            return total

        total = self.sum_over_data(local_sums)
        return float(total[0] / self._num_examples), (total[1:] / self._num_examples).to(self.dtype)

    # ------------------------------------------------------------ product error
    @property
    def last_product_error(self) -> float:
        """Estimated relative error of the last product (largest over its columns): the
        weighted sum of the batches' error bounds over the column's norm; 0 for exact ones."""
        return self._last_error

    @property
    def product_error(self) -> float:
        """The relative error floor of this operator's products, for a solver to stop at: 0 for
        exact products; for an approximate ``hvp_method`` the larger of its a-priori floor
        (:meth:`~tinysubspace.curvature.finite_difference.FiniteDifference.error_floor`) and the
        largest :attr:`last_product_error` seen so far, at most 0.5 (an estimate of 100 % or
        more, seen on random vectors of a bfloat16 model, would make every solve refuse the
        operator)."""
        if not self.uses_hvp:
            return 0.0
        floor = getattr(self.hvp_strategy(), "error_floor", lambda dtype: 0.0)(self.dtype)
        return min(max(float(floor), self._largest_error), 0.5)

    def hvp_strategy(self) -> Any:
        """The H·V strategy ``hvp_method`` names here (``auto`` resolved for this operator's
        device and mode; one object per operator, so that ``auto``'s fallback is its own)."""
        key = (self.hvp_method, str(self.device), self.mode)
        if key not in self._strategies:
            self._strategies[key] = hvp_strategy(self.hvp_method, self.device, self.mode)
        return self._strategies[key]

    # ------------------------------------------------------------ determinism
    def check_deterministic(self, seed: int = 0, rtol: float | None = None) -> None:
        """Check that two gradients and two products with the same vector agree.

        Args:
            seed: seed of the random test vector.
            rtol: relative tolerance (default ``1000 eps`` of the dtype).

        Raises:
            NonDeterministicError: they differ; the message names the likely culprits (dropout or
                batch norm in train mode, random augmentation, shuffling with ``drop_last``).
        """
        rtol = rtol if rtol is not None else 1000 * torch.finfo(self.dtype).eps
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(self.shape[0], generator=gen, dtype=self.dtype).to(self.device)
        with self._fresh_passes():  # kept state would hide randomness in the data or model
            pairs = [("gradient", self.loss_and_gradient()[1], self.loss_and_gradient()[1]),
                     (self.product_name, self @ v, self @ v)]
        for what, first, second in pairs:
            gap = float((first - second).norm() / first.norm().clamp_min(1e-300))
            if gap > rtol:
                raise NonDeterministicError(
                    f"two evaluations of the {what} at the same point differ by {gap:.2e} "
                    f"(relative, tolerance {rtol:.1e}); likely causes: "
                    + "; ".join(self._randomness_suspects()))

    # ------------------------------------ kept graphs (only a Hessian product keeps any)
    def release_graphs(self) -> None:
        """Free kept gradient graphs (none here)."""

    retained_graph_bytes = property(lambda self: 0, doc="Bytes of kept gradient graphs (none).")
    retained_graph_chunks = property(lambda self: 0, doc="Chunks with a kept graph (none).")

    # ---------------------------------------------------------------- internals
    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        def local_sum() -> torch.Tensor:  # [Σ n_j A_j V ; Σ n_j err_j] over this process's data
            total = torch.zeros(block.shape[0] + 1, block.shape[1], device=block.device,
                                dtype=accumulation_dtype(block.dtype))  # float32 for half
            for index, batch in self._local_batches():
                product = self.batch_product(batch, index, block)
                if isinstance(product, ProductEstimate):
                    total[-1] += batch.size * product.error
                    product = product.value
                total[:-1] += batch.size * product
            return total

        total = self.sum_over_data(local_sum, block=block) / self._num_examples
        result, error = total[:-1], total[-1]
        self._check_finite(result, self.product_name, None)
        relative = error / result.norm(dim=0).clamp_min(torch.finfo(self.dtype).tiny)
        self._last_error = float(relative.max())
        self._largest_error = max(self._largest_error, self._last_error)
        return result.to(self.dtype)

    def _local_batches(self) -> Iterator[tuple[int, Batch]]:
        """``(index, batch)`` for each chunk of this process's data (one pass)."""
        yield from enumerate(self.batches)

    def _forward(self, batch: Batch, leaves: Sequence[torch.Tensor] | None) -> Any:
        """The model's raw outputs on ``batch`` at ``leaves`` (default the measured point)."""
        leaves = self._leaves if leaves is None else leaves
        state = {**self._fixed, **self._buffers,
                 **dict(zip(self.layout.names, leaves, strict=True))}
        if self.mode == "train":  # running statistics update our copies, never the model's
            state.update({name: b.clone() for name, b in self._buffers.items()})
        with module_mode(self.model, train=self.mode == "train"):
            return call_model(Bound(self.model, state), batch.inputs)

    @contextlib.contextmanager
    def _fresh_passes(self) -> Iterator[None]:
        """Within: every pass recomputes (nothing kept is used or added)."""
        saved, self._fresh = self._fresh, True
        try:
            yield
        finally:
            self._fresh = saved

    def _check_finite(self, flat: torch.Tensor, what: str, batch: int | None) -> None:
        bad = ~torch.isfinite(flat)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            where = f" of batch {batch}" if batch is not None else ""
            raise NonFiniteError(f"the {what}{where} is not finite in parameter "
                                 f"{self.layout.owner(row)!r}")

    def _count_examples(self) -> int:
        def local_count() -> torch.Tensor:
            return torch.tensor([float(sum(batch.size for batch in self.batches))],
                                dtype=torch.float64, device=self.device)

        total = int(self.sum_over_data(local_count))
        if total == 0:
            raise ValueError("the data set is empty: the mean loss and its Hessian are undefined")
        return total

    def _randomness_suspects(self) -> list[str]:
        suspects = list(self.batches.describe_randomness())
        if self.mode == "train":
            kinds = {type(m).__name__ for m in self.model.modules()
                     if isinstance(m, (torch.nn.modules.dropout._DropoutNd,
                                       torch.nn.modules.batchnorm._BatchNorm))}
            if kinds:
                suspects.append(f"mode='train' with {', '.join(sorted(kinds))} (use mode='eval')")
        return suspects or ["randomness inside the model or loss (e.g. dropout implemented with "
                            "torch.rand), or a data set that changes between passes"]
